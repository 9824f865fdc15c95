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
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from layerprune.architectures import Architecture, find_architecture
from layerprune.errors import LayerpruneError
from layerprune.io.checkpoint import TORCH_DTYPES, TensorEntry, check_layers, tensor_entries
from layerprune.io.destinations import reclaim_stale, remove_scratch, scratch_folder
from layerprune.measure.residual import AngularSums, final_rows, last_token_index, run_layers
from layerprune.runtime.devices import DTYPE_BYTES, Plan
from layerprune.runtime.memory import FIT_SHARE, memory_available, memory_free, return_freed_memory

SPILL_PREFIX = "layerprune-spill-"


def remove_stale_spills() -> list[Path]:
    """Remove spill folders left by runs that were killed outright (their writer is gone); an
    interrupted run (Ctrl-C, SIGTERM) removes its own."""
    return reclaim_stale(Path(tempfile.gettempdir()), SPILL_PREFIX)


class _States:
    """The residual state of every batch: on the compute device up to its budget, then in host
    memory (pinned, for a GPU) up to its budget, then in files on disk."""

    def __init__(self, device: Any, device_budget: float, host_budget: float) -> None:
        tiers = [(device, device_budget)] + ([("cpu", host_budget)] if device.type != "cpu" else [])
        self.tiers = [[where, budget, 0] for where, budget in tiers]  # device, budget, bytes used
        self.device = device
        self.memory: dict[int, tuple[int, Any]] = {}  # batch -> (tier, state)
        self.folder: Path | None = None
        remove_stale_spills()

    def put(self, index: int, state: Any) -> None:
        import torch

        size = state.numel() * state.element_size()
        if index in self.memory:
            tier, old = self.memory.pop(index)
            self.tiers[tier][2] -= old.numel() * old.element_size()
        for tier, (where, budget, used) in enumerate(self.tiers):
            if used + size <= budget:
                moved = state.to(where)
                if where == "cpu" and self.device.type == "cuda":
                    moved = moved.pin_memory()  # so the copy back to the GPU is asynchronous
                self.memory[index] = (tier, moved)
                self.tiers[tier][2] += size
                return
        if self.folder is None:
            self.folder = scratch_folder(Path(tempfile.gettempdir()), SPILL_PREFIX)
        torch.save(state.cpu(), self.folder / f"{index}.pt")

    def get(self, index: int) -> Any:
        import torch

        if index in self.memory:
            return self.memory[index][1].to(self.device, non_blocking=True)
        assert self.folder is not None
        return torch.load(self.folder / f"{index}.pt").to(self.device)

    def close(self) -> None:
        if self.folder is not None:
            remove_scratch(self.folder)


def _read_rows(entry: TensorEntry, rows: Any) -> Any:
    """Rows `rows` (sorted ids) of a 2-D float tensor in a safetensors file, as fp32, read through
    a memory map so that only their pages are touched."""
    import numpy as np
    import torch

    table = np.memmap(entry.file, dtype=np.uint8, mode="r", offset=entry.start, shape=(entry.length,))
    picked = table.reshape(entry.shape[0], -1)[rows.numpy()]  # a copy of those rows only
    del table
    dtype = getattr(torch, TORCH_DTYPES[entry.dtype])
    return torch.from_numpy(picked).view(dtype).to(torch.float32)


def _used_embeddings(model: Any, entries: dict, batches: list[dict], dtype: Any = None) -> tuple[list[dict], list[str]]:
    """Give the model only the embedding rows that `batches` use, and the batches renumbered to
    them; returns the batches and the checkpoint keys now loaded (none if the table is not found
    or not a plain float matrix)."""
    import torch

    embedding = model.get_input_embeddings()
    key = next((n for n, p in model.named_parameters() if p is embedding.weight), "")
    if key not in entries or entries[key].dtype not in TORCH_DTYPES or len(entries[key].shape) != 2:
        return batches, []  # loaded whole, as any other tensor
    ids = torch.unique(torch.cat([b["input_ids"].flatten() for b in batches]))
    rows = _read_rows(entries[key], ids)
    embedding.weight = torch.nn.Parameter(rows.to(dtype) if dtype is not None else rows, requires_grad=False)
    embedding.padding_idx = None  # an index into the full table; it only matters for training
    return [{**b, "input_ids": torch.searchsorted(ids, b["input_ids"])} for b in batches], [key]


def _layer_bytes(entries: dict[str, TensorEntry], arch: Architecture, index: int, dtype: str) -> int:
    """Bytes of one layer's tensors in `dtype`, from the safetensors headers."""
    total = 0
    for key, entry in entries.items():
        split = arch.split_layer_key(key)
        if split and split[1] == index:
            total += math.prod(entry.shape) * DTYPE_BYTES[dtype]
    return total


Visit = Callable[[int, int, dict, Any, Any], None]  # (layer, batch index, batch, resid in, resid out)
Watch = Callable[[int, Any], list[Any]]  # (layer, its module) -> hook handles, removed after the layer


class LayerStream:
    """A checkpoint run one layer at a time on the plan's device and in its dtype (the CPU in fp32
    by default).

    `memory_budget` (bytes) bounds the weights and states kept on that device: by default, for a
    GPU, its free memory, and for the CPU, no bound. When the budget holds two layers, the next
    layer is read from disk on a second thread while the current one computes.
    """

    def __init__(self, path: Path, plan: Plan | None = None, memory_budget: float | None = None) -> None:
        import torch
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.plan = plan or Plan("cpu", "float32")
        self.device = torch.device(self.plan.device)
        config = AutoConfig.from_pretrained(str(path))
        self.arch = find_architecture(config)
        self.num_layers = self.arch.num_layers(config)
        self.entries = tensor_entries(path)
        if not self.entries:
            raise LayerpruneError(f"{path} has no safetensors weights to stream")
        check_layers(path, self.arch, self.num_layers, self.entries)
        sizes = [_layer_bytes(self.entries, self.arch, i, self.plan.dtype) for i in range(self.num_layers)]
        self.largest_layer = max(sizes)
        if memory_budget is None and self.device.type == "cuda":
            memory_budget = FIT_SHARE * memory_free(self.device)
        if memory_budget is not None and memory_budget < self.largest_layer:
            raise LayerpruneError(
                f"memory budget {memory_budget / 2**20:.1f} MiB is smaller than one layer: at least "
                f"{self.largest_layer / 2**20:.1f} MiB is needed"
            )
        self.memory_budget = memory_budget
        with init_empty_weights():
            self.model = AutoModelForCausalLM.from_config(config, dtype=self.plan.torch_dtype)
        self.model.eval()
        self.names = set(dict(self.model.named_parameters())) | set(dict(self.model.named_buffers()))

    def read(self, keys: list[str]) -> dict[str, Any]:
        """The tensors of `keys`, by module name, read in the plan's dtype (pinned for a GPU)."""
        from safetensors import safe_open

        tensors = {}
        for key in keys:
            split = self.arch.split_layer_key(key)
            name = f"{self.arch.layer_key(split[1])}{split[2]}" if split else key
            if name in self.names:
                with safe_open(self.entries[key].file, framework="pt") as handle:
                    tensor = handle.get_tensor(key).to(self.plan.torch_dtype)
                tensors[name] = tensor.pin_memory() if self.device.type == "cuda" else tensor
        return tensors

    def place(self, tensors: dict[str, Any], device: Any = None) -> None:
        """Put `tensors` (by module name) into the model, on `device` (the plan's by default)."""
        from accelerate.utils import set_module_tensor_to_device

        for name, tensor in tensors.items():
            set_module_tensor_to_device(self.model, name, device or self.device, value=tensor)

    def layer_keys(self, layer: int) -> list[str]:
        return [k for k in self.entries if (s := self.arch.split_layer_key(k)) and s[1] == layer]

    def run(self, batches: list[dict], visit: Visit, last_layer: int | None = None, watch: Watch | None = None,
            desc: str = "analyze (offload)", progress: bool = True) -> None:  # fmt: skip
        """Run `batches` through the layers up to `last_layer` (all by default), one layer in memory
        at a time, calling `visit` for each batch after each layer (layer -1: the embeddings, whose
        resid in is None) and `watch` on each layer before its batches run."""
        from tqdm.auto import tqdm

        arch, model, device = self.arch, self.model, self.device
        last_layer = self.num_layers - 1 if last_layer is None else last_layer
        prefetch = self.memory_budget is None or self.memory_budget >= 2 * self.largest_layer
        batches, loaded = _used_embeddings(model, self.entries, batches, self.plan.torch_dtype)
        outside = [k for k in self.entries if arch.split_layer_key(k) is None and not k.startswith("lm_head.")]
        self.place(self.read([k for k in outside if k not in loaded]))
        model.get_input_embeddings().to(device)
        batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
        weights = (2 if prefetch else 1) * self.largest_layer
        on_device = self.memory_budget - weights if self.memory_budget is not None else float("inf")
        states = _States(device, on_device, FIT_SHARE * memory_available())
        reader = ThreadPoolExecutor(max_workers=1) if prefetch else None
        try:
            for b, batch in enumerate(batches):
                resid = run_layers(model, arch, batch, None, [])  # the embeddings, resid[0]
                visit(-1, b, batch, None, resid)
                states.put(b, resid)
            upcoming = reader.submit(self.read, self.layer_keys(0)) if reader else None
            for layer in tqdm(range(last_layer + 1), desc=desc, unit="layer", disable=not progress):
                self.place(upcoming.result() if upcoming else self.read(self.layer_keys(layer)))
                if reader and layer < last_layer:
                    upcoming = reader.submit(self.read, self.layer_keys(layer + 1))  # read while this layer computes
                module = arch.layer_list(model)[layer]
                handles = watch(layer, module) if watch else []
                try:
                    for b, batch in enumerate(batches):
                        previous = states.get(b)
                        resid = run_layers(model, arch, batch, previous, [layer])
                        visit(layer, b, batch, previous, resid)
                        states.put(b, resid)
                finally:
                    for handle in handles:
                        handle.remove()
                module.to("meta")  # free this layer's weights
                return_freed_memory()
        finally:
            if reader:
                reader.shutdown(cancel_futures=True)
            states.close()


def layer_distances_streamed(
    path: Path,
    batches: list[dict],
    memory_budget: float | None = None,
    plan: Plan | None = None,
    progress: bool = True,
) -> tuple[dict[int, list[float]], list[float]]:
    """The angular table and Block Influence of the checkpoint at `path`, one layer at a time (see
    `LayerStream` for the device, dtype and `memory_budget`)."""
    stream = LayerStream(path, plan, memory_budget)
    sums = AngularSums(stream.num_layers)
    last_rows: list[list[Any]] = [[] for _ in batches]
    last_index = [last_token_index(b["attention_mask"].bool().to(stream.device)) for b in batches]

    def visit(layer: int, b: int, batch: dict, previous: Any, resid: Any) -> None:
        if previous is not None:
            sums.add_neighbours(layer, previous, resid, batch["attention_mask"].bool())
        last_rows[b].append(final_rows(resid, last_index[b]))

    stream.run(batches, visit, progress=progress)
    for rows, batch in zip(last_rows, batches, strict=True):
        sums.add_samples(rows, int(batch["attention_mask"].sum()))
    return sums.result()
