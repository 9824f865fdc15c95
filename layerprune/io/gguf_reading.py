"""Read a GGUF file's header with llama.cpp's reader, fast and strictly.

The reader takes each metadata array as one view instead of one per element (a 262k-token
vocabulary parses in milliseconds, not seconds). Everything a damaged file could hold is refused
in one line before any output is written or any weight converted: every count and length is
bounded by the file's size, every tensor name is one llama.cpp knows, every layer holds the same
tensors with the same shapes, the tensors' bytes lie end to end inside the file (so a damaged
offset, or a type or shape that changes a tensor's size, is seen), and the block count agrees with the `blk.N` tensors.
"""

from __future__ import annotations

import re
import struct
import sys
from functools import cache
from pathlib import Path
from typing import Any

from layerprune.architectures import gguf_architectures
from layerprune.errors import LayerpruneError

RECORD_KEY = "layerprune.record"  # the JSON record of what layerprune did, in a GGUF it wrote
BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
# GGUF architectures (llama.cpp's names) whose decoder layers are all `blk.N.*` tensors counted by
# `{arch}.block_count`, pruned as files only: no packaged family loads them into transformers.
# The packaged families' own GGUF architectures are in their family files (`architectures`).
FILE_ONLY_ARCHITECTURES = ("gemma", "starcoder2", "stablelm", "granite")
TRUNCATED = "it is truncated: it ends before the data its header describes"


def read_gguf(path: Path) -> Any:
    """llama.cpp's reader over the file (memory-mapped, arrays read whole), its tensor table checked
    (`check_tensors`), or a one-line error for a damaged file."""
    try:
        reader = _reader_class()(path)
    except (ValueError, IndexError, KeyError, OSError, OverflowError, UnicodeDecodeError, MemoryError) as err:
        raise LayerpruneError(f"{path} is not a readable GGUF file: {type(err).__name__}: {err}") from err
    check_tensors(reader, path)
    return reader


@cache
def _tensor_name() -> re.Pattern[str]:
    """Every tensor name llama.cpp knows, of any architecture: a template with `{bid}` for the
    layer, then `.weight`, `.bias` or `.scale`."""
    from gguf.constants import TENSOR_NAMES

    bases = sorted({re.escape(name).replace(re.escape("{bid}"), r"(0|[1-9]\d*)") for name in TENSOR_NAMES.values()})
    return re.compile(rf"^(?:{'|'.join(bases)})\.(?:weight|bias|scale)$")


def check_tensors(reader: Any, path: Path) -> None:
    """Refuse a tensor table a pruned output could not be trusted from: a name llama.cpp does not
    know, a layer whose tensors differ from the other layers' in name or shape (their types may
    differ: a k-quant mix such as Q4_K_M stores some layers' tensors in Q6_K), or tensor data that
    is not laid end to end from the data section's start to its end, each padded to the alignment,
    as every writer lays it (a damaged offset, or a type or shape that changes a tensor's size,
    breaks it)."""
    size = len(reader.data)
    layers: dict[int, dict[str, tuple[int, ...]]] = {}
    spans = []
    for tensor in reader.tensors:
        name = tensor.name
        if not _tensor_name().match(name):
            raise LayerpruneError(f"{path}: tensor name {name!r} is not one llama.cpp knows: the file is damaged")
        spans.append((int(tensor.data_offset), int(tensor.n_bytes), name))
        if match := BLOCK.match(name):
            kind = tuple(int(d) for d in tensor.shape)  # not the type: k-quant mixes differ by layer
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = kind
    at, align = int(reader.data_offset), int(reader.alignment)
    for offset, length, name in sorted(spans):  # laid end to end, each padded to the alignment, as writers do
        if offset != at or offset + length > size:
            raise LayerpruneError(
                f"{path}: tensor {name}'s data does not start where the previous one ends (or lies past the end "
                "of the file): its offset, type or shape is damaged"
            )
        at = offset + length + (-(offset + length - int(reader.data_offset)) % align)
    if spans and size - max(offset + length for offset, length, _ in spans) >= align:
        raise LayerpruneError(
            f"{path}: the data section holds bytes past its last tensor's end: a tensor's type or shape is damaged"
        )
    _check_width(reader, path)
    if layers:
        first = layers[min(layers)]
        for index, tensors in sorted(layers.items()):
            if tensors != first:
                odd = sorted(set(tensors.items()) ^ set(first.items()))[0][0]
                raise LayerpruneError(
                    f"{path}: layer {index} differs from layer {min(layers)} in tensor {odd} (its name or shape): "
                    "the file is damaged"
                )


def _check_width(reader: Any, path: Path) -> None:
    """Refuse a final norm whose shape is not the model's width (the token embedding's rows, ne0): it
    is the last tensor of most files, so a damaged shape there can still lay the data end to end
    (its lost bytes looking like padding)."""
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    norm, embedding = shapes.get("output_norm.weight"), shapes.get("token_embd.weight")
    if norm is not None and embedding and norm != embedding[:1]:
        raise LayerpruneError(
            f"{path}: tensor output_norm.weight has shape {list(norm)}, not the model's width {embedding[0]} (the "
            "token embedding's): the file is damaged"
        )


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


def field_value(reader: Any, key: str) -> Any:
    """One metadata value of a GGUF, or None; a damaged value is a one-line error."""
    field = reader.get_field(key)
    try:
        return field.contents() if field is not None else None
    except (UnicodeDecodeError, ValueError) as err:
        raise LayerpruneError(f"the GGUF's metadata {key} cannot be read (the file is damaged): {err}") from err


def gguf_layers(reader: Any, path: Path) -> tuple[str, int]:
    """(architecture, block count) of a GGUF, checked against its `blk.N` tensors."""
    arch = field_value(reader, "general.architecture")
    known = sorted({*gguf_architectures(), *FILE_ONLY_ARCHITECTURES})
    if arch not in known:
        raise LayerpruneError(
            f"{path}: GGUF architecture {arch!r} is not one layerprune knows the layers of (known: {', '.join(known)})"
        )
    count = field_value(reader, f"{arch}.block_count")
    blocks = {int(m.group(1)) for t in reader.tensors if (m := BLOCK.match(t.name))}
    if (
        not isinstance(count, int)
        or isinstance(count, bool)
        or len(blocks) != count
        or max(blocks, default=-1) != count - 1
    ):
        found = f"blk.0..blk.{max(blocks)}" if blocks else "none"
        raise LayerpruneError(f"{path}: its block count ({count}) disagrees with its layer tensors ({found})")
    return arch, count
