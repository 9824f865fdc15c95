"""The same commands run by two checkouts of layerprune, and their outputs compared.

python bench/behaviour_unchanged.py --before /path/to/old/checkout --after . --out /tmp/unchanged

For a change that should not change behaviour (a refactor): the packaged SmolLM2-135M analyzed,
pruned by every strategy in the registry (and repaired), a pruned model healed, and a small sweep,
each run once with `PYTHONPATH=<before>` and once with `PYTHONPATH=<after>` in the same Python.
Then every output file is compared: safetensors tensor by tensor, bitwise; JSON and CSV value by
value, with the output folder's own path written the same on both sides and wall-clock fields
(seconds, dates, speeds) left out; figures and HTML are not compared (their text holds times).
Prints one line per output and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODEL = "smollm2-135m"
CALIBRATION = ["--samples", "16", "--seq-len", "64"]  # 1,024 tokens: a 576 x 576 repair fit needs 576
STRATEGY_ARGS = {"random": ["--seed", "0"], "angular-rerank": ["--candidates", "3"]}
HEAL = ["--steps", "3", "--no-quant", "--batch-size", "2", "--grad-accum", "1", "--seq-len", "64",
        "--validation-sequences", "4", "--seed", "0"]  # fmt: skip
SWEEP = ["--n", "0,4,8", "--strategies", "angular,deepest", "--repairs", "none,linear", "--tasks", "piqa,loss,kld",
         "--limit", "12", "--eval-seq-len", "64", "--sensitivity-limit", "6", "--no-heal", *CALIBRATION]  # fmt: skip
# wall-clock and machine facts: different on every run, whatever the code
VOLATILE = ("second", "time", "date", "created", "elapsed", "speed", "started", "finished", "pid", "host", "peak",
            "rss", "memory_free", "throughput")  # fmt: skip


def commands(strategies: list[str]) -> dict[str, list[str]]:
    """The runs, by the name of the output they write under the side's folder."""
    runs = {"analysis": ["analyze", MODEL, "--out", "{o}/analysis", *CALIBRATION]}
    for name in strategies:
        runs[f"prune-{name}"] = ["prune", MODEL, "--out", f"{{o}}/prune-{name}", "--n", "4", "--strategy", name,
                                 *CALIBRATION, *STRATEGY_ARGS.get(name, [])]  # fmt: skip
    runs["prune-angular-linear"] = ["prune", MODEL, "--out", "{o}/prune-angular-linear", "--n", "6", "--repair",
                                    "linear", *CALIBRATION]  # fmt: skip
    runs["heal"] = ["heal", "{o}/prune-deepest", "--out", "{o}/heal", *HEAL]
    runs["sweep"] = ["sweep", MODEL, "--out", "{o}/sweep", *SWEEP]
    return runs


def run_side(tree: Path, out: Path, runs: dict[str, list[str]]) -> dict[str, float]:
    """Every run with `tree`'s layerprune first on the path; the wall time of each."""
    env = {**os.environ, "PYTHONPATH": str(tree.resolve()), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out.mkdir(parents=True, exist_ok=True)
    times = {}
    for name, args in runs.items():
        if (out / name).exists():
            continue
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "layerprune", *(a.format(o=out) for a in args)], env=env,
                              capture_output=True, text=True)  # fmt: skip
        times[name] = time.perf_counter() - started
        if done.returncode:
            raise SystemExit(f"{tree}: {name} failed: {done.stderr.strip().splitlines()[-1:]}")
    return times


def _volatile(key: str) -> bool:
    key = key.lower()
    return key.endswith("_s") or any(word in key for word in VOLATILE)


def _clean(value: Any, root: str) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v, root) for k, v in value.items() if not _volatile(str(k))}
    if isinstance(value, list):
        return [_clean(v, root) for v in value]
    return value.replace(root, "<out>") if isinstance(value, str) else value


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        found = [f"{where}/{k}: only on one side" for k in sorted(set(a) ^ set(b), key=str)]
        return found + [d for k in sorted(set(a) & set(b), key=str) for d in _differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {str(a)[:60]} != {str(b)[:60]}"]


def _tensors(path: Path) -> dict[str, bytes]:
    """Each tensor's bytes, to compare bitwise (bf16 included, which numpy cannot hold)."""
    import torch
    from safetensors.torch import load_file

    return {k: v.contiguous().view(-1).view(torch.uint8).numpy().tobytes() for k, v in load_file(path).items()}


def _csv(path: Path, root: str) -> list[dict[str, Any]]:
    with path.open() as f:
        return [_clean(row, root) for row in csv.DictReader(f)]


def compare_file(a: Path, b: Path, roots: tuple[str, str]) -> list[str]:
    """What differs between one output file of each side (empty: the same)."""
    if a.suffix == ".safetensors":
        x, y = _tensors(a), _tensors(b)
        return [f"tensor {k} differs" for k in sorted(x) if x[k] != y.get(k)] + (
            ["tensor names"] if x.keys() != y.keys() else []
        )
    if a.suffix == ".json":
        return _differences(_clean(json.loads(a.read_text()), roots[0]), _clean(json.loads(b.read_text()), roots[1]))
    if a.suffix == ".csv":
        return _differences(_csv(a, roots[0]), _csv(b, roots[1]))
    return []


def compare(before: Path, after: Path) -> int:
    """Print one line per output file; the number of files that differ."""
    differing = 0
    skipped = set()
    roots = (str(before), str(after))
    for a in sorted(p for p in before.rglob("*") if p.is_file()):
        rel = a.relative_to(before)
        b = after / rel
        if a.suffix not in (".safetensors", ".json", ".csv"):
            skipped.add(a.suffix or a.name)
            continue
        found = ["only before"] if not b.is_file() else compare_file(a, b, roots)
        differing += bool(found)
        print(f"{'DIFFERS' if found else 'same   '} {rel}" + (f": {'; '.join(found[:3])}" if found else ""))
    only_after = [
        p.relative_to(after) for p in after.rglob("*") if p.is_file() and not (before / p.relative_to(after)).exists()
    ]
    for rel in only_after:
        print(f"DIFFERS {rel}: only after")
    print(f"not compared (times inside, or binary figures): {', '.join(sorted(skipped))}")
    return differing + len(only_after)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="checkout of the code before the change")
    parser.add_argument("--after", type=Path, default=Path("."), help="checkout of the code after it")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    sys.path.insert(0, str(args.after.resolve()))
    from layerprune.selection.strategies import STRATEGIES

    runs = commands(sorted(STRATEGIES))
    times = {
        side: run_side(tree, args.out / side, runs) for side, tree in (("before", args.before), ("after", args.after))
    }
    (args.out / "times.json").write_text(json.dumps(times, indent=1))
    differing = compare(args.out / "before", args.out / "after")
    print(f"{differing} outputs differ" if differing else "every compared output is the same")
    raise SystemExit(1 if differing else 0)


if __name__ == "__main__":
    main()
