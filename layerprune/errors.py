"""The one exception type users see, and the CLI's error boundary: any expected failure as one line.

Library code raises `LayerpruneError` for bad input or an impossible request. Failures that come
from outside (the file system, a JSON parser, a pickle refusal, an absurd allocation) are mapped
to one line here too, naming the file and what is wrong. Anything else is a bug in layerprune:
it is also reported in one line, with exit code 2 and the hint to rerun with LAYERPRUNE_DEBUG=1,
which shows every traceback.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import pickle

MAX_MESSAGE = 400  # characters: one line on a terminal, even for an absurd argument
USER_ERROR, INTERNAL_ERROR = 1, 2


class LayerpruneError(Exception):
    """Bad input or an impossible request; carries a one-line message for the user."""


class LayerpruneWarning(UserWarning):
    """Input that was accepted after a correction the user should know of (printed as one line)."""


_OS_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.EEXIST: "already exists",
    errno.ENAMETOOLONG: "file name too long",
}


def describe_os_error(err: OSError) -> str:
    """'PATH: what went wrong', for any OSError."""
    what = _OS_ERRORS.get(err.errno or 0, err.strerror or type(err).__name__)
    where = err.filename if err.filename not in (None, "") else None
    return f"{where}: {what}" if where is not None else what


# the libraries of the optional extras, and the extra that brings each
EXTRAS = {"lm_eval": "eval", "datasets": "eval", "peft": "heal", "bitsandbytes": "heal"}


def missing_extra(module: str) -> str:
    return (
        f"this needs {module}, which is not installed: pip install 'layerprune[{EXTRAS[module]}]' (or layerprune[all])"
    )


def require(*modules: str) -> None:
    """Refuse, before any work, a command whose optional libraries are not installed."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise LayerpruneError(missing_extra(module))


def describe(err: BaseException) -> tuple[str, int]:
    """(one-line message, exit code) for an exception that reached the command line."""
    if isinstance(err, LayerpruneError):
        message, code = str(err), USER_ERROR
    elif isinstance(err, OSError):
        message, code = describe_os_error(err), USER_ERROR
    elif isinstance(err, json.JSONDecodeError):
        message, code = f"invalid JSON (line {err.lineno}, column {err.colno}): {err.msg}", USER_ERROR
    elif isinstance(err, pickle.UnpicklingError):
        message, code = f"refused to unpickle a checkpoint file: {err}", USER_ERROR
    elif isinstance(err, MemoryError):
        message, code = "out of memory: the request needs more memory than this machine has", USER_ERROR
    elif isinstance(err, ModuleNotFoundError) and (err.name or "").split(".")[0] in EXTRAS:
        message, code = missing_extra((err.name or "").split(".")[0]), USER_ERROR
    elif type(err).__name__ == "SafetensorError":
        message, code = f"corrupted safetensors file: {err}", USER_ERROR
    else:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        message = (
            f"internal error, a bug in layerprune: {type(err).__name__}: {first} "
            "(rerun with LAYERPRUNE_DEBUG=1 for the traceback)"
        )
        code = INTERNAL_ERROR
    return one_line(message), code


def one_line(message: str) -> str:
    """The message on one line, cut to MAX_MESSAGE characters."""
    flat = " ".join(message.split())
    return flat if len(flat) <= MAX_MESSAGE else flat[: MAX_MESSAGE - 1] + "…"
