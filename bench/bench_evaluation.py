"""Evaluation figures for docs/benchmarks.md.

    python bench/bench_evaluation.py accuracy smollm2-135m --limit 200 --out bench/results/eval-smollm2.json
    python bench/bench_evaluation.py speed smollm2-135m --task sciq --limit 100

`accuracy` runs every shipped task (MMLU: `--limit` / 50 documents per subject, 5-shot) and
the held-out loss, or `--tasks a,b`, adding to an existing results file. `speed` times
layerprune's evaluate and lm-eval's plain command line on
the same task, model and documents, one after the other in one run, and prints the ratio.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from layerprune.evaluation.harness import evaluate, lm_eval_command_line, task_table
from layerprune.runtime.models import resolve_model


def accuracy(model: str, limit: int, out: Path, tasks: list[str]) -> None:
    record: dict = json.loads(out.read_text()) if out.is_file() else {"model": model, "tasks": {}, "seconds": {}}
    record.setdefault("limits", {})
    for task in tasks:
        task_limit = max(1, limit // 50) if task == "mmlu" else limit
        start = time.perf_counter()
        result = evaluate(model, [task], limit=task_limit, batch_size=8)
        record["tasks"][task] = result["tasks"][task]
        record["limits"][task] = task_limit
        record["seconds"][task] = round(time.perf_counter() - start, 1)
        print(task, json.dumps(record["tasks"][task]), record["seconds"][task], flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1))


def speed(model: str, task: str, limit: int) -> None:
    path = resolve_model(model)
    start = time.perf_counter()
    ours = evaluate(path, [task], limit=limit, batch_size=8)["tasks"][task]
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    plain = lm_eval_command_line(path, task, limit, batch_size=8)
    plain_s = time.perf_counter() - start
    print(f"{task} x{limit} on {model}, torch threads {torch.get_num_threads()}")
    print(f"layerprune evaluate: {ours_s:.1f} s, {limit / ours_s:.2f} examples/s, acc {ours['acc']:.4f}")
    print(f"lm-eval CLI:         {plain_s:.1f} s, {limit / plain_s:.2f} examples/s, acc {plain['acc,none']:.4f}")
    print(f"ratio (lm-eval time / ours): {plain_s / ours_s:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["accuracy", "speed"])
    parser.add_argument("model")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--task", default="sciq", help="speed: the task timed")
    parser.add_argument("--tasks", default=None, help="accuracy: comma-separated (default: every task and loss)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/eval.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.what == "accuracy":
        tasks = args.tasks.split(",") if args.tasks else [*task_table(), "loss"]
        accuracy(args.model, args.limit, args.out, tasks)  # adds to an existing results file
    else:
        speed(args.model, args.task, args.limit)
