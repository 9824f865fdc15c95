"""Where outputs go: one policy for every file and folder layerprune writes, that no kill can break.

Ownership. A folder is layerprune's if it holds one of `MARKER_FILES`; a file is layerprune's if
its first MiB holds one of `FILE_MARKERS` (the record key of a GGUF, `"layerprune_version"` of a
results JSON). An existing path that is not layerprune's is refused, with --overwrite or without;
one that is is replaced only with --overwrite.

Overlap, on real files. Every input is resolved to the files it stands for (every file of an
input folder, after symlinks) and compared by inode with the destination and everything under
it, and with every folder above the destination: symlinks, hard links and bind mounts included.
An input that is not a regular file (a FIFO, a device) or a symlink loop is refused.

Writing. A run locks its destination (`hold`: `.NAME.lock` beside it, flock'ed, held from before
the first byte of work to the end, released by the kernel however its holder dies). It writes into
a scratch folder beside the destination (`.NAME.tmp.XXXX`), whose writer is recorded in a sibling
`.writer` file created before the folder and removed after it, so a scratch folder always says who
made it. A new output, or a file, is published by one rename. A folder that replaces an old one is
swapped with it in one step (renameat2's RENAME_EXCHANGE), which leaves the old output in the
scratch folder; where the file system cannot swap, it is moved in steps under a journal
(`.NAME.publish`, written before the first rename): old -> trash, new -> destination, trash
removed, journal removed.

Recovery. Every run, before it locks, looks at the destination's folder (`recover`): a journal
whose writer is dead is finished (the new output put in place, if it is whole) or rolled back (the
old one put back); then every scratch folder, `.writer` file and lock file whose writer is dead is
removed. What belongs to a live run is left alone, and so is everything else.

Faults. `LAYERPRUNE_FAULT_AT=N` kills the process with SIGKILL at its N-th publish step, and
`LAYERPRUNE_FAULT_LOG=FILE` appends each step's name to FILE: the tests kill every writer at
every step this way.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from layerprune.errors import LayerpruneError, describe_os_error

# a folder holding one of these was written by layerprune, so --overwrite may replace it
MARKER_FILES = ("layerprune.json", "distances.json", "sweep.json", "sensitivity.json", "bench.json")
# a file holding one of these in its first MiB was written by layerprune
FILE_MARKERS = (b"layerprune.record", b'"layerprune_version"')
WRITER_SUFFIX = ".writer"
HEAD_BYTES = 2**20
LOCK_RETRIES = 40  # x 50 ms: how long a run waits for a dead holder's lock file to be reclaimed


# --- faults (tests only) ------------------------------------------------------------------


_steps = 0


def step(name: str) -> None:
    """Mark one publish step; with LAYERPRUNE_FAULT_AT=N the N-th step of this process is a SIGKILL."""
    global _steps
    _steps += 1
    if log := os.environ.get("LAYERPRUNE_FAULT_LOG"):
        with open(log, "a") as handle:
            handle.write(f"{name}\n")
    if os.environ.get("LAYERPRUNE_FAULT_AT") == str(_steps):
        os.kill(os.getpid(), signal.SIGKILL)


def die_with_parent() -> None:
    """For `subprocess.Popen(preexec_fn=...)`: the child is killed when its parent dies, however."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# --- ownership ----------------------------------------------------------------------------


def owned(path: Path) -> bool:
    """Whether layerprune wrote the existing file or folder `path`."""
    if path.is_dir():
        return any((path / marker).is_file() for marker in MARKER_FILES)
    try:
        with open(path, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                return False
            head = handle.read(HEAD_BYTES)
    except OSError:
        return False
    return any(marker in head for marker in FILE_MARKERS)


# --- inputs and overlap -------------------------------------------------------------------


def _stat(path: Path, what: str) -> os.stat_result:
    try:
        return path.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise LayerpruneError(f"{what} {path} is a symlink loop") from err
        raise LayerpruneError(f"{what} {path}: {describe_os_error(err)}") from err


def input_files(inputs: Iterable[Path]) -> dict[tuple[int, int], Path]:
    """Every file and folder the inputs stand for, by (device, inode), symlinks followed; an input
    that is not a regular file or folder, or a loop, is refused. Missing inputs are skipped (a
    cache folder not made yet)."""
    found: dict[tuple[int, int], Path] = {}
    for given in inputs:
        if not (given.exists() or given.is_symlink()):
            continue
        pending = [given]
        while pending:
            path = pending.pop()
            info = _stat(path, "input")
            if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
                raise LayerpruneError(f"input {path} is not a regular file (a FIFO, socket or device)")
            key = (info.st_dev, info.st_ino)
            if key in found:
                continue
            found[key] = path
            if stat.S_ISDIR(info.st_mode):
                pending.extend(path.iterdir())
    return found


def _under(path: Path) -> Iterator[Path]:
    """`path` and, for a folder, everything under it, symlinks followed once."""
    yield path
    if path.is_dir() and not path.is_symlink():
        yield from path.rglob("*")


def check_overlap(out: Path, inputs: Iterable[Path]) -> None:
    """Refuse a destination that is, holds, or lies inside an input, or whose replacement would
    touch a file an input reads: compared by path and by inode (symlinks, hard links, bind mounts);
    also the current folder and anything holding it."""
    inputs = list(inputs)
    target = _resolved(out)
    for given in inputs:
        for source in {given.absolute(), _resolved(given)}:
            if target == source:
                raise LayerpruneError(f"output {out} is the input model {given}; choose another --out")
            if target in source.parents:
                raise LayerpruneError(f"output {out} holds the input model {given}; choose another --out")
            if source in target.parents:
                raise LayerpruneError(f"output {out} must not be inside the input model {given}")
    here = Path.cwd().resolve()
    if target == here or target in here.parents:
        raise LayerpruneError(f"output {out} is the current folder or holds it; choose another --out")
    read = input_files(inputs)
    for path in [target, *target.parents]:  # a folder above the output that is an input folder
        with suppress(OSError):
            info = path.stat()
            if (info.st_dev, info.st_ino) in read and stat.S_ISDIR(info.st_mode):
                raise LayerpruneError(f"output {out} must not be inside the input {read[(info.st_dev, info.st_ino)]}")
    if out.exists() or out.is_symlink():
        for path in _under(out):
            with suppress(OSError):
                info = path.stat()
                if (info.st_dev, info.st_ino) in read:
                    raise LayerpruneError(
                        f"output {out} holds {path}, which is the input {read[(info.st_dev, info.st_ino)]} "
                        "(a link to it); choose another --out"
                    )


def _resolved(path: Path) -> Path:
    try:
        return path.resolve(strict=False)
    except (OSError, RuntimeError) as err:
        raise LayerpruneError(f"{path} is a symlink loop") from err


# --- destinations -------------------------------------------------------------------------


def check_destination(
    out: Path, inputs: Iterable[Path], overwrite: bool, *, kind: str = "folder", resume: str | None = None
) -> None:
    """Refuse, before anything is created, a destination that overlaps an input (`check_overlap`),
    is of the other kind (`folder` or `file`), or exists and is not layerprune's, or (without
    `overwrite`) exists at all. A folder holding the file `resume` (a resumable job's record), or an
    empty one, may exist, to be continued."""
    check_overlap(out, inputs)
    if out.name in ("", ".", "..") or _resolved(out) == Path("/"):
        example = "out/model.gguf" if kind == "file" else "out/model"
        raise LayerpruneError(f"output {out} names no new {kind}; give a path such as {example}")
    if not (out.exists() or out.is_symlink()):
        parent = next((p for p in out.absolute().parents if p.exists() or p.is_symlink()), None)
        if parent is not None and not parent.is_dir():
            raise LayerpruneError(f"cannot create {out}: {parent} is a file, not a folder")
        return
    if out.is_symlink() and not out.exists():
        raise LayerpruneError(f"output {out} is a broken symlink; remove it or choose another --out")
    if kind == "folder" and not out.is_dir():
        raise LayerpruneError(f"output {out} exists and is not a folder; choose another --out")
    if kind == "file" and out.is_dir():
        raise LayerpruneError(f"output {out} is a folder; give a file name")
    if kind == "file" and not stat.S_ISREG(out.stat().st_mode):
        raise LayerpruneError(f"output {out} exists and is not a regular file; choose another --out")
    if resume is not None:
        recover_tree(out)  # what killed runs left inside
        if (out / resume).is_file() or not any(out.iterdir()):
            return
        raise LayerpruneError(f"{out} holds files that are not layerprune's; choose another --out")
    if kind == "folder" and not any(out.iterdir()):
        if overwrite:
            return
    elif not owned(out):
        what = "holds files that layerprune did not write" if kind == "folder" else "is a file layerprune did not write"
        raise LayerpruneError(f"{out} {what}; --overwrite replaces only layerprune's outputs")
    if not overwrite:
        raise LayerpruneError(f"output {out} already exists; pass --overwrite to replace it")


# --- writers, scratch folders and locks -----------------------------------------------------


def _writer() -> dict[str, Any]:
    """Who is writing: enough to tell later whether that process is still alive."""
    return {"pid": os.getpid(), "started": _start_time(os.getpid()), "host": socket.gethostname()}


def _start_time(pid: int) -> str | None:
    """The process's start time since boot (/proc), which tells a reused pid apart; None if unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def writer_alive(record: Any) -> bool:
    """Whether the process that wrote `record` may still be running (another host: assume so)."""
    if not isinstance(record, dict) or record.get("host") != socket.gethostname():
        return isinstance(record, dict)
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    started = record.get("started")
    return started is None or _start_time(pid) in (None, started)


def _read_writer(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def scratch_folder(parent: Path, prefix: str) -> Path:
    """A new hidden working folder, its writer recorded beside it first (`NAME.writer`), so that a
    later run can reclaim it if this one is killed at any instant."""
    while True:
        name = f"{prefix}{secrets.token_hex(4)}"
        writer = parent / f"{name}{WRITER_SUFFIX}"
        try:
            with open(writer, "x") as handle:
                handle.write(json.dumps(_writer()))
        except FileExistsError:
            continue
        try:
            (parent / name).mkdir(mode=0o700)
        except FileExistsError:
            writer.unlink()
            continue
        return parent / name


def remove_scratch(folder: Path) -> None:
    """Remove a scratch folder, then the record of its writer."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.with_name(folder.name + WRITER_SUFFIX).unlink(missing_ok=True)


def reclaim_stale(parent: Path, prefix: str) -> list[Path]:
    """Remove the scratch folders named `prefix*` in `parent` whose writer is dead (a run killed
    outright), and their records; those of live runs, and anything without a record, stay."""
    removed = []
    for record in parent.glob(f"{_glob_escape(prefix)}*{WRITER_SUFFIX}"):
        if not writer_alive(_read_writer(record)):
            folder = record.with_name(record.name.removesuffix(WRITER_SUFFIX))
            remove_scratch(folder)
            removed.append(folder)
    return removed


def _glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


_held: dict[Path, int] = {}  # the lock files this process holds, and how deeply


@contextmanager
def hold(out: Path) -> Iterator[None]:
    """An exclusive lock on the destination `out` (`.NAME.lock` beside it, whose folder must
    exist), held by this process for the whole block; nested holds of one destination are one.
    The kernel releases it when its holder dies; the lock file left then is reclaimed by the next
    run (`recover`)."""
    import fcntl

    lock = out.parent.absolute() / f".{out.name}.lock"
    if lock in _held:
        _held[lock] += 1
        try:
            yield
        finally:
            _held[lock] -= 1
        return
    recover(out.parent)
    for attempt in range(LOCK_RETRIES + 1):
        handle = open(lock, "a+")  # noqa: SIM115 (held open for the whole block)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _parse(handle.read())
            handle.close()
            if writer_alive(holder) or attempt == LOCK_RETRIES:  # a dead holder's file is being reclaimed
                pid = holder.get("pid", "?") if isinstance(holder, dict) else "?"
                raise LayerpruneError(
                    f"another layerprune (pid {pid}) is writing {out}; wait for it to finish"
                ) from None
            time.sleep(0.05)
            continue
        with suppress(FileNotFoundError):
            if os.fstat(handle.fileno()).st_ino == os.stat(lock).st_ino:
                break  # the file we locked is still the lock file (not one just removed)
        handle.close()
    _held[lock] = 1
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(_writer()))
        handle.flush()
        yield
    finally:
        del _held[lock]
        lock.unlink(missing_ok=True)
        handle.close()


def _parse(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _reclaim_locks(parent: Path) -> None:
    """Remove lock files whose holder died (nobody holds their flock)."""
    import fcntl

    for lock in parent.glob(".*.lock"):
        if lock.absolute() in _held:
            continue
        try:
            handle = open(lock)  # noqa: SIM115
        except OSError:
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        with suppress(FileNotFoundError):
            if os.fstat(handle.fileno()).st_ino == os.stat(lock).st_ino and not writer_alive(_parse(handle.read())):
                lock.unlink()
        handle.close()


# --- publishing and recovery ----------------------------------------------------------------


def _journal(out: Path) -> Path:
    return out.parent / f".{out.name}.publish"


def _fsync_folder(folder: Path) -> None:
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish(new: Path, out: Path, overwrite: bool) -> None:
    """Put the finished `new` (a file or folder beside `out`) in place of `out`. A file, or a folder
    where none was, takes one rename. A folder replacing an old one goes under a journal, so that at
    every instant `out` holds the old output or the new one, or `recover` can finish the move."""
    step("publish")
    if out.exists() and not overwrite:  # another run finished first
        raise LayerpruneError(f"output {out} already exists; pass --overwrite to replace it")
    if not out.is_dir() or new.is_file():
        os.replace(new, out)
        step("renamed")
        _fsync_folder(out.parent)
        return
    if _exchange(new, out):  # one atomic swap; the old output is now in the scratch folder, reclaimable
        step("exchanged")
        _fsync_folder(out.parent)
        shutil.rmtree(new, ignore_errors=True)
        step("removed old")
        return
    trash = scratch_folder(out.parent, f".{out.name}.old.")
    trash.rmdir()  # its name, recorded; the old output takes it
    journal = _journal(out)
    write_atomically(journal, json.dumps({"new": new.name, "old": trash.name, "writer": _writer()}))
    step("journal")
    os.replace(out, trash)
    step("moved old")
    os.replace(new, out)
    step("moved new")
    _fsync_folder(out.parent)
    shutil.rmtree(trash, ignore_errors=True)
    step("removed old")
    journal.unlink()
    step("journal removed")
    trash.with_name(trash.name + WRITER_SUFFIX).unlink(missing_ok=True)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step (Linux's renameat2 with RENAME_EXCHANGE); False where the system
    or the file system cannot, and the journal does it in steps."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _finish(journal: Path) -> None:
    """Finish or roll back the publish a dead run left at `journal`."""
    entry = _parse(journal.read_text()) if journal.is_file() else None
    out = journal.with_name(journal.name[1:].removesuffix(".publish"))
    if isinstance(entry, dict) and isinstance(entry.get("new"), str) and isinstance(entry.get("old"), str):
        new, old = out.parent / Path(entry["new"]).name, out.parent / Path(entry["old"]).name
        if not (out.exists() or out.is_symlink()):
            if new.is_dir():  # the old output moved away, the new one whole: finish
                os.replace(new, out)
            elif old.is_dir():  # roll back
                os.replace(old, out)
        shutil.rmtree(old, ignore_errors=True)
        remove_scratch(new)
        old.with_name(old.name + WRITER_SUFFIX).unlink(missing_ok=True)
    journal.unlink(missing_ok=True)


def recover(parent: Path) -> None:
    """Finish or roll back the publishes that dead runs left in `parent`, then reclaim their scratch
    folders and lock files; nothing of a live run, and nothing else, is touched."""
    if not parent.is_dir():
        return
    for journal in parent.glob(".*.publish"):
        if not writer_alive((_parse(journal.read_text()) or {}).get("writer") if journal.is_file() else None):
            with suppress(OSError):
                _finish(journal)
    reclaim_stale(parent, ".")
    _reclaim_locks(parent)


def recover_tree(folder: Path) -> None:
    """`recover` in `folder` and every folder under it: for a resumable job's folder, which it
    writes into file by file."""
    for path in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink())]:
        recover(path)


def write_atomically(path: Path, text: str) -> None:
    """Write a small file so that a kill or a full disk leaves the old file or the new one, never
    half of one; the temporary file lies in a scratch folder that the next write of this file (or a
    run into this folder) reclaims, if its writer was killed."""
    reclaim_stale(path.parent, f".{path.name}.tmp.")
    tmp = scratch_folder(path.parent, f".{path.name}.tmp.")
    try:
        (tmp / path.name).write_text(text, encoding="utf-8")
        os.chmod(tmp / path.name, 0o666 & ~_umask())
        step("replace file")
        os.replace(tmp / path.name, path)
        step("replaced file")
    finally:
        remove_scratch(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _make_parents(folder: Path, out: Path) -> list[Path]:
    """Create `folder` and its missing parents; returns those created, deepest first."""
    created = []
    current = folder.absolute()
    while not (current.exists() or current.is_symlink()) and current != current.parent:
        created.append(current)
        current = current.parent
    if not current.is_dir():
        raise LayerpruneError(f"cannot create {out}: {current} is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _remove_empty(created)
        raise LayerpruneError(f"cannot create {out}: {describe_os_error(err)}") from err
    return created


def _remove_empty(folders: Sequence[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def _mb(size: float) -> str:
    return f"{size / 2**20:,.1f} MB"


@contextmanager
def claimed(out: Path, check: Callable[[], None]) -> Iterator[list[Path]]:
    """`check()`, then `out`'s missing parent folders made and `out` held (`hold`), with `check()`
    again under the lock; the folders made are removed again if the block fails."""
    check()
    created = _make_parents(out.parent, out)
    try:
        with hold(out):
            check()
            yield created
    except BaseException:
        _remove_empty(created)
        raise


@contextmanager
def staged(
    out: Path,
    *,
    kind: str = "folder",
    overwrite: bool = False,
    inputs: Iterable[Path] = (),
    needed_bytes: int | None = None,
    resume: str | None = None,
) -> Iterator[Path]:
    """A temporary folder (kind `folder`) or file path (kind `file`) beside `out`, which becomes
    `out` only if the block succeeds. The destination is checked (`check_destination`) before
    anything is made, locked, and checked again under the lock. On any failure every temporary file,
    and every parent folder made for it, is removed; a full disk says how much space was needed
    (`needed_bytes`, when known) and how much was free."""
    inputs = list(inputs)
    with claimed(out, lambda: check_destination(out, inputs, overwrite, kind=kind, resume=resume)):
        try:
            if needed_bytes is not None and needed_bytes > _free_bytes(out.parent):
                raise LayerpruneError(
                    f"not enough space for {out}: it needs about {_mb(needed_bytes)}, "
                    f"{_mb(_free_bytes(out.parent))} is free there"
                )
            tmp = scratch_folder(out.parent, f".{out.name}.tmp.")
            try:
                target = tmp if kind == "folder" else tmp / out.name
                yield target
                if kind == "folder":
                    for path in [tmp, *tmp.rglob("*")]:  # mkdtemp and some writers leave them private
                        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())
                else:
                    os.chmod(target, 0o666 & ~_umask())
                publish(target, out, overwrite)
            finally:
                remove_scratch(tmp)  # gone after a publish; removed after a failure
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise _explained(err, out, needed_bytes) from err
            raise


def _explained(err: OSError, out: Path, needed_bytes: int | None) -> LayerpruneError:
    """A full or read-only file system while writing `out`, in one line that says what to do."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        folder = next(p for p in [out.parent, *out.parent.parents] if p.exists())
        needed = f"it needs about {_mb(needed_bytes)}, " if needed_bytes is not None else ""
        free = _mb(_free_bytes(folder))
        return LayerpruneError(f"disk full writing {out}: {needed}{free} is free there; nothing was left behind")
    return LayerpruneError(f"cannot write {out}: {describe_os_error(err)}")
