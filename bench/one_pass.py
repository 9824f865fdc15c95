"""The one-pass evaluation of many variants (`layerprune.evaluation.one_pass`) against evaluating each on its
own (the sweep's path before it), side by side in one process, on the same documents.

python bench/one_pass.py --limit 100 [--own healed1,healed2,...]

The cuts default to `make demo`'s unhealed points on SmolLM2-135M (angular and deepest at 4, 9
and 14 of 30 layers, as its analysis chose them) and the full model; the tasks to the demo's
(piqa, arc_easy, loss, kld). `--own` adds checkpoints with weights of their own (healed points),
each evaluated on its own with kld beside the full model, or beside it in the one pass. Prints
the model work in full-model token passes (tokens through decoder layers over the layer count),
the wall time of each path, their ratios, and the largest per-document differences.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from dataclasses import replace

from layerprune.config import build
from layerprune.cut.surgery import pruned_in_place
from layerprune.evaluation.harness import KLD_TASK, EvalConfig, closeness, evaluate, logits_of
from layerprune.evaluation.one_pass import FULL, OnePass, evaluate_variants
from layerprune.measure.cost import Ledger
from layerprune.runtime.models import load_model, resolve_model

DEMO_CUTS = "12-15;25-28;10-18;20-28;2-15;15-28"


def parse_cuts(text: str) -> list[tuple[int, ...]]:
    cuts = []
    for part in text.split(";"):
        first, _, last = part.partition("-")
        cuts.append(tuple(range(int(first), int(last or first) + 1)))
    return cuts


def alone(model, tokenizer, removed, config, ledger: Ledger, subject=None) -> dict:
    """One variant on its own: lm-eval's HF model on the model cut in place (or on `subject`, a model
    of its own); kld beside the full model."""
    subject = subject or model

    def cut():
        return pruned_in_place(model, list(removed)) if removed and subject is model else nullcontext()

    tasks = tuple(t for t in config.tasks if t != KLD_TASK)
    with ledger.phase("evaluate"), ledger.counting(subject), cut():
        result = evaluate(subject, config=replace(config, tasks=tasks), tokenizer=tokenizer)
    if (removed or subject is not model) and KLD_TASK in config.tasks:

        def own(batch):
            with cut():
                return logits_of(subject)(batch)

        vocab = model.config.get_text_config().vocab_size
        with ledger.phase("evaluate"), ledger.counting(subject, model):
            result["tasks"][KLD_TASK] = closeness(own, logits_of(model), tokenizer, vocab, config)
    return result["tasks"]


def largest_differences(a: dict, b: dict) -> dict[str, float]:
    found = {}
    for task, result in a.items():
        ours, theirs = result["documents"], b[task]["documents"]
        assert ours["id"] == theirs["id"], task
        column = {"loss": "loss", "kld": "kl"}.get(task, "loglik")
        found[task] = max(abs(x - y) for x, y in zip(ours[column], theirs[column], strict=True))
        if "correct" in ours:
            assert ours["correct"] == theirs["correct"] and ours["correct_norm"] == theirs["correct_norm"], task
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cuts", default=DEMO_CUTS, help="first-last;first-last;... (removed layers)")
    parser.add_argument("--tasks", default="piqa,arc_easy,loss,kld")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--own", default="", help="checkpoint folders with weights of their own, comma-separated")
    args = parser.parse_args()
    model, tokenizer = load_model(resolve_model(args.model))
    layers = model.config.get_text_config().num_hidden_layers
    cuts = parse_cuts(args.cuts) if args.cuts else []
    own = {path: load_model(path)[0] for path in filter(None, args.own.split(","))}
    config = build(EvalConfig, {"tasks": args.tasks, "limit": args.limit, "batch_size": 8})
    evaluate(model, config=build(EvalConfig, {"tasks": "piqa", "limit": 1}), tokenizer=tokenizer)  # lm-eval warm

    started = time.perf_counter()
    engine = OnePass(model, cuts, own)
    together = evaluate_variants(engine, tokenizer, config, dict.fromkeys([FULL, *cuts, *own]))
    one_pass_seconds = time.perf_counter() - started
    one_pass_work = sum(ledger.layer_tokens for ledger in engine.ledgers.values()) / layers

    started = time.perf_counter()
    ledger = Ledger()
    separate = {removed: alone(model, tokenizer, removed, config, ledger) for removed in [FULL, *cuts]}
    separate |= {path: alone(model, tokenizer, (), config, ledger, subject) for path, subject in own.items()}
    alone_seconds = time.perf_counter() - started
    alone_work = ledger.layer_tokens / layers

    worst: dict[str, float] = {}
    for removed in [FULL, *cuts, *own]:
        for task, difference in largest_differences(together[removed]["tasks"], separate[removed]).items():
            worst[task] = max(worst.get(task, 0.0), difference)
    suffixes = sum(len(engine.suffix(c)) for c in cuts) / layers
    print(f"{args.model}: the full model, {len(cuts)} cuts and {len(own)} models of their own, tasks {args.tasks}, "
          f"{args.limit} documents each")  # fmt: skip
    print(f"one by one: {alone_work:,.0f} full-model token passes, {alone_seconds:.0f} s")
    print(f"one pass:   {one_pass_work:,.0f} full-model token passes, {one_pass_seconds:.0f} s")
    print(f"ratio: work {one_pass_work / alone_work:.3f}, wall time {one_pass_seconds / alone_seconds:.3f}")
    print(f"1 + sum of suffix fractions = {1 + suffixes:.2f} full passes per batch, against {len(cuts) + 1} (+"
          f" {len(cuts)} for kld's reference) one by one")  # fmt: skip
    print("largest per-document difference:", ", ".join(f"{t} {v:.1e}" for t, v in worst.items()),
          "(acc and acc_norm identical)")  # fmt: skip


if __name__ == "__main__":
    main()
