"""What pruning buys at inference, and pruned models in a quantized, ready-to-serve form.

`benchmark` measures, for each model and with the same prompts and settings: parameters and
on-disk size, peak memory while generating, prefill throughput, decode throughput and time to
first token, each as the median (and spread) of several repeats after a warm-up.

`export_quantized` writes a checkpoint quantized by bitsandbytes (NF4 or int8) that
transformers loads directly, through its bitsandbytes integration; `then_quantize` does the same
at the end of a prune or a heal (`--quantize`).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import LayerpruneError

QUANTIZATION_SCHEMES = ("nf4", "int8")


@dataclass(frozen=True)
class InferenceSettings:
    prompt_tokens: int = 128
    new_tokens: int = 32
    batch_size: int = 1
    repeats: int = 3
    warmup: int = 1

    def __post_init__(self) -> None:
        if min(self.prompt_tokens, self.new_tokens, self.batch_size, self.repeats) < 1 or self.warmup < 0:
            raise LayerpruneError("prompt and generation lengths, batch size and repeats must be at least 1")


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.suffix == ".safetensors")


def _median_spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(model: Any, settings: InferenceSettings) -> dict[str, Any]:
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


def benchmark_one(model: str | Path, settings: InferenceSettings) -> dict[str, Any]:
    """Every figure for one model argument (run it in its own process for a clean peak memory)."""
    import torch

    from .models import load_model, resolve_model

    path = resolve_model(model)
    loaded, _ = load_model(path, device="cuda" if torch.cuda.is_available() else "cpu")
    figures = measure(loaded, settings)
    return {
        "model": str(model),
        "path": str(path),
        "parameters": loaded.num_parameters(),
        "num_layers": loaded.config.get_text_config().num_hidden_layers,
        "disk_bytes": _folder_bytes(path),
        "peak_memory_mb": (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else _peak_rss_mb()),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        **figures,
    }


def benchmark(models: list[str | Path], settings: InferenceSettings | None = None) -> list[dict[str, Any]]:
    """Benchmark several models side by side, each in a fresh subprocess so peak memory is its own."""
    import subprocess
    import sys

    from .models import resolve_model

    settings = settings or InferenceSettings()
    for model in models:
        resolve_model(model)  # refuse a missing model before spending time on the others
    results = []
    for model in models:
        code = (
            "import json, sys; from layerprune.deployment import InferenceSettings, benchmark_one; "
            f"print(json.dumps(benchmark_one({str(model)!r}, InferenceSettings(**{asdict(settings)!r}))))"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
        if done.returncode:
            raise LayerpruneError(f"benchmark of {model} failed: {done.stderr.strip().splitlines()[-1]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def check_quantization(scheme: str) -> None:
    """Refuse an unknown scheme, or a machine bitsandbytes cannot run on, before any long work."""
    from transformers.utils import is_bitsandbytes_available

    if scheme not in QUANTIZATION_SCHEMES:
        raise LayerpruneError(f"unknown quantization {scheme!r}; choose one of {', '.join(QUANTIZATION_SCHEMES)}")
    if not is_bitsandbytes_available():
        raise LayerpruneError(
            "quantized export needs bitsandbytes, which cannot run here; it runs on CUDA GPUs (any recent NVIDIA "
            "card) and on x86-64 or arm64 CPUs with bitsandbytes>=0.45"
        )


def then_quantize(out: str | Path, scheme: str, make: Callable[[Path], Path], overwrite: bool = False) -> Path:
    """Run `make` (a prune or a heal) into a staging folder beside `out`, then write its quantized
    form to `out` (`prune/heal --quantize`). The same command rerun resumes `make` there."""
    from .surgery import RECORD_NAME, check_not_existing

    check_quantization(scheme)
    out = Path(out)
    check_not_existing(out, overwrite)
    staging = out.parent / f".{out.name}.unquantized"
    shutil.rmtree(staging, ignore_errors=True)  # left by an earlier run; a heal's resumable work is kept apart
    try:
        export_quantized(make(staging), out, scheme, overwrite=overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    record = json.loads((out / RECORD_NAME).read_text())
    del record["quantization"]["source"]  # the staging folder, now gone: the record's history says the rest
    (out / RECORD_NAME).write_text(json.dumps(record, indent=1) + "\n")
    return out


def export_quantized(model: str | Path, out: str | Path, scheme: str, overwrite: bool = False) -> Path:
    """Write `model` quantized with bitsandbytes (`nf4` or `int8`) as a checkpoint transformers loads directly."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from .checkpoint import staged_folder
    from .models import resolve_model
    from .surgery import RECORD_NAME, check_destination

    check_quantization(scheme)
    out = Path(out)
    src = resolve_model(model)
    check_destination(src, out, overwrite)
    quantization = (
        BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
        )
        if scheme == "nf4"
        else BitsAndBytesConfig(load_in_8bit=True)
    )
    device_map = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
    loaded = AutoModelForCausalLM.from_pretrained(str(src), quantization_config=quantization, device_map=device_map)
    with staged_folder(out) as tmp:
        loaded.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(src)).save_pretrained(tmp)
        previous = src / RECORD_NAME
        record = json.loads(previous.read_text()) if previous.is_file() else {"source": str(model)}
        record["quantization"] = {"scheme": scheme, "backend": "bitsandbytes", "source": str(src)}
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=1) + "\n")
    return out
