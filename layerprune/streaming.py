"""Analysis of models larger than memory: the calibration data goes through one layer at a time.

The model is built on the meta device (accelerate's empty-weights init), with only the
embeddings and the final norm loaded. Then for each layer l: its weights are read from the
safetensors files (memory-mapped), every calibration batch's residual stream resid[l] goes
through it to give resid[l+1], the final-token rows and Block Influence are taken at once, and
the layer is freed before the next is loaded. Each layer is run by the model's own forward with
its layer list cut to that one layer and a pre-hook that feeds in the stored resid[l], so masks,
rotary embeddings and sliding windows are the family's own code.

Of the embedding table only the rows of the token ids in the calibration data are read (a
memory map touches only their pages), and the ids are renumbered to index those rows: for a
large vocabulary (Gemma 3's 262k tokens, 671 MB in fp32) the full table would outweigh a layer.

Peak memory: one layer's weights, the used embedding rows and the residual states of all samples
(kept in memory up to `memory_budget`, spilled to a temporary folder past it).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import LayerpruneError


def _run_layers(model: Any, arch: Any, batch: dict, start: Any, keep: list[int]) -> Any:
    """resid entering the final norm after running only layers `keep`, starting from `start`
    (the embeddings when `start` is None)."""
    import torch

    from .surgery import running_from

    captured: dict[str, Any] = {}

    def capture(module: Any, args: tuple, kwargs: dict) -> None:
        captured["resid"] = args[0] if args else kwargs["hidden_states"]

    hook = model.get_submodule(arch.final_norm).register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.inference_mode(), running_from(model, arch, keep, start):
            model.base_model(**batch, use_cache=False)
    finally:
        hook.remove()
    return captured["resid"].float()


SPILL_PREFIX = "layerprune-spill-"


def remove_stale_spills() -> list[Path]:
    """Remove spill folders left by runs that were killed outright (their process is gone); an
    interrupted run (Ctrl-C, SIGTERM) removes its own."""
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{SPILL_PREFIX}*-*"):
        pid = folder.name.removeprefix(SPILL_PREFIX).split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class _States:
    """The residual state of every batch, in memory up to a budget and on disk past it."""

    def __init__(self, budget_bytes: float) -> None:
        self.budget = budget_bytes
        self.memory: dict[int, Any] = {}
        self.used = 0
        self.folder: Path | None = None
        remove_stale_spills()

    def put(self, index: int, state: Any) -> None:
        import torch

        size = state.numel() * state.element_size()
        if index in self.memory:
            self.used -= self.memory[index].numel() * self.memory[index].element_size()
            del self.memory[index]
        if self.used + size <= self.budget:
            self.memory[index] = state
            self.used += size
            return
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-"))
        torch.save(state, self.folder / f"{index}.pt")

    def get(self, index: int) -> Any:
        import torch

        if index in self.memory:
            return self.memory[index]
        assert self.folder is not None
        return torch.load(self.folder / f"{index}.pt")

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def _return_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc). Layers converted from bf16 are allocated in
    pieces below glibc's mmap threshold, and without a trim the heap keeps every layer's worth."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # AttributeError: a libc without malloc_trim
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols, libc among them


_TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def _read_rows(entry: Any, rows: Any) -> Any:
    """Rows `rows` (sorted ids) of a 2-D float tensor in a safetensors file, as fp32, read through
    a memory map so that only their pages are touched."""
    import numpy as np
    import torch

    table = np.memmap(entry.file, dtype=np.uint8, mode="r", offset=entry.start, shape=(entry.length,))
    picked = table.reshape(entry.shape[0], -1)[rows.numpy()]  # a copy of those rows only
    del table
    dtype = getattr(torch, _TORCH_DTYPES[entry.dtype])
    return torch.from_numpy(picked).view(dtype).to(torch.float32)


def _used_embeddings(model: Any, entries: dict, batches: list[dict]) -> tuple[list[dict], list[str]]:
    """Give the model only the embedding rows that `batches` use, and the batches renumbered to
    them; returns the batches and the checkpoint keys now loaded (none if the table is not found
    or not a plain float matrix)."""
    import torch

    embedding = model.get_input_embeddings()
    key = next((n for n, p in model.named_parameters() if p is embedding.weight), None)
    if key not in entries or entries[key].dtype not in _TORCH_DTYPES or len(entries[key].shape) != 2:
        return batches, []  # loaded whole, as any other tensor
    ids = torch.unique(torch.cat([b["input_ids"].flatten() for b in batches]))
    embedding.weight = torch.nn.Parameter(_read_rows(entries[key], ids), requires_grad=False)
    embedding.padding_idx = None  # an index into the full table; it only matters for training
    return [{**b, "input_ids": torch.searchsorted(ids, b["input_ids"])} for b in batches], [key]


def _layer_bytes(entries: dict, arch: Any, index: int) -> int:
    """fp32 bytes of one layer's tensors, from the safetensors headers."""
    total = 0
    for key, entry in entries.items():
        split = arch.split_layer_key(key)
        if split and split[1] == index:
            total += math.prod(entry.shape) * 4
    return total


def measure_streaming(
    path: Path, batches: list[dict], memory_budget: float | None = None, progress: bool = True
) -> tuple[dict[int, list[float]], list[float]]:
    """The angular table and Block Influence of the checkpoint at `path`, one layer in memory at a time."""
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM

    from .architectures import find_architecture
    from .checkpoint import read_header, shard_files

    config = AutoConfig.from_pretrained(str(path))
    arch = find_architecture(config)
    num_layers = arch.num_layers(config)
    entries = {k: e for shard in shard_files(path) for k, e in read_header(shard)[0].items()}
    if not entries:
        raise LayerpruneError(f"{path} has no safetensors weights to stream")
    largest_layer = max(_layer_bytes(entries, arch, i) for i in range(num_layers))
    if memory_budget is not None and memory_budget < largest_layer:
        raise LayerpruneError(
            f"memory budget {memory_budget / 2**20:.1f} MiB is smaller than one layer: at least "
            f"{largest_layer / 2**20:.1f} MiB is needed"
        )
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    names = set(dict(model.named_parameters())) | set(dict(model.named_buffers()))

    def load(keys: list[str]) -> None:
        for key in keys:
            entry = entries[key]
            split = arch.split_layer_key(key)
            name = f"{arch.layer_key(split[1])}{split[2]}" if split else key
            if name not in names:
                continue
            with safe_open(entry.file, framework="pt") as handle:
                tensor = handle.get_tensor(key).to(torch.float32)
            set_module_tensor_to_device(model, name, "cpu", value=tensor)

    batches, loaded = _used_embeddings(model, entries, batches)
    load([k for k in entries if arch.split_layer_key(k) is None and not k.startswith("lm_head.") and k not in loaded])
    budget = (memory_budget - largest_layer) if memory_budget is not None else float("inf")
    states = _States(budget)
    last_rows: list[list[Any]] = [[] for _ in batches]
    cos_sum = torch.zeros(num_layers, dtype=torch.float64)
    tokens = 0
    masks = [b["attention_mask"].bool() for b in batches]
    last_index = [m.shape[1] - 1 - m.flip(1).int().argmax(dim=1) for m in masks]
    try:
        for b, batch in enumerate(batches):
            resid = _run_layers(model, arch, batch, None, [])  # the embeddings, resid[0]
            last_rows[b].append(resid[torch.arange(len(resid)), last_index[b]].double())
            states.put(b, resid)
            tokens += int(masks[b].sum())
        for layer in tqdm(range(num_layers), desc="analyze (offload)", unit="layer", disable=not progress):
            load([k for k in entries if (s := arch.split_layer_key(k)) and s[1] == layer])
            for b, batch in enumerate(batches):
                previous = states.get(b)
                resid = _run_layers(model, arch, batch, previous, [layer])
                cos = torch.nn.functional.cosine_similarity(previous, resid, dim=-1)
                cos_sum[layer] += cos[masks[b]].double().sum()
                last_rows[b].append(resid[torch.arange(len(resid)), last_index[b]].double())
                states.put(b, resid)
            arch.layer_list(model)[layer].to("meta")  # free this layer's weights
            _return_freed_memory()
    finally:
        states.close()
    angular_sum = torch.zeros(num_layers + 1, num_layers + 1, dtype=torch.float64)
    samples = 0
    for rows in last_rows:
        unit = torch.nn.functional.normalize(torch.stack(rows, dim=1), dim=-1)
        angular_sum += (torch.arccos((unit @ unit.transpose(1, 2)).clamp(-1, 1)) / math.pi).sum(dim=0)
        samples += unit.shape[0]
    mean = angular_sum / samples
    angular = {n: [float(mean[s, s + n]) for s in range(num_layers - n + 1)] for n in range(1, num_layers)}
    return angular, [float(v) for v in 1.0 - cos_sum / tokens]
