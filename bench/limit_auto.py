"""`--limit auto:N` against the fixed `--limit N`, side by side on the same sweep settings (by
default `make demo`'s): documents evaluated, wall time, and the "how far can I prune" answers.

python bench/limit_auto.py --out /tmp/limit-auto --cap 200

Both sweeps run one after the other in this process's machine, each in its own process; the
fixed one evaluates every point on the first N documents of each task, the adaptive one in
rounds of 20, 40, 80, ... of a seeded order until each comparison decides (or N). Documents are
counted per computed point and task (points that removed the same layers as another are
computed once, and not counted twice).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

DEMO = ["--fractions", "0,0.15,0.3,0.45", "--strategies", "angular,deepest", "--tasks", "piqa,arc_easy,loss,kld",
        "--heal", "--heal-no-quant", "--heal-steps", "12", "--heal-lr", "2e-3", "--heal-batch-size", "4",
        "--heal-grad-accum", "1", "--heal-seq-len", "128"]  # fmt: skip


def run(model: str, out: Path, limit: str, flags: list[str]) -> float:
    started = time.perf_counter()
    command = [sys.executable, "-m", "layerprune", "sweep", model, "--out", str(out), "--limit", limit, *flags]
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def documents(out: Path) -> dict[str, int]:
    rows = json.loads((out / "results.json").read_text())
    counted: dict[str, int] = {}
    for row in rows:
        if "same_as" in row:
            continue
        for task, result in row["tasks"].items():
            counted[task] = counted.get(task, 0) + result["n"]
    return counted


def answers(out: Path) -> dict[str, dict[str, str]]:
    from layerprune.evaluation.harness import Tolerance
    from layerprune.sweep.report import _measured, how_far

    rows = json.loads((out / "results.json").read_text())
    return {task: {k: a.text() for k, a in how_far(rows, task, Tolerance()).items()} for task in _measured(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cap", type=int, default=200)
    args, extra = parser.parse_known_args()
    flags = extra or DEMO
    seconds = {}
    for name, limit in (("fixed", str(args.cap)), ("auto", f"auto:{args.cap}")):
        record = args.out / f"{name}.seconds"
        if not record.is_file():  # a finished sweep is kept: rerun the other after a change
            record.write_text(str(run(args.model, args.out / name, limit, flags)))
        seconds[name] = float(record.read_text())
    counted = {name: documents(args.out / name) for name in seconds}
    found = {name: answers(args.out / name) for name in seconds}
    print(f"\n{'':8} {'seconds':>8} " + " ".join(f"{t:>9}" for t in counted["fixed"]) + f" {'total':>7}")
    for name in seconds:
        cells = " ".join(f"{counted[name].get(t, 0):>9}" for t in counted["fixed"])
        print(f"{name:8} {seconds[name]:>8.0f} {cells} {sum(counted[name].values()):>7}")
    share = sum(counted["auto"].values()) / sum(counted["fixed"].values())
    print(f"auto / fixed: documents {share:.2f}, time {seconds['auto'] / seconds['fixed']:.2f}")
    same = found["auto"] == found["fixed"]
    print(f"same 'how far' answers: {same}")
    for task in found["fixed"]:
        for series, answer in found["fixed"][task].items():
            other = found["auto"].get(task, {}).get(series)
            print(f"  {task:9} {series:20} fixed: {answer:45} auto: {other}")
    (args.out / "limit_auto.json").write_text(json.dumps({"seconds": seconds, "documents": counted, "answers": found},
                                                         indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
