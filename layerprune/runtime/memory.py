"""How much host memory there is, and whether something of a given size fits in it.

Memory available is the kernel's MemAvailable, or the limit of this process's cgroup (a
container, a batch job, `systemd-run -p MemoryMax=`) where that is smaller.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path
from typing import Any

FIT_SHARE = 0.7  # a model "fits" when its weights take at most this share of the memory available


def cgroup_limits(proc: Path = Path("/proc/self/cgroup"), mount: Path = Path("/sys/fs/cgroup")) -> list[int]:
    """Memory limits (bytes) of this process's cgroup and its ancestors, v1 or v2; empty when
    none is set or visible."""
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
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return min([available, *cgroup_limits()])


def memory_free(device: Any) -> int:
    """Bytes free now where `device` (a torch device) keeps its tensors: a GPU's free memory, or
    the host's available memory for the CPU."""
    if getattr(device, "type", device) == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0]
    return memory_available()


def fits_in_memory(nbytes: int) -> bool:
    """Whether `nbytes` take at most FIT_SHARE of the host memory available now."""
    return nbytes <= FIT_SHARE * memory_available()


def return_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc). Tensors converted from bf16 are allocated in
    pieces below glibc's mmap threshold, and without a trim the heap keeps every layer's worth."""
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: a libc without malloc_trim
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols, libc among them
