"""Remove whole layers: choose which, then cut them from a checkpoint on disk or a loaded model.

On disk, tensors are streamed from the input's safetensors and their layer index renumbered,
without building the model; the result is written to a temporary folder and renamed into
place only once it has checked itself, so a failed prune never looks finished and the input
is only ever read. In memory, the layer list is rebuilt, each attention's `layer_idx`
renumbered and every per-layer config list sliced, so `generate()` and its KV cache stay right.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .analysis import AnalysisResult
from .architectures import Architecture, find_architecture
from .checkpoint import (
    INDEX_NAME,
    WEIGHT_SUFFIXES,
    TensorEntry,
    read_header,
    shard_files,
    shard_name,
    staged_folder,
    write_index,
    write_shard,
)
from .errors import LayerpruneError

STRATEGIES = ("angular", "deepest", "bi")  # chosen from the analysis alone
ALL_STRATEGIES = (*STRATEGIES, "loss", "angular-rerank", "iterative")  # the last three score removals by loss
RECORD_NAME = "layerprune.json"


def parse_layers(spec: str) -> list[int]:
    """'20-27' or '3,5,7-9' -> sorted unique layer indices."""
    layers: set[int] = set()
    try:
        for part in filter(None, (p.strip() for p in spec.split(","))):
            first, _, last = part.partition("-")
            layers.update(range(int(first), int(last or first) + 1))
    except ValueError as err:
        raise LayerpruneError(f"cannot read layers {spec!r}: use a range like 20-27 or a list like 3,5,7-9") from err
    if not layers:
        raise LayerpruneError(f"no layers in {spec!r}")
    return sorted(layers)


def _count_from(num_layers: int, n: int | None, fraction: float | None) -> int:
    if fraction is not None:
        if not 0 < fraction < 1:
            raise LayerpruneError(f"fraction must be in (0, 1), got {fraction}")
        n = round(fraction * num_layers)
        if n < 1:
            raise LayerpruneError(f"fraction {fraction} of {num_layers} layers removes no layer")
    assert n is not None
    if not 1 <= n < num_layers:
        raise LayerpruneError(f"n must be between 1 and {num_layers - 1} for a model of {num_layers} layers, got {n}")
    return n


def select_layers(
    num_layers: int,
    *,
    layers: list[int] | str | None = None,
    n: int | None = None,
    fraction: float | None = None,
    strategy: str = "angular",
    analysis: AnalysisResult | None = None,
    allow_final: bool = False,
) -> list[int]:
    """The layers to remove: given explicitly, or n (or a fraction) chosen by a strategy.

    deepest: the n layers just before the final layer (Gromov et al.'s heuristic, no data).
    angular: l*(n)..l*(n)+n-1, the block of smallest angular distance (needs `analysis`).
    bi: the n layers of lowest Block Influence (ShortGPT; need not be contiguous).
    """
    if sum(x is not None for x in (layers, n, fraction)) != 1:
        raise LayerpruneError("give exactly one of layers, n or fraction")
    final = num_layers - 1
    if layers is not None:
        chosen = parse_layers(layers) if isinstance(layers, str) else sorted(set(layers))
        bad = [i for i in chosen if not 0 <= i < num_layers]
        if bad:
            raise LayerpruneError(f"layers {bad} are out of range: the model has layers 0..{final}")
        if len(chosen) >= num_layers:
            raise LayerpruneError(f"cannot remove all {num_layers} layers")
    else:
        count = _count_from(num_layers, n, fraction)
        if strategy == "deepest":
            chosen = list(range(final - count, final))
        elif strategy in ("angular", "bi"):
            if analysis is None:
                raise LayerpruneError(f"strategy {strategy} needs an analysis")
            if analysis.num_layers != num_layers:
                raise LayerpruneError(f"the analysis is of {analysis.num_layers} layers, the model has {num_layers}")
            if strategy == "angular":
                start = analysis.best_start(count, allow_final)
                chosen = list(range(start, start + count))
            else:
                candidates = range(num_layers if allow_final else final)
                chosen = sorted(sorted(candidates, key=analysis.block_influence.__getitem__)[:count])
        else:
            raise LayerpruneError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if final in chosen and not allow_final:
        raise LayerpruneError(f"removing the final layer ({final}) is refused; pass --allow-final to allow it")
    return chosen


def slice_config(config: Any, keep: list[int], arch: Architecture) -> None:
    """Set the layer count and slice every per-layer list (declared, or of length L) to `keep`,
    in a config object or a config.json dict."""
    num_layers = arch.num_layers(config)
    items = config if isinstance(config, dict) else config.to_dict()
    lists = set(arch.per_layer_config_lists)
    lists |= {k for k, v in items.items() if isinstance(v, list) and len(v) == num_layers}
    update = {key: [items[key][i] for i in keep] for key in sorted(lists) if items.get(key) is not None}
    update[arch.num_layers_key] = len(keep)
    for key, value in update.items():
        if isinstance(config, dict):
            config[key] = value
        else:
            setattr(config, key, value)


def prune_model(model: Any, layers: list[int]) -> Any:
    """Remove `layers` from a loaded model in place; returns it.

    Renumbers every `layer_idx` (the KV cache is indexed by it) and slices the config lists
    (`layer_types` decides sliding versus full attention per layer).
    """
    import torch

    arch = find_architecture(model.config)
    num_layers = arch.num_layers(model.config)
    removed = set(select_layers(num_layers, layers=layers, allow_final=True))
    keep = [i for i in range(num_layers) if i not in removed]
    old = arch.layer_list(model)
    new = torch.nn.ModuleList([old[i] for i in keep])
    arch.set_layer_list(model, new)
    owner_path, _, idx_attr = arch.layer_idx_attr.rpartition(".")
    for new_index, layer in enumerate(new):
        owner = layer.get_submodule(owner_path) if owner_path else layer
        if not hasattr(owner, idx_attr):
            raise LayerpruneError(f"{arch.name}: layer has no attribute {arch.layer_idx_attr}")
        for module in layer.modules():  # the attention's, and any other copy (e.g. Gemma3's decoder layer)
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    slice_config(model.config, keep, arch)
    return model


@contextmanager
def layers_swapped(model: Any, arch: Architecture, keep: Sequence[int]) -> Iterator[None]:
    """Temporarily run the model with only the layers `keep`, its config sliced to match
    (models index per-layer lists such as `layer_types` by position; no cache, so layer_idx
    does not matter)."""
    import torch

    original = arch.layer_list(model)
    saved = {k: v for k, v in vars(model.config).items() if isinstance(v, list) or k == arch.num_layers_key}
    arch.set_layer_list(model, torch.nn.ModuleList([original[i] for i in keep]))
    slice_config(model.config, list(keep), arch)
    try:
        yield
    finally:
        arch.set_layer_list(model, original)
        for key, value in saved.items():
            setattr(model.config, key, value)


@contextmanager
def running_from(model: Any, arch: Architecture, keep: Sequence[int], start: Any = None) -> Iterator[None]:
    """Run only layers `keep`, the first of them fed `start` as its residual stream (the final
    norm when `keep` is empty; the embeddings as usual when `start` is None)."""
    first = arch.layer_list(model)[keep[0]] if keep else model.get_submodule(arch.final_norm)

    def feed(module: Any, args: tuple, kwargs: dict) -> Any:
        return ((start, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": start})

    handle = first.register_forward_pre_hook(feed, with_kwargs=True) if start is not None else None
    try:
        with layers_swapped(model, arch, keep):
            yield
    finally:
        if handle is not None:
            handle.remove()


def _rename_map(arch: Architecture, keys: list[str], removed: set[int]) -> dict[str, str | None]:
    """Old key -> new key (None when it is dropped), shifting layer indices down past removed ones."""
    renamed: dict[str, str | None] = {}
    for key in keys:
        split = arch.split_layer_key(key)
        if split is None:
            renamed[key] = key
            continue
        prefix, index, rest = split
        shift = sum(1 for r in removed if r < index)
        renamed[key] = None if index in removed else f"{prefix}{index - shift}.{rest}"
    return renamed


def _check_output(arch: Architecture, folder: Path, expected: dict[str, tuple[str, tuple[int, ...]]], layers: int):
    """The written tensors are exactly the expected ones, with unchanged shapes and dtypes, and
    every layer 0..layers-1 has the same tensor names."""
    written: dict[str, tuple[str, tuple[int, ...]]] = {}
    for shard in shard_files(folder):
        entries, _ = read_header(shard)
        written.update({k: (e.dtype, e.shape) for k, e in entries.items()})
    if written != expected:
        raise RuntimeError(
            f"pruned checkpoint self-check failed: {len(written)} tensors written, {len(expected)} expected"
        )
    per_layer: dict[int, set[str]] = defaultdict(set)
    for key in written:
        split = arch.split_layer_key(key)
        if split:
            per_layer[split[1]].add(split[2])
    if sorted(per_layer) != list(range(layers)) or len({frozenset(v) for v in per_layer.values()}) > 1:
        raise RuntimeError("pruned checkpoint self-check failed: layers are not numbered 0..L'-1 with equal tensors")


def _write_weights(src: Path, tmp: Path, arch: Architecture, removed: set[int]) -> dict[str, tuple[str, tuple]]:
    """Stream the kept tensors of every input shard into one output shard each.

    Returns the (dtype, shape) of every tensor written, for the self-check.
    """
    plans: list[list[tuple[str, TensorEntry]]] = []
    note = ",".join(map(str, sorted(removed)))
    metadata: dict[str, str] = {}
    for shard in shard_files(src):
        entries, metadata = read_header(shard)
        rename = _rename_map(arch, list(entries), removed)
        plan = [(new, entry) for key, entry in entries.items() if (new := rename[key])]
        if plan:
            plans.append(plan)
    weight_map: dict[str, str] = {}
    total = 0
    for number, plan in enumerate(plans, start=1):
        name = shard_name(number, len(plans))
        total += write_shard(tmp / name, plan, {**metadata, "layerprune_removed_layers": note})
        weight_map.update({key: name for key, _ in plan})
    if len(plans) > 1:
        write_index(tmp, weight_map, total)
    return {key: (entry.dtype, entry.shape) for plan in plans for key, entry in plan}


def _copy_side_files(src: Path, tmp: Path) -> None:
    """Tokenizer, generation config, chat template...: every top-level file that is not weights or config."""
    for path in src.iterdir():
        skip = path.name in ("config.json", INDEX_NAME, RECORD_NAME) or path.name.endswith(WEIGHT_SUFFIXES)
        if path.is_file() and not skip and not path.name.endswith(".index.json"):
            shutil.copy2(path, tmp / path.name)


def _write_config(src: Path, tmp: Path, config: dict[str, Any], keep: list[int], arch: Architecture) -> None:
    """`config` (the input's config.json) with the layer count set and every per-layer list sliced.

    Edited as JSON, so pruning safetensors never imports transformers or torch (their start-up
    is most of a prune's time on a small model). A config that leaves a declared per-layer list
    to be derived at load time (e.g. `layer_types` from a sliding-window pattern, which would be
    re-derived wrongly for fewer layers) is loaded by transformers, which writes the list out.
    """
    if all(key in config for key in arch.per_layer_config_lists):
        slice_config(config, keep, arch)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return
    from transformers import AutoConfig

    loaded = AutoConfig.from_pretrained(str(src))
    slice_config(loaded, keep, arch)
    loaded.save_pretrained(tmp)


def check_destination(src: Path, out: Path, overwrite: bool) -> None:
    src_r, out_r = src.resolve(), out.resolve()
    if out_r == src_r or src_r in out_r.parents:
        raise LayerpruneError(f"output {out} must not be inside the input model {src}")
    if out_r in src_r.parents:
        raise LayerpruneError(f"output {out} holds the input model {src}; choose another folder")
    check_not_existing(out, overwrite)


def check_not_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise LayerpruneError(f"output folder {out} already exists; pass --overwrite to replace it")


def prune_checkpoint(src: Path, out: Path, removed: list[int], record: dict[str, Any], overwrite: bool = False) -> Path:
    """Write `src` without the `removed` layers to `out`: streamed safetensors, sliced config, side files."""
    check_destination(src, out, overwrite)
    config = json.loads((src / "config.json").read_text())
    arch = find_architecture(config)
    num_layers = arch.num_layers(config)
    removed = select_layers(num_layers, layers=removed, allow_final=True)
    keep = [i for i in range(num_layers) if i not in set(removed)]
    with staged_folder(out) as tmp:
        if shard_files(src):
            expected = _write_weights(src, tmp, arch, set(removed))
            _write_config(src, tmp, config, keep, arch)
            _check_output(arch, tmp, expected, len(keep))
        else:  # no safetensors (e.g. pytorch_model.bin): load, prune in memory, save as safetensors
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(src), dtype="auto")
            prune_model(model, removed).save_pretrained(tmp)
        _copy_side_files(src, tmp)
        previous = src / RECORD_NAME
        history = [json.loads(previous.read_text())] if previous.is_file() else []
        record = {
            **record,
            "num_layers_before": num_layers,
            "num_layers_after": len(keep),
            "removed_layers": removed,
            "kept_layers": keep,
            "history": history,
        }
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=1) + "\n")
    return out


def prune(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    layers: list[int] | str | None = None,
    n: int | None = None,
    fraction: float | None = None,
    strategy: str = "angular",
    analysis: AnalysisResult | str | os.PathLike[str] | None = None,
    candidates: int = 5,
    allow_final: bool = False,
    overwrite: bool = False,
    data: str | None = None,
    samples: int = 64,
    seq_len: int = 256,
    batch_size: int = 8,
    progress: bool = True,
) -> Path:
    """Prune a model argument to a new checkpoint folder `out`; returns `out`.

    `deepest` and explicit `layers` never load the model; `angular` and `bi` run `analyze`
    first unless given an analysis (an AnalysisResult or a distances.json path); `loss`,
    `angular-rerank` (its `candidates` best angular blocks) and `iterative` score removals by
    calibration loss (see `selection`).
    """
    from . import __version__
    from .models import resolve_model
    from .selection import SELECTION_STRATEGIES

    if strategy not in ALL_STRATEGIES:
        raise LayerpruneError(f"unknown strategy {strategy!r}; choose one of {', '.join(ALL_STRATEGIES)}")
    if sum(x is not None for x in (layers, n, fraction)) != 1:
        raise LayerpruneError("give exactly one of layers, n or fraction")
    out = Path(out)
    src = resolve_model(model)
    check_destination(src, out, overwrite)
    config = json.loads((src / "config.json").read_text())
    num_layers = find_architecture(config).num_layers(config)
    if isinstance(analysis, (str, os.PathLike)):
        analysis = AnalysisResult.load(analysis)
    calibration = {"data": data, "samples": samples, "seq_len": seq_len, "batch_size": batch_size}
    record: dict[str, Any] = {
        "layerprune_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": str(model),
        "source_path": str(src),
        "strategy": "explicit" if layers is not None else strategy,
    }
    if layers is None:
        count = _count_from(num_layers, n, fraction)  # refuse a bad n before any long computation
        needs_analysis = strategy in ("angular", "bi", "angular-rerank")
        if analysis is None and needs_analysis:
            from .analysis import analyze

            analysis = analyze(src, **calibration, progress=progress)
        if strategy in SELECTION_STRATEGIES:
            from .selection import select_with_data

            selection = select_with_data(src, count, strategy, analysis, candidates, allow_final, **calibration)
            layers = selection.removed
            record["selection"] = {
                "candidates": selection.candidates,
                "forward_passes": selection.forward_passes,
                "seconds": selection.seconds,
                "calibration": calibration,
            }
        else:
            layers = select_layers(num_layers, n=count, strategy=strategy, analysis=analysis, allow_final=allow_final)
        if analysis is not None:
            record.setdefault("selection", {}).update(
                angular_distance_of_block=analysis.angular[count][layers[0]] if strategy == "angular" else None,
                angular_distances_for_n=analysis.angular.get(count),
                block_influence=analysis.block_influence,
                analysis={k: getattr(analysis, k) for k in ("model", "data", "samples", "seq_len")},
            )
    removed = select_layers(num_layers, layers=layers, allow_final=allow_final)
    return prune_checkpoint(src, out, removed, record, overwrite=overwrite)
