"""What layerprune knows about each decoder family, loaded from `_data/architectures/*.json`.

A family file declares where the layer list and final norm live, which config key counts
layers, which per-layer config lists must be sliced, which attribute carries `layer_idx`,
the state-dict key template that carries the layer index, the MLP module names, where a repair
folds in, and its GGUF facts (llama.cpp's name for it, its implicit sliding-window period).
Adding a family means adding one JSON file; nothing here changes.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, fields
from functools import cache
from importlib import resources
from string import Template
from typing import Any

from layerprune.errors import LayerpruneError

LAYER_INDEX = "${layer_index}"


@dataclass(frozen=True)
class Architecture:
    """One decoder family, as declared in its JSON file."""

    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    layers: str  # module path of the nn.ModuleList of decoder layers
    final_norm: str  # module path of the norm applied after the last layer
    num_layers_key: str  # config key holding the layer count
    layer_idx_attr: str  # attribute path, inside one layer, of the attention's `layer_idx`
    layer_key_template: str  # state-dict prefix of one layer, with ${layer_index}
    per_layer_config_lists: tuple[str, ...]  # config lists indexed by layer
    mlp_modules: tuple[str, ...]  # MLP linear module names (LoRA targets for healing)
    mlp_term: str  # module, inside one layer, whose output is the MLP's term in the residual add
    repair_fold: str  # module, inside one layer, that takes a repair's map (see `repair`)
    # linear (weight [out, in]), conv1d (weight [in, out]), or norm: a linear whose output passes
    # through the norm `mlp_term` (the map is fitted through it, with the norm's weight)
    repair_fold_kind: str
    gguf_arch: str  # llama.cpp's name for the family in a GGUF (`general.architecture`; Mistral's is llama)
    # llama.cpp's set_swa_pattern(period) for the family: layer i uses sliding-window attention
    # unless i % period == period - 1; 0: no implicit pattern
    gguf_sliding_period: int

    def __post_init__(self) -> None:
        if self.layer_key_template.count(LAYER_INDEX) != 1:
            raise ValueError(f"{self.name}: layer_key_template needs one {LAYER_INDEX}")
        if self.repair_fold_kind not in ("linear", "conv1d", "norm"):
            raise ValueError(f"{self.name}: repair_fold_kind must be linear, conv1d or norm")
        if self.gguf_sliding_period < 0:
            raise ValueError(f"{self.name}: gguf_sliding_period must be 0 (none) or a period of layers")

    def num_layers(self, config: Any) -> int:
        """The layer count from a config object or a config dict."""
        value = config.get(self.num_layers_key) if isinstance(config, dict) else getattr(config, self.num_layers_key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise LayerpruneError(
                f"config's '{self.num_layers_key}' must be a whole number of layers (family {self.name}), got {value!r}"
            )
        if value < 1:
            raise LayerpruneError(f"config's '{self.num_layers_key}' must be at least 1, got {value}")
        return value

    def layer_list(self, model: Any) -> Any:
        """The model's nn.ModuleList of decoder layers."""
        return model.get_submodule(self.layers)

    def set_layer_list(self, model: Any, layers: Any) -> None:
        """Put a new nn.ModuleList of decoder layers in the model."""
        parent, _, attr = self.layers.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, layers)

    def layer_key(self, index: int) -> str:
        """The state-dict prefix of layer `index`, e.g. 'model.layers.3.'."""
        return Template(self.layer_key_template).substitute(layer_index=index)

    @property
    def layer_key_pattern(self) -> re.Pattern[str]:
        """Matches a layer key; checkpoints may omit the base-model prefix ('h.0.' for 'transformer.h.0.')."""
        return _key_pattern(self.layer_key_template)

    def split_layer_key(self, key: str) -> tuple[str, int, str] | None:
        """Split a state-dict key into (prefix, layer index, rest), or None if not a layer key."""
        match = self.layer_key_pattern.match(key)
        if match is None:
            return None
        return match.group("prefix"), int(match.group("index")), key[match.end() :]


@cache
def _key_pattern(template: str) -> re.Pattern[str]:
    head, tail = template.split(LAYER_INDEX)
    parts = head.rstrip(".").split(".")
    suffixes = ["\\.".join(map(re.escape, parts[i:])) for i in range(len(parts))]
    return re.compile(rf"^(?P<prefix>(?:{'|'.join(suffixes)})\.)(?P<index>\d+){re.escape(tail)}")


@cache
def all_architectures() -> dict[str, Architecture]:
    """Every packaged family, keyed by family name."""
    found: dict[str, Architecture] = {}
    for entry in resources.files("layerprune._data.architectures").iterdir():
        if entry.name.endswith(".json"):
            arch = parse_family(json.loads(entry.read_text()), entry.name)
            found[arch.name] = arch
    return dict(sorted(found.items()))


def parse_family(raw: Any, source: str) -> Architecture:
    """A family file checked against its schema, the fields of `Architecture`: every field present,
    no other, each of its type (a list of strings for the tuples, a whole number for the ints, else
    a non-empty string); one line names what is wrong."""
    if not isinstance(raw, dict):
        raise LayerpruneError(f"family file {source}: expected a JSON object")
    wanted = {f.name: f.type for f in fields(Architecture)}
    missing, unknown = sorted(set(wanted) - set(raw)), sorted(set(raw) - set(wanted))
    if missing or unknown:
        raise LayerpruneError(f"family file {source}: missing {missing}, unknown {unknown}")
    for name, kind in wanted.items():
        value = raw[name]
        if "tuple" in str(kind):
            ok, expected = isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of strings"
        elif kind in (int, "int"):
            ok, expected = isinstance(value, int) and not isinstance(value, bool), "a whole number"
        else:
            ok, expected = isinstance(value, str) and value != "", "a non-empty string"
        if not ok:
            raise LayerpruneError(f"family file {source}: {name} must be {expected}, got {value!r}")
    try:
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
        return Architecture(**values)
    except ValueError as err:
        raise LayerpruneError(f"family file {source}: {err}") from err


def find_architecture(config: Any) -> Architecture:
    """The family of a config (object or dict): by architecture class first, then model_type."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    classes = list(get("architectures") or [])
    model_type = get("model_type")
    families = all_architectures().values()
    for arch in families:
        if classes and classes[0] in arch.architectures:
            return arch
    for arch in families:
        if model_type in arch.model_types:
            return arch
    known = sorted({c for a in families for c in a.architectures} | {t for a in families for t in a.model_types})
    asked = classes[0] if classes else str(model_type)
    close = difflib.get_close_matches(asked, known, n=1)
    hint = f" Did you mean {close[0]}?" if close else ""
    raise LayerpruneError(
        f"unsupported architecture {asked!r}.{hint} Supported families: {', '.join(all_architectures())}"
    )


def gguf_sliding_period(gguf_arch: str) -> int:
    """The implicit sliding-window period llama.cpp gives GGUFs of an architecture (0: none)."""
    return max((a.gguf_sliding_period for a in all_architectures().values() if a.gguf_arch == gguf_arch), default=0)


def gguf_architectures() -> tuple[str, ...]:
    """The GGUF architectures (llama.cpp's names) of the packaged families."""
    return tuple(sorted({a.gguf_arch for a in all_architectures().values()}))
