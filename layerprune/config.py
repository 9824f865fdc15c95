"""Settings as frozen dataclasses, seen flat: one name per field, nested configs included.

Each settings class (`Calibration`, `PruneConfig`, `HealConfig`, `EvalConfig`, `SweepConfig`,
...) declares its fields once, with their help in the field's metadata. A nested config field
adds its fields under an optional prefix (`metadata={"prefix": "heal_"}`), some of them without it
(`"bare": ("tasks",)`) and some not at all (`"omit": ("limit",)`: left at their defaults, for the
owner to set); a field may name its command-line flag and other names for it (`metadata={"flag":
"n", "aliases": ("counts",)}`). The flat view gives the CLI one option per field and the API one
keyword per field, so a new setting is one field.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from layerprune.errors import LayerpruneError


@dataclass(frozen=True)
class FlatField:
    """One setting: its flat name, where it sits in the nested config, its type, default and help."""

    name: str  # e.g. "heal_steps"
    path: tuple[str, ...]  # e.g. ("heal_config", "steps")
    annotation: Any
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    prefix: str = ""  # of the name, e.g. "heal_"
    flag: str = ""  # the option's name on the command line, e.g. "heal-steps"
    aliases: tuple[str, ...] = ()  # other names for it on the command line


@cache
def _hints(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def flat_fields(
    cls: Any, prefix: str = "", path: tuple[str, ...] = (), outer: str = "", bare: tuple = (), omit: tuple = ()
) -> Iterator[FlatField]:
    """Every setting of a config class, nested configs expanded in place (`bare`: fields that keep
    the `outer` prefix rather than the nested one; `omit`: fields left at their defaults, unseen)."""
    for field in dataclasses.fields(cls):
        if field.name in omit:
            continue
        own = outer if field.name in bare else prefix
        annotation = _hints(cls)[field.name]
        if dataclasses.is_dataclass(annotation):
            meta = field.metadata
            yield from flat_fields(annotation, own + meta.get("prefix", ""), (*path, field.name), own,
                                   meta.get("bare", ()), meta.get("omit", ()))  # fmt: skip
            continue
        choices = field.metadata.get("choices", ())
        yield FlatField(
            name=own + field.name,
            path=(*path, field.name),
            annotation=annotation,
            default=_default(field),
            help=field.metadata.get("help", ""),
            choices=tuple(choices() if callable(choices) else choices),
            prefix=own,
            flag=(own + field.metadata.get("flag", field.name)).replace("_", "-"),
            aliases=tuple((own + alias).replace("_", "-") for alias in field.metadata.get("aliases", ())),
        )


def build(cls: Any, values: Mapping[str, Any]) -> Any:
    """An instance of `cls` from flat values; missing ones take their defaults.

    A nested config may also be given whole, under its field name.
    """
    known = {f.name for f in flat_fields(cls)} | _nested_names(cls)
    unknown = sorted(set(values) - known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise LayerpruneError(f"unknown setting {unknown[0]!r} for {cls.__name__}{hint}")
    return _build(cls, values, "")


def _nested_names(cls: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if dataclasses.is_dataclass(_hints(cls)[f.name])}


def _build(
    cls: Any, values: Mapping[str, Any], prefix: str, outer: str = "", bare: tuple = (), omit: tuple = (),
    template: Any = None,
) -> Any:  # fmt: skip
    """`cls` from the flat `values`; with `omit`, the fields left out keep `template`'s values."""
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name in omit:
            continue
        own = outer if field.name in bare else prefix
        annotation = _hints(cls)[field.name]
        if dataclasses.is_dataclass(annotation):
            meta = field.metadata
            given = values.get(field.name) if not prefix else None
            inner = _default(field) if meta.get("omit") else None
            kwargs[field.name] = given or _build(annotation, values, own + meta.get("prefix", ""), own,
                                                 meta.get("bare", ()), meta.get("omit", ()), inner)  # fmt: skip
        elif own + field.name in values:
            kwargs[field.name] = values[own + field.name]
    return dataclasses.replace(template, **kwargs) if template is not None else cls(**kwargs)


def flatten(config: Any) -> dict[str, Any]:
    """The flat values of a config instance (the inverse of `build`)."""
    flat: dict[str, Any] = {}
    for field in flat_fields(type(config)):
        value = config
        for name in field.path:
            value = getattr(value, name)
        flat[field.name] = value
    return flat
