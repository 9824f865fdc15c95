"""Training-free repair against LoRA healing, on the same cut and the same documents.

python bench/repair_grid.py run --model smollm2-135m --strategy angular --n 8 --out /tmp/repair/smollm2-angular-8 \
    --variants none,linear,cosine,lora20,linear+lora20 --limit 100
python bench/repair_grid.py report /tmp/repair/*        # the markdown tables of docs/results/repair.md

For one cut of one model: the cut unrepaired (`none`), repaired by `linear` or `cosine` (calibrated
on CoQA, the analysis's default text, never the evaluation's), healed by plain LoRA for N steps
(`loraN`: the batch of docs/results/healing.md, 4 x 128 tokens, fp32 LoRA, healing text
SlimPajama-style passages of the default `heal` data; `qloraN`: `heal`'s default recipe, QLoRA in
NF4 with 16 x 256 tokens a step), and repaired then healed (`linear+loraN`, `linear+qloraN`).
Each is evaluated against the full model on the same documents: LAMBADA loss and KL divergence to
the full model on the first `--loss-limit` passages (default `--limit`), and the first `--limit`
documents of the `--qa` tasks (PIQA and SciQ by default, pooled for the table). Wall times of
the repair (calibration pass and fit) and of the heal (training steps, validation and merge) are
recorded. A finished variant is read back, not redone, when the script reruns.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

QA = "piqa,sciq"  # two-choice and four-choice; ARC-Easy (`--qa arc_easy`) left out by default for time on this CPU
HEALS = {  # heal recipe by variant prefix: `lora` the small fp32 one of docs/results/healing.md, `qlora` heal's default
    "lora": dict(batch_size=4, grad_accum=1, seq_len=128, quant=False),
    "qlora": {},
}


def parse_variant(variant: str) -> tuple[str, str, int]:
    """`linear+lora20` -> ("linear", "lora", 20); `qlora60` -> ("none", "qlora", 60); `cosine` -> ("cosine", "", 0)."""
    repair, _, heal = variant.rpartition("+")
    recipe = heal.rstrip("0123456789")
    if recipe not in HEALS:
        return variant, "", 0
    return repair or "none", recipe, int(heal.removeprefix(recipe))


def heal_config(recipe: str, steps: int) -> Any:
    """`steps` steps of a recipe of HEALS, validated before and after, saved only at the end."""
    from layerprune.healing.lora import HealConfig

    return HealConfig(steps=steps, eval_every=steps, save_every=1000, validation_sequences=16, **HEALS[recipe])


def build(variant: str, model: str, strategy: str, n: int, out: Path) -> tuple[Path, dict[str, float]]:
    """The checkpoint of one variant (made once), and its wall times by phase."""
    from layerprune import prune
    from layerprune.healing.lora import heal

    folder = out / variant
    times_file = out / f"{variant}.times.json"
    if times_file.is_file():
        return folder, json.loads(times_file.read_text())
    repair, recipe, steps = parse_variant(variant)
    times: dict[str, float] = {}
    started = time.perf_counter()
    base = prune(model, out / f"cut-{repair}" if recipe else folder, n=n, strategy=strategy, repair=repair,
                 overwrite=True, progress=False)  # fmt: skip
    times["prune_and_repair"] = time.perf_counter() - started
    times["repair"] = base.record.get("repair", {}).get("seconds", 0.0)
    if recipe:
        started = time.perf_counter()
        heal(base.path, folder, heal_config(recipe, steps), overwrite=True)
        times["heal"] = time.perf_counter() - started
    times_file.write_text(json.dumps(times))
    return folder, times


def evaluate_variant(folder: Path, args: argparse.Namespace, name: str) -> dict[str, Any]:
    """LAMBADA loss (and KL to the full model) on the first `--loss-limit` passages, QA on the first `--limit`."""
    from layerprune.evaluation.harness import evaluate
    from layerprune.runtime.models import resolve_model

    results = Path(args.out) / f"{name}.results.json"
    if not results.is_file():
        reference = str(resolve_model(args.model))
        text = ["loss"] + (["kld"] if name != "full" else [])
        record = evaluate(folder, tasks=text, limit=args.loss_limit or args.limit, reference=reference)
        qa = evaluate(folder, tasks=args.qa, limit=args.limit)
        results.write_text(json.dumps(record | {"tasks": record["tasks"] | qa["tasks"]}))
    return json.loads(results.read_text())


def run(args: argparse.Namespace) -> None:
    from layerprune.runtime.models import resolve_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "case.json").write_text(json.dumps(vars(args) | {"func": None}))
    evaluate_variant(resolve_model(args.model), args, "full")
    for variant in args.variants.split(","):
        folder, times = build(variant, args.model, args.strategy, args.n, out)
        evaluate_variant(folder, args, variant)
        print(variant, times, flush=True)


def _documents(result: dict[str, Any], task: str) -> Any:
    from layerprune.evaluation.uncertainty import Documents

    stored = result["tasks"][task]["documents"]
    if task in ("loss", "kld"):
        return Documents.of(stored, "loss" if task == "loss" else "kl", "tokens")
    return Documents.of(stored, "correct")


def _pooled(result: dict[str, Any], qa: str) -> Any:
    from layerprune.evaluation.uncertainty import Documents

    parts = [_documents(result, task) for task in qa.split(",")]
    return Documents(sum((p.ids for p in parts), ()), sum((p.num for p in parts), ()), sum((p.den for p in parts), ()))


def report(args: argparse.Namespace) -> None:
    from layerprune.evaluation.uncertainty import compare

    for case in map(Path, args.cases):
        setting = json.loads((case / "case.json").read_text())
        full = json.loads((case / "full.results.json").read_text())
        cut = json.loads((case / "none.results.json").read_text())
        lost_loss = cut["tasks"]["loss"]["loss"] - full["tasks"]["loss"]["loss"]
        qa_tasks = setting.get("qa", QA)
        full_qa, cut_qa = _pooled(full, qa_tasks), _pooled(cut, qa_tasks)
        lost_qa = full_qa.estimate() - cut_qa.estimate()
        print(f"\n### {setting['model']}, {setting['strategy']}, {setting['n']} layers removed "
              f"(layers {cut['layers_removed']})\n")  # fmt: skip
        print(f"Full model: LAMBADA loss {full['tasks']['loss']['loss']:.3f}, pooled QA accuracy "
              f"{full_qa.estimate():.3f} ({len(full_qa.ids)} documents).\n")  # fmt: skip
        print(
            "| variant | LAMBADA loss | vs cut, paired 95% CI | loss recovered | KL to full | pooled QA | vs cut, "
            "paired 95% CI | QA recovered | repair s | heal s |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for variant in ["none", *[v for v in setting["variants"].split(",") if v != "none"]]:
            path = case / f"{variant}.results.json"
            if not path.is_file():
                continue
            result = json.loads(path.read_text())
            times = json.loads((case / f"{variant}.times.json").read_text())
            loss = result["tasks"]["loss"]["loss"]
            loss_cmp = compare(_documents(cut, "loss"), _documents(result, "loss"), higher_is_better=False)
            pooled = _pooled(result, qa_tasks)
            qa_cmp = compare(cut_qa, pooled, higher_is_better=True)
            qa = pooled.estimate()
            cells = [
                variant, f"{loss:.3f}", _ci(loss_cmp) if variant != "none" else "-",
                f"{(cut['tasks']['loss']['loss'] - loss) / lost_loss:.0%}" if variant != "none" else "-",
                f"{result['tasks']['kld']['kld']:.3f}", f"{qa:.3f}", _ci(qa_cmp) if variant != "none" else "-",
                f"{(qa - cut_qa.estimate()) / lost_qa:.0%}" if variant != "none" and lost_qa else "-",
                f"{times.get('repair', 0):.0f}", f"{times.get('heal', 0):.0f}",
            ]  # fmt: skip
            print("| " + " | ".join(cells) + " |")
        _repair_then_heal(case, setting["variants"].split(","), qa_tasks)


def _repair_then_heal(case: Path, variants: list[str], qa_tasks: str) -> None:
    """`linear` alone and `linear+loraN` against `loraN` (and the same for `qloraN`), paired on the same documents."""
    from layerprune.evaluation.uncertainty import compare

    for heal in [v for v in variants if "+" not in v and parse_variant(v)[1]]:  # the heals alone
        for variant, steps in (("linear", ""), (f"linear+{heal}", " at equal steps")):
            both = [case / f"{v}.results.json" for v in (heal, variant)]
            if not all(path.is_file() for path in both):
                continue
            alone, repaired = (json.loads(path.read_text()) for path in both)
            loss = compare(_documents(alone, "loss"), _documents(repaired, "loss"), higher_is_better=False)
            kld = compare(_documents(alone, "kld"), _documents(repaired, "kld"), higher_is_better=False)
            qa = compare(_pooled(alone, qa_tasks), _pooled(repaired, qa_tasks), higher_is_better=True)
            print(f"\n- `{variant}` against `{heal}`{steps}: loss {_ci(loss)}, KL {_ci(kld)}; pooled QA {_ci(qa)}.")


def _ci(comparison: Any) -> str:
    low, high = comparison.change_interval
    return f"{comparison.change:+.3f} [{low:+.3f}, {high:+.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(required=True)
    go = commands.add_parser("run")
    go.add_argument("--model", default="smollm2-135m")
    go.add_argument("--strategy", default="angular")
    go.add_argument("--n", type=int, default=8)
    go.add_argument("--variants", default="none,linear,cosine,lora20,linear+lora20")
    go.add_argument("--limit", type=int, default=100)
    go.add_argument("--loss-limit", type=int, help="LAMBADA passages (default: --limit)")
    go.add_argument("--qa", default=QA, help="comma-separated QA tasks, pooled in the table")
    go.add_argument("--out", required=True)
    go.set_defaults(func=run)
    table = commands.add_parser("report")
    table.add_argument("cases", nargs="+")
    table.set_defaults(func=report)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
