"""Which blocks of layers change the residual stream least: angular distance and Block Influence.

Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers" (arXiv:2403.17887):

    d(l, n) = arccos(cos(resid[l], resid[l + n])) / pi

where resid[l] is the residual stream entering layer l (resid[0] is the embeddings and
resid[L] is the last layer's output before the final norm), taken at each sample's final
real token and averaged over samples. The block l..l+n-1 with the smallest d(l, n) is the
one to remove. ShortGPT's Block Influence (Men et al. 2024, arXiv:2403.03853) is
BI[l] = 1 - E_tokens cos(resid[l], resid[l + 1]) over all real tokens.

Both come from ONE forward pass over the calibration data: forward pre-hooks on every
layer and on the final norm see resid[0..L]. Memory holds only the final-token rows of
every resid[l] and the full resid of one layer at a time, never all hidden states.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .architectures import Architecture, find_architecture
from .errors import LayerpruneError


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
    def load(cls, path: str | Path) -> AnalysisResult:
        """Read a `distances.json` (or the folder holding it)."""
        path = Path(path)
        path = path / "distances.json" if path.is_dir() else path
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise LayerpruneError(f"{path} is not a layerprune distances.json: {type(err).__name__}: {err}") from err

    def save(self, out: str | Path) -> Path:
        """Write distances.json, distances.csv and heatmap.png into `out`."""
        from .plots import angular_heatmap

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "distances.json").write_text(json.dumps(self.to_json(), indent=1))
        with open(out / "distances.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["n", "l", "angular_distance"])
            for n, row in self.angular.items():
                writer.writerows((n, start, f"{d:.6f}") for start, d in enumerate(row))
        angular_heatmap(self, out / "heatmap.png")
        return out


class _ResidualRecorder:
    """Forward pre-hooks on every layer and the final norm, reducing resid[l] as it streams past."""

    def __init__(self, model: Any, arch: Architecture) -> None:
        import torch

        layers = list(arch.layer_list(model))
        self.modules = [*layers, model.get_submodule(arch.final_norm)]
        n_states = len(self.modules)  # L + 1
        self.angular_sum = torch.zeros(n_states, n_states, dtype=torch.float64)
        self.cos_sum = torch.zeros(n_states - 1, dtype=torch.float64)
        self.samples = 0
        self.tokens = 0
        self._last_rows: list[Any] = []
        self._previous: Any = None
        self._mask: Any = None
        self._last_index: Any = None

    def __enter__(self) -> _ResidualRecorder:
        self._handles = [
            module.register_forward_pre_hook(self._hook(index), with_kwargs=True)
            for index, module in enumerate(self.modules)
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def start_batch(self, attention_mask: Any) -> None:
        mask = attention_mask.bool()
        self._mask = mask
        # the final real token of each row, whatever the padding side
        self._last_index = mask.shape[1] - 1 - mask.flip(1).int().argmax(dim=1)
        self._last_rows = []
        self._previous = None

    def _hook(self, index: int):
        import torch

        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            # per-token cosines in the model's dtype, summed in float64: a float64 copy of every
            # state would cost more than the layers of a small model
            resid = (args[0] if args else kwargs["hidden_states"]).detach()
            rows = torch.arange(resid.shape[0])
            self._last_rows.append(resid[rows, self._last_index].double())
            if self._previous is not None:
                cos = torch.nn.functional.cosine_similarity(self._previous, resid, dim=-1)
                self.cos_sum[index - 1] += cos[self._mask].double().sum()
            self._previous = resid

        return hook

    def end_batch(self) -> None:
        import torch

        if len(self._last_rows) != len(self.modules):
            raise RuntimeError(f"saw {len(self._last_rows)} residual states, expected {len(self.modules)}")
        unit = torch.nn.functional.normalize(torch.stack(self._last_rows, dim=1), dim=-1)  # [B, L+1, H]
        cos = (unit @ unit.transpose(1, 2)).clamp(-1.0, 1.0)  # [B, L+1, L+1]
        self.angular_sum += (torch.arccos(cos) / math.pi).sum(dim=0)
        self.samples += unit.shape[0]
        self.tokens += int(self._mask.sum())
        self._last_rows, self._previous = [], None

    def result(self) -> tuple[dict[int, list[float]], list[float]]:
        mean = self.angular_sum / self.samples
        num_layers = len(self.modules) - 1
        angular = {
            n: [float(mean[start, start + n]) for start in range(num_layers - n + 1)] for n in range(1, num_layers)
        }
        block_influence = [float(v) for v in 1.0 - self.cos_sum / self.tokens]
        return angular, block_influence


def measure(model: Any, batches: list[dict], progress: bool = True) -> tuple[dict[int, list[float]], list[float]]:
    """Angular table and Block Influence of a loaded model over token batches, in one pass."""
    import torch
    from tqdm.auto import tqdm

    arch = find_architecture(model.config)
    device = next(model.parameters()).device
    with torch.inference_mode(), _ResidualRecorder(model, arch) as recorder:
        for batch in tqdm(batches, desc="analyze", unit="batch", disable=not progress):
            recorder.start_batch(batch["attention_mask"].to(device))
            model.base_model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
            recorder.end_batch()
    return recorder.result()


def cgroup_limits(proc: Path = Path("/proc/self/cgroup"), mount: Path = Path("/sys/fs/cgroup")) -> list[int]:
    """Memory limits (bytes) of this process's cgroup and its ancestors, v1 or v2 (containers,
    `systemd-run -p MemoryMax=`, batch schedulers); empty when none is set or visible."""
    limits = []
    for line in proc.read_text().splitlines() if proc.is_file() else []:
        _, controllers, path = line.split(":", 2)
        v1 = "memory" in controllers.split(",")
        if not v1 and controllers:
            continue
        root, name = (mount / "memory", "memory.limit_in_bytes") if v1 else (mount, "memory.max")
        folder = root / path.lstrip("/")
        while folder.is_relative_to(root):
            value = (folder / name).read_text().strip() if (folder / name).is_file() else "max"
            if value.isdigit() and int(value) < 2**60:
                limits.append(int(value))
            if folder == root:
                break
            folder = folder.parent
    return limits


def memory_available() -> int:
    """Bytes available to this process: the kernel's MemAvailable, or a smaller cgroup limit."""
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").is_file() else ""
    available = next(
        (int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.startswith("MemAvailable")), None
    )
    if available is None:
        import os

        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return min([available, *cgroup_limits()])


def fp32_bytes(path: Path) -> int:
    """The checkpoint's weights in fp32, from the safetensors headers (nothing is loaded)."""
    from .checkpoint import read_header, shard_files

    return sum(math.prod(e.shape) * 4 for shard in shard_files(path) for e in read_header(shard)[0].values())


def fits_in_memory(path: Path) -> bool:
    """False when the model's fp32 weights would take more than 70% of the memory available now."""
    return fp32_bytes(path) <= 0.7 * memory_available()


def analyze(
    model: Any,
    data: str | Path | None = None,
    samples: int = 64,
    seq_len: int = 256,
    batch_size: int = 8,
    out: str | Path | None = None,
    tokenizer: Any = None,
    progress: bool = True,
    offload: bool | None = None,
    memory_budget_mb: float | None = None,
) -> AnalysisResult:
    """Measure d(l, n) for every block and Block Influence for every layer.

    `model` is any model argument (folder, .gguf, built-in name, hub id) or a loaded model,
    in which case `tokenizer` is required. `offload` runs the data through one layer at a time,
    reading each layer's weights from disk (see `streaming`); by default it is chosen when the
    model would not fit in the memory available. Writes distances.json/.csv and heatmap.png to `out`.
    """
    from .data import DEFAULT_CALIBRATION, load_documents, token_batches
    from .models import load_model, load_tokenizer, resolve_model

    data = data or DEFAULT_CALIBRATION
    documents = load_documents(data)  # fail on bad data before loading a model
    name = str(model) if isinstance(model, (str, Path)) else getattr(model, "name_or_path", type(model).__name__)
    if isinstance(model, (str, Path)):
        path = resolve_model(model)
        if offload is None and not fits_in_memory(path):
            print(f"{name} would not fit in the memory available: analyzing one layer at a time (--offload)")
            offload = True
        if offload:
            from .streaming import measure_streaming

            tokenizer = load_tokenizer(path)
            batches = token_batches(tokenizer, documents, samples, seq_len, batch_size)
            budget = memory_budget_mb * 2**20 if memory_budget_mb is not None else None
            angular, block_influence = measure_streaming(path, batches, budget, progress=progress)
        else:
            model, tokenizer = load_model(path)
    elif tokenizer is None:
        raise LayerpruneError("analyze() of a loaded model needs its tokenizer")
    if not offload:
        batches = token_batches(tokenizer, documents, samples, seq_len, batch_size)
        angular, block_influence = measure(model, batches, progress=progress)
    result = AnalysisResult(
        num_layers=len(block_influence),
        angular=angular,
        block_influence=block_influence,
        model=name,
        data=str(data),
        samples=sum(len(b["input_ids"]) for b in batches),
        seq_len=seq_len,
        extra={"offload": bool(offload)},
    )
    if out is not None:
        result.save(out)
    return result
