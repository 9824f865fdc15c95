"""Which blocks of layers change the residual stream least: angular distance and Block Influence.

Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers" (arXiv:2403.17887):

    d(l, n) = arccos(cos(resid[l], resid[l + n])) / pi

where resid[l] is the residual stream entering layer l (resid[0] is the embeddings and
resid[L] is the last layer's output before the final norm), taken at each sample's final
real token and averaged over samples. The block l..l+n-1 with the smallest d(l, n) is the
one to remove. ShortGPT's Block Influence (Men et al. 2024, arXiv:2403.03853) is
BI[l] = 1 - E_tokens cos(resid[l], resid[l + 1]) over all real tokens.

Both come from ONE forward pass over the calibration data: forward pre-hooks on every
layer and on the final norm see resid[0..L] (see `residual`). Memory holds only the
final-token rows of every resid[l] and the full resid of one layer at a time, never all
hidden states. A model larger than memory is measured one layer at a time (`streaming`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from layerprune.architectures import find_architecture
from layerprune.data import Calibration
from layerprune.errors import LayerpruneError
from layerprune.io.destinations import check_destination, claimed, staged
from layerprune.measure.residual import AngularSums, final_rows, last_token_index, stream_modules, watching
from layerprune.measure.streaming import layer_distances_streamed
from layerprune.plots import angular_heatmap
from layerprune.runtime.devices import Placement, layer_by_layer, plan_of, plan_placement
from layerprune.runtime.models import library_bars, load_model, load_tokenizer, model_inputs, resolve_model


@dataclass(frozen=True)
class AnalysisResult:
    """The full angular-distance table and Block Influence of one model on one data set."""

    num_layers: int
    angular: dict[int, list[float]]  # n -> [d(l, n) for l in 0..L-n]
    block_influence: list[float]  # per layer
    model: str = ""
    data: str = ""
    samples: int = 0
    seq_len: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """The table's shape matches its layer count: rows of every n from 1 to L-1, each of L-n+1."""
        size = self.num_layers
        if not isinstance(size, int) or size < 2:
            raise LayerpruneError(f"an analysis needs at least 2 layers, got {size!r}")
        if sorted(self.angular) != list(range(1, size)):
            raise LayerpruneError(f"the angular table should have rows n = 1..{size - 1}")
        short = next((n for n, row in self.angular.items() if len(row) != size - n + 1), None)
        if short is not None:
            raise LayerpruneError(f"row n = {short} of the angular table should have {size - short + 1} distances")
        if len(self.block_influence) != size:
            raise LayerpruneError(f"Block Influence should have {size} values, one per layer")

    @property
    def best(self) -> dict[int, int]:
        """n -> l*(n), the start of the n-block with the smallest angular distance."""
        return {n: min(range(len(row)), key=row.__getitem__) for n, row in self.angular.items()}

    def best_start(self, n: int, allow_final: bool = False) -> int:
        """l*(n) among blocks that keep the final layer unless `allow_final`."""
        if n not in self.angular:
            raise LayerpruneError(f"the analysis has no blocks of {n} layers (it has 1..{self.num_layers - 1})")
        row = self.angular[n]
        starts = range(len(row)) if allow_final else range(self.num_layers - n)
        if not starts:
            raise LayerpruneError(f"no block of {n} layers keeps the final layer; pass --allow-final")
        return min(starts, key=row.__getitem__)

    def to_json(self) -> dict[str, Any]:
        raw = asdict(self)
        raw["angular"] = {str(n): row for n, row in self.angular.items()}
        raw["best"] = {str(n): start for n, start in self.best.items()}
        return raw

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> AnalysisResult:
        fields = {k: raw[k] for k in ("num_layers", "block_influence", "model", "data", "samples", "seq_len")}
        angular = {int(n): [float(v) for v in row] for n, row in raw["angular"].items()}
        return cls(angular=angular, extra=raw.get("extra", {}), **fields)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AnalysisResult:
        """Read a `distances.json` (or the folder holding it)."""
        path = Path(path)
        path = path / "distances.json" if path.is_dir() else path
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, LayerpruneError) as err:
            raise LayerpruneError(f"{path} is not a layerprune distances.json: {type(err).__name__}: {err}") from err

    def save(self, out: str | os.PathLike[str], overwrite: bool = False, inputs: list[Path] | None = None) -> Path:
        """Write distances.json, distances.csv and heatmap.png into a new folder `out`."""
        out = Path(out)
        with staged(out, overwrite=overwrite, inputs=inputs or []) as tmp:
            (tmp / "distances.json").write_text(json.dumps(self.to_json(), indent=1))
            with open(tmp / "distances.csv", "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["n", "l", "angular_distance"])
                for n, row in self.angular.items():
                    writer.writerows((n, start, f"{d:.6f}") for start, d in enumerate(row))
            title = f"Angular distance d(l, n): {Path(self.model).name or self.model}"
            angular_heatmap(self.angular, self.best, self.num_layers, title, tmp / "heatmap.png")
        return out


VOLATILE_CONFIG = ("name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "use_cache",
                   "quantization_config", "output_attentions", "output_hidden_states", "return_dict")  # fmt: skip


def model_fingerprint(config: Any) -> str:
    """What identifies a model's shape for an analysis: a hash of its config, less the settings that
    change no number (names, dtype, versions, caching)."""
    kept = {k: v for k, v in config.to_dict().items() if k not in VOLATILE_CONFIG and not k.startswith("_")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_analysis(analysis: AnalysisResult, path: Path) -> None:
    """Refuse an analysis computed for another model (by its fingerprint; older analyses have none)."""
    from transformers import AutoConfig

    stored = analysis.extra.get("fingerprint")
    if stored and stored != model_fingerprint(AutoConfig.from_pretrained(str(path))):
        raise LayerpruneError(
            f"the analysis was computed for another model ({analysis.model}), not {path}; analyze this model, "
            "or leave out --analysis"
        )


def layer_distances(
    model: Any, batches: list[dict], progress: bool = True
) -> tuple[dict[int, list[float]], list[float]]:
    """Angular table and Block Influence of a loaded model over token batches, in one pass."""
    import torch
    from tqdm.auto import tqdm

    arch = find_architecture(model.config)
    sums = AngularSums(arch.num_layers(model.config))
    device = model.get_input_embeddings().weight.device
    rows: list[Any] = []
    previous: list[Any] = []

    def on_state(position: int, resid: Any) -> None:
        rows.append(final_rows(resid, last_index))
        if position:
            sums.add_neighbours(position - 1, previous[0], resid, mask)
        previous[:] = [resid]

    with torch.inference_mode(), watching(stream_modules(model, arch), on_state):
        for batch in tqdm(batches, desc="analyze", unit="batch", disable=not progress):
            mask = batch["attention_mask"].bool()
            last_index = last_token_index(mask)
            rows.clear()
            model.base_model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
            if len(rows) != sums.num_layers + 1:
                raise RuntimeError(f"saw {len(rows)} residual states, expected {sums.num_layers + 1}")
            sums.add_samples(rows, int(mask.sum()))
            previous.clear()
    return sums.result()


def analyze(
    model: Any,
    calibration: Calibration | None = None,
    *,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    tokenizer: Any = None,
    progress: bool = True,
    offload: bool | None = None,
    memory_budget_mb: float | None = None,
    placement: Placement | None = None,
    **calibration_settings: Any,
) -> AnalysisResult:
    """Measure d(l, n) for every block and Block Influence for every layer.

    `model` is any model argument (folder, .gguf, built-in name, hub id) or a loaded model,
    in which case `tokenizer` is required. The calibration text is `calibration`, or built from
    its settings given as keywords (`data=`, `samples=`, `seq_len=`, `batch_size=`). `offload`
    runs the data through one layer at a time, reading each layer's weights from disk (see
    `streaming`); by default it is chosen when the model would not fit in the memory of the device
    that runs it (`placement`, see `devices`). Writes distances.json/.csv and heatmap.png to a new
    folder `out`.
    """
    calibration = calibration or Calibration(**calibration_settings)
    documents = calibration.documents()  # fail on bad data before loading a model
    run = partial(_analyze, model, calibration, documents, tokenizer, progress, offload, memory_budget_mb, placement)
    if out is None:
        with library_bars(progress):
            return run()
    out = Path(out)
    inputs = [*(model_inputs(model) if isinstance(model, (str, os.PathLike)) else []), *calibration.inputs()]
    # the destination is refused before any work, and held
    with claimed(out, partial(check_destination, out, inputs, overwrite)), library_bars(progress):
        result = run()
        result.save(out, overwrite=overwrite, inputs=inputs)
    return result


def _analyze(
    model: Any,
    calibration: Calibration,
    documents: list[str],
    tokenizer: Any,
    progress: bool,
    offload: bool | None,
    memory_budget_mb: float | None,
    placement: Placement | None,
) -> AnalysisResult:
    """`analyze` without its output folder."""
    started = time.perf_counter()
    if isinstance(model, (str, os.PathLike)):
        name = str(model)
        path = resolve_model(model, placement)
        plan = plan_placement(placement, path)
        offload = layer_by_layer(plan, path, offload, name, "analyzing")
        if offload:
            from transformers import AutoConfig

            fingerprint = model_fingerprint(AutoConfig.from_pretrained(str(path)))
            plan = replace(plan, device_map=None, max_memory=None)  # one layer at a time on the device
            batches = calibration.batches(load_tokenizer(path), documents)
            budget = memory_budget_mb * 2**20 if memory_budget_mb is not None else None
            angular, block_influence = layer_distances_streamed(path, batches, budget, plan, progress=progress)
        else:
            model, tokenizer = load_model(path, plan)
    elif tokenizer is None:
        raise LayerpruneError("analyze() of a loaded model needs its tokenizer")
    else:
        name = getattr(model, "name_or_path", type(model).__name__)
        plan = plan_of(model)
    if not offload:
        fingerprint = model_fingerprint(model.config)
        batches = calibration.batches(tokenizer, documents)
        angular, block_influence = layer_distances(model, batches, progress=progress)
    result = AnalysisResult(
        num_layers=len(block_influence),
        angular=angular,
        block_influence=block_influence,
        model=name,
        data=str(calibration.data),
        samples=sum(len(b["input_ids"]) for b in batches),
        seq_len=calibration.seq_len,
        extra={
            "offload": bool(offload),
            **plan.record(),
            "fingerprint": fingerprint,
            "seconds": round(time.perf_counter() - started, 1),
        },
    )
    return result
