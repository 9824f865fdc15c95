"""Which layers a cut removes, checked in one place with one set of messages: a layer list as the
user types it (`20-27`, `3,5,7-9`), a count (`--n`) or a share (`--fraction`) of the layers, and
the removal they add up to, against the model's layer count."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable

from layerprune.errors import LayerpruneError, LayerpruneWarning

_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def parse_layers(spec: str, num_layers: int | None = None) -> list[int]:
    """'20-27' or '3,5,7-9' -> sorted unique layer indices. Each range is checked against
    `num_layers` before it is expanded, so an absurd range costs nothing."""
    parts = [part.strip() for part in spec.split(",")]
    if not spec.strip():
        raise LayerpruneError(f"no layers in {spec!r}")
    ranges = []
    for part in parts:
        match = _RANGE.fullmatch(part)
        if match is None:
            what = "an empty item" if not part else repr(part)
            raise LayerpruneError(
                f"cannot read layers {spec!r}: {what} is not a layer or a range; use 20-27 or 3,5,7-9"
            )
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < first:
            raise LayerpruneError(f"layer range {part} runs backwards; write it {last}-{first}")
        if num_layers is not None and last >= num_layers:
            raise LayerpruneError(f"layers {part} are out of range: the model has layers 0..{num_layers - 1}")
        ranges.append(range(first, last + 1))
    layers = sorted({i for r in ranges for i in r})
    if sum(len(r) for r in ranges) != len(layers):
        warnings.warn(f"layers {spec!r} name some layer twice; each is removed once", LayerpruneWarning, stacklevel=2)
    return layers


def check_removal(num_layers: int, removed: Iterable[int], allow_final: bool = False) -> list[int]:
    """The layers to remove, sorted, checked against the model: in range, not all, and not the
    final layer unless `allow_final`."""
    chosen = sorted(set(removed))
    final = num_layers - 1
    bad = [i for i in chosen if not 0 <= i < num_layers]
    if bad:
        raise LayerpruneError(f"layers {bad[:10]} are out of range: the model has layers 0..{final}")
    if not chosen:
        raise LayerpruneError("no layers to remove")
    if len(chosen) >= num_layers:
        raise LayerpruneError(f"cannot remove all {num_layers} layers")
    if final in chosen and not allow_final:
        raise LayerpruneError(f"removing the final layer ({final}) is refused; pass --allow-final to allow it")
    return chosen


def exactly_one(layers: object, n: object, fraction: object) -> None:
    """Refuse a request that names the layers in none or in more than one way."""
    if sum(x is not None for x in (layers, n, fraction)) != 1:
        raise LayerpruneError("give exactly one of --layers, --n or --fraction")


def check_fraction(fraction: float, zero_allowed: bool = False) -> None:
    """A share of the layers: between 0 and 1 (0 itself only where it stands for the full model)."""
    if not (0 <= fraction < 1 if zero_allowed else 0 < fraction < 1):
        interval = "[0, 1)" if zero_allowed else "(0, 1)"
        raise LayerpruneError(f"--fraction must be in {interval}: a share of the layers, got {fraction}")


def check_count(n: int, num_layers: int, most: int | None = None) -> int:
    """A number of layers to remove: at least 1, at most `most` (default: all but one)."""
    most = num_layers - 1 if most is None else most
    if not 1 <= n <= most:
        raise LayerpruneError(f"--n must be between 1 and {most} for a model of {num_layers} layers, got {n}")
    return n


def layer_count(num_layers: int, n: int | None, fraction: float | None, most: int | None = None) -> int:
    """How many layers to remove, from n or a fraction (rounded to the nearest layer)."""
    if fraction is not None:
        check_fraction(fraction)
        n = round(fraction * num_layers)
        if n < 1:
            raise LayerpruneError(f"--fraction {fraction} of {num_layers} layers removes no layer")
    if n is None:
        raise LayerpruneError("give --n or --fraction: how many layers to remove")
    return check_count(n, num_layers, most)
