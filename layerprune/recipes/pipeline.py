"""Recipes over the components: choose layers then cut them, prune then heal, then quantize.

    prune:          strategy.choose(...) -> surgery.prune_checkpoint(...), or gguf_surgery.prune_gguf(...)
    prune_and_heal: prune into the heal's work folder -> heal into the output
    then_quantize:  any of the above into a staging folder -> its quantized form into the output
    then_gguf:      any of the above into a staging folder -> a GGUF file (llama.cpp's converter)

Each returns a result object holding the folder written and its `layerprune.json` record.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from layerprune._version import __version__
from layerprune.config import build
from layerprune.cut.gguf_surgery import check_gguf_destination, gguf_layers, prune_gguf, read_gguf
from layerprune.cut.surgery import prune_checkpoint
from layerprune.data import Calibration
from layerprune.errors import LayerpruneError
from layerprune.healing.lora import HealConfig, HealResult, heal, heal_work_dir
from layerprune.healing.repair import METHODS as REPAIR_METHODS
from layerprune.healing.repair import repaired_weights
from layerprune.io.checkpoint import Written, read_config, read_record, write_record
from layerprune.io.destinations import check_destination, claimed
from layerprune.layer_sets import check_fraction, check_removal, exactly_one, layer_count, parse_layers
from layerprune.measure.analysis import AnalysisResult, analyze, check_analysis
from layerprune.recipes.export import export_gguf, export_quantized, gguf_quantizer
from layerprune.runtime.devices import (
    Placement,
    fits_on_device,
    is_main_process,
    model_bytes,
    on_main_process,
    plan_of,
    plan_placement,
)
from layerprune.runtime.memory import memory_available
from layerprune.runtime.models import (
    BUILTIN_MODELS,
    ModelSpec,
    check_quantization,
    gguf_file,
    library_bars,
    load_model,
    model_inputs,
    resolve_model,
)
from layerprune.selection.scoring import calibration_batches
from layerprune.selection.strategies import ANALYSIS, MODEL, Request, get_strategy, strategy_names


@dataclass(frozen=True)
class PruneConfig:
    """Which layers to remove: given explicitly, or how many and by which strategy."""

    layers: str | None = field(default=None, metadata={"help": "Layers to remove: 20-27 or 3,5,7-9."})
    n: int | None = field(
        default=None,
        metadata={"help": "Number of layers to remove (--count under torchrun, whose parser takes --n).",
                  "aliases": ("count",)},
    )  # fmt: skip
    fraction: float | None = field(default=None, metadata={"help": "Fraction of layers to remove."})
    strategy: str = field(
        default="angular",
        metadata={"help": "How to choose them (see `layerprune strategies`).", "choices": strategy_names},
    )
    candidates: int = field(default=5, metadata={"help": "angular-rerank: blocks re-scored by loss."})
    seed: int = field(default=0, metadata={"help": "Seed of strategies that draw at random."})
    allow_final: bool = field(default=False, metadata={"help": "Allow removing the final layer."})
    repair: str = field(
        default="none",
        metadata={"help": "Repair the cut without training: a map per removed block, fitted on the calibration "
                  "data and folded into the layer before it (linear: least squares; cosine: then refined to "
                  "minimize cosine distance).", "choices": REPAIR_METHODS},
    )  # fmt: skip
    offload: bool | None = field(
        default=None,
        metadata={"help": "Analyze and repair one layer in memory at a time (default: when the model would not fit)."},
    )
    calibration: Calibration = field(default_factory=Calibration)
    placement: Placement = field(default_factory=Placement)

    def __post_init__(self) -> None:
        if isinstance(self.layers, (list, tuple)):  # the API also takes a list of layer indices
            object.__setattr__(self, "layers", ",".join(map(str, self.layers)))
        get_strategy(self.strategy)
        exactly_one(self.layers, self.n, self.fraction)
        if self.fraction is not None:
            check_fraction(self.fraction)
        if self.candidates < 1:
            raise LayerpruneError(f"--candidates must be at least 1, got {self.candidates}")


class PruneResult(Written):
    """A pruned checkpoint: its folder and the `layerprune.json` written there."""

    @property
    def removed(self) -> list[int]:
        return self.record["removed_layers"]


def choose_layers(
    num_layers: int,
    source: Callable[[], Path],
    config: PruneConfig,
    analysis: AnalysisResult | None = None,
    progress: bool = True,
    loaded: tuple[Any, Any] | None = None,
) -> tuple[list[int], dict[str, Any]]:
    """The layers `config` removes from a model of `num_layers` layers, and what led to them.
    `source()` gives its checkpoint folder, asked for only by strategies that read the model
    (which read `loaded` instead where it is given)."""
    if config.layers is not None:
        return check_removal(num_layers, parse_layers(config.layers, num_layers), config.allow_final), {}
    count = layer_count(num_layers, config.n, config.fraction)  # refuse a bad n before any long work
    return choose_counts(num_layers, [count], source, config, analysis, progress, loaded)[count]


def choose_counts(
    num_layers: int,
    counts: list[int],
    source: Callable[[], Path],
    config: PruneConfig,
    analysis: AnalysisResult | None = None,
    progress: bool = True,
    loaded: tuple[Any, Any] | None = None,
) -> dict[int, tuple[list[int], dict[str, Any]]]:
    """For each of `counts`, the layers `config`'s strategy removes and what led to them (one run
    for all where the strategy shares the work, as `iterative`). The analysis is computed if the
    strategy needs it and none is given; the model, if it needs it, is `loaded` (model, tokenizer)
    or loaded from `source()`."""
    strategy = get_strategy(config.strategy)
    if ANALYSIS in strategy.needs and analysis is None:
        model_argument, tokenizer = loaded or (source(), None)
        analysis = analyze(model_argument, config.calibration, tokenizer=tokenizer, placement=config.placement,
                           offload=config.offload, progress=progress)  # fmt: skip
    model = batches = None
    if MODEL in strategy.needs:
        documents = config.calibration.documents()  # a bad --data is refused before the weights load
        model, tokenizer = loaded or _loaded_whole(source(), config, strategy.name)
        batches = calibration_batches(config.calibration, tokenizer, documents)
    request = Request(num_layers, counts[0], config.allow_final, analysis, model, batches, config.candidates,
                      config.seed, progress)  # fmt: skip
    found = {}
    for count, choice in strategy.choose_many(request, counts).items():
        selection = dict(choice.provenance)
        if MODEL in strategy.needs:
            selection["calibration"] = asdict(config.calibration)
            selection["placement"] = plan_of(model).record()
        if analysis is not None:
            selection.update(
                angular_distances_for_n=analysis.angular.get(count),
                block_influence=analysis.block_influence,
                analysis={k: getattr(analysis, k) for k in ("model", "data", "samples", "seq_len")},
            )
        found[count] = check_removal(num_layers, choice.layers, config.allow_final), selection
    return found


def _loaded_whole(src: Path, config: PruneConfig, strategy: str) -> tuple[Any, Any]:
    """The model and tokenizer, for a strategy that scores blocks with the whole model in memory."""
    plan = plan_placement(config.placement, src)
    if plan.device == "cpu" and not fits_on_device(plan, src):
        raise LayerpruneError(
            f"strategy {strategy} scores blocks with the whole model in memory, and its weights "
            f"({model_bytes(src, plan.dtype) / 2**30:.1f} GiB in {plan.dtype}) would not fit in the "
            f"{memory_available() / 2**30:.1f} GiB available; use angular or bi (their analysis runs one "
            "layer at a time) or deepest"
        )
    return load_model(src, plan)


def _read_once(src: Path, config: PruneConfig, analysis: AnalysisResult | None) -> tuple[Any, Any] | None:
    """The model and tokenizer, loaded once for both the choice of layers and the repair where both
    read the whole model in memory; None where at most one reads it, or the model is streamed."""
    needs = get_strategy(config.strategy).needs if config.layers is None else set()
    reads = MODEL in needs or (ANALYSIS in needs and analysis is None)
    if config.repair == "none" or not reads or config.offload:
        return None
    config.calibration.documents()  # a bad --data is refused before the weights load
    plan = plan_placement(config.placement, src)
    if config.offload is None and not fits_on_device(plan, src):
        return None
    return load_model(src, plan)


def prune(
    model: ModelSpec,
    out: str | os.PathLike[str],
    config: PruneConfig | None = None,
    *,
    analysis: AnalysisResult | str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    outtype: str = "f16",
    loaded: tuple[Any, Any] | None = None,
    **settings: Any,
) -> PruneResult:
    """Prune a model argument to a new checkpoint folder `out`, or to a GGUF file `out` (.gguf):
    from a GGUF, still quantized (its tensors' bytes copied); from a checkpoint, converted by
    llama.cpp's converter to `outtype`.

    The settings are `config`, or `PruneConfig`'s fields as keywords (`n=8, strategy="loss",
    samples=32`, ...). `deepest` and explicit `layers` never load the model; strategies that
    need the analysis run `analyze` first unless given one (an AnalysisResult or a
    distances.json path); the loss-scored ones load the model and calibration data. The model is
    loaded once for both the choice and a repair; `loaded` (model, tokenizer), the same model
    already in memory as `config.placement` places it, is read instead of loading it, and is left
    unchanged.
    """
    config = config or build(PruneConfig, settings)
    out = Path(out)
    inputs = model_inputs(model)
    if isinstance(analysis, (str, os.PathLike)):
        analysis = AnalysisResult.load(analysis)
    if output_format(out) == "gguf":
        with library_bars(progress):
            return _prune_gguf(model, out, config, analysis, overwrite, progress, outtype)
    inputs += config.calibration.inputs() if config.repair != "none" else []
    # the destination is held from before any long work
    with claimed(out, partial(check_destination, out, inputs, overwrite)), library_bars(progress):
        src = resolve_model(model, config.placement)
        raw, arch = read_config(src)
        if analysis is not None:
            check_analysis(analysis, src)
        loaded = loaded if loaded is not None else _read_once(src, config, analysis)
        removed, selection = choose_layers(arch.num_layers(raw), lambda: src, config, analysis, progress, loaded)
        record = _record(model, src, config, selection)
        if config.repair == "none":
            return PruneResult(out, prune_checkpoint(src, out, removed, record, overwrite, inputs=inputs))
        replaced, record["repair"] = repaired_weights(
            src, removed, config.repair, config.calibration, config.placement, progress, config.offload, loaded
        )
        del loaded  # not held while the checkpoint is written (a caller that passed it may still hold it)
        return PruneResult(
            out, prune_checkpoint(src, out, removed, record, overwrite, inputs=inputs, replaced=replaced)
        )


FILE_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth", ".ckpt", ".onnx", ".ggml", ".h5", ".json", ".zip", ".tar")


def output_format(out: Path) -> str:
    """`gguf` for a .gguf file, `folder` for a checkpoint folder; a file suffix of another format
    is refused (a folder's name may hold dots)."""
    if out.suffix.lower() == ".gguf":
        return "gguf"
    if out.suffix.lower() in FILE_SUFFIXES:
        raise LayerpruneError(
            f"output {out}: {out.suffix} names no format layerprune writes; give a folder or a .gguf file"
        )
    return "folder"


def _prune_gguf(
    model: ModelSpec,
    out: Path,
    config: PruneConfig,
    analysis: AnalysisResult | None,
    overwrite: bool,
    progress: bool,
    outtype: str,
) -> PruneResult:
    """A GGUF input pruned into a GGUF file, still quantized: `deepest` and `--layers` read only its
    header; strategies that read the model analyze its converted checkpoint, then cut the GGUF."""
    source = gguf_file(model)
    if source is None or config.repair != "none":  # pruned to a folder, then converted by llama.cpp's converter
        written = then_gguf(out, outtype, lambda staging: prune(model, staging, config, analysis=analysis,
                                                              progress=progress), overwrite)  # fmt: skip
        return PruneResult(written.path, written.record)
    inputs = model_inputs(model)
    with claimed(out, partial(check_gguf_destination, out, [source, *inputs], overwrite)):  # held throughout
        reader = read_gguf(source)  # parsing a GGUF's metadata takes seconds: once
        _, num_layers = gguf_layers(reader, source)
        removed, selection = choose_layers(
            num_layers, lambda: resolve_model(model, config.placement), config, analysis, progress
        )
        record = _record(model, source, config, selection)
        return PruneResult(out, prune_gguf(source, out, removed, record, overwrite, inputs, reader))


def _record(model: ModelSpec, src: Path, config: PruneConfig, selection: dict[str, Any]) -> dict[str, Any]:
    record: dict[str, Any] = {
        "layerprune_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": str(model),
        "source_path": str(src),
        "strategy": "explicit" if config.layers is not None else config.strategy,
    }
    builtin = BUILTIN_MODELS.get(str(model))
    if builtin is not None:  # for the model card: what the packaged model was made from
        record.update(base_model=builtin.hub_id, license=builtin.license)
    if selection:
        record["selection"] = selection
    return record


def prune_and_heal(
    model: ModelSpec,
    out: str | os.PathLike[str],
    config: PruneConfig | None = None,
    heal_config: HealConfig | None = None,
    *,
    analysis: AnalysisResult | str | os.PathLike[str] | None = None,
    save_adapter: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **settings: Any,
) -> HealResult:
    """Prune (see `prune`) into the heal's work folder beside `out`, then heal that into `out`.

    Run again after an interruption, the prune is redone (it is deterministic) and the heal resumes.
    """
    config = config or build(PruneConfig, settings)
    out = Path(out)
    inputs = model_inputs(model)
    check = partial(check_destination, out, inputs, overwrite)
    # the destination is held from the prune to the merge
    with claimed(out, check) if is_main_process() else nullcontext(), library_bars(progress):
        return _prune_and_heal(model, out, config, heal_config, analysis, save_adapter, overwrite, progress)


def _prune_and_heal(
    model: ModelSpec,
    out: Path,
    config: PruneConfig,
    heal_config: HealConfig | None,
    analysis: AnalysisResult | str | os.PathLike[str] | None,
    save_adapter: bool,
    overwrite: bool,
    progress: bool,
) -> HealResult:
    """`prune_and_heal` under the lock on its destination."""
    work = heal_work_dir(out)
    base = work / "base"

    def prune_base() -> None:  # one process prunes; under torchrun or accelerate the others wait for it
        if overwrite:
            shutil.rmtree(work, ignore_errors=True)
        prune(model, base, config, analysis=analysis, overwrite=True, progress=progress)

    on_main_process(prune_base)
    heal_config = with_placement(heal_config or HealConfig(), config.placement)
    return heal(base, out, heal_config, save_adapter=save_adapter, overwrite=overwrite, restart=False)


def with_placement(heal_config: HealConfig, placement: Placement) -> HealConfig:
    """A heal inside another command trains where that command runs, unless told otherwise
    (`--heal-device`, `--heal-dtype`): one placement decision per command."""
    return heal_config if heal_config.placement != Placement() else replace(heal_config, placement=placement)


def _through_staging(out: Path, name: str, make: Callable[[Path], Any], convert: Callable[[Path], Any]) -> Any:
    """Run `make(staging)` (a prune or a heal) into the staging folder `.OUT.name` beside `out`, then
    `convert(staged folder)` on the main process; the staging folder is removed either way. The
    same command rerun redoes `make` there (a heal resumes from its own work folder)."""
    staging = out.parent / f".{out.name}.{name}"
    on_main_process(lambda: shutil.rmtree(staging, ignore_errors=True))  # left by an earlier run
    made = make(staging)  # every process, for a heal under torchrun or accelerate

    def run() -> None:
        try:
            convert(made.path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    on_main_process(run)
    return made


def then_gguf(
    out: str | os.PathLike[str], outtype: str, make: Callable[[Path], Any], overwrite: bool = False
) -> Written:
    """`make` into a staging folder beside `out`, then written as the GGUF file `out` through
    llama.cpp's converter (`export_gguf`)."""
    out = Path(out)
    gguf_quantizer(outtype)  # refused before the work, not after it
    with claimed(out, partial(check_gguf_destination, out, [], overwrite)) if is_main_process() else nullcontext():
        made = _through_staging(out, "checkpoint", make, lambda staged: export_gguf(staged, out, outtype, overwrite))
    return Written(out, made.record)


def then_quantize(
    out: str | os.PathLike[str], scheme: str, make: Callable[[Path], Any], overwrite: bool = False
) -> Written:
    """`make` into a staging folder beside `out`, then its quantized form written to `out`
    (`prune/heal --quantize`)."""
    check_quantization(scheme)
    out = Path(out)

    def quantize(staged: Path) -> None:
        export_quantized(staged, out, scheme, overwrite=overwrite)
        record = read_record(out) or {}
        del record["quantization"]["source"]  # the staging folder, now gone: the record's history says the rest
        write_record(out, record)

    with claimed(out, partial(check_destination, out, [], overwrite)) if is_main_process() else nullcontext():
        _through_staging(out, "unquantized", make, quantize)
    return Written(out, read_record(out) or {})
