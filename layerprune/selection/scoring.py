"""Score removals by what they cost: next-token loss on calibration data, searched efficiently.

Angular distance only stands in for the model's quality after removal; these searches measure
it directly (beyond Gromov et al. 2024), for the strategies of the same names:

- `loss`: exact search over every contiguous block of n layers for the lowest calibration loss.
- `angular-rerank`: the k blocks of smallest angular distance, re-ranked by calibration loss.
- `loss-repair`: the same exact search, each block scored after the repair `prune --repair
  linear` would make (`repair`): one pass sums every candidate's statistics, each map is fitted
  as that repair fits it (in closed form, or through the norm for Gemma 2/3 and OLMo 2), and a
  second pass scores each block with its map applied to the stream it hands on. The scores are
  cross-fitted: the calibration documents are dealt into REPAIR_FOLDS folds, and each fold's
  tokens are scored with the map fitted on the other folds, so a block whose map fits its own
  tokens best but carries over worst is not preferred (on Gemma 3, maps fitted and scored on the
  same 4,096 tokens picked a block 0.07 nat worse on held-out text; docs/results/repair.md). The
  fold maps see fewer documents than the repair's: give the search enough (the default 64).
- `iterative`: SLEB-style greedy removal (Song et al. 2024, arXiv:2402.09025), one layer at a
  time, each time the one whose removal raises the loss least; removed layers need not be
  contiguous.

Efficiency: the residual stream entering layer l is the same for every candidate that keeps
layers 0..l-1, so each batch is run once with hooks recording resid[0..L], and each candidate
runs only the layers after its cut, starting from the recorded state (a pre-hook swaps it in).
For the block search that is about (L-n)/2 full-pass equivalents instead of L-n+1. Memory:
the L+1 residual states of one calibration batch; `loss-repair` adds, per candidate and fold,
two d x d float64 sums, and for a fit through a norm the rows of its calibration tokens (3 x d
floats each, up to SAMPLE_TOKENS); for many candidates of a large model, in groups that fit, one
more pass per group.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from layerprune.architectures import find_architecture
from layerprune.data import Calibration
from layerprune.errors import LayerpruneError
from layerprune.healing.repair import (
    SAMPLE_TOKENS,
    BlockStatistics,
    Fit,
    fit_all,
    mapped_term,
    pooled,
    through_norm,
)
from layerprune.layer_sets import check_count
from layerprune.measure.residual import layers_swapped, next_token_losses, running_from, stream_modules, watching
from layerprune.runtime.memory import FIT_SHARE, memory_free

REPAIR_FOLDS = 2  # loss-repair: each document scored with the map fitted on the others (1: on all, itself too)


@dataclass(frozen=True)
class Selection:
    """The layers chosen, every candidate scored, and the cost in full-forward-pass equivalents."""

    removed: list[int]
    scored: list[dict[str, Any]] = field(default_factory=list)  # {"layers": [...], "loss": float}
    forward_passes: float = 0.0
    seconds: float = 0.0


class Scorer:
    """Calibration loss of the model with some layers removed, reusing recorded residual states."""

    def __init__(self, model: Any, batches: list[dict], bar: Any = None) -> None:
        self.model = model
        self.bar = bar  # a progress bar counting calibration batches run, or None
        self.arch = find_architecture(model.config)
        self.num_layers = self.arch.num_layers(model.config)
        self.batches = batches
        # Work is counted in parameters applied per token (FLOPs up to a factor): each decoder
        # layer run, and the LM head, which is most of a pass for a large vocabulary (Gemma 3).
        self.layer_cost = [sum(p.numel() for p in layer.parameters()) for layer in self.arch.layer_list(model)]
        self.head_cost = model.get_output_embeddings().weight.numel()
        self.work = 0

    def resid(self, batch: dict, keep: Sequence[int]) -> list[Any]:
        """resid entering each kept layer (and the final norm) of the model reduced to `keep`."""
        import torch

        states: list[Any] = []
        with (
            watching(stream_modules(self.model, self.arch, keep), lambda _, resid: states.append(resid)),
            torch.inference_mode(),
            layers_swapped(self.model, self.arch, keep),
        ):
            self.model.base_model(**self._on_device(batch), use_cache=False)
        self.work += sum(self.layer_cost[i] for i in keep)
        return states

    def document_losses(self, batch: dict, start_state: Any, suffix: Sequence[int]) -> tuple[list[float], list[int]]:
        """Each document's summed next-token loss and token count, running only `suffix` layers from a
        recorded state (`start_state` None: every layer from the embeddings). Only the tokens a
        batch's `target_mask` marks count, where it has one (an answer after its question)."""
        import torch

        inputs = self._on_device(batch)
        with torch.inference_mode(), running_from(self.model, self.arch, suffix, start_state):
            losses, mask = next_token_losses(self.model(**inputs, use_cache=False).logits, inputs)
        if "target_mask" in batch:
            mask = mask & batch["target_mask"][:, 1:].to(mask.device).bool()
        self.work += sum(self.layer_cost[i] for i in suffix) + self.head_cost
        return losses.masked_fill(~mask, 0.0).sum(dim=1).tolist(), mask.sum(dim=1).tolist()

    def _suffix_loss(self, batch: dict, start_state: Any, suffix: Sequence[int]) -> tuple[float, int]:
        """Summed next-token loss and token count, running only `suffix` layers from a recorded state."""
        sums, counts = self.document_losses(batch, start_state, suffix)
        return sum(sums), sum(counts)

    def resid_and_terms(self, batch: dict, layers: Sequence[int]) -> tuple[list[Any], dict[int, tuple[Any, Any]]]:
        """resid entering every layer (and the final norm), and for each of `layers` its MLP term
        (what it adds to the stream; see `repair`) with that module's input, from one pass of the
        whole model."""
        terms: dict[int, tuple[Any, Any]] = {}

        def store(index: int) -> Any:
            return lambda _m, args, out: terms.__setitem__(index, (out[0] if isinstance(out, tuple) else out, args[0]))

        modules = self.arch.layer_list(self.model)
        handles = [modules[i].get_submodule(self.arch.mlp_term).register_forward_hook(store(i)) for i in layers]
        try:
            return self.resid(batch, list(range(self.num_layers))), terms
        finally:
            for handle in handles:
                handle.remove()

    def _on_device(self, batch: dict) -> dict:
        """The model's inputs where its embeddings are (a dispatched model moves them on from there)."""
        device = self.model.get_input_embeddings().weight.device
        return {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}

    def score(self, kept: Sequence[int], candidates: list[list[int]]) -> list[float]:
        """Mean calibration loss of the model reduced to `kept`, minus each candidate set of layers."""
        totals = [0.0] * len(candidates)
        tokens = 0
        for batch in self.batches:
            resid = self.resid(batch, kept)
            for c, removed in enumerate(candidates):
                position = min(kept.index(layer) for layer in removed)  # first kept layer cut
                suffix = [layer for layer in kept[position:] if layer not in removed]
                loss, count = self._suffix_loss(batch, resid[position], suffix)
                totals[c] += loss
            tokens += count
            self.advance()
        return [t / tokens for t in totals]

    def advance(self) -> None:
        """One more calibration batch done."""
        if self.bar is not None:
            self.bar.update()

    @property
    def forward_passes(self) -> float:
        """The work so far, in full forward passes (every layer and the head) over the calibration set."""
        return self.work / ((sum(self.layer_cost) + self.head_cost) * len(self.batches))


def _blocks(num_layers: int, n: int, allow_final: bool) -> list[list[int]]:
    last_start = num_layers - n if allow_final else num_layers - n - 1
    return [list(range(start, start + n)) for start in range(last_start + 1)]


def select_by_loss(
    model: Any,
    batches: list[dict],
    n: int,
    strategy: str = "loss",
    analysis: Any = None,
    candidates: int = 5,
    allow_final: bool = False,
    progress: bool = True,
    folds: int = REPAIR_FOLDS,
) -> Selection:
    """Choose n layers by calibration loss with `strategy` (see the module docstring); `folds`:
    how `loss-repair` cross-fits its maps."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    rounds = {"loss-repair": 2, "iterative": n}.get(strategy, 1)  # passes over the calibration batches
    with tqdm(total=rounds * len(batches), desc=f"{strategy} search", unit="batch", disable=not progress) as bar:
        return _select(Scorer(model, batches, bar), n, strategy, analysis, candidates, allow_final, started, folds)


def _select(scorer: Scorer, n: int, strategy: str, analysis: Any, candidates: int, allow_final: bool,
            started: float, folds: int) -> Selection:  # fmt: skip
    num_layers = scorer.num_layers
    check_count(n, num_layers, most=num_layers - (1 if allow_final else 2))  # a search keeps a layer to score
    every = list(range(num_layers))
    if strategy == "loss":
        pool = _blocks(num_layers, n, allow_final)
    elif strategy == "angular-rerank":
        pool = _blocks(num_layers, n, allow_final)
        if not 1 <= candidates <= len(pool):
            raise LayerpruneError(f"--candidates must be between 1 and {len(pool)} for n={n}, got {candidates}")
        if analysis is None:
            raise LayerpruneError("angular-rerank needs an analysis")
        pool = sorted(pool, key=lambda block: analysis.angular[n][block[0]])[:candidates]
    elif strategy == "loss-repair":
        pool = [block for block in _blocks(num_layers, n, allow_final) if block[0] > 0]  # repair needs a layer before
    elif strategy == "iterative":
        removed, rounds = _iterative(scorer, n, allow_final, started)
        return Selection(removed, rounds, scorer.forward_passes, round(time.perf_counter() - started, 2))
    else:
        raise LayerpruneError(
            f"unknown loss search {strategy!r}; choose from loss, loss-repair, angular-rerank, iterative"
        )
    if strategy == "loss-repair":
        losses, fits = _repaired_losses(scorer, pool, folds)
        extra: list[dict[str, Any]] = [{"fit_residual": round(sum(f.residual for f in each) / folds, 6)}
                                       for each in fits]  # fmt: skip
    else:
        losses, extra = scorer.score(every, pool), [{} for _ in pool]
    scored: list[dict[str, Any]] = [{"layers": block, "loss": loss, **more}
                                    for block, loss, more in zip(pool, losses, extra, strict=True)]  # fmt: skip
    best = min(scored, key=lambda c: c["loss"])
    return Selection(best["layers"], scored, scorer.forward_passes, round(time.perf_counter() - started, 2))


def _document_folds(batches: list[dict], folds: int) -> list[Any]:
    """Each batch's rows' folds: the calibration documents dealt in turn, or a one-line error
    when there are fewer documents than folds."""
    import torch

    rows = [batch["input_ids"].shape[0] for batch in batches]
    if sum(rows) < folds:
        raise LayerpruneError(
            f"loss-repair scores each block on documents its map was not fitted on: it needs at least {folds} "
            f"calibration documents, got {sum(rows)}; raise --samples"
        )
    offsets = [sum(rows[:i]) for i in range(len(rows))]
    return [(torch.arange(count) + offset) % folds for count, offset in zip(rows, offsets, strict=True)]


def _repaired_losses(scorer: Scorer, pool: list[list[int]], folds: int) -> tuple[list[float], list[list[Fit]]]:
    """Each block's calibration loss after its linear repair, and its fits: the map `prune --repair
    linear` folds, fitted the same way, once per fold on the documents of the other folds (on all
    of them for one fold), each fold's documents scored with their own fold's map."""
    import torch

    arch, d = scorer.arch, scorer.model.config.get_text_config().hidden_size
    dealt = _document_folds(scorer.batches, folds)
    tokens = sum(int(batch["attention_mask"].sum()) for batch in scorer.batches)
    keep = min(SAMPLE_TOKENS, tokens) if through_norm(arch) else 0
    share = keep if folds == 1 else -(-keep // (folds - 1))  # rows kept per fold: a fit pools folds - 1 of them
    room = FIT_SHARE * memory_free(scorer.model.get_input_embeddings().weight.device)
    group = max(1, int(room // (folds * (2 * d * d * 8 + 3 * share * d * 4))))  # two float64 d x d sums, kept rows
    fits: list[list[Fit]] = []  # per block, per fold
    for first in range(0, len(pool), group):
        blocks = pool[first : first + group]
        stats = [[BlockStatistics(block[0], block[-1] + 1) for _ in range(folds)] for block in blocks]  # per fold
        for batch, fold_of in zip(scorer.batches, dealt, strict=True):
            resid, terms = scorer.resid_and_terms(batch, sorted({s[0].start - 1 for s in stats}))
            real = batch["attention_mask"].bool().to(resid[0].device)
            in_fold = [real & (fold_of == k).to(real.device)[:, None] for k in range(folds)]  # its real tokens
            for per_fold in stats:
                term, source = terms[per_fold[0].start - 1]
                for used, block in zip(in_fold, per_fold, strict=True):
                    kept = source[used] if keep else None  # the norm's input, for a fit through it
                    block.add(term[used], resid[block.start][used], resid[block.end][used], share, kept)
            if first == 0:  # the bar counts the first group's pass and the scoring pass
                scorer.advance()
        shown = scorer.bar is not None and not scorer.bar.disable  # a fit through a norm takes seconds a block
        for per_fold in stats:
            others = [per_fold[:k] + per_fold[k + 1 :] or per_fold for k in range(folds)]  # all, for one fold
            fitted_on = [pooled(parts, keep) for parts in others]
            fits.append(fit_all(fitted_on, "linear", scorer.model, arch, progress=shown))
            per_fold.clear()  # the fits are done; the next group needs the room
    totals, predicted = [0.0] * len(pool), 0
    for batch, fold_of in zip(scorer.batches, dealt, strict=True):
        resid, terms = scorer.resid_and_terms(batch, sorted({each[0].start - 1 for each in fits}))
        in_fold = [(fold_of == k).to(resid[0].device) for k in range(folds)]  # its rows
        for c, each in enumerate(fits):
            start, end = each[0].start, each[0].end
            term, source = terms[start - 1]
            change = torch.zeros_like(term)  # (H - A) + the mapped A, each row by its fold's map
            for rows, result in zip(in_fold, each, strict=True):
                change[rows] = (mapped_term(scorer.model, arch, result, term[rows], source[rows]) - term[rows]).to(term)
            loss, count = scorer._suffix_loss(batch, resid[start] + change, list(range(end, scorer.num_layers)))
            totals[c] += loss
        predicted += count
        scorer.advance()
    return [t / predicted for t in totals], fits


def _iterative(scorer: Scorer, n: int, allow_final: bool, started: float) -> tuple[list[int], list[dict]]:
    """Greedy removal; round k records the k layers removed so far and its cumulative cost, so the
    first k rounds are the whole answer for n = k (the path is nested)."""

    kept = list(range(scorer.num_layers))
    final = scorer.num_layers - 1
    rounds = []
    for _ in range(n):
        pool = [[layer] for layer in kept if allow_final or layer != final]
        losses = scorer.score(kept, pool)
        choice, loss = min(zip(pool, losses, strict=True), key=lambda pair: pair[1])
        rounds.append(
            {
                "layers": sorted(set(range(scorer.num_layers)) - set(kept) | set(choice)),
                "loss": loss,
                "scored": {str(c[0]): s for c, s in zip(pool, losses, strict=True)},
                "forward_passes": scorer.forward_passes,
                "seconds": round(time.perf_counter() - started, 2),
            }
        )
        kept.remove(choice[0])
    return sorted(set(range(scorer.num_layers)) - set(kept)), rounds


def nested_prefix(selection: Selection, n: int) -> Selection:
    """The `iterative` answer for a smaller n, read off a longer greedy path at no cost."""
    rounds = selection.scored[:n]
    return Selection(rounds[-1]["layers"], rounds, rounds[-1]["forward_passes"], rounds[-1]["seconds"])


def calibration_batches(calibration: Calibration, tokenizer: Any, documents: list[str] | None = None) -> list[dict]:
    """The calibration batches, refusing data shorter than one full sequence: too little to score blocks."""
    batches = calibration.batches(tokenizer, documents)
    if sum(int(b["attention_mask"].sum()) for b in batches) < calibration.seq_len:
        raise LayerpruneError(
            "calibration data is too small to score blocks: fewer than one full sequence of "
            f"{calibration.seq_len} tokens"
        )
    return batches
