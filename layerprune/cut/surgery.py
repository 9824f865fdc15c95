"""Cut whole layers out: from a checkpoint on disk, or from a loaded model. Choosing which is
the strategies' job; this module only removes a given set and checks the result.

On disk, tensors are streamed from the input's safetensors and their layer index renumbered,
without building the model; the result is written to a temporary folder and renamed into
place only once it has checked itself, so a failed prune never looks finished and the input
is only ever read. In memory, the layer list is rebuilt, each attention's `layer_idx`
renumbered and every per-layer config list sliced, so `generate()` and its KV cache stay right.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from layerprune.architectures import Architecture, find_architecture
from layerprune.errors import LayerpruneError
from layerprune.io.checkpoint import (
    CONFIG_NAME,
    INDEX_NAME,
    RECORD_NAME,
    WEIGHT_SUFFIXES,
    Source,
    check_layers,
    describe,
    read_config,
    read_header,
    read_record,
    shard_files,
    tensor_entries,
    write_record,
    write_weights,
)
from layerprune.io.destinations import staged
from layerprune.layer_sets import check_removal
from layerprune.measure.residual import slice_config
from layerprune.runtime.models import load_weights


def prune_model(model: Any, layers: list[int]) -> Any:
    """Remove `layers` from a loaded model in place; returns it.

    Renumbers every `layer_idx` (the KV cache is indexed by it) and slices the config lists
    (`layer_types` decides sliding versus full attention per layer).
    """
    import torch

    arch = find_architecture(model.config)
    num_layers = arch.num_layers(model.config)
    removed = set(check_removal(num_layers, layers, allow_final=True))
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
                module.layer_idx = new_index  # type: ignore[assignment]
    slice_config(model.config, keep, arch)
    return model


@contextmanager
def pruned_in_place(model: Any, layers: list[int]) -> Iterator[Any]:
    """The model with `layers` removed for the duration of the block (`prune_model`), then exactly
    as it was: no copy of the weights is made, so a sweep needs memory for one model only."""
    arch = find_architecture(model.config)
    layer_list = arch.layer_list(model)
    config = {k: v for k, v in vars(model.config).items() if isinstance(v, list) or k == arch.num_layers_key}
    indices = [(m, m.layer_idx) for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    prune_model(model, layers)
    try:
        yield model
    finally:
        arch.set_layer_list(model, layer_list)
        for key, value in config.items():
            setattr(model.config, key, value)
        for module, index in indices:
            module.layer_idx = index


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
    every layer 0..layers-1 has the same tensor names. A failure here is a bug, not bad input."""
    written = {k: (e.dtype, e.shape) for k, e in tensor_entries(folder).items()}
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


def _plan(
    src: Path, arch: Architecture, removed: set[int], replaced: dict[str, Source]
) -> tuple[list[list[tuple[str, Source]]], dict]:
    """The kept tensors of every input shard, renamed (one output shard each), each read from
    `replaced` where it names the key, and the metadata."""
    plans: list[list[tuple[str, Source]]] = []
    metadata: dict[str, str] = {}
    for shard in shard_files(src):
        entries, metadata = read_header(shard)
        rename = _rename_map(arch, list(entries), removed)
        plan = [(new, replaced.get(key, entry)) for key, entry in entries.items() if (new := rename[key])]
        if plan:
            plans.append(plan)
    return plans, metadata


def _copy_side_files(src: Path, tmp: Path) -> None:
    """Tokenizer, generation config, chat template...: every top-level file that is not weights or config."""
    for path in src.iterdir():
        skip = path.name in (CONFIG_NAME, INDEX_NAME, RECORD_NAME) or path.name.endswith(WEIGHT_SUFFIXES)
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
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return
    from transformers import AutoConfig

    loaded = AutoConfig.from_pretrained(str(src))
    slice_config(loaded, keep, arch)
    loaded.save_pretrained(tmp)


def _prune_bin(src: Path, tmp: Path, removed: list[int]) -> None:
    """A checkpoint without safetensors (pytorch_model.bin): load it (refusing missing or
    unexpected weights), prune in memory, save as safetensors."""
    prune_model(load_weights(src, dtype="auto"), removed).save_pretrained(tmp)


def prune_checkpoint(
    src: Path,
    out: Path,
    removed: list[int],
    record: dict[str, Any],
    overwrite: bool = False,
    inputs: Iterable[Path] = (),
    replaced: dict[str, Source] | None = None,
) -> dict[str, Any]:
    """Write `src` without the `removed` layers to `out`: streamed safetensors, sliced config, side
    files, and `layerprune.json` (`record` plus the layers removed and kept, and `src`'s history),
    which it returns. `replaced`: tensors (by source key) taken from elsewhere, of the same dtype and
    shape (a repair's folded weights, in memory)."""
    replaced = replaced or {}
    config, arch = read_config(src)
    num_layers = arch.num_layers(config)
    entries = tensor_entries(src)  # every header validated before anything is written
    if entries:
        check_layers(src, arch, num_layers, entries)
    removed = check_removal(num_layers, removed, allow_final=True)
    keep = [i for i in range(num_layers) if i not in set(removed)]
    for key, entry in replaced.items():
        if key not in entries or (entries[key].dtype, entries[key].shape) != describe(entry)[:2]:
            raise RuntimeError(f"a replacement for {key} does not match the checkpoint's tensor")
    plans, metadata = _plan(src, arch, set(removed), replaced)
    needed = sum(describe(source)[2] for plan in plans for _, source in plan)
    with staged(out, overwrite=overwrite, inputs=[src, *inputs], needed_bytes=needed) as tmp:
        if entries:
            note = ",".join(map(str, sorted(removed)))
            write_weights(tmp, plans, len(plans), {**metadata, "layerprune_removed_layers": note})
            _write_config(src, tmp, config, keep, arch)
            _check_output(arch, tmp, {new: describe(e)[:2] for plan in plans for new, e in plan}, len(keep))
        else:
            _prune_bin(src, tmp, removed)
        _copy_side_files(src, tmp)
        previous = read_record(src)
        record = {
            **record,
            "num_layers_before": num_layers,
            "num_layers_after": len(keep),
            "removed_layers": removed,
            "kept_layers": keep,
            "history": [previous] if previous else [],
        }
        write_record(tmp, record)
    return record
