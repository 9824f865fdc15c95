"""Healing objectives side by side: `lm`, `distill` and `mixed`, each on every layer or near the cut.

python bench/healing_objectives.py goal --out /tmp/heal-goal          # the issue's goal on SmolLM2
python bench/healing_objectives.py grid --out /tmp/heal-grid          # both models, two strategies, two fractions

`goal`: SmolLM2-135M without its 8 deepest layers (the final one kept), healed with heal's batch
(4 x 128 tokens, one micro-batch per step) at the default learning rate in plain LoRA (fp32; QLoRA
on a CPU is several times slower), validated every 10 steps on held-out documents of the healing
text, for 200 steps of `lm` and 67 (a third) of `distill` and `mixed`; then the held-out loss on
LAMBADA (a corpus the healing never saw) after 30 steps of each, and at the end of those runs.

`grid`: each packaged model pruned by `deepest` and `angular` at about 25% and 40% of its layers,
healed 30 steps by each objective on every layer and near the cut (k = 1), then evaluated against
the full model on the same documents: LAMBADA loss, KL divergence, SciQ, PIQA and ARC-Easy.
Each run's wall time is recorded, for the comparison at equal time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

STEP = dict(batch_size=4, grad_accum=1, seq_len=128, quant=False, save_every=1000, validation_sequences=16)
OBJECTIVES = ("lm", "distill", "mixed")


def heal_run(pruned: Path, out: Path, steps: int, objective: str, target: str = "all", every: int = 10) -> dict:
    from layerprune.healing import HealConfig, heal

    config = HealConfig(steps=steps, objective=objective, target_layers=target, eval_every=every, **STEP)
    started = time.perf_counter()
    healed = heal(pruned, out, config, overwrite=True)
    curve = json.loads((out / "heal_curve.json").read_text())
    return {
        "objective": objective,
        "target_layers": target,
        "steps": steps,
        "seconds": round(time.perf_counter() - started, 1),
        "tokens_per_second": healed.healing["tokens_per_second"],
        "trainable_parameters": healed.healing["trainable_parameters"],
        "validation_before": healed.healing["validation_loss_before"],
        "validation": curve["validation"],
        "path": str(out),
    }


def held_out(model: Path, full: Path, tasks: list[str], limit: int) -> dict:
    """Each task's result on the first `limit` documents; kld against the full model."""
    from layerprune.evaluation import evaluate

    reference = {"reference": str(full)} if "kld" in tasks else {}
    return evaluate(model, tasks, limit=limit, **reference)["tasks"]


def goal(out: Path) -> None:
    from layerprune import prune
    from layerprune.evaluation import evaluate
    from layerprune.models import resolve_model

    full = resolve_model("smollm2-135m")
    pruned = prune(full, out / "pruned", n=8, strategy="deepest", overwrite=True).path
    runs = {}
    for objective in OBJECTIVES:  # lm for 200 steps; the others for a third of that, their own schedule
        steps = 200 if objective == "lm" else 67
        run = heal_run(pruned, out / f"healed-{objective}", steps, objective, every=20 if steps == 200 else 10)
        run["lambada_end"] = evaluate(run["path"], ["loss"], limit=200)["tasks"]["loss"]["loss"]
        runs[objective] = run
    thirty = {}
    for objective in OBJECTIVES:
        run = heal_run(pruned, out / f"healed-{objective}-30", 30, objective, every=30)
        thirty[objective] = evaluate(run["path"], ["loss"], limit=200)["tasks"]["loss"]["loss"]
    before = evaluate(pruned, ["loss"], limit=200)["tasks"]["loss"]["loss"]
    summary = {"lambada_before": before, "lambada_30": thirty, "runs": runs}
    (out / "goal.json").write_text(json.dumps(summary, indent=1))
    print(f"LAMBADA loss of the pruned model: {before:.3f}")
    lm_200 = dict(runs["lm"]["validation"])[200]
    for objective, run in runs.items():
        reached = next((step for step, loss in run["validation"] if loss <= lm_200), None)
        change = thirty[objective] - before
        print(f"{objective:8} LAMBADA after 30 steps {thirty[objective]:.3f} (change {change:+.3f}),"
              f" after {run['steps']} {run['lambada_end']:.3f}; validation {run['validation_before']:.3f} -> "
              f"{run['validation'][-1][1]:.3f}; reaches lm's 200-step validation loss {lm_200:.3f} at step {reached};"
              f" {run['tokens_per_second']:.0f} tok/s")  # fmt: skip


def grid(out: Path, limit: int) -> None:
    from layerprune import prune
    from layerprune.models import resolve_model

    rows = []
    for name in ("smollm2-135m", "gemma3-270m"):
        full = resolve_model(name)
        num_layers = json.loads((full / "config.json").read_text())["num_hidden_layers"]
        baseline = held_out(full, full, ["loss", "sciq", "piqa", "arc_easy"], limit)
        for fraction in (0.25, 0.4):
            n = round(fraction * num_layers)
            for strategy in ("deepest", "angular"):
                pruned = prune(full, out / f"{name}-{strategy}-{n}", n=n, strategy=strategy, overwrite=True).path
                unhealed = held_out(pruned, full, ["loss", "kld", "sciq", "piqa", "arc_easy"], limit)
                variants = [(o, "all") for o in OBJECTIVES] + [(o, "near-cut") for o in OBJECTIVES]
                for objective, target in variants:
                    run = heal_run(pruned, out / "healed", 30, objective, target)
                    run |= {"model": name, "strategy": strategy, "n": n, "fraction": n / num_layers}
                    run["tasks"] = held_out(Path(run["path"]), full, ["loss", "kld", "sciq", "piqa", "arc_easy"], limit)
                    run["unhealed"], run["full"] = unhealed, baseline
                    rows.append(run)
                    (out / "grid.json").write_text(json.dumps(rows, indent=1))
                    print(f"{name} {strategy} n={n} {objective}/{target}: loss {run['tasks']['loss']['loss']:.3f} "
                          f"kld {run['tasks']['kld']['kld']:.3f} in {run['seconds']:.0f} s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("goal", "grid"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=100)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    goal(args.out) if args.what == "goal" else grid(args.out, args.limit)


if __name__ == "__main__":
    main()
