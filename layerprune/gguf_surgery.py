"""Prune a GGUF file into a GGUF file, still quantized: the kept tensors' bytes copied verbatim.

llama.cpp's own reader and writer (the `gguf` package) read the header and write the new one.
Two fast paths keep the cost near that of copying the file: the reader takes each metadata array
as one view instead of one per element (a 262k-token vocabulary parses in milliseconds, not
seconds), and every metadata entry that does not change is copied as its encoded bytes. The tensor
data is copied in the kernel (`copy_file_range`), in runs of adjacent kept tensors, or through a
16 MiB buffer where the file system cannot, so memory stays bounded whatever the file's size and
every kept tensor keeps its quantization bit for bit. `blk.N.*` tensors are renumbered,
`{arch}.block_count` is set, and every per-layer metadata array (of length block_count) is sliced
to the kept layers. The prune is recorded in the metadata (`layerprune.record`, JSON). The output
is written to a temporary file beside it and renamed.

Some architectures keep per-layer properties only implicitly: llama.cpp derives Gemma 2/3's and
Command-R 2's sliding and global attention layers from a period. A removal that would change
which kept layers are global is refused, with the reason, since GGUF cannot state them per layer.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import sys
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

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
TRUNCATED = "it is truncated: it ends before the data its header describes"


def read_gguf(path: Path) -> Any:
    """llama.cpp's reader over the file (memory-mapped, arrays read whole), or a one-line error for a
    damaged file."""
    try:
        return _reader_class()(path)
    except (ValueError, IndexError, KeyError, OSError) as err:
        raise LayerpruneError(f"{path} is not a readable GGUF file: {err}") from err


@cache
def _reader_class() -> type:
    """`gguf.GGUFReader` with each metadata array read as one part: its values as one numpy view, or,
    for strings, the encoded strings as one byte span (decoded only on `contents()`). The package's
    reader makes a view per element: seconds for a 262k-token vocabulary, and memory to match."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, ReaderField

    class StringArrayField(ReaderField):
        """A string array held as its encoded bytes (u64 length, then UTF-8, per string)."""

        __slots__ = ()

        def contents(self, index_or_slice: int | slice = slice(None)) -> Any:
            blob, strings, at = self.parts[-1].tobytes(), [], 0
            while at < len(blob):
                (size,) = struct.unpack_from("<Q", blob, at)
                strings.append(blob[at + 8 : at + 8 + size].decode("utf-8"))
                at += 8 + size
            return strings[index_or_slice]

    class ArrayReader(GGUFReader):
        def __init__(self, path: Path) -> None:
            super().__init__(path)
            if self.byte_order != "I" or sys.byteorder != "little":
                raise ValueError("only little-endian GGUF files are supported")
            for key, field in self.fields.items():
                if field.types == [GGUFValueType.ARRAY, GGUFValueType.STRING]:
                    self.fields[key] = StringArrayField(*field)

        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> Any:
            """The package's `_get` through a plain view of the map (numpy's memmap slicing costs
            ten times more), for a file in the host's byte order."""
            if self.byte_order != "I":
                return super()._get(offset, dtype, count, override_order)
            if "plain" not in self.__dict__:
                self.plain = self.data.view(np.ndarray)
            dtype, count = np.dtype(dtype), int(count)
            if offset + dtype.itemsize * count > len(self.plain):
                raise ValueError(TRUNCATED)
            return self.plain[offset : offset + dtype.itemsize * count].view(dtype)

        def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[Any], list[int], list[Any]]:
            if raw_type != GGUFValueType.ARRAY:
                return super()._get_field_parts(orig_offs, raw_type)
            item_type, count = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
            kind, start = GGUFValueType(int(item_type[0])), orig_offs + 12
            scalar = self.gguf_scalar_to_np.get(kind)
            if scalar is not None:
                values = self._get(start, scalar, int(count[0]))
                return 12 + int(values.nbytes), [item_type, count, values], [2], [GGUFValueType.ARRAY, kind]
            if kind != GGUFValueType.STRING:
                return super()._get_field_parts(orig_offs, raw_type)  # arrays of arrays: element by element
            end, length = start, struct.Struct("<Q")
            buffer = self.data.data  # a memoryview of the map
            try:
                for _ in range(int(count[0])):
                    end += 8 + length.unpack_from(buffer, end)[0]
            except struct.error:
                end = len(self.data) + 1
            if end > len(self.data):
                raise ValueError(TRUNCATED)
            return end - orig_offs, [item_type, count, self.data[start:end]], [], [GGUFValueType.ARRAY, kind]

    return ArrayReader


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
    """Whether a file is a GGUF holding our record key in its metadata, without parsing it all: the
    key comes second (before the vocabulary), so the first MiB holds it; older files hold it last,
    within the first 64 MiB."""
    key = RECORD_KEY.encode()
    with open(path, "rb") as handle:
        head = bytearray(handle.read(2**20))
        if head[:4] != b"GGUF":
            return False
        while key not in head and len(head) < 64 * 2**20 and (more := handle.read(2**20)):
            head += more
    return key in head


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
    created = not out.parent.exists()
    out.parent.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(out.parent).free < needed:
        raise LayerpruneError(f"not enough space for {out}: it needs {needed / 2**20:.0f} MiB")
    history = _field(reader, RECORD_KEY)
    record = {**record, "history": [json.loads(history)] if history else []}
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
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
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if created:
            shutil.rmtree(out.parent, ignore_errors=True)
        raise
    return record
