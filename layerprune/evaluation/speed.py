"""What pruning buys at inference: `benchmark` measures, for each model and with the same prompts
and settings, parameters and on-disk size, peak memory while generating, prefill throughput,
decode throughput and time to first token, each as the median (and spread) of several repeats
after a warm-up (`inference_speed` for a model already loaded).
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

from layerprune.errors import LayerpruneError
from layerprune.io.destinations import check_destination, claimed, die_with_parent, staged
from layerprune.plots import inference_bars
from layerprune.runtime.devices import Placement, plan_placement
from layerprune.runtime.models import gguf_file, load_model, model_inputs, resolve_model


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
        "import json; from layerprune.evaluation.speed import InferenceSettings, Placement, benchmark_one; "
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
