"""The one place that decides where a model runs and in which dtype.

`Placement` is what the user asks (`--device auto|cpu|cuda|cuda:N`, `--dtype auto|float32|
bfloat16|float16`); `plan_placement` turns it into a `Plan` for one checkpoint:

- `auto` with a GPU: the GPU, in the checkpoint's own dtype (bf16 for today's models); a model
  larger than one GPU is spread over every visible GPU, then host memory, by accelerate's
  big-model dispatch (`device_map="auto"` with `max_memory`);
- `auto` without one: the CPU in fp32 (on CPUs without bf16 units it is several times faster).

The same function plans a (Q)LoRA heal (`work="train"`) and a bitsandbytes quantizing
(`work="quantize"`), which place weights their own way; each command plans once and passes the
plan down. `layer_by_layer` is the one "stream it, or load it whole?" decision of analysis and repair.
The plan is printed and recorded in every output (`Plan.record`). Nothing here imports torch
at module level; the GPU probe is one function, so tests can fake any machine.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from layerprune.errors import LayerpruneError
from layerprune.io.checkpoint import tensor_entries
from layerprune.runtime.memory import FIT_SHARE, fits_in_memory, memory_available

DTYPES = ("auto", "float32", "bfloat16", "float16")
_HEADER_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float32"}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
Work = Literal["run", "train", "quantize"]


@dataclass(frozen=True)
class Placement:
    """Where to run the model and in which dtype (`auto`: the GPU in the checkpoint's dtype, else the CPU in fp32)."""

    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N."})
    dtype: str = field(default="auto", metadata={"help": "Compute dtype.", "choices": DTYPES})

    def __post_init__(self) -> None:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise LayerpruneError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise LayerpruneError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


@dataclass(frozen=True)
class Plan:
    """A placement decided for one model: the device inputs go to, the dtype, and (for a model
    larger than one device) accelerate's device map and memory limits."""

    device: str  # "cpu" or "cuda:N": where the embeddings, and so the inputs, are
    dtype: str  # "float32", "bfloat16" or "float16"
    device_map: str | None = None  # "auto" when spread over several devices by accelerate
    max_memory: dict[Any, int] | None = None
    sharded_by: str | None = None  # "fsdp" or "deepspeed": the launcher places the weights, not a device map

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)

    def record(self) -> dict[str, Any]:
        """What every output records about where it was computed."""
        return {"device": self.device, "dtype": self.dtype, "device_map": self.device_map}


def _local_rank(gpus: int) -> int:
    """The GPU of this process under torchrun or accelerate launch (its local rank); 0 alone."""
    return int(os.environ.get("LOCAL_RANK", "0")) % max(gpus, 1)


def visible_gpus() -> list[tuple[int, int]]:
    """(free, total) bytes of every visible CUDA GPU; [] on a machine without one."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.mem_get_info(i) for i in range(torch.cuda.device_count())]


def working_dtype(device: str) -> str:
    """The dtype a model runs in by default on `device`: fp32 on the CPU (fastest there), bf16 on a
    GPU that has bf16 units, else fp16 (as nanoGPT and torchtune check)."""
    if not device.startswith("cuda"):
        return "float32"
    import torch

    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def chosen_device(placement: Placement | Plan, gpus: list[tuple[int, int]] | None = None) -> str:
    """The one device a placement names, on this machine or on the GPUs `gpus` describes: `cpu`;
    `cuda:N`; `cuda`, the first GPU; `auto`, this process's GPU (its local rank) where there is
    one, else the CPU. A GPU the machine lacks is refused in one line."""
    if placement.device == "cpu":
        return "cpu"
    gpus = visible_gpus() if gpus is None else gpus
    if placement.device == "auto" and not gpus:
        return "cpu"
    if not gpus:
        raise LayerpruneError(f"--device {placement.device}: no CUDA GPU is visible on this machine")
    index = int(placement.device.partition(":")[2] or 0) if placement.device != "auto" else _local_rank(len(gpus))
    if index >= len(gpus):
        names = ", ".join(f"cuda:{i}" for i in range(len(gpus)))
        raise LayerpruneError(f"--device {placement.device}: this machine has {len(gpus)} GPU(s) ({names})")
    return f"cuda:{index}"


def checkpoint_dtype(path: Path) -> str:
    """The dtype most of a checkpoint's floating-point bytes are stored in (fp32 if unknown)."""
    weights: dict[str, int] = {}
    for entry in tensor_entries(path).values():
        if entry.dtype in _HEADER_DTYPES:
            name = _HEADER_DTYPES[entry.dtype]
            weights[name] = weights.get(name, 0) + entry.length
    return max(weights, key=weights.__getitem__) if weights else "float32"


def model_bytes(path: Path, dtype: str) -> int:
    """The checkpoint's weights in `dtype`, from the safetensors headers (nothing is loaded)."""
    return sum(math.prod(e.shape) * DTYPE_BYTES[dtype] for e in tensor_entries(path).values())


def plan_placement(
    placement: Placement | None = None,
    path: Path | None = None,
    gpus: list[tuple[int, int]] | None = None,
    work: Work = "run",
) -> Plan:
    """Decide device, dtype and dispatch for `work` on the checkpoint at `path` (or an already
    loaded model when `path` is None), on this machine or on the GPUs `gpus` describes. An asked
    `--dtype` always wins; on the CPU the default is fp32. On a GPU:

    - `run` (analysis, evaluation, repair): the checkpoint's own dtype; a model larger than the
      GPU is spread over every visible GPU from the chosen one, then host memory;
    - `train`: bf16, or fp32 on a GPU without it (its fp16 would need loss scaling); under FSDP or
      DeepSpeed (from an accelerate config) the launcher shards and places the weights: no device
      map (ZeRO-3 refuses one), nothing loaded whole on every GPU;
    - `quantize` (bitsandbytes, for export): bf16 compute, fp16 where the GPU has no bf16, spread
      over every visible GPU unless one was named.
    """
    placement = placement or Placement()
    gpus = visible_gpus() if gpus is None and placement.device != "cpu" else (gpus or [])
    device = chosen_device(placement, gpus)
    asked = None if placement.dtype == "auto" else placement.dtype
    sharded = _launcher_sharding() if work == "train" else None
    if device == "cpu":
        return Plan("cpu", asked or "float32", sharded_by=sharded)
    default = working_dtype(device)
    if work == "train":
        return Plan(device, asked or ("float32" if default == "float16" else default), sharded_by=sharded)
    if work == "quantize":
        return Plan(device, asked or default, "auto" if placement.device == "auto" else None)
    dtype = asked or (checkpoint_dtype(path) if path else default)
    index = int(device.partition(":")[2])
    if path is None or model_bytes(path, dtype) <= FIT_SHARE * gpus[index][0]:
        return Plan(device, dtype)
    order = [index, *[i for i in range(len(gpus)) if i != index]] if placement.device == "auto" else [index]
    max_memory: dict[Any, int] = {i: int(FIT_SHARE * gpus[i][0]) for i in order}
    max_memory["cpu"] = int(FIT_SHARE * memory_available())
    return Plan(device, dtype, "auto", max_memory)


def _launcher_sharding() -> str | None:
    """`fsdp` or `deepspeed` where `accelerate launch` was given such a config (it says so in the
    environment), else None."""
    for name in ("fsdp", "deepspeed"):
        if os.environ.get(f"ACCELERATE_USE_{name.upper()}", "").lower() in ("1", "true"):
            return name
    return None


def fits_on_device(plan: Plan, path: Path) -> bool:
    """Whether the checkpoint fits, whole and in the plan's dtype, in the memory of the device that
    would run it (host memory for the CPU; one GPU's free memory for a GPU)."""
    if plan.device == "cpu":
        return fits_in_memory(model_bytes(path, plan.dtype))
    return plan.device_map is None


def layer_by_layer(plan: Plan, path: Path, offload: bool | None, name: str, activity: str) -> bool:
    """Whether `activity` streams the model one layer at a time: as asked (`--offload`), else when the
    checkpoint would not fit whole in the memory of the device that runs it, which is said in one
    line (it changes what the command costs)."""
    if offload is not None:
        return offload
    if fits_on_device(plan, path):
        return False
    print(f"{name} would not fit in the memory of {plan.device}: {activity} one layer at a time (--offload)")
    return True


def plan_of(model: Any) -> Plan:
    """The plan a loaded model was placed by (`models.load_model` keeps it), or one read off it."""
    plan = getattr(model, "layerprune_plan", None)
    if isinstance(plan, Plan):
        return plan
    weight = model.get_input_embeddings().weight
    return Plan(str(weight.device), str(weight.dtype).removeprefix("torch."))


def on_main_process(work: Callable[[], Any]) -> None:
    """Run `work` on the main process only (rank 0 of a torchrun or accelerate launch); the other
    processes wait until it is done, and raise its error too if it failed. A lone process just
    runs it."""
    if process_rank()[1] <= 1:
        work()
        return
    from accelerate.utils import broadcast_object_list

    state = process_state()
    failure: list[Any] = [None]
    if state.is_main_process:
        try:
            work()
        except Exception as err:  # sent to every process: none may go on alone
            failure[0] = err
    broadcast_object_list(failure, from_process=0)
    if failure[0] is not None:
        raise failure[0] if state.is_main_process else LayerpruneError(f"the main process failed: {failure[0]}")


def process_state() -> Any:
    """accelerate's state of this process, joined to the others of a torchrun or accelerate launch:
    over NCCL with GPUs, over gloo without (accelerate stays single-process on the CPU unless told)."""
    from accelerate import PartialState

    return PartialState(cpu=not visible_gpus())


def process_rank() -> tuple[int, int]:
    """(this process's rank, the number of processes) of a torchrun or accelerate launch; (0, 1) alone."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def gather_objects(items: dict[Any, Any]) -> dict[Any, Any]:
    """Every process's `items`, merged (each process holding its own keys); alone, `items` itself."""
    if process_rank()[1] <= 1:
        return items
    import torch.distributed as dist

    process_state()  # joins the process group if lm-eval or the Trainer has not yet
    shares: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(shares, items)
    return {key: value for share in shares for key, value in share.items()}


_LAUNCHER_VARIABLES = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
    "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
)  # fmt: skip


def work_alone() -> None:
    """Make this process of a torchrun launch a lone process on its own GPU: for work split by
    shards (each process its own points) rather than one job shared by DDP. Call it before
    anything asks for the GPUs."""
    local = os.environ.get("LOCAL_RANK")
    for name in _LAUNCHER_VARIABLES:
        os.environ.pop(name, None)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if local is not None:
        devices = visible.split(",") if visible else [str(i) for i in range(int(local) + 1)]
        os.environ["CUDA_VISIBLE_DEVICES"] = devices[int(local) % len(devices)]


def end_processes(succeeded: bool) -> bool:
    """Leave the process group of a torchrun or accelerate launch, if this process joined one (and
    say whether it had). After success every process first waits for the others, so none leaves
    while another still uses the group; after a failure there is no waiting: the others may never come."""
    distributed = sys.modules.get("torch.distributed")  # never imports torch for a command that did not
    if distributed is None or not distributed.is_available() or not distributed.is_initialized():
        return False
    if succeeded:
        distributed.barrier()
    distributed.destroy_process_group()
    return True


def is_main_process() -> bool:
    """Whether this is rank 0 of a torchrun or accelerate launch (or a lone process): what prints."""
    return process_rank()[0] == 0
