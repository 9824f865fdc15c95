"""Healing objectives side by side: `lm`, `distill` and `mixed`, each on every layer or near the cut.

python bench/healing_objectives.py goal --out /tmp/heal-goal       # the issue's goal on SmolLM2
python bench/healing_objectives.py grid --out /tmp/heal-grid --models smollm2-135m --steps 20 --limit 50
python bench/healing_objectives.py report --out /tmp/heal-grid --figure docs/results/healing-curves.png \
    --goal /tmp/heal-goal                                          # the tables and the figures

`goal`: SmolLM2-135M without its 8 deepest layers (the final one kept), healed with heal's batch
(4 x 128 tokens, one micro-batch per step) at the default learning rate in plain LoRA (fp32; QLoRA
on a CPU is several times slower), validated every 10 steps on held-out documents of the healing
text, for 200 steps of `lm` and 67 (a third) of `distill`; then 30 steps of each objective (and of
`lm` and `distill` near the cut), each followed by the held-out loss on LAMBADA (200 passages, a
corpus the healing never saw). A finished run is read back, not redone, when the script reruns.

`grid`: each model pruned by `deepest` and `angular` at about 25% and 40% of its layers, healed
`--steps` steps by each objective on every layer and near the cut (k = 1), validated every 5 steps,
then evaluated against the full model on the same first `--limit` documents: LAMBADA loss, KL
divergence, SciQ, PIQA and ARC-Easy. Each run's training time is recorded, for the comparison at
equal time. `--cases` and `--variants` choose a part of the grid; a case whose cut repeats the
layers of a case earlier in the same call is not run again (`report` shows a repeated cut once,
whichever calls made it). `report` prints the tables (LAMBADA loss and the three QA
tasks' pooled accuracy, each with a paired interval against `lm` everywhere) and draws the curves
against steps and against training seconds.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

STEP = dict(batch_size=4, grad_accum=1, seq_len=128, quant=False, save_every=1000, validation_sequences=16)
OBJECTIVES = ("lm", "distill", "mixed")
VARIANTS = [(objective, target) for target in ("all", "near-cut") for objective in OBJECTIVES]
COLORS = {"lm": "C0", "distill": "C1", "mixed": "C2"}


def heal_run(pruned: Path, out: Path, steps: int, objective: str, target: str = "all", every: int = 10) -> dict:
    """Heal, or read back a finished run with the same settings (so the script can be rerun)."""
    from layerprune.healing.lora import HealConfig, heal

    config = HealConfig(steps=steps, objective=objective, target_layers=target, eval_every=every, **STEP)
    record_path = out / "layerprune.json"
    done = json.loads(record_path.read_text())["healing"] if record_path.is_file() else None
    if done is None or done["config"] != json.loads(json.dumps(asdict(config))):
        done = heal(pruned, out, config, overwrite=True).healing
    curve = json.loads((out / "heal_curve.json").read_text())
    return {
        "objective": objective,
        "target_layers": target,
        "steps": steps,
        "seconds": done["seconds"],
        "tokens_per_second": done["tokens_per_second"],
        "trainable_parameters": done["trainable_parameters"],
        "validation_before": done["validation_loss_before"],
        "validation": curve["validation"],
        "path": str(out),
    }


def held_out(model: Path, full: Path, tasks: list[str], limit: int) -> dict:
    """Each task's result on the first `limit` documents; kld against the full model."""
    from layerprune.evaluation.harness import evaluate

    reference = {"reference": str(full)} if "kld" in tasks else {}
    return evaluate(model, tasks, limit=limit, **reference)["tasks"]


def goal(out: Path) -> None:
    from layerprune import prune
    from layerprune.evaluation.harness import evaluate
    from layerprune.runtime.models import resolve_model

    full = resolve_model("smollm2-135m")
    pruned = out / "pruned"
    if not (pruned / "layerprune.json").is_file():
        prune(full, pruned, n=8, strategy="deepest", overwrite=True)
    lambada = lambda path: evaluate(path, ["loss"], limit=200)["tasks"]["loss"]["loss"]  # noqa: E731
    runs = {  # lm for 200 steps, distill for a third of that (its own schedule)
        "lm": heal_run(pruned, out / "healed-lm", 200, "lm", every=20),
        "distill": heal_run(pruned, out / "healed-distill", 67, "distill", every=10),
    }
    for run in runs.values():
        run["lambada_end"] = lambada(run["path"])
    thirty = {}
    for objective, target in [(o, "all") for o in OBJECTIVES] + [("lm", "near-cut"), ("distill", "near-cut")]:
        run = heal_run(pruned, out / f"healed-{objective}-{target}-30", 30, objective, target, every=30)
        run["lambada"] = lambada(run["path"])
        thirty[f"{objective}/{target}"] = run
    before = lambada(pruned)
    (out / "goal.json").write_text(json.dumps({"lambada_before": before, "runs": runs, "thirty": thirty}, indent=1))
    print(f"LAMBADA loss of the pruned model: {before:.3f}")
    for name, run in thirty.items():
        print(f"30 steps {name:18} LAMBADA {run['lambada']:.3f} (change {run['lambada'] - before:+.3f}); validation "
              f"{run['validation_before']:.3f} -> {run['validation'][-1][1]:.3f}; {run['trainable_parameters']} "
              f"trainable; {run['tokens_per_second']:.0f} tok/s; {run['seconds']:.0f} s")  # fmt: skip
    lm_200 = dict(runs["lm"]["validation"])[200]
    for name, run in runs.items():
        reached = next((step for step, loss in run["validation"] if loss <= lm_200), None)
        print(f"{name:8} {run['steps']} steps: LAMBADA {run['lambada_end']:.3f}; validation reaches lm's 200-step "
              f"{lm_200:.3f} at step {reached}; {run['seconds']:.0f} s")  # fmt: skip


QA_TASKS = ("sciq", "piqa", "arc_easy")
TASKS = ["loss", "kld", *QA_TASKS]
# (strategy, fraction of the layers), in the order they run: the goal's case first
CASES = (("deepest", 0.25), ("angular", 0.4), ("angular", 0.25), ("deepest", 0.4))


def grid(
    out: Path,
    models: list[str],
    steps: int,
    limit: int,
    cases: list[tuple[str, float]],
    variants: list[tuple[str, str]],
) -> None:
    """Every case of every model, healed by each objective everywhere and near the cut, then evaluated;
    each finished run is stored in its own `run.json` and read back when the script reruns. A case
    that removes the same layers as one earlier in this call is not run again: its models would be
    the same."""
    from layerprune import prune
    from layerprune.runtime.models import resolve_model

    for name in models:
        full = resolve_model(name)
        num_layers = json.loads((full / "config.json").read_text())["num_hidden_layers"]
        if not (out / f"{name}-full.json").is_file():
            store(out / f"{name}-full.json", held_out(full, full, TASKS[:1] + TASKS[2:], limit))
        seen: dict[tuple[int, ...], str] = {}
        for strategy, fraction in cases:
            n = round(fraction * num_layers)
            case = out / f"{name}-{strategy}-{n}"
            if not (case / "pruned" / "layerprune.json").is_file():
                prune(full, case / "pruned", n=n, strategy=strategy, overwrite=True)
            removed = removed_layers(case)
            if removed in seen:
                print(f"{name} {strategy} n={n} removes layers {list(removed)}, as {seen[removed]} does: not rerun")
                continue
            seen[removed] = f"{strategy} n={n}"
            if not (case / "unhealed.json").is_file():
                store(case / "unhealed.json", held_out(case / "pruned", full, TASKS, limit))
            for objective, target in variants:
                healed = case / f"{objective}-{target}"
                row = stored(healed / "run.json")
                if row is None:
                    row = heal_run(case / "pruned", healed, steps, objective, target, every=5)
                    row["tasks"] = held_out(healed, full, TASKS, limit)
                    for weights in healed.glob("*.safetensors"):  # the figures are kept, not the weights
                        weights.unlink()
                    store(healed / "run.json", row)
                tasks = row["tasks"]
                print(f"{name} {strategy} n={n} {objective}/{target}: loss {tasks['loss']['loss']:.3f} kld "
                      f"{tasks['kld']['kld']:.3f} sciq {tasks['sciq']['acc']:.2f} piqa {tasks['piqa']['acc']:.2f} "
                      f"arc_easy {tasks['arc_easy']['acc']:.2f} in {row['seconds']:.0f} s", flush=True)  # fmt: skip


def removed_layers(case: Path) -> tuple[int, ...]:
    """The layers a case's pruned model lacks, from its record."""
    return tuple(json.loads((case / "pruned" / "layerprune.json").read_text())["removed_layers"])


def stored(path: Path) -> Any:
    """What `store` kept at `path`, or None."""
    return json.loads(path.read_text()) if path.is_file() else None


def store(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def training_seconds(run: dict) -> float:
    """Seconds of training per step, from the run's measured tokens/s (validation excluded)."""
    return STEP["batch_size"] * STEP["seq_len"] / run["tokens_per_second"]


def loss_at(run: dict, seconds: float) -> float:
    """Validation loss after `seconds` of training, interpolated between validations."""
    import numpy as np

    steps, losses = zip(*[(0, run["validation_before"]), *run["validation"]], strict=True)
    return float(np.interp(seconds / training_seconds(run), steps, losses))


def finished_runs(out: Path) -> list[dict]:
    """Every finished run under `out`, with its case, whichever `grid` call made it."""
    rows = []
    for case in sorted(out.glob("*/pruned/layerprune.json")):
        pruned = json.loads(case.read_text())
        folder = case.parent.parent
        model, strategy, n = folder.name.rsplit("-", 2)
        for objective, target in VARIANTS:
            run = stored(folder / f"{objective}-{target}" / "run.json")
            if run is not None:
                rows.append(run | {"model": model, "strategy": strategy, "n": int(n),
                                   "fraction": int(n) / pruned["num_layers_before"],
                                   "removed": pruned["removed_layers"],
                                   "unhealed": stored(folder / "unhealed.json"),
                                   "full": stored(out / f"{model}-full.json")})  # fmt: skip
    return rows


def report(out: Path, figure: Path | None) -> None:
    """The grid's tables (markdown) and, with `figure`, its validation curves against steps and time."""
    from layerprune.evaluation.tasks import task_of
    from layerprune.evaluation.uncertainty import compare

    cases: dict[tuple[str, str, int], list[dict]] = {}
    for row in finished_runs(out):
        cases.setdefault((row["model"], row["strategy"], row["n"]), []).append(row)
    cases = dict(sorted(cases.items(), key=lambda case: (case[0][0], case[0][2], case[0][1])))
    by_cut: dict[tuple, tuple[str, str, int]] = {}  # one case per cut: the one with the most runs
    for case, runs in sorted(cases.items(), key=lambda item: -len(item[1])):
        cut = (case[0], tuple(runs[0]["removed"]))
        if cut in by_cut:
            print(f"\n**{case[0]}, `{case[1]}`, {case[2]} layers**: the same layers as `{by_cut[cut][1]}` "
                  f"({list(cut[1])}), so the same models; its runs are reported there.")  # fmt: skip
            del cases[case]
        by_cut.setdefault(cut, case)
    for (model, strategy, n), runs in cases.items():
        base = next(r for r in runs if (r["objective"], r["target_layers"]) == ("lm", "all"))
        budget = min(r["steps"] * training_seconds(r) for r in runs)  # the fastest run's training time
        unhealed, full = runs[0]["unhealed"], runs[0]["full"]
        print(f"\n**{model}, `{strategy}`, {n} layers ({runs[0]['fraction']:.0%})**: validation loss before "
              f"healing {base['validation_before']:.2f}; LAMBADA {unhealed['loss']['loss']:.2f}, KL "
              f"{unhealed['kld']['kld']:.2f} (full model: LAMBADA {full['loss']['loss']:.2f})\n")  # fmt: skip
        print(f"| objective | LoRA on | trainable | tokens/s | validation at {runs[0]['steps']} steps "
              f"| at {budget:.0f} s | LAMBADA loss, change against lm/all [95%]"
              " | KL | SciQ | PIQA | ARC-Easy | QA accuracy, change against lm/all [95%] |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for run in runs:
            tasks = run["tasks"]
            loss_task = task_of("loss")
            loss = compare(loss_task.documents(base["tasks"]["loss"]), loss_task.documents(tasks["loss"]), False)
            qa = compare(qa_documents(base["tasks"]), qa_documents(tasks), True)
            accuracy = " | ".join(f"{tasks[t]['acc']:.2f} ± {tasks[t]['acc_stderr']:.2f}" for t in QA_TASKS)
            print(f"| {run['objective']} | {run['target_layers']} | {run['trainable_parameters']:,} | "
                  f"{run['tokens_per_second']:.0f} | {run['validation'][-1][1]:.2f} | {loss_at(run, budget):.2f} | "
                  f"{tasks['loss']['loss']:.2f} ± {tasks['loss']['loss_stderr']:.2f}, {change(loss, run is base, 3)} | "
                  f"{tasks['kld']['kld']:.2f} ± {tasks['kld']['kld_stderr']:.2f} | {accuracy} | "
                  f"{change(qa, run is base, 2)} |")  # fmt: skip
    if figure is not None:
        plot(cases, figure)


def qa_documents(tasks: dict) -> Any:
    """The QA tasks' documents pooled into one paired sample (ids prefixed by their task)."""
    from layerprune.evaluation.tasks import task_of
    from layerprune.evaluation.uncertainty import Documents

    parts = [task_of(task).documents(tasks[task]) for task in QA_TASKS]
    return Documents(
        tuple(f"{task}/{doc}" for task, part in zip(QA_TASKS, parts, strict=True) for doc in part.ids),
        tuple(value for part in parts for value in part.num),
        tuple(value for part in parts for value in part.den),
    )


def change(paired: Any, is_base: bool, digits: int) -> str:
    """A paired change and its 95% interval, or a dash for the reference run itself."""
    low, high = paired.change_interval
    return "–" if is_base else f"{paired.change:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def plot(cases: dict[tuple[str, str, int], list[dict]], figure: Path) -> None:
    """Validation loss against steps (top) and against training seconds (bottom), one column per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(cases), figsize=(4.2 * len(cases), 7), squeeze=False, sharey="col")
    for column, ((model, strategy, n), runs) in enumerate(cases.items()):
        for run in runs:
            steps, losses = zip(*[(0, run["validation_before"]), *run["validation"]], strict=True)
            label = f"{run['objective']}, {run['target_layers']}"
            style = {"linestyle": "-" if run["target_layers"] == "all" else "--", "marker": "o", "markersize": 3,
                     "color": COLORS[run["objective"]], "label": label}  # fmt: skip
            axes[0, column].plot(steps, losses, **style)
            axes[1, column].plot([s * training_seconds(run) for s in steps], losses, **style)
        axes[0, column].set_title(f"{model}, {strategy}, {n} layers removed", fontsize=9)
        axes[0, column].legend(fontsize=7)
        axes[0, column].set_xlabel("healing steps (4 x 128 tokens)")
        axes[1, column].set_xlabel("training seconds (2 CPU cores)")
        for row in axes[:, column]:
            row.set_ylabel("validation loss (held-out)")
            row.grid(alpha=0.3)
    fig.suptitle("Healing by objective: held-out next-token loss (16 sequences of 128 tokens)", fontsize=10)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=110)
    print(f"\nfigure: {figure}")


def goal_figure(goal_dir: Path, figure: Path) -> None:
    """The goal case's long runs, each on its own schedule: validation loss against steps (not time:
    these runs shared the cores with different jobs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 4))
    for record in sorted(goal_dir.glob("healed-*/layerprune.json")):
        run = json.loads(record.read_text())["healing"]
        if len(run["curve"]["validation"]) < 3:
            continue  # a single end point is no curve
        steps, losses = zip(*[(0, run["validation_loss_before"]), *run["curve"]["validation"]], strict=True)
        axis.plot(steps, losses, label=f"{run['objective']}, {run['config']['steps']}-step schedule", marker="o",
                  markersize=3, color=COLORS[run["objective"]], linestyle="-" if run["config"]["steps"] >= 100 else "--")  # fmt: skip  # noqa: E501
    axis.set_xlabel("healing steps (4 x 128 tokens)")
    axis.set_ylabel("validation loss (held-out)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title("SmolLM2 without its 8 deepest layers: each run on its own schedule", fontsize=10)
    fig.tight_layout()
    fig.savefig(figure, dpi=110)
    print(f"figure: {figure}")


def case_of(text: str) -> tuple[str, float]:
    strategy, fraction = text.split(":")
    return strategy, float(fraction)


def variant_of(text: str) -> tuple[str, str]:
    objective, target = text.split("/")
    return objective, target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("goal", "grid", "report"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=100, help="grid: documents per task")
    parser.add_argument("--steps", type=int, default=30, help="grid: healing steps per run")
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"], help="grid: the models")
    parser.add_argument("--cases", nargs="+", type=case_of, default=list(CASES), help="grid: STRATEGY:FRACTION")
    parser.add_argument("--variants", nargs="+", type=variant_of, default=VARIANTS, help="grid: OBJECTIVE/TARGET")
    parser.add_argument("--figure", type=Path, help="report: where to draw the curves")
    parser.add_argument("--goal", type=Path, help="report: the goal's folder, whose long runs are drawn too")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.what == "goal":
        goal(args.out)
    elif args.what == "grid":
        grid(args.out, args.models, args.steps, args.limit, args.cases, args.variants)
    else:
        report(args.out, args.figure)
        if args.goal and args.figure:
            goal_figure(args.goal, args.figure.with_name(f"{args.figure.stem}-goal{args.figure.suffix}"))


if __name__ == "__main__":
    main()
