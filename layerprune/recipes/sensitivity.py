"""Where knowledge sits: each single layer removed in turn, and the paired change, document by
document, in each task's log-likelihood of the correct answer (or in the held-out loss).

The prompts and correct answers are lm-eval's (`harness.answer_requests`), encoded and scored
by lm-eval's HF model. Cost: every removal is run side by side from the full model's prefix
(`one_pass`): each batch runs once through the full model with the residual stream recorded,
then the removal of layer l runs only the layers after l, from the recorded state entering l:
about L/2 full passes instead of L. Memory: the L residual states and two logits of one batch.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from layerprune.architectures import find_architecture
from layerprune.errors import LayerpruneError
from layerprune.evaluation.harness import EvalConfig, answer_requests, check_tasks, text_documents, text_samples
from layerprune.evaluation.one_pass import FULL, Cut, OnePass, Variant, table_lm
from layerprune.evaluation.tasks import task_of
from layerprune.evaluation.uncertainty import METHOD, Documents, compare
from layerprune.io.destinations import check_destination, claimed, staged, write_atomically
from layerprune.plots import sensitivity_heatmap
from layerprune.runtime.models import load_model, model_inputs, resolve_model

RESULT_FILE = "sensitivity.json"


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


def _scores(full: Documents, without: list[Documents], higher_is_better: bool) -> dict[str, Any]:
    """The full model's per-document scores, and for each layer the paired change without it: a
    log-likelihood per document (higher is better), or a loss per token."""
    per_layer = []
    for layer, values in enumerate(without):
        comparison = compare(full, values, higher_is_better)
        per_layer.append(
            {"layer": layer, "change": comparison.change, "interval": list(comparison.change_interval),
             "harm": comparison.harm, "harm_interval": [comparison.harm_lower, comparison.harm_upper]}
        )  # fmt: skip
    unit = "log-likelihood of the correct answer (nats per document)" if higher_is_better else "loss per token"
    return {"unit": unit, "full": full.estimate(), "documents": len(full.ids), "layers": per_layer}


def _check(config: EvalConfig) -> None:
    check_tasks(list(config.tasks))
    taking = [t for t in config.tasks if task_of(t).reference]
    if taking:
        raise LayerpruneError(f"sensitivity measures QA tasks and loss; {', '.join(taking)} is not one of them")


def _task_scores(engine: OnePass, tokenizer: Any, task: str, asked: Any, config: EvalConfig) -> dict[str, Any]:
    """One task's map, in one pass: each held-out passage's loss, or each question's log-likelihood
    of its correct answer (lm-eval's prompt, encoding and scoring), with every single layer removed."""
    layers = [(layer,) for layer in range(engine.num_layers)]
    ids, work = asked
    kind = task_of(task)
    if kind.text:
        wanted: dict[Variant, set[str]] = {cut: {task} for cut in (FULL, *layers)}
        found = engine.text_tasks(tokenizer, work, config.seq_len, config.loss_batch_size, wanted)
        vocab = engine.model.config.get_text_config().vocab_size
        scored = {cut: kind.documents(kind.result(ids, found[cut][task], vocab, config.loss_data)) for cut in found}
        return _scores(scored[FULL], [scored[c] for c in layers], kind.higher_is_better)
    lm = table_lm(engine, tokenizer, config.loss_batch_size)
    lm.active = layers

    def answers(cut: Cut) -> Documents:
        lm.cut = cut
        found = [loglik for loglik, _ in lm.loglikelihood(work, disable_tqdm=True)]
        return Documents(tuple(ids), tuple(found), (1.0,) * len(ids))

    return _scores(answers(FULL), [answers(c) for c in layers], True)


def _asked(task: str, config: EvalConfig) -> tuple[list[str], list[Any]]:
    """A task's document ids and work: held-out passages for `loss`, else each question's prompt and
    correct answer as an lm-eval request."""
    if task_of(task).text:
        return text_documents(config.loss_data, text_samples(config))
    from lm_eval.api.instance import Instance

    requests = answer_requests(task, config.limit, config.num_fewshot)
    return [r[0] for r in requests], [
        Instance("loglikelihood", {}, (context, answer), 0) for _, context, answer in requests
    ]


def sensitivity(
    model: Any, tokenizer: Any, config: EvalConfig, counts: dict[str, int] | None = None
) -> SensitivityResult:
    """Remove each layer of a loaded model in turn and measure every task of `config` (QA tasks
    and `loss`; `config.limit` documents each, or the task's number in `counts`)."""
    from tqdm.auto import tqdm

    _check(config)
    started = time.perf_counter()
    engine = OnePass(model, [(layer,) for layer in range(find_architecture(model.config).num_layers(model.config))])
    counts = counts or {}
    asked = {task: _asked(task, replace(config, limit=counts.get(task, config.limit))) for task in config.tasks}
    rows = {task: engine.text_rows(config.seq_len, config.loss_batch_size) if task_of(task).text
            else config.loss_batch_size for task in config.tasks}  # fmt: skip
    total = sum(-(-len(asked[task][0]) // rows[task]) for task in config.tasks)
    tasks = {}
    with tqdm(total=total, desc="sensitivity", unit="batch") as engine.bar:  # each batch: about L/2 passes
        for task in config.tasks:
            engine.bar.set_postfix_str(task)
            engine.phase = task
            tasks[task] = _task_scores(engine, tokenizer, task, asked[task], config)
    name = getattr(model, "name_or_path", "") or type(model).__name__
    return SensitivityResult(str(name), engine.num_layers, tasks, engine.forward_passes() / len(tasks),
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
