"""Stream safetensors checkpoints tensor by tensor, without building the model.

safetensors' `save_file` needs every tensor of a shard in memory; this module instead
copies each tensor's bytes from the source file to the destination in bounded chunks, so
peak memory stays at one copy buffer, whatever the size of the model or of its largest
tensor. The format is an 8-byte little-endian header length, a JSON header of dtype,
shape and data_offsets per tensor, then the raw bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import LayerpruneError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
COPY_CHUNK = 16 * 1024 * 1024
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie in a shard."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in `file`
    length: int


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The tensors of one safetensors file, checked against its size, and its metadata."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(handle.read(header_len))
        metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + header_len
        entries: dict[str, TensorEntry] = {}
        spans = []
        for key, info in header.items():
            begin, end = info["data_offsets"]
            entries[key] = TensorEntry(path, info["dtype"], tuple(info["shape"]), data_start + begin, end - begin)
            spans.append((begin, end))
        spans.sort()
        position = 0
        for begin, end in spans:
            if begin != position or end < begin:
                raise ValueError("tensor data is not contiguous")
            position = end
        if data_start + position != size:
            raise ValueError(f"data ends at byte {data_start + position} but the file has {size}")
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise LayerpruneError(f"corrupted safetensors file {path}: {err}") from err
    return entries, metadata


def shard_files(folder: Path) -> list[Path]:
    """The safetensors shards of a checkpoint folder, in index order; [] if it has none."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            names = list(dict.fromkeys(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as err:
            raise LayerpruneError(f"corrupted index {index}: {err}") from err
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise LayerpruneError(f"{index} names missing shards: {', '.join(missing)}")
        return [folder / n for n in sorted(names)]
    return sorted(folder.glob("*.safetensors"))


def shard_name(number: int, total: int) -> str:
    """Hugging Face's shard naming: model.safetensors, or model-0000k-of-0000N.safetensors."""
    return SINGLE_NAME if total == 1 else f"model-{number:05d}-of-{total:05d}.safetensors"


def write_shard(path: Path, tensors: list[tuple[str, TensorEntry]], metadata: dict[str, str]) -> int:
    """Write (name, source entry) pairs as one safetensors file; returns the data size in bytes."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, entry in tensors:
        header[name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.length],
        }
        offset += entry.length
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data to 8 bytes
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for _, entry in tensors:
            _copy_range(entry, out)
    return offset


def _copy_range(entry: TensorEntry, out) -> None:
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
        except (AttributeError, OSError):  # not Linux, or a filesystem pair that cannot: copy by hand
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


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out` that becomes `out` only if the block succeeds.

    An existing `out` is replaced only at that moment; on any error the temporary folder is
    removed, so nothing half-written is ever left where the result belongs.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a checkpoint folder should not be
    try:
        yield tmp
        for path in tmp.rglob("*"):  # some writers (transformers' save_pretrained) leave files private
            if path.is_file():
                os.chmod(path, 0o666 & ~umask)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
