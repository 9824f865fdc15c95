"""Checkpoints on disk: validated safetensors headers, streamed shard writes, `layerprune.json`
records, and output folders that never look finished before they are, nor clobber an input.

Reading. Every safetensors header is validated before any byte is written, as the safetensors
library itself does: every dtype is known, shape x itemsize equals the byte range, the ranges are
contiguous and end at the end of the file, and shard names stay inside the checkpoint folder. A
checkpoint's config must count the layers its tensors hold.

Writing. `write_weights` is the one writer of a checkpoint's weights (a prune, a repair folded in,
a LoRA merge): shard naming, metadata and index. safetensors' `save_file` needs every tensor of a
shard in memory; `write_shard` instead copies each tensor's bytes from the source file in bounded
chunks (a tensor already in memory, such as a folded or merged one, is written from there), so a
prune's peak memory stays at one copy buffer whatever the size of the model. The format is an
8-byte little-endian header length, a JSON header of dtype, shape and data_offsets per tensor,
then the raw bytes. transformers' `save_pretrained` writes only what transformers must serialize
itself: a bitsandbytes-quantized model, a model read from GGUF, and the rare inputs that fall back
to a whole model in memory (`.bin` checkpoints, adapters the streamed merge does not cover).

Where outputs go, and how they are published without loss, is `destinations`' job.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from layerprune.architectures import Architecture, find_architecture
from layerprune.errors import LayerpruneError, describe_os_error
from layerprune.io.destinations import write_atomically
from layerprune.io.model_card import CARD_NAME, model_card

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
RECORD_NAME = "layerprune.json"
COPY_CHUNK = 16 * 1024 * 1024
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
# bytes per element of every dtype safetensors writes
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
# the torch dtype (by name) of each float dtype safetensors writes
TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def regular_file(path: Path, what: str) -> None:
    """Refuse, in one line, a path that is not a regular file (a FIFO would block the read forever)."""
    try:
        mode = path.stat().st_mode
    except OSError as err:
        raise LayerpruneError(f"{what} {path}: {describe_os_error(err)}") from err
    if not stat.S_ISREG(mode):
        raise LayerpruneError(f"{what} {path} is not a regular file (a FIFO, socket, device or folder)")


def read_json(path: Path, what: str = "JSON file") -> Any:
    """A JSON file's content, or a one-line error naming the file."""
    regular_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise LayerpruneError(f"{path} is not a valid {what}: {err}") from err


# --- reading --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie in a shard."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in `file`
    length: int


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The tensors of one safetensors file, fully validated against the file, and its metadata."""
    regular_file(path, "safetensors file")
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            if size < 8:
                raise ValueError("shorter than a header")
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(handle.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError("metadata is not a map of strings")
        entries = {key: _entry(path, 8 + header_len, key, info) for key, info in header.items()}
        position = 8 + header_len
        for entry in sorted(entries.values(), key=lambda e: (e.start, e.length)):
            if entry.start != position:
                raise ValueError("tensor data is not contiguous")
            position += entry.length
        if position != size:
            raise ValueError(f"data ends at byte {position} but the file has {size}")
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise LayerpruneError(f"corrupted safetensors file {path}: {err}") from err
    return entries, metadata


def _entry(path: Path, data_start: int, key: str, info: Any) -> TensorEntry:
    """One header entry, checked: known dtype, integer shape, a byte range that fits it."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"tensor {key!r} needs exactly dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPE_SIZES:
        raise ValueError(f"tensor {key!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"tensor {key!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise ValueError(f"tensor {key!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise ValueError(f"tensor {key!r} has invalid data_offsets {offsets!r}")
    if math.prod(shape) * DTYPE_SIZES[dtype] != end - begin:
        raise ValueError(f"tensor {key!r}: shape {shape} of {dtype} does not fill its {end - begin} bytes")
    return TensorEntry(path, dtype, tuple(shape), data_start + begin, end - begin)


def shard_files(folder: Path) -> list[Path]:
    """The safetensors shards of a checkpoint folder, in index order; [] if it has none."""
    index = folder / INDEX_NAME
    if not index.is_file():
        return sorted(folder.glob("*.safetensors"))
    raw = read_json(index, "safetensors index")
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(n, str) for n in weight_map.values()):
        raise LayerpruneError(f"corrupted index {index}: no weight_map of shard names")
    names = list(dict.fromkeys(weight_map.values()))
    root = folder.resolve()
    outside = [n for n in names if not n or not (folder / n).resolve().is_relative_to(root)]
    if outside:
        raise LayerpruneError(f"{index} names a shard outside the checkpoint folder: {outside[0]!r}")
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise LayerpruneError(f"{index} names missing shards: {', '.join(missing)}")
    return [folder / n for n in sorted(names)]


def tensor_entries(folder: Path) -> dict[str, TensorEntry]:
    """Every tensor of a checkpoint folder, across its shards, each header validated."""
    entries: dict[str, TensorEntry] = {}
    for shard in shard_files(folder):
        found, _ = read_header(shard)
        twice = sorted(set(found) & set(entries))
        if twice:
            raise LayerpruneError(f"tensor {twice[0]} is in two shards of {folder}")
        entries.update(found)
    return entries


def read_config(folder: Path) -> tuple[dict[str, Any], Architecture]:
    """A checkpoint's config.json and its family."""
    config = read_json(folder / CONFIG_NAME, "config.json")
    if not isinstance(config, dict):
        raise LayerpruneError(f"{folder / CONFIG_NAME} is not a JSON object")
    return config, find_architecture(config)


def check_layers(folder: Path, arch: Architecture, num_layers: int, keys: Iterable[str]) -> None:
    """The tensors hold exactly the layers the config counts, each with the same tensor names: a
    layer missing from the weights would be loaded as random values."""
    per_layer: dict[int, set[str]] = {}
    for key in keys:
        if split := arch.split_layer_key(key):
            per_layer.setdefault(split[1], set()).add(split[2])
    indices = sorted(per_layer)  # 0..L-1 exactly, checked without building a range of the config's size
    if len(indices) != num_layers or (indices and (indices[0] != 0 or indices[-1] != num_layers - 1)):
        held = f"{len(indices)} layers ({indices[0]}..{indices[-1]})" if indices else "no layers"
        raise LayerpruneError(f"{folder}: config.json counts {num_layers} layers but the weights hold {held}")
    names = set().union(*per_layer.values())
    short = next((i for i in sorted(per_layer) if per_layer[i] != names), None)
    if short is not None:
        missing = sorted(names - per_layer[short])
        raise LayerpruneError(f"{folder}: layer {short} has no tensor {missing[0]} (other layers have one)")


def validate_checkpoint(folder: Path) -> dict[str, TensorEntry]:
    """Check a checkpoint folder before use: its config, family, headers and layer count."""
    config, arch = read_config(folder)
    entries = tensor_entries(folder)
    if entries:
        check_layers(folder, arch, arch.num_layers(config), entries)
    return entries


# --- writing --------------------------------------------------------------------------------


def shard_name(number: int, total: int) -> str:
    """Hugging Face's shard naming: model.safetensors, or model-0000k-of-0000N.safetensors."""
    return SINGLE_NAME if total == 1 else f"model-{number:05d}-of-{total:05d}.safetensors"


Source = Any  # a tensor's bytes: a TensorEntry (a range of a file) or a tensor in memory
ELEMENT_TYPES = {name: code for code, name in TORCH_DTYPES.items()} | {
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}  # fmt: skip


def describe(source: Source) -> tuple[str, tuple[int, ...], int]:
    """The safetensors dtype, the shape and the byte length of a source."""
    if isinstance(source, TensorEntry):
        return source.dtype, source.shape, source.length
    name = str(source.dtype).removeprefix("torch.")
    if name not in ELEMENT_TYPES:
        raise LayerpruneError(f"cannot write a tensor of dtype {name} as safetensors")
    return ELEMENT_TYPES[name], tuple(source.shape), source.numel() * source.element_size()


def write_weights(
    folder: Path, shards: Iterable[list[tuple[str, Source]]], count: int, metadata: dict[str, str]
) -> int:
    """The one way layerprune writes a checkpoint's weights: `count` shards (each a list of
    (name, source), produced one at a time, so only one shard of tensors in memory need be held)
    named as Hugging Face names them, with `metadata` in each, and the index when there are several.
    Returns the data size in bytes. Where the folder goes, and when, is `destinations.staged`'s job;
    the record is `write_record`'s."""
    weight_map: dict[str, str] = {}
    total = written = 0
    for written, tensors in enumerate(shards, start=1):
        name = shard_name(written, count)
        total += write_shard(folder / name, tensors, metadata)
        weight_map.update({key: name for key, _ in tensors})
        del tensors  # a shard's tensors in memory are freed before the next is made
    if written != count:
        raise RuntimeError(f"{written} shards written where {count} were announced")
    if count > 1:
        write_index(folder, weight_map, total)
    return total


def write_shard(path: Path, tensors: list[tuple[str, Source]], metadata: dict[str, str]) -> int:
    """Write (name, source) pairs as one safetensors file; returns the data size in bytes."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, source in tensors:
        dtype, shape, length = describe(source)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + length]}
        offset += length
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data to 8 bytes
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for _, source in tensors:
            if isinstance(source, TensorEntry):
                _copy_range(source, out)
            else:  # a tensor in memory: its bytes as they lie there (little-endian, as safetensors stores them)
                import torch

                out.write(memoryview(source.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return offset


def _copy_range(entry: TensorEntry, out: IO[bytes]) -> None:
    """Copy one tensor's bytes: in the kernel where it can (`copy_file_range`, as `cp` does),
    else through a COPY_CHUNK buffer. Either way memory stays bounded whatever the tensor size."""
    out.flush()
    with open(entry.file, "rb") as src:
        done = 0
        try:
            while done < entry.length:
                sent = os.copy_file_range(src.fileno(), out.fileno(), entry.length - done, entry.start + done)
                if not sent:
                    break
                done += sent
        except OSError as err:  # a file system pair that cannot: copy by hand; a full disk is a full disk
            if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise
        except AttributeError:  # not Linux
            pass
        src.seek(entry.start + done)
        remaining = entry.length - done
        while remaining:
            chunk = src.read(min(COPY_CHUNK, remaining))
            if not chunk:
                raise LayerpruneError(f"corrupted safetensors file {entry.file}: truncated tensor data")
            out.write(chunk)
            remaining -= len(chunk)


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    """The index of a sharded checkpoint, as transformers writes it."""
    body = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(body, indent=2) + "\n")


# --- records --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Written:
    """A folder layerprune wrote, and the record it wrote there (its layerprune.json)."""

    path: Path
    record: dict[str, Any]


def read_record(folder: Path) -> dict[str, Any] | None:
    """The `layerprune.json` of a folder layerprune wrote, or None."""
    path = folder / RECORD_NAME
    return read_json(path, RECORD_NAME) if path.is_file() else None


def write_record(folder: Path, record: dict[str, Any]) -> None:
    """The checkpoint's `layerprune.json`, and its model card (`README.md`) made from it, replacing
    any card copied from the source, which would describe the model before the change."""
    write_atomically(folder / RECORD_NAME, json.dumps(record, indent=1) + "\n")
    write_atomically(folder / CARD_NAME, model_card(record))


def extend_record(source: Path, section: str, value: dict[str, Any], source_name: str) -> dict[str, Any]:
    """The source's record (or a new one naming it) with one more section: what was done to it."""
    record = read_record(source) or {"source": source_name}
    return {**record, section: value}
