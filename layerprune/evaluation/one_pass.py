"""Evaluate many variants of one model in one pass: every cut, and every model with weights of
its own (a healed or repaired one), scored side by side on each batch, sharing the full model's
prefix and its logits.

A cut that removes layers l..l+n-1 (and perhaps more after them) computes, for layers 0..l-1,
exactly the full model's residual stream entering layer l. So each batch runs through the full
model once, with its residual stream kept where some cut starts, and every cut resumes from there
through its kept layers, the final norm and the head. K cuts then cost 1 + the sum of their suffix
fractions full passes, where evaluating them one by one costs K + 1, and `kld`'s reference logits
K more: here the full model's logits of the same batch are the reference. A variant with its own
weights runs on the same batch, from the full model's residual stream after the first layers it
shares with it bitwise (a model healed near its cut; none for one healed everywhere), and its
`kld` takes the same reference logits.

lm-eval stays the authority on prompts, requests and metrics: `TableLM` is lm-eval's own HF model
(its request encoding, truncation and scoring rule), answering log-likelihood requests from a
table filled for every cut at once, so acc, acc_norm, their standard errors and the per-document
samples come out of lm-eval's result processing as for any model.

Memory beyond the models, per batch: the residual stream at each distinct cut start, the full
model's logits and one variant's logits at a time (the text tasks keep a logits tensor within
`harness.LOGITS_BUDGET`); across batches, only the per-document results. At its peak: at most
4 batches of logits (the full model's, a variant's, and their log-softmax) and (distinct cut
starts + 2) residual states; more cuts add only the states at their starts (asserted in tests).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from layerprune.architectures import find_architecture
from layerprune.data import token_batches
from layerprune.evaluation.harness import (
    EvalConfig,
    logits_rows,
    qa_accuracy,
    settings_record,
    text_documents,
    text_samples,
)
from layerprune.evaluation.tasks import TEXT_TASKS, task_of
from layerprune.measure.cost import Ledger
from layerprune.measure.residual import hidden_state, running_from

Cut = tuple[int, ...]  # the layers a cut removes, sorted; () is the full model
FULL: Cut = ()
Variant = Cut | str  # a cut, or the name of a model with weights of its own


def shared_prefix(model: Any, other: Any) -> int:
    """How many first layers `other` shares with `model`, weights bitwise equal (embeddings
    included; 0 if they differ): a model healed near its cut only (`--target-layers near-cut`)
    computes the full model's residual stream up to its first adapted layer."""
    import torch

    def same(first: Any, second: Any) -> bool:
        ours, theirs = dict(first.named_parameters()), dict(second.named_parameters())
        return ours.keys() == theirs.keys() and all(
            ours[k].shape == theirs[k].shape
            and "meta" not in (ours[k].device.type, theirs[k].device.type)  # offloaded: not compared
            and torch.equal(ours[k], theirs[k].to(ours[k].device))
            for k in ours
        )

    if type(model) is not type(other) or not same(model.get_input_embeddings(), other.get_input_embeddings()):
        return 0
    arch = find_architecture(model.config)
    ours, theirs = arch.layer_list(model), arch.layer_list(other)
    count = 0
    while count < min(len(ours), len(theirs) - 1) and same(ours[count], theirs[count]):
        count += 1
    return count


class OnePass:
    """The cuts of one loaded model, run side by side from the full model's prefix, and models
    with weights of their own (`own`: name -> loaded model, on the same device) beside it, each
    resumed from the full model's residual stream after the layers it shares with it
    (`shared_prefix`). Each variant's work (seconds under the current `phase`, tokens through
    layers and the head) goes to its own ledger; the full model's pass to FULL's."""

    def __init__(self, model: Any, cuts: Sequence[Sequence[int]], own: dict[str, Any] | None = None) -> None:
        self.model = model
        self.arch = find_architecture(model.config)
        self.num_layers = self.arch.num_layers(model.config)
        self.own = dict(own or {})
        self.shared = {name: shared_prefix(model, other) for name, other in self.own.items()}
        self.variants: list[Variant] = [*dict.fromkeys([FULL, *(tuple(sorted(c)) for c in cuts)]), *self.own]
        self.ledgers = {cut: Ledger() for cut in self.variants}
        self.phase = "evaluate"
        self.busy = 0.0  # seconds spent in `run`, all ledgers together
        self.bar: Any = None  # a progress bar to count batches on; else each call shows its own

    def _model(self, variant: Variant) -> Any:
        """The model a variant runs: its own, or the full model (cut in place for a cut)."""
        return self.own[variant] if isinstance(variant, str) else self.model

    def suffix(self, variant: Variant) -> list[int]:
        """The layers a variant runs after its prefix: a cut's, those it keeps from its first removed
        one on; a model of its own, its layers from the first it does not share with the full model."""
        if isinstance(variant, str):
            return list(range(self.shared[variant], len(self.arch.layer_list(self._model(variant)))))
        return [i for i in range(variant[0], self.num_layers) if i not in variant] if variant else []

    def _start(self, variant: Variant) -> int:
        """The layer whose input, in the full model, a variant resumes from (0: it runs whole)."""
        return self.shared[variant] if isinstance(variant, str) else variant[0] if variant else 0

    @contextmanager
    def _spent(self, variant: Variant) -> Iterator[None]:
        ledger = self.ledgers[variant]
        with ledger.phase(self.phase), ledger.counting(self._model(variant)):
            yield

    def run(
        self, inputs: dict, variants: Sequence[Variant], reduce: Callable[[Variant, Any, Any], Any],
        reference: bool = False,
    ) -> dict[Variant, Any]:  # fmt: skip
        """`reduce(variant, its logits, the full model's logits)` for every variant in `variants`
        (FULL among them or not), on one batch of `inputs` (on the model's input device). The full
        model runs when FULL or a variant that resumes from its prefix is asked for, or when
        `reference` logits are (else the full logits passed are None)."""
        import torch

        started = time.perf_counter()
        layers = self.arch.layer_list(self.model)
        states: dict[int, Any] = {}

        def keep(start: int) -> Callable[..., None]:
            return lambda _module, args, kwargs: states.__setitem__(start, hidden_state(args, kwargs))

        results: dict[Variant, Any] = {}
        full = None
        starts = {self._start(v) for v in variants if v} - {0}
        if FULL in variants or starts or reference:
            handles = [layers[s].register_forward_pre_hook(keep(s), with_kwargs=True) for s in starts]
            try:
                with torch.inference_mode(), self._spent(FULL):
                    full = self.model(**inputs, use_cache=False).logits
                    if FULL in variants:
                        results[FULL] = reduce(FULL, full, full)
            finally:
                for handle in handles:
                    handle.remove()
        with torch.inference_mode():
            for variant in [v for v in variants if v]:
                model = self._model(variant)
                resumed = running_from(model, self.arch, self.suffix(variant), states.get(self._start(variant)))
                with self._spent(variant), resumed:  # from the embeddings where it starts at layer 0
                    results[variant] = reduce(variant, model(**inputs, use_cache=False).logits, full)
        self.busy += time.perf_counter() - started
        return results

    def text_rows(self, seq_len: int, batch_size: int) -> int:
        """Held-out passages per batch: `batch_size`, or fewer to keep a logits tensor within budget."""
        return logits_rows(seq_len, self.model.config.get_text_config().vocab_size, batch_size)

    def forward_passes(self) -> float:
        """The work so far, in full forward passes (every layer and the head, counted in parameters
        applied per token) over the tokens the full model ran: 1 plus each cut's suffix and head."""
        layers = sum(p.numel() for p in self.arch.layer_list(self.model).parameters()) / self.num_layers
        head = self.model.get_output_embeddings().weight.numel()
        work = sum(ledger.layer_tokens * layers + ledger.head_tokens * head for ledger in self.ledgers.values())
        return work / ((self.num_layers * layers + head) * max(1, self.ledgers[FULL].head_tokens))

    def _device(self) -> Any:
        return self.model.get_input_embeddings().weight.device

    def loglikelihoods(
        self, requests: Sequence[tuple[Sequence[int], Sequence[int]]], variants: Sequence[Variant], batch_size: int,
        max_length: int,
    ) -> dict[Variant, list[tuple[float, bool]]]:  # fmt: skip
        """Each (context tokens, continuation tokens) request's log-likelihood and whether the
        continuation is the greedy one, for every variant (FULL among them or not), as lm-eval's HF model
        computes them (`HFLM._loglikelihood_tokens`: inputs truncated from the left to the model's
        length, right-padded, no attention mask, longest first), with the head and softmax run
        only at the positions scored."""
        import torch
        from tqdm.auto import tqdm

        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
        answers: dict[Variant, list[Any]] = {variant: [None] * len(requests) for variant in variants}
        bar = self.bar or tqdm(total=-(-len(requests) // batch_size), desc="requests, all cuts at once",
                               unit="batch", leave=False)  # fmt: skip
        for first in range(0, len(order), batch_size):
            chunk = order[first : first + batch_size]
            rows = [(list(requests[i][0]) + list(requests[i][1]))[-(max_length + 1) :][:-1] for i in chunk]
            ids = torch.zeros((len(rows), max(map(len, rows))), dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, : len(row)] = torch.tensor(row)

            # the head runs only where some row's continuation is scored (transformers' logits_to_keep)
            scored = [range(len(row) - len(requests[i][1]), len(row)) for row, i in zip(rows, chunk, strict=True)]
            kept = sorted({position for positions in scored for position in positions})
            columns = [[kept.index(position) for position in positions] for positions in scored]

            def reduce(_: Variant, logits: Any, _full: Any, chunk: list[int] = chunk, columns: list = columns) -> list:
                logprobs = torch.nn.functional.log_softmax(logits, dim=-1)
                found = []
                for r, (index, where) in enumerate(zip(chunk, columns, strict=True)):
                    continuation = torch.tensor(requests[index][1], dtype=torch.long, device=logprobs.device)
                    chosen = logprobs[r, where]
                    greedy = bool((chosen.argmax(dim=-1) == continuation).all())
                    found.append((float(chosen.gather(1, continuation[:, None]).sum()), greedy))
                return found

            inputs = {"input_ids": ids.to(self._device()), "logits_to_keep": torch.tensor(kept)}
            for cut, found in self.run(inputs, variants, reduce).items():
                for index, answer in zip(chunk, found, strict=True):
                    answers[cut][index] = answer
            bar.update()
        if bar is not self.bar:
            bar.close()
        return answers

    def text_tasks(
        self, tokenizer: Any, texts: list[str], seq_len: int, batch_size: int, wanted: dict[Variant, set[str]]
    ) -> dict[Variant, dict[str, list]]:
        """Per held-out document, for each variant and the text tasks `wanted` of it, the task's rows
        (`tasks.Task.rows`), against the full model's logits of the same batch where the task takes a
        reference (`kld`): one pass for all."""
        from tqdm.auto import tqdm

        batches = token_batches(tokenizer, texts, len(texts), seq_len, self.text_rows(seq_len, batch_size))
        found: dict[Variant, dict[str, list]] = {v: {task: [] for task in tasks} for v, tasks in wanted.items()}
        reference = any(task_of(task).reference for tasks in wanted.values() for task in tasks)
        bar = self.bar or tqdm(total=len(batches), desc="held-out text, all cuts at once", unit="batch", leave=False)
        for batch in batches:
            inputs = {k: v.to(self._device()) for k, v in batch.items()}

            def reduce(cut: Variant, logits: Any, full: Any, inputs: dict = inputs) -> dict[str, list]:
                return {task: TEXT_TASKS[task].rows(logits, full, inputs) for task in wanted.get(cut, ())}

            for cut, rows in self.run(inputs, list(wanted), reduce, reference).items():
                for task, values in rows.items():
                    found[cut][task] += values
            bar.update()
        if bar is not self.bar:
            bar.close()
        return found


def table_lm(engine: OnePass, tokenizer: Any, batch_size: int) -> Any:
    """lm-eval's HF model of `engine`'s model whose log-likelihoods, for the variant in its `cut`
    attribute, come from a table filled for the variants in its `active` list (and that one) at once."""
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # as `qa_accuracy`: its notices drown the progress bars

    class TableLM(HFLM):
        def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, override_bs: Any = None) -> list:
            keys = [(tuple(context), tuple(continuation)) for _, context, continuation in requests]
            known = self.table.setdefault(self.cut, {})
            missing = list(dict.fromkeys(k for k in keys if k not in known))
            if missing:
                cuts = list(dict.fromkeys([*self.active, self.cut]))
                found = engine.loglikelihoods(missing, cuts, batch_size, self.max_length)
                for cut in cuts:
                    self.table.setdefault(cut, {}).update(zip(missing, found[cut], strict=True))
            return [known[k] for k in keys]

    lm = TableLM(pretrained=engine.model, tokenizer=tokenizer, batch_size=batch_size, device=str(engine._device()))
    lm.table, lm.cut, lm.active = {}, FULL, list(engine.variants)
    return lm


def run_record(engine: OnePass, config: EvalConfig) -> dict[str, Any]:
    """What `harness.evaluate` records beside the tasks: the model, backend, settings and versions."""
    return {"model": getattr(engine.model, "name_or_path", ""), "backend": "hf", **settings_record(config)}


def evaluate_variants(
    engine: OnePass,
    tokenizer: Any,
    config: EvalConfig,
    documents: dict[Variant, dict[str, list[str]] | None],
) -> dict[Variant, dict[str, Any]]:
    """Every task of `config` for the variants (FULL among them, or not) named in `documents`, each
    on its own documents per task (None: the first `config.limit`), side by side: a QA task's requests
    are answered for every variant that asks for them in one pass, then scored by lm-eval one by one;
    `loss` and `kld` (not for FULL) are computed together in one pass over their passages. Returns
    one record per variant, as `harness.evaluate` does (its tasks, settings and versions)."""
    record = run_record(engine, config)
    results: dict[Variant, dict[str, Any]] = {cut: record | {"tasks": {}} for cut in documents}

    def asking(task: str) -> list[Variant]:
        cuts = [cut for cut, chosen in documents.items() if chosen is None or task in chosen]
        return [cut for cut in cuts if cut] if task_of(task).reference else cuts

    lm = None
    for task in [t for t in config.tasks if t not in TEXT_TASKS and asking(t)]:
        engine.phase = f"evaluate {task}"
        lm = lm or table_lm(engine, tokenizer, config.loss_batch_size)
        lm.active = asking(task)
        for cut in lm.active:
            lm.cut, chosen = cut, documents[cut]
            started, busy = time.perf_counter(), engine.busy
            found = qa_accuracy(lm, [task], config.limit, config.num_fewshot, {task: chosen[task]} if chosen else None)
            # lm-eval's own work on this cut's answers (the model work is on the ledgers already)
            engine.ledgers[cut].add(engine.phase, time.perf_counter() - started - (engine.busy - busy))
            results[cut]["tasks"] |= found
    text = {task: asking(task) for task in TEXT_TASKS if task in config.tasks}
    if any(text.values()):
        engine.phase = f"evaluate {'+'.join(t for t in text if text[t])}"  # one pass for both
        for cut, tasks in _text_tasks(engine, tokenizer, config, text, documents).items():
            results[cut]["tasks"] |= tasks
    return results


def _text_tasks(
    engine: OnePass, tokenizer: Any, config: EvalConfig, asking: dict[str, list[Variant]],
    documents: dict[Variant, dict[str, list[str]] | None],
) -> dict[Variant, dict[str, Any]]:  # fmt: skip
    """`loss` and `kld` for the cuts `asking` each, on their documents, in one pass over their union."""
    first = text_documents(config.loss_data, text_samples(config))[0]
    own = {(cut, task): (documents[cut] or {}).get(task, first) for task, cuts in asking.items() for cut in cuts}
    ids, texts = text_documents(config.loss_data, 0, list(dict.fromkeys(d for chosen in own.values() for d in chosen)))
    wanted: dict[Variant, set[str]] = {}
    for cut, task in own:
        wanted.setdefault(cut, set()).add(task)
    found = engine.text_tasks(tokenizer, texts, config.seq_len, config.loss_batch_size, wanted)
    vocab = engine.model.config.get_text_config().vocab_size
    position = {d: i for i, d in enumerate(ids)}
    results: dict[Variant, dict[str, Any]] = {}
    for (cut, task), chosen in own.items():
        rows = [found[cut][task][position[d]] for d in chosen]
        results.setdefault(cut, {})[task] = TEXT_TASKS[task].result(chosen, rows, vocab, config.loss_data)
    return results
