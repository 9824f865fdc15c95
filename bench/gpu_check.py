"""The GPU check: every command on a machine with one GPU, timed, in under 8 minutes.

On the lent GPU machine (no network; torch, transformers, accelerate, peft, safetensors are there):

    pip install --no-deps -e . && python bench/gpu_check.py            # OUT=dir keeps gpu_check.json

Here, to check the script itself before a GPU is lent (a small model, the same steps):

    python bench/gpu_check.py --device cpu --size small

Models are built from configs with random weights (nothing is downloaded): a tiny Llama and a
tiny Gemma 3 for GPU-against-CPU agreement, and a Llama-3-8B shape (or, with --size small, a
small Llama) for the timings. Calibration and held-out text is generated. Each step prints one
JSON line (seconds, peak GPU memory, tokens/s and its own figures) and goes on after a failure;
the summary goes to $OUT/gpu_check.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS: list[dict[str, Any]] = []
SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=4096, max_position_embeddings=1024),
}  # fmt: skip
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=272, max_position_embeddings=512)  # fmt: skip


def step(name: str, function: Callable[[], dict[str, Any]], device: str) -> dict[str, Any]:
    """Run one step: its figures, wall time and peak GPU memory, or its error; printed at once."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        figures = function()
        error = None
    except Exception as err:  # record and go on: one failure must not hide the other figures
        figures, error = {}, f"{type(err).__name__}: {err}"
        traceback.print_exc()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    row = {"step": name, "seconds": round(time.perf_counter() - started, 2), **figures}
    if device.startswith("cuda"):
        row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    if error:
        row["error"] = error
    RESULTS.append(row)
    print(json.dumps(row), flush=True)
    return row


def tokenizer() -> Any:
    """A byte-level tokenizer built in code (3 specials + 256 bytes): any vocabulary above 259 works."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {
        "<pad>": 0,
        "<s>": 1,
        "</s>": 2,
        **{c: 3 + i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
    }
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def build(model_type: str, shape: dict, folder: Path, device: str, dtype: torch.dtype) -> tuple[Path, int]:
    """A random-weight model from a config, saved with the tokenizer; returns the folder and bytes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"sliding_window": 8, "sliding_window_pattern": 3} if model_type == "gemma3_text" else {}
    config = AutoConfig.for_model(model_type, pad_token_id=0, bos_token_id=1, eos_token_id=2, **shape, **extra)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if shape is TINY:  # a wider init so that tiny layers differ (as in the tests)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.dim() > 1:
                    parameter.normal_(0, 0.2)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(folder, max_shard_size="5GB")
    tokenizer().save_pretrained(folder)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return folder, size


WORDS = (  # fmt: skip
    "the",
    "model",
    "layer",
    "prune",
    "heal",
    "residual",
    "stream",
    "angle",
    "block",
    "token",
    "loss",
    "data",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "river",
    "mountain",
    "city",
    "music",
    "light",
    "water",
    "story",
    "time",
    "people",
    "world",
    "work",
    "day",
)


def text(path: Path, documents: int = 400) -> Path:
    """Generated English-like documents (seeded), separated by blank lines."""
    rng = random.Random(0)
    lengths = [rng.randint(150, 400) for _ in range(documents)]
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(n)) for n in lengths))
    return path


def max_diff(first: dict, second: dict) -> float:
    """The largest difference between two angular tables."""
    return max(abs(a - b) for n in first for a, b in zip(first[n], second[n], strict=True))


def agreement(root: Path, data: Path, device: str) -> dict[str, Any]:
    """Tiny Llama and Gemma 3: the analysis (in memory and streamed), the loss search, held-out
    loss and a linear repair (for Gemma 3, the map fitted through its norm by Adam on the device)
    on the device, against the CPU (fp32 both, and bf16 on the device)."""
    from layerprune import Calibration, analyze
    from layerprune.evaluation.harness import heldout_loss
    from layerprune.recipes.pipeline import prune
    from layerprune.runtime.devices import Placement
    from layerprune.runtime.models import load_model

    figures: dict[str, Any] = {}
    calibration = Calibration(data=str(data), samples=16, seq_len=64, batch_size=4)
    for family in ("llama", "gemma3_text"):
        folder, _ = build(family, TINY, root / f"tiny-{family}", "cpu", torch.float32)
        cpu = analyze(folder, calibration, placement=Placement("cpu"), progress=False)
        for dtype in ("float32", "bfloat16"):
            placement = Placement(device, dtype)
            gpu = analyze(folder, calibration, placement=placement, progress=False)
            figures[f"{family}_{dtype}_angular_max_diff"] = round(max_diff(cpu.angular, gpu.angular), 6)
            figures[f"{family}_{dtype}_same_best"] = cpu.best == gpu.best
            streamed = analyze(folder, calibration, placement=placement, offload=True, progress=False)
            figures[f"{family}_{dtype}_streamed_max_diff"] = round(max_diff(gpu.angular, streamed.angular), 6)
        losses = {}
        for where in dict.fromkeys(("cpu", device)):
            model, tok = load_model(folder, Placement(where, "float32"))
            losses[where] = heldout_loss(model, tok, str(data), 16, 64, 4)["loss"]
            out = root / f"loss-{family}-{where.replace(':', '')}"
            settings = dict(data=str(data), samples=16, seq_len=64, device=where, dtype="float32", progress=False)
            figures[f"{family}_loss_search_{where}"] = prune(folder, out, n=2, strategy="loss", **settings).removed
            repaired = prune(folder, Path(f"{out}-repaired"), layers=[2, 3], repair="linear", **settings)
            figures[f"{family}_repair_residual_{where}"] = repaired.record["repair"]["blocks"][0]["fit_residual"]
        figures[f"{family}_heldout_loss_diff"] = round(abs(losses["cpu"] - losses[device]), 6)
    return figures


FSDP_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_processes: 1
num_machines: 1
machine_rank: 0
mixed_precision: bf16
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_cpu_ram_efficient_loading: true
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_reshard_after_forward: true
"""
FSDP_HEAL = """\
import sys
import layerprune.healing.lora as healing
healing.loss_curves = lambda *a, **k: None  # matplotlib is not on the GPU machine
real = healing._trainer
def trainer(*args, **kwargs):
    made = real(*args, **kwargs)
    print("FSDP enabled:", made.is_fsdp_enabled, flush=True)
    return made
healing._trainer = trainer
from layerprune.cli import main
sys.argv = ["layerprune", *sys.argv[1:]]
main()
"""


def fsdp_heal(root: Path, data: Path) -> dict[str, Any]:
    """Two heal steps of the pruned model under FSDP: no device map, the weights placed by FSDP."""
    import subprocess

    (root / "fsdp.yaml").write_text(FSDP_CONFIG)
    (root / "fsdp_heal.py").write_text(FSDP_HEAL)
    command = ["accelerate", "launch", "--config_file", str(root / "fsdp.yaml"), str(root / "fsdp_heal.py"), "heal",
               str(root / "pruned"), "--out", str(root / "fsdp-healed"), "--no-quant", "--steps", "2", "--batch-size",
               "4", "--grad-accum", "1", "--seq-len", "256", "--data", str(data), "--save-every", "1000"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-1500:])
    return {"fsdp_enabled": "FSDP enabled: True" in done.stdout, "wrote": (root / "fsdp-healed").is_dir()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=sorted(SHAPES), default="8b")
    parser.add_argument(
        "--skip", default="", help="steps to skip, comma-separated: agreement, stream, heal, bench, fsdp"
    )
    args = parser.parse_args()
    from layerprune import Calibration, HealConfig, heal, prune
    from layerprune.evaluation.harness import heldout_loss
    from layerprune.evaluation.speed import InferenceSettings, benchmark
    from layerprune.measure.analysis import layer_distances
    from layerprune.measure.streaming import layer_distances_streamed
    from layerprune.runtime.devices import Placement, Plan
    from layerprune.runtime.models import load_model

    device, dtype, skip = args.device, "bfloat16", set(filter(None, args.skip.split(",")))
    root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    data = text(root / "text.txt")
    calibration = Calibration(data=str(data), samples=32, seq_len=256, batch_size=8)
    facts: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        facts |= {"gpu": torch.cuda.get_device_name(0), "gpu_gib": round(torch.cuda.mem_get_info(0)[1] / 2**30, 1)}
    step("machine", lambda: facts, device)
    if "agreement" not in skip:
        step("agreement (tiny models, device against CPU)", lambda: agreement(root, data, device), device)
    shape = SHAPES[args.size]
    big, size = build("llama", shape, root / "big", device, torch.bfloat16)
    step(f"build {args.size} (random weights, {dtype})", lambda: {"gib": round(size / 2**30, 2)}, device)
    state: dict[str, Any] = {}
    state["model"], tok = load_model(big, Placement(device, dtype))
    batches = calibration.batches(tok)

    def plain_forward() -> dict[str, Any]:
        with torch.inference_mode():
            for batch in batches:
                inputs = {k: v.to(device) for k, v in batch.items()}
                state["model"](**inputs, output_hidden_states=True, use_cache=False)
        return {}

    def in_memory() -> dict[str, Any]:
        state["angular"], _ = layer_distances(state["model"], batches, progress=False)
        return {"best_block_n4": min(range(len(state["angular"][4])), key=state["angular"][4].__getitem__)}

    floor = step("plain forward with output_hidden_states (the floor)", plain_forward, device)
    analysis = step("analyze in memory", in_memory, device)
    analysis["tokens_per_s"] = round(calibration.samples * calibration.seq_len / analysis["seconds"])
    analysis["ratio_to_floor"] = round(analysis["seconds"] / floor["seconds"], 3)  # goal: at most 1.1
    del state["model"]
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    def disk_read() -> dict[str, Any]:
        dropped = os.system("sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null") == 0
        started = time.perf_counter()
        for shard in big.glob("*.safetensors"):
            with open(shard, "rb") as handle:
                while handle.read(64 * 2**20):
                    pass
        state["read_s"] = time.perf_counter() - started
        return {"page_cache_dropped": dropped, "read_gib_per_s": round(size / 2**30 / state["read_s"], 2)}

    def streamed() -> dict[str, Any]:
        os.system("sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null")
        budget = size / 4  # a quarter of the model: it cannot sit on the device whole under this cap
        angular, _ = layer_distances_streamed(big, batches, budget, Plan(device, dtype), progress=False)
        return {
            "budget_gib": round(budget / 2**30, 2),
            "max_diff_to_in_memory": round(max_diff(angular, state["angular"]), 5),
        }

    if "stream" not in skip:
        step("disk read throughput", disk_read, device)
        stream = step("analyze streamed under a memory cap of a quarter of the model", streamed, device)
        bound = max(state.get("read_s", 0.0), analysis["seconds"])
        stream["ratio_to_disk_or_compute_bound"] = round(stream["seconds"] / bound, 3)  # goal: at most 1.3

    def loss_search() -> dict[str, Any]:
        chosen = prune(big, root / "loss", n=4, strategy="loss", data=str(data), samples=8, seq_len=128,
                       device=device, dtype=dtype, progress=False)  # fmt: skip
        return {"removed": chosen.removed, "forward_passes": round(chosen.record["selection"]["forward_passes"], 2)}

    def loss() -> dict[str, Any]:
        model, tokenizer_ = load_model(big, Placement(device, dtype))
        started = time.perf_counter()
        result = heldout_loss(model, tokenizer_, str(data), 64, 256, 8)
        return {
            "loss": round(result["loss"], 4),
            "tokens_per_s": round(result["tokens"] / (time.perf_counter() - started)),
        }

    def healing() -> dict[str, Any]:
        import layerprune.healing.lora

        layerprune.healing.lora.loss_curves = lambda *a, **k: None  # matplotlib is not on the GPU machine
        config = HealConfig(steps=2, quant=False, batch_size=4, grad_accum=1, seq_len=256, data=str(data),
                            save_every=1000, eval_every=1000, validation_sequences=4)  # fmt: skip
        record = heal(root / "pruned", root / "healed", config).healing
        return {k: record[k] for k in ("tokens_per_second", "validation_loss_before", "validation_loss_after")}

    def bench() -> dict[str, Any]:
        settings = InferenceSettings(prompt_tokens=128, new_tokens=32, repeats=3)
        rows = benchmark([big, root / "pruned"], settings, Placement(device))
        keep = ("num_layers", "device", "dtype", "peak_memory_mb")
        return {
            "models": [{k: r[k] for k in keep} | {"decode_tok_s": r["decode_tokens_per_s"]["median"]} for r in rows]
        }

    def closeness_and_sensitivity() -> dict[str, Any]:
        from layerprune.cut.surgery import pruned_in_place
        from layerprune.evaluation.harness import EvalConfig, closeness, logits_of
        from layerprune.recipes.sensitivity import sensitivity

        model, tokenizer_ = load_model(big, Placement(device, dtype))
        last = model.config.num_hidden_layers - 1
        full = logits_of(model)

        def pruned(batch: dict) -> Any:
            with pruned_in_place(model, list(range(last - 4, last))):
                return full(batch)

        config = EvalConfig(tasks=("kld",), loss_data=str(data), limit=32, seq_len=256, batch_size=8)
        started = time.perf_counter()
        kld = closeness(pruned, full, tokenizer_, model.config.vocab_size, config)
        kld_seconds = time.perf_counter() - started
        mapped = sensitivity(model, tokenizer_, EvalConfig(tasks=("loss",), loss_data=str(data), limit=16, seq_len=128,
                                                           batch_size=8))  # fmt: skip
        return {"kld_deepest_4": round(kld["kld"], 4), "top1_agreement": round(kld["top1_agreement"], 4),
                "kld_seconds": round(kld_seconds, 2), "sensitivity_forward_passes": round(mapped.forward_passes, 2),
                "sensitivity_seconds": mapped.seconds}  # fmt: skip

    def one_pass() -> dict[str, Any]:
        """Issue 28's engine: three cuts' loss and kld side by side against each cut on its own
        (the model cut in place; kld's reference the full model run again), on the same passages."""
        from layerprune.cut.surgery import pruned_in_place
        from layerprune.data import load_documents
        from layerprune.evaluation.harness import document_losses
        from layerprune.evaluation.one_pass import FULL, OnePass

        model, tokenizer_ = load_model(big, Placement(device, dtype))
        last = model.config.num_hidden_layers - 1
        cuts = [tuple(range(last - 4, last)), tuple(range(last // 2, last // 2 + 3)), (2, 3)]
        texts = load_documents(str(data))[:32]
        started = time.perf_counter()
        engine = OnePass(model, cuts)
        found = engine.text_tasks(tokenizer_, texts, 256, 8, {FULL: {"loss"}} | {c: {"loss", "kld"} for c in cuts})
        together = time.perf_counter() - started
        started, worst = time.perf_counter(), 0.0
        document_losses(model, tokenizer_, texts, 256, 8)  # the full point
        for cut in cuts:  # each cut's loss, then kld: the cut again and the full model as its reference
            document_losses(model, tokenizer_, texts, 256, 8)
            with pruned_in_place(model, list(cut)):
                alone = document_losses(model, tokenizer_, texts, 256, 8)
                document_losses(model, tokenizer_, texts, 256, 8)
            worst = max(worst, *(abs(a[0] - b[0]) / b[1] for a, b in zip(found[cut]["loss"], alone, strict=True)))
        alone_seconds = time.perf_counter() - started
        return {"full_passes_together": round(engine.forward_passes(), 2), "seconds_together": round(together, 2),
                "seconds_alone": round(alone_seconds, 2), "max_loss_difference_per_token": worst}  # fmt: skip

    step("one-pass engine: 3 cuts' loss + kld side by side against one by one (32 x 256 tokens)", one_pass, device)
    step("prune --strategy loss --n 4 (8 x 128 tokens)", loss_search, device)
    step("held-out loss (64 x 256 tokens)", loss, device)
    step("kld against the full model (32 x 256 tokens), sensitivity map (16 x 128)", closeness_and_sensitivity, device)
    n = shape["num_hidden_layers"] // 4
    pruned = step(f"prune --strategy deepest --n {n} (on disk)", lambda: {"removed": prune(
        big, root / "pruned", n=n, strategy="deepest").removed}, device)  # fmt: skip
    if "heal" not in skip and "error" not in pruned:
        step("heal --no-quant, 2 steps of 4 x 256 tokens", healing, device)
    if "bench" not in skip and "error" not in pruned:
        step("bench full against pruned", bench, device)
    if "fsdp" not in skip and "error" not in pruned and device.startswith("cuda"):
        step("heal under FSDP (accelerate launch, 1 process)", lambda: fsdp_heal(root, data), device)
    if os.environ.get("OUT"):
        summary = {"device": device, "size": args.size, "results": RESULTS}
        Path(os.environ["OUT"], "gpu_check.json").write_text(json.dumps(summary, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    print(f"{len(RESULTS)} steps, {sum('error' in r for r in RESULTS)} failed", file=sys.stderr)


if __name__ == "__main__":
    main()
