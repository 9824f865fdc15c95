"""The kinds of task, one object each: what a task reads, what it keeps per document, and how
that sums up, merges, pairs with another model's and prints.

    Accuracy   (every lm-eval task): lm-eval's requests and metrics; per document, whether the
               answer was right (acc, acc_norm) and the log-likelihood of the correct answer.
    HeldOutLoss (`loss`): next-token cross-entropy on held-out passages; per document, its
               summed loss and tokens.
    Divergence (`kld`): KL(reference || model) on the same passages, from both models' logits of
               one batch; per document, summed KL, tokens and top-token agreements, and the
               per-token KL binned (a histogram that adds up across rounds).

Callers ask a task, never its name: `task_of("kld").reference` says it needs the reference
model's logits. A new metric on held-out text is one class here and one entry in TEXT_TASKS.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

from layerprune.data import load_documents
from layerprune.evaluation.uncertainty import Documents
from layerprune.measure.divergence import divergences
from layerprune.measure.residual import next_token_losses

LOSS_TASK = "loss"
KLD_TASK = "kld"


def _ratio_stderr(num: list[float], den: list[float]) -> float | None:
    """The standard error of sum(num) / sum(den) over documents (the ratio estimator's)."""
    n, total = len(num), sum(den)
    if n < 2 or not total:
        return None
    mean = sum(num) / total
    return math.sqrt(n / (n - 1) * sum((x - mean * d) ** 2 for x, d in zip(num, den, strict=True))) / total


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


class Task:
    """One task's behaviour. `text`: scored from logits on held-out passages (`rows`, `result`),
    not through lm-eval's requests; `reference`: its rows need the reference model's logits of the
    same batch (so it is never asked of the reference itself, and is judged alone, not paired)."""

    text: ClassVar[bool] = False
    reference: ClassVar[bool] = False
    higher_is_better: ClassVar[bool] = True
    metric: ClassVar[str] = "acc"  # its headline figure, in a result and the report's plots
    value_column: ClassVar[str] = "correct"  # the per-document column paired comparisons take
    weight_column: ClassVar[str | None] = None  # and its weights (tokens), for a ratio estimator
    figures: ClassVar[tuple[str, ...]] = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n")

    def __init__(self, name: str) -> None:
        self.name = name

    def rows(self, logits: Any, reference: Any, batch: dict) -> list:
        """Per document of a batch, what `result` needs, from the model's (and the reference's) logits."""
        raise NotImplementedError(f"{self.name} is scored by lm-eval, not from logits")

    def result(self, ids: list[str], rows: list, vocab: int, data: str | Path) -> dict[str, Any]:
        """The task's record from `rows` of the documents `ids` of held-out `data`."""
        raise NotImplementedError(f"{self.name} is scored by lm-eval, not from logits")

    def summary(self, documents: dict[str, list], old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        """The figures of the per-document columns `documents` (of `old` and `new` merged)."""
        raise NotImplementedError

    def merge(self, old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        """Two evaluations on different documents, as one (the figures recomputed)."""
        known = set(old["documents"]["id"])
        keep = [i for i, d in enumerate(new["documents"]["id"]) if d not in known]
        documents = {k: v + [new["documents"][k][i] for i in keep] for k, v in old["documents"].items()}
        rest = {k: v for k, v in old.items() if k not in ("documents", "histogram")}
        return rest | self.summary(documents, old, new)

    def documents(self, result: dict[str, Any]) -> Documents:
        """A result's per-document figures as a ratio estimator's columns (see `uncertainty`)."""
        return Documents.of(result["documents"], self.value_column, self.weight_column)

    def columns(self) -> list[str]:
        """Its columns in a sweep's table."""
        return [f"{self.name}_{figure}" for figure in self.figures]

    def table(self, result: dict[str, Any]) -> dict[str, Any]:
        """A result's cells in those columns."""
        return {f"{self.name}_{figure}": result.get(figure) for figure in self.figures}

    def describe(self, result: dict[str, Any]) -> str:
        """The result in one line of `evaluate`'s table (after the task's name and documents)."""
        raise NotImplementedError


class Accuracy(Task):
    """A QA task of lm-eval: its requests, prompts and metrics are lm-eval's (`harness.qa_accuracy`);
    here, only how its per-document results merge, pair and print."""

    def summary(self, documents: dict[str, list], old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        summary: dict[str, Any] = {"n": len(documents["id"])}
        for metric, column in (("acc", "correct"), ("acc_norm", "correct_norm")):
            values = documents[column]
            summary[metric] = sum(values) / len(values)
            summary[f"{metric}_stderr"] = _ratio_stderr(values, [1.0] * len(values))
        return summary | {"documents": documents}

    def describe(self, result: dict[str, Any]) -> str:
        cells = [f"{result[m]:.3f} ± {_nan(result.get(m + '_stderr')):.3f}" if m in result else "-"
                 for m in ("acc", "acc_norm")]  # fmt: skip
        chance = f"{result['chance']:.3f}" if "chance" in result else "-"
        return f"{cells[0]:>14} {cells[1]:>14} {chance:>7}"


class HeldOutLoss(Task):
    """The paper's held-out next-token loss, also normalized by ln(vocabulary size)."""

    text = True
    higher_is_better = False
    metric = "loss"
    value_column, weight_column = "loss", "tokens"
    figures = ("loss", "loss_stderr", "loss_normalized", "perplexity")

    def rows(self, logits: Any, reference: Any, batch: dict) -> list[tuple]:
        """Each document's summed next-token cross-entropy and its number of predicted tokens."""
        losses, mask = next_token_losses(logits, batch)
        sums = losses.masked_fill(~mask, 0.0).sum(dim=1)
        return list(zip(sums.tolist(), mask.sum(dim=1).tolist(), strict=True))

    def result(self, ids: list[str], rows: list, vocab: int, data: str | Path) -> dict[str, Any]:
        documents: dict[str, list] = {"id": ids, "loss": [s for s, _ in rows], "tokens": [c for _, c in rows]}
        summary = self.summary(documents, {"vocab": vocab}, {})
        return summary | {"available": len(load_documents(data)), "data": str(data)}

    def summary(self, documents: dict[str, list], old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        count = sum(documents["tokens"])
        loss = sum(documents["loss"]) / count
        return {
            "loss": loss,
            "loss_stderr": _ratio_stderr(documents["loss"], documents["tokens"]),
            "perplexity": math.exp(loss),
            "loss_normalized": loss / math.log(old["vocab"]),
            "tokens": count,
            "n": len(documents["id"]),
            "vocab": old["vocab"],
            "documents": documents,
        }

    def columns(self) -> list[str]:
        return list(self.figures)

    def table(self, result: dict[str, Any]) -> dict[str, Any]:
        return {figure: result.get(figure) for figure in self.figures}

    def describe(self, result: dict[str, Any]) -> str:
        return (f"loss {result['loss']:.3f} ± {_nan(result['loss_stderr']):.3f}, normalized "
                f"{result['loss_normalized']:.3f}, perplexity {result['perplexity']:.1f} ({result['tokens']} tokens "
                f"of {result['data']})")  # fmt: skip


# Per-token KL divergences are kept as counts in log-spaced bins (1e-6 to 1e3 nats, 20 per decade), a
# compact form that adds up across rounds of `--limit auto`; the 99th percentile is read off it to
# within one bin (12%).
KL_BINS = [10 ** (-6 + i / 20) for i in range(181)]


def _percentile(counts: list[int], q: float) -> float:
    """The q-th quantile of binned values: the geometric middle of the bin where it falls."""
    target, seen = q * sum(counts), 0
    for index, count in enumerate(counts):
        seen += count
        if seen >= target and count:
            return math.sqrt(KL_BINS[index] * KL_BINS[index + 1])
    return 0.0


def token_divergences(candidate: Any, reference: Any, mask: Any, chunk: int | None = None) -> tuple[Any, Any]:
    """Per predicted token that `mask` marks: KL(reference || candidate) of the next-token
    distributions, and whether their top tokens agree (`divergence.divergences`, chunked)."""
    return divergences(candidate[:, :-1][mask], reference[:, :-1][mask], chunk)


class Divergence(HeldOutLoss):
    """llama.cpp's --kl-divergence measure: the mean KL divergence per token from the reference
    model, its 99th percentile, and how often both models' top tokens agree."""

    reference = True
    metric = "kld"
    value_column, weight_column = "kl", "tokens"
    figures = ("kld", "kld_stderr", "kld_p99", "top1_agreement")

    def rows(self, logits: Any, reference: Any, batch: dict) -> list[tuple]:
        """Per document: summed KL over its predicted tokens, their number, how many top tokens
        agree, and each token's KL."""
        mask = batch["attention_mask"][:, 1:].bool()
        results = []
        for row in range(mask.shape[0]):
            kl, agree = token_divergences(
                logits[row : row + 1], reference[row : row + 1], mask[row : row + 1].to(logits.device)
            )
            results.append((float(kl.sum()), int(kl.numel()), float(agree.sum()), kl.tolist()))
        return results

    def result(self, ids: list[str], rows: list, vocab: int, data: str | Path) -> dict[str, Any]:
        import torch

        values = torch.tensor([v for *_, kls in rows for v in kls], dtype=torch.float64)
        counts = torch.histogram(values.clamp(KL_BINS[0], KL_BINS[-1]), torch.tensor(KL_BINS, dtype=torch.float64))
        documents: dict[str, list] = {
            "id": ids,
            "kl": [k for k, _, _, _ in rows],
            "tokens": [c for _, c, _, _ in rows],
            "agree": [a for _, _, a, _ in rows],
        }
        summary = self.summary(documents, {"histogram": [int(c) for c in counts.hist.tolist()]}, {})
        return summary | {"available": len(load_documents(data)), "data": str(data)}

    def summary(self, documents: dict[str, list], old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        histogram = [a + b for a, b in zip(old["histogram"], new.get("histogram", [0] * len(old["histogram"])),
                                           strict=True)]  # fmt: skip
        tokens = sum(documents["tokens"])
        return {
            "kld": sum(documents["kl"]) / tokens,
            "kld_stderr": _ratio_stderr(documents["kl"], documents["tokens"]),
            "kld_p99": _percentile(histogram, 0.99),
            "top1_agreement": sum(documents["agree"]) / tokens,
            "tokens": tokens,
            "n": len(documents["id"]),
            "histogram": histogram,
            "documents": documents,
        }

    def describe(self, result: dict[str, Any]) -> str:
        return (f"KL {result['kld']:.4f} ± {_nan(result['kld_stderr']):.4f} nats/token, 99th percentile "
                f"{result['kld_p99']:.3f}, same top token {result['top1_agreement']:.1%}")  # fmt: skip


TEXT_TASKS: dict[str, Task] = {LOSS_TASK: HeldOutLoss(LOSS_TASK), KLD_TASK: Divergence(KLD_TASK)}


def task_of(name: str) -> Task:
    """The task object of a task name: a held-out text task, or else an lm-eval task's accuracy."""
    return TEXT_TASKS.get(name) or Accuracy(name)
