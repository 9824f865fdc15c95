"""Prune a GGUF file into a GGUF file, still quantized: the kept tensors' bytes copied verbatim.

llama.cpp's own reader and writer (the `gguf` package) read the header and write the new one;
the tensor data is copied from the source file a buffer at a time, so memory is bounded by the
buffer whatever the file's size, and every kept tensor keeps its quantization bit for bit.
`blk.N.*` tensors are renumbered, `{arch}.block_count` is set, and every per-layer metadata array
(of length block_count) is sliced to the kept layers. The prune is recorded in the metadata
(`layerprune.record`, JSON). The output is written to a temporary file beside it and renamed.

Some architectures keep per-layer properties only implicitly: llama.cpp derives Gemma 2/3's and
Command-R 2's sliding and global attention layers from a period. A removal that would change
which kept layers are global is refused, with the reason, since GGUF cannot state them per layer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from .checkpoint import check_overlap
from .errors import LayerpruneError
from .surgery import check_removal

RECORD_KEY = "layerprune.record"
BUFFER_BYTES = 16 * 2**20  # bytes copied at a time
BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
# GGUF architectures whose decoder layers are all `blk.N.*` tensors counted by `{arch}.block_count`
# (llama.cpp's names; Mistral GGUFs say llama).
KNOWN_ARCHITECTURES = ("llama", "gemma", "gemma2", "gemma3", "qwen2", "qwen3", "phi3", "olmo2", "gpt2", "gptneox",
                       "starcoder2", "stablelm", "granite")  # fmt: skip
# llama.cpp's set_swa_pattern(period): layer i uses sliding-window attention unless i % period == period - 1.
SLIDING_PERIOD = {"gemma2": 2, "gemma3": 6, "cohere2": 4}


def read_gguf(path: Path) -> Any:
    """llama.cpp's reader over the file (memory-mapped), or a one-line error for a damaged file."""
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as err:
        raise LayerpruneError(f"{path} is not a readable GGUF file: {err}") from err


def _field(reader: Any, key: str) -> Any:
    field = reader.get_field(key)
    return field.contents() if field is not None else None


def gguf_layers(reader: Any, path: Path) -> tuple[str, int]:
    """(architecture, block count) of a GGUF, checked against its `blk.N` tensors."""
    arch = _field(reader, "general.architecture")
    if arch not in KNOWN_ARCHITECTURES:
        raise LayerpruneError(
            f"{path}: GGUF architecture {arch!r} is not one layerprune maps to a decoder family "
            f"(known: {', '.join(KNOWN_ARCHITECTURES)})"
        )
    count = _field(reader, f"{arch}.block_count")
    blocks = {int(m.group(1)) for t in reader.tensors if (m := BLOCK.match(t.name))}
    if not isinstance(count, int) or blocks != set(range(count)):
        found = f"blk.0..blk.{max(blocks)}" if blocks else "none"
        raise LayerpruneError(f"{path}: its block count ({count}) disagrees with its layer tensors ({found})")
    return arch, count


def check_sliding_pattern(arch: str, num_layers: int, keep: list[int]) -> None:
    """Refuse a removal after which llama.cpp would take other kept layers for global attention."""
    period = SLIDING_PERIOD.get(arch)
    if period is None:
        return
    is_global = [i % period == period - 1 for i in range(num_layers)]
    changed = [old for new, old in enumerate(keep) if is_global[old] != (new % period == period - 1)]
    if changed:
        raise LayerpruneError(
            f"removing these layers from a {arch} GGUF would change which layers use global attention "
            f"(layer {changed[0]} among them): llama.cpp derives them from a period of {period}, which GGUF "
            f"cannot override per layer; remove blocks of a multiple of {period} layers, or write a checkpoint "
            "folder (--out DIR), whose config lists each layer's type"
        )


def _metadata(reader: Any, arch: str, num_layers: int, keep: list[int]) -> list[tuple[str, Any, Any, Any]]:
    """Every key of the source as (key, value, type, sub-type), with the block count and every
    per-layer array of the architecture cut to the kept layers."""
    from gguf import GGUFValueType

    fields = []
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", RECORD_KEY):
            continue  # the header's own counts, the writer's own key, and an older prune's record
        value, kind = field.contents(), field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        if key == f"{arch}.block_count":
            value = len(keep)
        elif sub is not None and key.startswith(f"{arch}.") and len(value) == num_layers:
            value = [value[i] for i in keep]
        fields.append((key, value, kind, sub))
    return fields


def _copy(source: Any, target: Any, offset: int, size: int) -> None:
    source.seek(offset)
    while size:
        chunk = source.read(min(BUFFER_BYTES, size))
        if not chunk:
            raise LayerpruneError("the GGUF file ends inside a tensor: it is truncated")
        target.write(chunk)
        size -= len(chunk)


def check_gguf_destination(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """A .gguf output must not be an input, nor replace a file layerprune did not write."""
    check_overlap(out, inputs)
    if out.is_dir():
        raise LayerpruneError(f"output {out} is a folder; a .gguf output is a file")
    if out.exists():
        if not overwrite:
            raise LayerpruneError(f"output {out} already exists; pass --overwrite to replace it")
        if not _written_by_layerprune(out):
            raise LayerpruneError(f"output {out} is a GGUF layerprune did not write; --overwrite replaces only its own")


def _written_by_layerprune(path: Path) -> bool:
    """Whether a file is a GGUF holding our record key, from its first bytes (the metadata comes
    before the tensors; 64 MiB holds the largest vocabulary), without parsing it all."""
    with open(path, "rb") as handle:
        head = handle.read(64 * 2**20)
    return head[:4] == b"GGUF" and RECORD_KEY.encode() in head


def prune_gguf(
    src: Path,
    out: Path,
    removed: list[int],
    record: dict[str, Any],
    overwrite: bool = False,
    inputs: list[Path] | None = None,
    reader: Any = None,
) -> dict[str, Any]:
    """Write `src` without the `removed` layers to the GGUF file `out`; returns the record stored in it.
    `reader`: `src` already read (`read_gguf`), so that its metadata is not parsed twice."""
    check_gguf_destination(out, [src, *(inputs or [])], overwrite)
    reader = reader or read_gguf(src)
    arch, num_layers = gguf_layers(reader, src)
    removed = check_removal(num_layers, removed, allow_final=True)
    keep = [i for i in range(num_layers) if i not in set(removed)]
    check_sliding_pattern(arch, num_layers, keep)
    record = {**record, "num_layers_before": num_layers, "num_layers_after": len(keep), "removed_layers": removed,
              "kept_layers": keep}  # fmt: skip
    return rewrite_gguf(reader, src, out, keep, record)


def rewrite_gguf(reader: Any, src: Path, out: Path, keep: list[int], record: dict[str, Any]) -> dict[str, Any]:
    """Copy the GGUF read by `reader` from `src` to `out` with only the layers `keep` (renumbered)
    and `record` (plus the source's own record as history) in its metadata."""
    import numpy as np
    from gguf import GGUFWriter

    arch, num_layers = gguf_layers(reader, src)
    new_index = {old: new for new, old in enumerate(keep)}
    tensors = []
    for tensor in reader.tensors:
        match = BLOCK.match(tensor.name)
        if match and int(match.group(1)) not in new_index:
            continue
        name = f"blk.{new_index[int(match.group(1))]}.{match.group(2)}" if match else tensor.name
        tensors.append((name, tensor))
    needed = sum(t.n_bytes for _, t in tensors) + reader.data_offset
    created = not out.parent.exists()
    out.parent.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(out.parent).free < needed:
        raise LayerpruneError(f"not enough space for {out}: it needs {needed / 2**20:.0f} MiB")
    history = _field(reader, RECORD_KEY)
    record = {**record, "history": [json.loads(history)] if history else []}
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        writer = GGUFWriter(tmp, arch)
        writer.data_alignment = reader.alignment
        for key, value, kind, sub in _metadata(reader, arch, num_layers, keep):
            writer.add_key_value(key, value, kind, sub_type=sub)
        writer.add_string(RECORD_KEY, json.dumps(record))
        for name, tensor in tensors:  # numpy order (outermost first) and the stored type, as they were
            shape = tuple(reversed(tensor.shape.tolist()))
            writer.add_tensor_info(name, shape, np.dtype(np.float32), tensor.n_bytes, raw_dtype=tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        assert writer.fout is not None
        handle = writer.fout[0]
        with open(src, "rb") as source:
            for _, tensor in tensors:
                writer.write_padding(handle, handle.tell())
                _copy(source, handle, tensor.data_offset, tensor.n_bytes)
                writer.write_padding(handle, tensor.n_bytes)
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if created:
            shutil.rmtree(out.parent, ignore_errors=True)
        raise
    return record
