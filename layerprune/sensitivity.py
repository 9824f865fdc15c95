"""Where knowledge sits: each single layer removed in turn, and the paired change, document by
document, in each task's log-likelihood of the correct answer (or in the held-out loss).

The prompts and correct answers are lm-eval's (`evaluation.answer_requests`), encoded as lm-eval
encodes them. Cost: the cached-prefix trick of the `loss` search (`scoring.Scorer`): each batch
runs once with the residual stream recorded, then the removal of layer l runs only the layers
after l, from the recorded state entering l: about L/2 full passes instead of L. Memory: the
L+1 residual states of one batch.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import token_batches
from .destinations import check_destination, claimed, staged, write_atomically
from .errors import LayerpruneError
from .evaluation import KLD_TASK, LOSS_TASK, EvalConfig, answer_requests, check_tasks, text_documents, text_samples
from .models import load_model, model_inputs, resolve_model
from .plots import sensitivity_heatmap
from .scoring import Scorer
from .uncertainty import METHOD, Documents, compare

RESULT_FILE = "sensitivity.json"


def _answer_batches(tokenizer: Any, requests: list[tuple[str, str, str]], batch_size: int) -> list[dict]:
    """Prompt + correct answer, right-padded, with a `target_mask` on the answer's tokens."""
    import torch

    pairs = [_encode(tokenizer, context, answer) for _, context, answer in requests]
    batches = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        width = max(len(c) + len(a) for c, a in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id or 0, dtype=torch.long)
        attention = torch.zeros_like(ids)
        target = torch.zeros_like(ids)
        for row, (context, answer) in enumerate(chunk):
            tokens = context + answer
            ids[row, : len(tokens)] = torch.tensor(tokens)
            attention[row, : len(tokens)] = 1
            target[row, len(context) : len(tokens)] = 1
        batches.append({"input_ids": ids, "attention_mask": attention, "target_mask": target})
    return batches


def _encode(tokenizer: Any, context: str, answer: str) -> tuple[list[int], list[int]]:
    """lm-eval's encoding of a (context, continuation) pair: trailing spaces move to the answer,
    the whole is encoded with the tokenizer's defaults and split where the context ends."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, answer = context[:-spaces], context[-spaces:] + answer
    whole = tokenizer(context + answer)["input_ids"]
    prefix = tokenizer(context)["input_ids"]
    return whole[: len(prefix)], whole[len(prefix) :]


@dataclass(frozen=True)
class SensitivityResult:
    """Per task: each document's score with all layers, and per removed layer the paired change."""

    model: str
    num_layers: int
    tasks: dict[str, dict[str, Any]]
    forward_passes: float
    seconds: float

    def record(self) -> dict[str, Any]:
        return {**vars(self), "method": METHOD}

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(folder / RESULT_FILE, json.dumps(self.record(), indent=1) + "\n")
        draw_heatmap(self.record(), folder / "sensitivity.png")
        return folder / RESULT_FILE


def draw_heatmap(record: dict[str, Any], path: Path) -> Path:
    """The layer x task map of relative harm (positive: the task got worse without the layer)."""
    tasks = list(record["tasks"])
    grid = [[record["tasks"][t]["layers"][layer]["harm"] for t in tasks] for layer in range(record["num_layers"])]
    return sensitivity_heatmap(grid, tasks, f"{Path(record['model']).name}: removing one layer", path)


def _scores(scorer: Scorer, batches: list[dict], ids: list[str], higher_is_better: bool) -> dict[str, Any]:
    """The full model's per-document scores, and for each layer the paired change without it."""
    layers = range(scorer.num_layers)
    full_sums: list[float] = []
    full_counts: list[int] = []
    removed: dict[int, list[float]] = {layer: [] for layer in layers}
    for batch in batches:
        resid = scorer.resid(batch, list(layers))  # entering each layer, and the final norm
        sums, counts = scorer.document_losses(batch, resid[-1], [])  # the full model: only the head to run
        full_sums += sums
        full_counts += counts
        for layer in layers:
            removed[layer] += scorer.document_losses(batch, resid[layer], list(layers)[layer + 1 :])[0]
        scorer.advance()
    sign = -1.0 if higher_is_better else 1.0  # a log-likelihood is minus the summed loss
    den = [1.0] * len(ids) if higher_is_better else [float(c) for c in full_counts]
    full = Documents(tuple(ids), tuple(sign * s for s in full_sums), tuple(den))
    per_layer = []
    for layer in layers:
        without = Documents(tuple(ids), tuple(sign * s for s in removed[layer]), tuple(den))
        comparison = compare(full, without, higher_is_better)
        per_layer.append(
            {"layer": layer, "change": comparison.change, "interval": list(comparison.change_interval),
             "harm": comparison.harm, "harm_interval": [comparison.harm_lower, comparison.harm_upper]}
        )  # fmt: skip
    unit = "log-likelihood of the correct answer (nats per document)" if higher_is_better else "loss per token"
    return {"unit": unit, "full": full.estimate(), "documents": len(ids), "layers": per_layer}


def _check(config: EvalConfig) -> None:
    check_tasks(list(config.tasks))
    if KLD_TASK in config.tasks:
        raise LayerpruneError("sensitivity measures QA tasks and loss; kld is not one of them")


def _task_batches(task: str, tokenizer: Any, config: EvalConfig) -> tuple[list[str], list[dict]]:
    """A task's document ids and batches: held-out passages for `loss`, else each question's prompt
    and correct answer."""
    if task == LOSS_TASK:
        ids, texts = text_documents(config.loss_data, text_samples(config))
        return ids, token_batches(tokenizer, texts, len(texts), config.seq_len, config.loss_batch_size)
    requests = answer_requests(task, config.limit, config.num_fewshot)
    return [r[0] for r in requests], _answer_batches(tokenizer, requests, config.loss_batch_size)


def sensitivity(model: Any, tokenizer: Any, config: EvalConfig) -> SensitivityResult:
    """Remove each layer of a loaded model in turn and measure every task of `config` (QA tasks
    and `loss`; `config.limit` documents each)."""
    from tqdm.auto import tqdm

    _check(config)
    started = time.perf_counter()
    tasks: dict[str, dict[str, Any]] = {}
    work = 0.0
    prepared = {task: _task_batches(task, tokenizer, config) for task in config.tasks}
    total = sum(len(batches) for _, batches in prepared.values())
    with tqdm(total=total, desc="sensitivity", unit="batch") as bar:  # each batch: about L/2 passes
        for task, (ids, batches) in prepared.items():
            bar.set_postfix_str(task)
            scorer = Scorer(model, batches, bar)
            tasks[task] = _scores(scorer, batches, ids, higher_is_better=task != LOSS_TASK)
            work += scorer.forward_passes
    name = getattr(model, "name_or_path", "") or type(model).__name__
    return SensitivityResult(str(name), len(tasks[config.tasks[0]]["layers"]), tasks, work / len(tasks),
                             round(time.perf_counter() - started, 2))  # fmt: skip


def run_sensitivity(model: str, out: str | Path, config: EvalConfig, overwrite: bool = False) -> SensitivityResult:
    """`layerprune sensitivity`: load the model, measure, and write DIR/sensitivity.json and its heatmap."""
    out = Path(out)
    inputs = model_inputs(model)
    check_destination(out, inputs, overwrite=overwrite)
    _check(config)
    with claimed(out, lambda: check_destination(out, inputs, overwrite=overwrite)):  # held throughout
        loaded, tokenizer = load_model(resolve_model(model), config.placement)
        result = sensitivity(loaded, tokenizer, config)
        result = SensitivityResult(str(model), result.num_layers, result.tasks, result.forward_passes, result.seconds)
        with staged(out, overwrite=overwrite, inputs=inputs) as tmp:
            result.save(tmp)
    return result
