"""The paper's experiment: vary the fraction of layers removed, prune by each strategy, repair
each cut as asked (`--repairs`), with and without healing, and evaluate every point.

    analyze once -> for each (n, strategy, repair): prune (repair), evaluate; heal, evaluate
                 -> results + report

Each point's result is written to `DIR/points/<key>.json` the moment it is done (atomically),
so the same command run again after an interruption, or with more points, computes only what
is missing. The settings that make numbers comparable (tasks, limit, data, healing) are stored
in `DIR/sweep.json`; a rerun with other settings is refused rather than mixed in.

Every task keeps its per-document results, and each point is compared with the full model on
the same documents (`uncertainty`). With `--limit auto`, each point evaluates its documents in
rounds (20, 40, 80, ... in a fixed seeded order) until every task's comparison decides the
tolerance question or its documents run out; the full model is evaluated on whatever documents
the points need. The `kld` task compares each point with the base model, side by side.

Cost: one analysis pass, one sensitivity map (about L/2 passes per task); the unhealed,
unrepaired points evaluated side by side (`one_pass`: one full pass plus each cut's suffix); per
healed or repaired point one on-disk prune (streamed; a repair adds its calibration pass), for
healed points one LoRA run and a merge, and one pass of its own beside the others (the full model
runs once more for their kld reference). Memory: the base model, and as many healed or repaired
checkpoints as fit beside it (FIT_SHARE of what is free), the rest in further groups; on disk,
one group's checkpoints in `DIR/work` until their points are stored.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import random
import shutil
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from layerprune._version import __version__
from layerprune.architectures import find_architecture
from layerprune.config import build, flatten
from layerprune.cut.gguf_surgery import prune_gguf
from layerprune.cut.surgery import pruned_in_place
from layerprune.data import Calibration, load_documents
from layerprune.errors import LayerpruneError, LayerpruneWarning
from layerprune.evaluation.harness import EvalConfig, Tolerance, check_tasks, judge, task_documents
from layerprune.evaluation.one_pass import FULL, OnePass, Variant, evaluate_variants, run_record
from layerprune.evaluation.speed import InferenceSettings, inference_speed
from layerprune.evaluation.tasks import task_of
from layerprune.healing.lora import HealConfig, heal
from layerprune.healing.repair import METHODS as REPAIR_METHODS
from layerprune.io.checkpoint import read_json, read_record
from layerprune.io.destinations import check_destination, claimed, write_atomically
from layerprune.layer_sets import check_fraction
from layerprune.measure.analysis import AnalysisResult, analyze
from layerprune.measure.cost import Ledger
from layerprune.recipes.export import export_gguf
from layerprune.recipes.pipeline import PruneConfig, choose_counts, prune, with_placement
from layerprune.recipes.sensitivity import RESULT_FILE as SENSITIVITY_FILE
from layerprune.recipes.sensitivity import sensitivity
from layerprune.runtime.devices import Placement, process_rank, work_alone
from layerprune.runtime.memory import FIT_SHARE, memory_free
from layerprune.runtime.models import gguf_file, library_bars, load_model, model_inputs, resolve_model
from layerprune.selection.strategies import STRATEGIES, get_strategy, strategy_names
from layerprune.sweep.report import write_report

AUTO = "auto"
FIRST_ROUND = 20  # documents per task in the first round of --limit auto; each round doubles them
RESULT_FIELDS = (
    "strategy",
    "n",
    "fraction",
    "repair",
    "healed",
    "layers_removed",
    "num_layers",
    "parameters",
    "size_mb",
    "decode_tokens_per_s",
    "seconds",
)
# a short generation per point: enough to rank decode speed, cheap beside the evaluation
SPEED_SETTINGS = InferenceSettings(prompt_tokens=64, new_tokens=16, batch_size=1, repeats=3, warmup=1)


@dataclass(frozen=True)
class SweepConfig:
    """What to sweep and how to measure it."""

    ns: tuple[int, ...] = field(
        default=(),
        metadata={"help": "Numbers of layers removed: 0,2,4,... (0: the full model; --counts under torchrun).",
                  "flag": "n", "aliases": ("counts",)},
    )  # fmt: skip
    fractions: tuple[float, ...] = field(default=(), metadata={"help": "Or fractions of layers removed: 0,0.1,0.2,..."})
    strategies: tuple[str, ...] = field(
        default=("angular", "deepest"),
        metadata={
            "help": "Pruning strategies, comma-separated (see `layerprune strategies`).",
            "choices": strategy_names,
        },
    )
    repairs: tuple[str, ...] = field(
        default=("none",),
        metadata={"help": "Repairs of each cut, comma-separated: none, linear, cosine (see `prune --repair`); each "
                  "is a point of its own, healed from the repaired weights with --heal.", "choices": REPAIR_METHODS},
    )  # fmt: skip
    heal: bool = field(default=True, metadata={"help": "Also heal every pruned point."})
    heal_config: HealConfig = field(default_factory=HealConfig, metadata={"prefix": "heal_"})
    evaluation: EvalConfig = field(
        default_factory=EvalConfig,  # its documents per task are --limit's, its model the sweep's
        metadata={"prefix": "eval_", "bare": ("tasks", "loss_data", "num_fewshot"),
                  "omit": ("limit", "backend", "reference", "placement")},
    )  # fmt: skip
    limit: int | str | None = field(
        default=100,
        metadata={"help": "Documents per task; or auto: in rounds (20, 40, 80, ...) until each "
                          "point's paired comparison with the full model decides the tolerance question, or "
                          "the task's documents (auto:N: its first N) run out."},
    )  # fmt: skip
    verdicts: Tolerance = field(default_factory=Tolerance)
    sensitivity: bool = field(
        default=True, metadata={"help": "Also map each single layer's effect on each task (about L/2 passes)."}
    )
    sensitivity_limit: int = field(
        default=100,
        metadata={"help": "The sensitivity map's documents per task, at most (and, with --limit auto, at most as "
                          "many as any point needed)."},
    )  # fmt: skip
    export: str | None = field(
        default=None,
        metadata={"help": "gguf: also write every pruned point as DIR/gguf/<point>.gguf (from a GGUF, unhealed "
                          "points keep its quantization; healed points are converted to f16).", "choices": ("gguf",)},
    )  # fmt: skip
    prune: PruneConfig = field(
        default_factory=lambda: PruneConfig(n=1),  # each point sets its own n, strategy and repair
        metadata={"omit": ("layers", "n", "fraction", "strategy", "repair")},
    )

    @property
    def calibration(self) -> Calibration:
        return self.prune.calibration

    @property
    def placement(self) -> Placement:
        return self.prune.placement

    def __post_init__(self) -> None:
        if bool(self.ns) == bool(self.fractions):
            raise LayerpruneError("give exactly one of --n and --fractions")
        for fraction in self.fractions:  # 0: the full model
            check_fraction(fraction, zero_allowed=True)
        if any(n < 0 for n in self.ns):
            raise LayerpruneError(f"n must be 0 or more, got {list(self.ns)}")
        if not self.strategies:
            raise LayerpruneError(f"no strategy given; choose from {', '.join(STRATEGIES)}")
        for strategy in self.strategies:
            get_strategy(strategy)
        bad_repairs = [r for r in self.repairs if r not in REPAIR_METHODS]
        if bad_repairs or not self.repairs:
            raise LayerpruneError(f"--repairs takes {', '.join(REPAIR_METHODS)}, got {','.join(self.repairs)!r}")
        if isinstance(self.limit, str) and not self.adaptive:
            if not self.limit.isdigit():
                raise LayerpruneError(f"--limit must be a whole number, auto or auto:N, got {self.limit!r}")
            object.__setattr__(self, "limit", int(self.limit))
        if self.adaptive and self.limit != AUTO:
            cap = str(self.limit).removeprefix(f"{AUTO}:")
            if not cap.isdigit() or int(cap) < FIRST_ROUND:
                raise LayerpruneError(
                    f"--limit auto:N needs a whole number N of at least {FIRST_ROUND}, got {self.limit!r}"
                )
        if isinstance(self.limit, int) and self.limit < 1:
            raise LayerpruneError(f"--limit must be at least 1, got {self.limit}")
        if self.sensitivity_limit < 1:
            raise LayerpruneError(f"--sensitivity-limit must be at least 1, got {self.sensitivity_limit}")
        if self.export not in (None, "gguf"):
            raise LayerpruneError(f"--export must be gguf, got {self.export!r}")

    @property
    def adaptive(self) -> bool:
        """--limit auto (or auto:N): documents in rounds until each comparison decides."""
        return isinstance(self.limit, str) and (self.limit == AUTO or self.limit.startswith(f"{AUTO}:"))

    @property
    def most_documents(self) -> int | None:
        """The N of --limit auto:N: no task goes beyond its first N documents."""
        return int(self.limit.partition(":")[2]) if isinstance(self.limit, str) and ":" in self.limit else None

    def counts(self, num_layers: int) -> list[int]:
        """The n of every point, from --n or --fractions, sorted, 0 included."""
        ns = set(self.ns) if self.ns else {round(f * num_layers) for f in self.fractions}
        too_many = [n for n in ns if n >= num_layers - 1]
        if too_many:
            raise LayerpruneError(
                f"n={max(too_many)} cannot be removed from {num_layers} layers while keeping the final layer; "
                f"use at most {num_layers - 2}"
            )
        return sorted(ns | {0})

    def comparable(self) -> dict[str, Any]:
        """The settings that must match for results to be comparable (the points may grow)."""
        raw = {k: v for k, v in flatten(self).items() if not k.startswith("heal_")}
        raw["heal_config"] = asdict(self.heal_config)
        # they change no stored number (beyond rounding), only which points and maps are made
        changeable = ("ns", "fractions", "strategies", "repairs", "device", "export", "sensitivity",
                      "sensitivity_limit", "eval_batch_size", "offload")  # fmt: skip
        for key in changeable:
            raw.pop(key)
        raw["tasks"] = sorted(raw["tasks"])
        return raw


@dataclass(frozen=True)
class Point:
    strategy: str  # "full" for n = 0
    n: int
    healed: bool
    repair: str = "none"

    @property
    def key(self) -> str:
        return f"{self.strategy}-n{self.n}" + (f"-{self.repair}" if self.repair != "none" else "") + (
            "-healed" if self.healed else "")  # fmt: skip


def sweep_points(config: SweepConfig, num_layers: int) -> list[Point]:
    points = [Point("full", 0, False)]
    for n in config.counts(num_layers):
        if n:
            for strategy in config.strategies:
                for repair in config.repairs:
                    points.append(Point(strategy, n, False, repair))
                    if config.heal:
                        points.append(Point(strategy, n, True, repair))
    return points


def _write_json(path: Path, value: Any) -> None:
    """Write a stored result atomically (`write_atomically`); a full disk says what is kept."""
    try:
        write_atomically(path, json.dumps(value, indent=1) + "\n")
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise LayerpruneError(
            f"disk full writing {path.name}; results stored before are intact: free space and run the same command"
        ) from err


def _open_sweep(out: Path, model: str, config: SweepConfig) -> None:
    record = out / "sweep.json"
    settings: dict[str, Any] = {"model": model, "settings": config.comparable()}
    if record.is_file():
        stored = read_json(record, "sweep record")
        defaults = build(SweepConfig, {"ns": (0,)}).comparable()  # settings added since it was stored
        # a setting that no longer has to match (as --sensitivity, stored by earlier versions) is left out
        stored["settings"] = {**defaults, **{k: v for k, v in stored["settings"].items() if k in defaults}}
        if {"model": stored["model"], "settings": stored["settings"]} != settings:
            changed = sorted(k for k in settings["settings"] if stored["settings"].get(k) != settings["settings"][k])
            if stored["model"] != model:
                changed.insert(0, "model")
            raise LayerpruneError(
                f"{out} holds a sweep with other settings ({', '.join(changed)}); use another --out to keep them apart"
            )
    out.mkdir(parents=True, exist_ok=True)  # the sweep's folder, once nothing refused it; its record first
    _write_json(
        record,
        {**settings, "config": {**config.comparable(), **_points_settings(config)}, "layerprune_version": __version__},
    )
    (out / "points").mkdir(exist_ok=True)


def _points_settings(config: SweepConfig) -> dict[str, Any]:
    return {"ns": list(config.ns), "fractions": list(config.fractions), "strategies": list(config.strategies),
            "repairs": list(config.repairs)}  # fmt: skip


def _eval_config(config: SweepConfig) -> EvalConfig:
    """The evaluation's settings: the sweep's --limit (under auto, each round names its documents)
    and its placement."""
    limit = config.limit if isinstance(config.limit, int) else None
    return replace(config.evaluation, limit=limit, placement=config.placement)


def document_orders(config: SweepConfig) -> dict[str, list[str]]:
    """Every task's document ids in a fixed seeded order: the order in which --limit auto takes them."""
    orders = {}
    for task in config.evaluation.tasks:
        if task_of(task).text:
            ids = [str(i) for i in range(len(load_documents(config.evaluation.loss_data)))]
        else:
            ids = task_documents(task)
        random.Random(f"layerprune:{task}").shuffle(ids)
        ids = ids[: config.most_documents]
        if len(ids) < FIRST_ROUND:
            raise LayerpruneError(
                f"--limit auto needs at least {FIRST_ROUND} documents per task; {task} has {len(ids)}"
            )
        orders[task] = ids
    return orders


def _fresh(wanted: dict[str, list[str]], known: dict[str, Any]) -> dict[str, list[str]]:
    """Per task, the documents `wanted` that its `known` result does not hold yet (tasks with none left out)."""
    fresh = {}
    for task, ids in wanted.items():
        done = set(known[task]["documents"]["id"]) if task in known else set()
        fresh[task] = [d for d in ids if d not in done]
    return {task: ids for task, ids in fresh.items() if ids}


def _undecided(
    task: str, size: int, orders: dict[str, list[str]], full: dict[str, Any], result: dict[str, Any],
    config: SweepConfig,
) -> bool:  # fmt: skip
    """Whether a point's task takes another round: its documents not all used, and its comparison
    with the full model's task results `full` not decided."""
    if size >= len(orders[task]):
        return False
    return judge(task, full.get(task), result, config.verdicts).verdict.state == "undecided"


def _adaptive_together(
    engine: OnePass, tokenizer: Any, config: SweepConfig, orders: dict[str, list[str]], variants: list[Variant],
    reference: dict[str, Any],
) -> dict[Variant, dict[str, Any]]:  # fmt: skip
    """--limit auto for many variants side by side: in rounds of doubling size (20, 40, 80, ...),
    every variant evaluates the next documents of the tasks whose comparison with the full model has
    not decided, all in one pass, and the full model (`reference`: its task results so far, extended
    here) whatever documents they need that it lacks; FULL among `variants` is the full point itself,
    which takes at least the first round."""
    eval_config = _eval_config(config)
    results: dict[Variant, dict[str, Any]] = {v: {} for v in variants if v}
    pending = {cut: list(eval_config.tasks) for cut in results}
    own_round = FULL in variants
    size = FIRST_ROUND
    while own_round or any(pending.values()):
        wanted = {cut: {task: orders[task][:size] for task in tasks} for cut, tasks in pending.items() if tasks}
        needed = {t for tasks in pending.values() for t in tasks} | (set(eval_config.tasks) if own_round else set())
        wanted[FULL] = {task: orders[task][:size] for task in needed if not task_of(task).reference}
        known = {FULL: reference, **results}
        documents: dict[Variant, dict[str, list[str]] | None] = {}
        for cut, asked in wanted.items():
            if fresh := _fresh(asked, known[cut]):
                documents[cut] = fresh
        for cut, record in evaluate_variants(engine, tokenizer, eval_config, documents).items():
            for task, result in record["tasks"].items():
                merged_result = task_of(task).merge(known[cut][task], result) if task in known[cut] else result
                if cut:
                    merged_result["rounds"] = merged_result.get("rounds", 0) + 1
                known[cut][task] = merged_result
        for cut, tasks in pending.items():
            pending[cut] = [t for t in tasks if _undecided(t, size, orders, reference, results[cut][t], config)]
        own_round = False
        size *= 2
    record = run_record(engine, eval_config)
    return {FULL: record | {"tasks": reference}} | {cut: record | {"tasks": tasks} for cut, tasks in results.items()}


def _run_points(
    points: list[Point], base: tuple[Any, Any], src: Path, analysis: AnalysisResult, config: SweepConfig, out: Path,
    orders: dict[str, list[str]] | None, store: Callable[[Point, dict], None], bar: Any,
) -> None:  # fmt: skip
    """Every point of `points`, evaluated side by side (`one_pass`). First the unhealed cuts: the
    full model runs each batch once and every cut resumes from its prefix. Then the healed or
    repaired points in groups of as many as fit in memory beside the base (`_group_size`): each
    group's checkpoints are made (`_prepare`), then run beside the base as models of their own,
    sharing its logits as kld's reference. A point that removes what another removed (same layers,
    healing and repair) is computed once and stored for both."""
    removed = {p: _removed_layers(p, base, src, analysis, config, out) if p.n else [] for p in points}
    fresh = []
    for point in points:
        twin = _twin(out, point, removed[point])
        if twin is None:
            fresh.append(point)
        else:
            store(point, twin)
    leaders: dict[tuple, Point] = {}
    for point in fresh:
        leaders.setdefault((tuple(removed[point]), point.healed, point.repair), point)
    cuts = [p for p in leaders.values() if not p.healed and p.repair == "none"]
    own = [p for p in leaders.values() if p not in cuts]
    if cuts:
        bar.set_postfix_str(f"{len(cuts)} unhealed points side by side")
        _evaluate_together(cuts, {}, base, config, out, orders, removed, store)
    size = _group_size(base[0])
    for group in [own[i : i + size] for i in range(0, len(own), size)]:
        prepared = {}
        for point in group:
            bar.set_postfix_str(f"{point.key}: {'heal' if point.healed else 'repair'}")
            prepared[point] = _prepare(point, base, src, removed[point], config, out / "work" / point.key)
        bar.set_postfix_str(f"{len(group)} healed or repaired points side by side")
        _evaluate_together([], prepared, base, config, out, orders, removed, store)
    for point in fresh:  # the others: twins of a point stored above
        twin = None if point in leaders.values() else _twin(out, point, removed[point])
        if twin is not None:
            store(point, twin)


def _group_size(model: Any) -> int:
    """How many models of the base's size fit at once beside it: FIT_SHARE of the memory free now
    where it runs (a GPU's, or the host's); one at least."""
    weight = model.get_input_embeddings().weight
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return max(1, int(FIT_SHARE * memory_free(weight.device) // size))


def _prepare(
    point: Point, base: tuple[Any, Any], src: Path, removed: list[int], config: SweepConfig, work: Path
) -> tuple[Path, dict, Ledger]:
    """A healed or repaired point's own checkpoint in `work`: pruned on disk (and repaired from the
    base model in memory), then healed if asked; with what it records (healing, repair) and what
    making it cost. A checkpoint a killed run finished is taken as it is (each is published whole),
    and a killed heal resumes."""
    checkpoint, spent = work / ("healed" if point.healed else "pruned"), work / "cost.json"
    if not checkpoint.is_dir():
        ledger = Ledger()
        with ledger.phase("prune and repair" if point.repair != "none" else "prune"):
            settings = replace(config.prune, layers=",".join(map(str, removed)), n=None, repair=point.repair)
            pruned = prune(src, work / "pruned", settings, overwrite=True, loaded=base)
        if point.healed:  # resumes if a killed run left checkpoints
            with ledger.phase("heal"):
                heal(pruned.path, checkpoint, with_placement(config.heal_config, config.placement))
            shutil.rmtree(pruned.path)  # only the healed checkpoint is used from here on
        write_atomically(spent, json.dumps(ledger.record(1)))
    record = read_record(checkpoint) or {}
    extras = {"healing": {k: v for k, v in record["healing"].items() if k != "curve"}} if point.healed else {}
    if record.get("repair"):
        extras["repair_record"] = {k: v for k, v in record["repair"].items() if k != "calibration"}
    return checkpoint, extras, _ledger_of(json.loads(spent.read_text()) if spent.is_file() else None)


def _evaluate_together(
    cuts: list[Point], prepared: dict[Point, tuple[Path, dict, Ledger]], base: tuple[Any, Any], config: SweepConfig,
    out: Path, orders: dict[str, list[str]] | None, removed: dict[Point, list[int]],
    store: Callable[[Point, dict], None],
) -> None:  # fmt: skip
    """Unhealed `cuts` of the base model, and own-weight points (their `prepared` checkpoints, loaded
    here), evaluated in one engine and stored. The full model's pass is the full point's cost, or
    when that is stored already (its tasks extended by any documents it gained as the reference of
    --limit auto), shared evenly by the variants it served."""
    model, tokenizer = base
    models = {}
    for point, (checkpoint, _, ledger) in prepared.items():
        with ledger.phase("load"):
            models[point] = load_model(checkpoint, config.placement)[0]
    variants: dict[Point, Variant] = {p: tuple(removed[p]) for p in cuts} | {p: p.key for p in prepared}
    engine = OnePass(model, [removed[p] for p in cuts], {p.key: m for p, m in models.items()})
    num_layers, keys = engine.num_layers, list(variants.values())
    full_path = out / "points" / f"{Point('full', 0, False).key}.json"
    stored = json.loads(full_path.read_text()) if FULL not in keys and full_path.is_file() else None
    if orders is None:
        evaluated = evaluate_variants(engine, tokenizer, _eval_config(config), dict.fromkeys(keys))
    else:
        reference = {t: dict(r) for t, r in stored["tasks"].items()} if stored else {}
        evaluated = _adaptive_together(engine, tokenizer, config, orders, keys, reference)
    ledgers = dict(engine.ledgers)
    if stored is not None:  # the full point is stored: its pass now served only these variants, and is theirs
        shared = engine.ledgers[FULL].share(len(keys))
        ledgers = {key: ledger.merged(shared) for key, ledger in ledgers.items()}
        if orders is not None and evaluated[FULL]["tasks"] != stored["tasks"]:  # documents it gained as reference
            _write_json(full_path, stored | {"tasks": evaluated[FULL]["tasks"]})
    for point, key in variants.items():
        own = point in models
        subject = models[point] if own else model
        _, extras, made = prepared.get(point, (None, {}, Ledger()))
        ledger = ledgers[key].merged(made)
        shape = _shape(model, removed[point], subject)
        with nullcontext() if own or not removed[point] else pruned_in_place(model, removed[point]):
            speed = _decode_speed(subject, shape, out, ledger, point.key)
            store(point, _row(point, removed[point], num_layers, subject, evaluated[key] | extras | speed, ledger))


def _shape(base: Any, removed: list[int], subject: Any) -> str:
    """What a point's decode speed depends on: how many layers it keeps, of which attention types
    where the family mixes them (Gemma's sliding and global layers), and its dtype; not which
    layers, nor their weights (a healed or repaired point computes the same per token as its cut)."""
    text = base.config.get_text_config()
    kept = [i for i in range(find_architecture(text).num_layers(text)) if i not in removed]
    types = [text.layer_types[i] for i in kept] if getattr(text, "layer_types", None) else []
    layers = ", ".join(f"{types.count(t)} {t}" for t in sorted(set(types))) or f"{len(kept)} layers"
    return f"{layers}, {subject.get_input_embeddings().weight.dtype}".replace("torch.", "")


def _decode_speed(model: Any, shape: str, out: Path, ledger: Ledger, key: str) -> dict[str, Any]:
    """A point's decode speed (tokens/s, `SPEED_SETTINGS`): measured once per `_shape`, and taken
    from the stored point that measured it for every other point of that shape."""
    for path in sorted((out / "points").glob("*.json")):
        row = json.loads(path.read_text())
        if row.get("decode_shape") == shape:
            return {k: row[k] for k in ("decode_tokens_per_s", "decode_shape", "decode_measured_on")}
    with ledger.phase("decode speed"):
        speed = inference_speed(model, SPEED_SETTINGS)["decode_tokens_per_s"]["median"]
    return {"decode_tokens_per_s": speed, "decode_shape": shape, "decode_measured_on": key}


def _removed_layers(
    point: Point, base: tuple[Any, Any], src: Path, analysis: AnalysisResult, config: SweepConfig, out: Path
) -> list[int]:
    """The layers a strategy removes at a point, chosen as `prune` chooses them (`pipeline.choose_counts`,
    with the sweep's prune settings: --candidates, --seed, ...). Every strategy's choices are stored
    in `selections/` (with what led to them), so healed points and reruns reuse them; a strategy
    that answers several n from one run (`iterative`) is asked for all the sweep's n at once."""
    folder = out / "selections"
    stored = folder / f"{point.strategy}-n{point.n}.json"
    if not stored.is_file():
        ns = [n for n in config.counts(analysis.num_layers) if n]
        settings = replace(config.prune, strategy=point.strategy)
        found = choose_counts(analysis.num_layers, ns, lambda: src, settings, analysis, progress=False, loaded=base)
        folder.mkdir(parents=True, exist_ok=True)
        for n, (removed, selection) in found.items():
            if not (folder / f"{point.strategy}-n{n}.json").is_file():
                _write_json(folder / f"{point.strategy}-n{n}.json", {"removed": removed, **selection})
    return json.loads(stored.read_text())["removed"]


def _twin(out: Path, point: Point, removed: list[int]) -> dict[str, Any] | None:
    """A stored point of another strategy that removed the same layers: its numbers are this point's."""
    for path in sorted((out / "points").glob(f"*-n{point.n}*.json")):
        row = json.loads(path.read_text())
        same = (row["healed"], row.get("repair", "none"), row["layers_removed"]) == (
            point.healed,
            point.repair,
            removed,
        )
        if same and "same_as" not in row:
            return {**row, "strategy": point.strategy, "same_as": row["strategy"], "seconds": 0.0,
                    "cost": Ledger().record(1)}  # fmt: skip
    return None


def _export_point(
    model: str | Path, src: Path, point: Point, removed: list[int], work: Path, folder: Path, twin: Point | None
) -> None:
    """A point as `folder/<point>.gguf`: a healed or repaired one converted from its checkpoint
    (still in `work`); an unhealed one cut from the source GGUF, bytes unchanged, or else converted from a
    pruned copy; a point that removed the same layers as an earlier one (`twin`), a copy of its file."""
    path = folder / f"{point.key}.gguf"
    record = {"source": str(model), "strategy": point.strategy, "sweep_point": point.key}
    source = gguf_file(model)
    folder.mkdir(parents=True, exist_ok=True)
    if twin is not None:
        shutil.copyfile(folder / f"{twin.key}.gguf", path)
    elif point.healed or point.repair != "none":  # a checkpoint of this point's own is in `work`
        export_gguf(work / ("healed" if point.healed else "pruned"), path, overwrite=True)
    else:
        try:
            if source is None:
                raise LayerpruneError("not a GGUF")
            prune_gguf(source, path, removed, record, overwrite=True)
        except LayerpruneError as err:  # a checkpoint, or a cut GGUF cannot state (Gemma's attention pattern)
            if source is not None:
                warnings.warn(f"{point.key}.gguf converted to f16: {err}", LayerpruneWarning, stacklevel=2)
            export_gguf(prune(src, work / "pruned", layers=removed, overwrite=True).path, path, overwrite=True)


def _ledger_of(cost: dict[str, Any] | None) -> Ledger:
    """A stored point's cost record as a ledger to add to (a point stored by an older layerprune has none)."""
    return Ledger(dict(cost["seconds"]), cost["layer_tokens"], cost["head_tokens"]) if cost else Ledger()


def _row(point: Point, removed: list[int], num_layers: int, model: Any, evaluated: dict, ledger: Ledger) -> dict:
    """A point's stored result: what was removed, the model's size, its evaluation and decode speed,
    and what it cost (`cost.Ledger`; the decode-speed measurement is timed, not counted)."""
    cost = ledger.record(num_layers)
    return {
        "strategy": point.strategy,
        "n": point.n,
        "fraction": point.n / num_layers,
        "repair": point.repair,
        "healed": point.healed,
        "layers_removed": removed,
        "num_layers": num_layers - len(removed),
        "parameters": model.num_parameters(),
        "size_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        **evaluated,
        "seconds": cost["total_seconds"],  # the whole point's, healing included
        "cost": cost,
    }


@dataclass(frozen=True)
class Shard:
    """This run's share of a sweep's points: every `count`-th point from `index` (0-based)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise LayerpruneError(f"shard {self.index + 1}/{self.count} does not exist: use 1/k to k/k")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """'2/4' -> the second of four shards."""
        number, _, count = text.partition("/")
        if not (number.isdigit() and count.isdigit()):
            raise LayerpruneError(f"--shard takes i/k, such as 2/4, got {text!r}")
        return cls(int(number) - 1, int(count))

    @classmethod
    def of_launcher(cls) -> Shard | None:
        """Under torchrun or accelerate launch: one shard per process, by its rank; each process
        then works alone on its own GPU (its heals are its own, not shared by DDP)."""
        rank, count = process_rank()
        if count <= 1:
            return None
        work_alone()
        return cls(rank, count)


@dataclass(frozen=True)
class SweepResult:
    """A sweep folder, and whether every point is in it (and so results and report are written)."""

    path: Path
    complete: bool


def run_sweep(
    model: str | Path, out: str | Path, config: SweepConfig, progress: bool = True, shard: Shard | None = None
) -> SweepResult:
    """Run (or resume) a sweep into `out`; writes results.json, results.csv and report.html.

    With `shard` (or, by default, under torchrun: one per process), only this shard's points are
    computed; shards may run at once into one `out` on a shared file system, and whichever
    finishes with every point stored writes the results and the report.
    """
    shard = shard or Shard.of_launcher()  # first: a launched process works alone from here on
    out = Path(out)
    inputs = model_inputs(model)
    check_tasks(list(config.evaluation.tasks))
    # one run per shard at a time; shards of one sweep may run at once
    lock = out.with_name(f"{out.name}.shard-{shard.index}-of-{shard.count}") if shard else out
    check = partial(check_destination, out, inputs, overwrite=False, resume="sweep.json")
    with claimed(lock, check), library_bars(progress):
        return _run_sweep(model, out, config, progress, shard)


def _run_sweep(model: str | Path, out: Path, config: SweepConfig, progress: bool, shard: Shard | None) -> SweepResult:
    """`run_sweep` under its lock: every check that can refuse comes before the folder is written."""
    from tqdm.auto import tqdm

    src = resolve_model(model, config.placement)
    check_destination(out, [src], overwrite=False, resume="sweep.json")
    base = load_model(src, config.placement)
    num_layers = find_architecture(base[0].config).num_layers(base[0].config)
    points = sweep_points(config, num_layers)
    _open_sweep(out, str(model), config)
    analysis = _shared_analysis(out, base, config, progress)
    mine = points[shard.index :: shard.count] if shard else points
    missing = [p for p in mine if not (out / "points" / f"{p.key}.json").is_file()]
    orders = document_orders(config) if config.adaptive else None
    first = points[0]
    if orders is not None and first not in missing and not (out / "points" / f"{first.key}.json").is_file():
        missing.insert(0, first)  # every point's reference under --limit auto: first, whatever the shard
    bar = tqdm(total=len(mine), initial=len(mine) - len(missing), desc="sweep", unit="point", disable=not progress)

    def store(point: Point, result: dict[str, Any]) -> None:
        work = out / "work" / point.key  # a healed or repaired point's checkpoints
        if config.export and point.n:
            twin = Point(result["same_as"], point.n, point.healed, point.repair) if "same_as" in result else None
            _export_point(model, src, point, result["layers_removed"], work, out / "gguf", twin)
        _write_json(out / "points" / f"{point.key}.json", result)
        shutil.rmtree(work, ignore_errors=True)
        bar.update()

    if missing:
        _run_points(missing, base, src, analysis, config, out, orders, store, bar)
    bar.close()
    complete = all((out / "points" / f"{p.key}.json").is_file() for p in points)
    if complete:  # the last shard to finish reports
        shutil.rmtree(out / "work", ignore_errors=True)
        if config.sensitivity and not (out / "sensitivity" / SENSITIVITY_FILE).is_file():
            _sensitivity_map(out, base, config)
        collect(out)
        write_report(out, config.verdicts)
    return SweepResult(out, complete)


def _shared_analysis(out: Path, base: tuple[Any, Any], config: SweepConfig, progress: bool) -> AnalysisResult:
    """The sweep's analysis, computed once and stored; a shard that finds another writing it waits
    for it, and every shard reads the stored one, so all of them choose alike."""
    distances = out / "analysis" / "distances.json"
    if not distances.is_file():
        analysis = analyze(base[0], config.calibration, tokenizer=base[1], progress=progress)  # on the base's device
        try:
            analysis.save(out / "analysis")
        except LayerpruneError:
            for _ in range(600):  # another shard is writing it: up to ten minutes
                if distances.is_file():
                    break
                time.sleep(1)
            else:
                raise
    return AnalysisResult.load(distances)


def _sensitivity_map(out: Path, base: tuple[Any, Any], config: SweepConfig) -> None:
    """The single-layer sensitivity of the base model on the sweep's tasks (kld aside), stored for
    the report: each task on at most --sensitivity-limit documents, and with --limit auto at most as
    many as the points needed (the loss comparisons often decide on the first 20 passages)."""
    tasks = tuple(t for t in config.evaluation.tasks if not task_of(t).reference)
    if not tasks:
        return
    cap = config.sensitivity_limit
    if isinstance(config.limit, int):
        cap = min(cap, config.limit)
    counts = dict.fromkeys(tasks, cap)
    if config.adaptive:
        rows = [json.loads(p.read_text()) for p in (out / "points").glob("*.json")]
        for task in tasks:
            used = [len(r["tasks"][task]["documents"]["id"]) for r in rows if r["n"] and task in r["tasks"]]
            counts[task] = min(cap, max(used, default=cap))
    sensitivity(*base, replace(_eval_config(config), tasks=tasks, limit=cap), counts).save(out / "sensitivity")


def collect(out: Path) -> list[dict[str, Any]]:
    """Gather every stored point into results.json and results.csv (one row per strategy, n, healed)."""
    rows = [json.loads(p.read_text()) for p in sorted((out / "points").glob("*.json"))]
    if not rows:
        raise LayerpruneError(f"{out} holds no sweep results")
    rows.sort(key=lambda r: (r["n"], r["strategy"], REPAIR_METHODS.index(r.get("repair", "none")), r["healed"]))
    _write_json(out / "results.json", rows)
    tasks = sorted({t for r in rows for t in r["tasks"]})
    columns = list(RESULT_FIELDS) + [column for task in tasks for column in task_of(task).columns()]
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        flat = {k: row.get(k) for k in RESULT_FIELDS}
        flat["layers_removed"] = " ".join(map(str, row["layers_removed"]))
        for task, metrics in row["tasks"].items():
            flat.update(task_of(task).table(metrics))
        writer.writerow(flat)
    write_atomically(out / "results.csv", table.getvalue())
    return rows
