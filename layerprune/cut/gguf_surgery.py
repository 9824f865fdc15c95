"""Prune a GGUF file into a GGUF file, still quantized: the kept tensors' bytes copied verbatim.

llama.cpp's own reader and writer (the `gguf` package) read the header (strictly validated, see
`gguf_reading`) and write the new one. Every metadata entry that does not change is copied as its
encoded bytes. The tensor
data is copied in the kernel (`copy_file_range`), in runs of adjacent kept tensors, or through a
16 MiB buffer where the file system cannot, so memory stays bounded whatever the file's size and
every kept tensor keeps its quantization bit for bit. `blk.N.*` tensors are renumbered,
`{arch}.block_count` is set, and every per-layer metadata array (of length block_count) is sliced
to the kept layers. The prune is recorded in the metadata (`layerprune.record`, JSON). The output
is staged and published by `destinations.staged`.

Some architectures keep per-layer properties only implicitly: llama.cpp derives Gemma 2/3's sliding
and global attention layers from a period (in their family files). A removal that would change
which kept layers are global is refused, with the reason, since GGUF cannot state them per layer.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

from layerprune.architectures import gguf_sliding_period
from layerprune.errors import LayerpruneError
from layerprune.io.destinations import check_destination, staged
from layerprune.io.gguf_reading import BLOCK, RECORD_KEY, field_value, gguf_layers, read_gguf
from layerprune.layer_sets import check_removal

BUFFER_BYTES = 16 * 2**20  # bytes copied at a time


def check_sliding_pattern(arch: str, num_layers: int, keep: list[int]) -> None:
    """Refuse a removal after which llama.cpp would take other kept layers for global attention
    (layer i is global when i % period == period - 1; the period is in the family file)."""
    period = gguf_sliding_period(arch)
    if not period:
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


class _Encoded(NamedTuple):
    """A metadata value (type code, then value) as the source file encodes it: a view of the mapped
    file, written unchanged without a copy of its own."""

    view: memoryview


def _metadata(reader: Any, arch: str, num_layers: int, keep: list[int]) -> list[tuple[str, Any, Any, Any]]:
    """Every key of the source as (key, value, type, sub-type), with the block count and every
    per-layer array of the architecture cut to the kept layers; other values stay `_Encoded`."""
    from gguf import GGUFValueType

    fields = []
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", RECORD_KEY):
            continue  # the header's own counts, the writer's own key, and an older prune's record
        kind = field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        if key == f"{arch}.block_count":
            value: Any = len(keep)
        elif sub not in (None, GGUFValueType.STRING) and key.startswith(f"{arch}.") and len(field.data) == 1 \
                and len(values := field.contents()) == num_layers:  # fmt: skip
            value = [values[i] for i in keep]
        else:
            start = field.offset + field.parts[0].nbytes + field.parts[1].nbytes  # past the key
            value = _Encoded(memoryview(reader.data[start : field.offset + sum(part.nbytes for part in field.parts)]))
        fields.append((key, value, kind, sub))
    return fields


def _writer(path: Path, arch: str, alignment: int) -> Any:
    """llama.cpp's writer, which writes an `_Encoded` value as it is."""
    from gguf import GGUFWriter

    class EncodedWriter(GGUFWriter):
        def _pack_val(self, val: Any, vtype: Any, add_vtype: bool, sub_type: Any = None) -> bytes:
            if isinstance(val, _Encoded) and add_vtype:
                return val.view  # type: ignore[return-value]  # the writer appends it to a bytearray
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    writer = EncodedWriter(path, arch)
    writer.data_alignment = alignment
    return writer


# copy_file_range's answers when the file system cannot copy in the kernel: copy through a buffer
NO_KERNEL_COPY = (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


def _copy(source: int, target: int, offset: int, at: int, size: int) -> None:
    """Copy `size` bytes from `offset` of the file `source` to `at` of `target` (descriptors): in the
    kernel where the file system allows (no copy through memory), else `BUFFER_BYTES` at a time."""
    kernel = hasattr(os, "copy_file_range")
    while size:
        if kernel:
            try:
                done = os.copy_file_range(source, target, min(size, 2**30), offset, at)
            except OSError as err:
                if err.errno not in NO_KERNEL_COPY:
                    raise
                kernel = False
                continue
        else:
            done = os.pwrite(target, os.pread(source, min(size, BUFFER_BYTES), offset), at)
        if not done:
            raise LayerpruneError("the GGUF file ends inside a tensor: it is truncated")
        offset, at, size = offset + done, at + done, size - done


def _runs(tensors: list[tuple[str, Any]], data_start: int, alignment: int) -> list[list[int]]:
    """[source offset, target offset, size] of each run of tensors adjacent in both files, the tensors
    laid out in their order from `data_start`, each padded to `alignment` (as the writer lays them)."""
    from gguf import GGUFWriter

    runs: list[list[int]] = []
    at = data_start
    for _, tensor in tensors:
        source, target, size = runs[-1] if runs else (-1, -1, 0)
        end = GGUFWriter.ggml_pad(size, alignment)
        if runs and source + end == tensor.data_offset and target + end == at:
            runs[-1][2] = tensor.data_offset + tensor.n_bytes - source
        else:
            runs.append([tensor.data_offset, at, tensor.n_bytes])
        at += GGUFWriter.ggml_pad(tensor.n_bytes, alignment)
    return runs


def check_gguf_destination(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """A .gguf output is a file (`destinations.check_destination`): not an input, and never a file
    layerprune did not write."""
    check_destination(out, inputs, overwrite, kind="file")


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
    inputs = [src, *(inputs or [])]
    check_gguf_destination(out, inputs, overwrite)
    reader = reader or read_gguf(src)
    arch, num_layers = gguf_layers(reader, src)
    removed = check_removal(num_layers, removed, allow_final=True)
    keep = [i for i in range(num_layers) if i not in set(removed)]
    check_sliding_pattern(arch, num_layers, keep)
    record = {**record, "num_layers_before": num_layers, "num_layers_after": len(keep), "removed_layers": removed,
              "kept_layers": keep}  # fmt: skip
    return rewrite_gguf(reader, src, out, keep, record, overwrite, inputs)


def rewrite_gguf(
    reader: Any, src: Path, out: Path, keep: list[int], record: dict[str, Any], overwrite: bool, inputs: list[Path]
) -> dict[str, Any]:
    """Copy the GGUF read by `reader` from `src` to the file `out` with only the layers `keep`
    (renumbered) and `record` (plus the source's own record as history) in its metadata, staged
    and published by `destinations.staged`."""
    import numpy as np

    arch, num_layers = gguf_layers(reader, src)
    new_index = {old: new for new, old in enumerate(keep)}
    tensors = []
    for tensor in reader.tensors:
        match = BLOCK.match(tensor.name)
        if match and int(match.group(1)) not in new_index:
            continue
        name = f"blk.{new_index[int(match.group(1))]}.{match.group(2)}" if match else tensor.name
        tensors.append((name, tensor))
    tensors.sort(key=lambda named: named[1].data_offset)  # the source's order, so that runs stay adjacent
    needed = sum(t.n_bytes for _, t in tensors) + reader.data_offset
    history = field_value(reader, RECORD_KEY)
    record = {**record, "history": [json.loads(history)] if history else []}
    with staged(out, kind="file", overwrite=overwrite, inputs=inputs, needed_bytes=needed) as tmp:
        writer = _writer(tmp, arch, reader.alignment)
        writer.add_string(RECORD_KEY, json.dumps(record))  # early: an --overwrite check reads only the start
        for key, value, kind, sub in _metadata(reader, arch, num_layers, keep):
            writer.add_key_value(key, value, kind, sub_type=sub)
        for name, tensor in tensors:  # numpy order (outermost first) and the stored type, as they were
            shape = tuple(reversed(tensor.shape.tolist()))
            writer.add_tensor_info(name, shape, np.dtype(np.float32), tensor.n_bytes, raw_dtype=tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        assert writer.fout is not None
        target = writer.fout[0].fileno()
        data_start = writer.ggml_pad(writer.fout[0].tell(), reader.alignment)
        runs = _runs(tensors, data_start, reader.alignment)
        with open(src, "rb") as source:
            for offset, at, size in runs:
                _copy(source.fileno(), target, offset, at, size)
        end = runs[-1][1] + runs[-1][2] if runs else data_start
        os.ftruncate(target, writer.ggml_pad(end, reader.alignment))  # with the last tensor's padding
        writer.close()
    return record
