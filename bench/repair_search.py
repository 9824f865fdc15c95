"""Does a repair-aware choice of the block pick other layers, and are they better once repaired?

python bench/repair_search.py --model smollm2-135m --n 8 --samples 16 --limit 100 --out /tmp/repair-search/smollm2-8

The `loss` and `loss-repair` searches run on the same calibration batches (`--samples` CoQA
documents of 256 tokens, the analysis's default text); `loss-repair` three times: cross-fitted
over 2 and 4 folds (each document scored with the map fitted on the other folds) and in-sample
(`folds=1`: the maps fitted and scored on the same tokens). Every distinct block they and
`angular` choose is then pruned with `--repair linear` (default calibration, 64 documents) and
evaluated on the first `--limit` LAMBADA passages (loss, and KL divergence to the full model),
each compared with the block of the first of `--searches` (`loss` by default) on the same
passages (paired bootstrap). Finished steps (each search, each block's evaluation) are read back
when the script reruns.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SEARCHES = {
    "loss": ("loss", 1),
    "loss-repair 2 folds": ("loss-repair", 2),
    "loss-repair 4 folds": ("loss-repair", 4),
    "loss-repair in-sample": ("loss-repair", 1),
}


def searches(model: str, n: int, samples: int, names: list[str], out: Path) -> dict[str, dict]:
    """Each search's selection, with every candidate's score and its wall time."""
    path = out / "searches.json"
    found = json.loads(path.read_text()) if path.is_file() else {}
    missing = [name for name in names if name not in found]
    if not missing:
        return found
    from layerprune.data import Calibration
    from layerprune.runtime.models import load_model, resolve_model
    from layerprune.selection.scoring import calibration_batches, select_by_loss

    loaded, tokenizer = load_model(resolve_model(model))
    batches = calibration_batches(Calibration(samples=samples), tokenizer)
    for name in missing:
        strategy, folds = SEARCHES[name]
        started = time.perf_counter()
        selection = select_by_loss(loaded, batches, n, strategy, folds=folds)
        found[name] = {"removed": selection.removed, "candidates": selection.scored,
                       "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
        print(name, selection.removed, found[name]["seconds"], "s", flush=True)
        path.write_text(json.dumps(found, indent=1))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--out", required=True)
    parser.add_argument("--searches", default=",".join(SEARCHES), help="of SEARCHES; the first is the reference")
    args = parser.parse_args()
    from layerprune import prune
    from layerprune.evaluation.harness import evaluate
    from layerprune.evaluation.uncertainty import Documents, compare
    from layerprune.runtime.models import resolve_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.searches.split(",")
    every = searches(args.model, args.n, args.samples, names, out)
    found = {name: every[name] for name in names}
    reference = names[0]
    blocks = {name: found[name]["removed"] for name in found}
    if not (out / "angular.json").is_file():
        chosen = prune(args.model, out / "angular-cut", n=args.n, strategy="angular", progress=False).removed
        (out / "angular.json").write_text(json.dumps(chosen))
    blocks["angular"] = json.loads((out / "angular.json").read_text())
    results = {}
    for name, layers in blocks.items():
        block = f"{layers[0]}-{layers[-1]}"
        path = out / f"{block}.results.json"  # by block: searches that agree share one evaluation
        if not path.is_file():
            pruned = prune(args.model, out / f"{block}-linear", layers=layers, repair="linear", overwrite=True,
                           progress=False)  # fmt: skip
            evaluate(pruned.path, tasks=["loss", "kld"], limit=args.limit, reference=str(resolve_model(args.model)),
                     out=path, overwrite=True)  # fmt: skip
        results[name] = json.loads(path.read_text())

    def documents(name: str, task: str) -> Documents:
        stored = results[name]["tasks"][task]["documents"]
        return Documents.of(stored, "loss" if task == "loss" else "kl", "tokens")

    scored = {name: {tuple(c["layers"]): c["loss"] for c in found[name]["candidates"]} for name in found}
    print(
        f"\n| block chosen by | layers | {' | '.join(f'calibration loss, {name}' for name in names)} | LAMBADA loss "
        f"(repaired) | minus {reference}'s, paired 95% CI | KL to full | minus {reference}'s |"
    )
    print("|---" * (len(names) + 6) + "|")
    for name, layers in blocks.items():
        key = tuple(layers)
        cells = [name, f"{layers[0]}–{layers[-1]}"]
        cells += [f"{scored[search].get(key, float('nan')):.3f}" for search in names]
        for task in ("loss", "kld"):
            cells.append(f"{results[name]['tasks'][task][task]:.3f}")
            if name == reference:
                cells.append("-")
                continue
            c = compare(documents(reference, task), documents(name, task), higher_is_better=False)
            cells.append(f"{c.change:+.3f} [{c.change_interval[0]:+.3f}, {c.change_interval[1]:+.3f}]")
        print("| " + " | ".join(cells) + " |")
    print("\nsearch seconds: " + ", ".join(f"{name} {found[name]['seconds']}" for name in names))


if __name__ == "__main__":
    main()
