"""Pruning strategies: which n layers to remove. Every strategy is one registered function here.

A strategy is a function `choose(request) -> Choice` registered with `@strategy(name, needs=...,
cost=...)`; its docstring is its help, and `needs` says whether it takes the angular analysis or
the model and calibration batches. The CLI's help, the config checks, the sweep and the report
all read this registry, so a new strategy is one function. A strategy whose answers for several
n come from one run (the greedy path of `iterative`) also registers `many`.
"""

from __future__ import annotations

import difflib
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from layerprune.errors import LayerpruneError
from layerprune.layer_sets import check_removal, exactly_one, layer_count, parse_layers
from layerprune.measure.analysis import AnalysisResult
from layerprune.selection.scoring import Selection, nested_prefix, select_by_loss

ANALYSIS, MODEL = "analysis", "model"  # what a strategy may need


@dataclass(frozen=True)
class Request:
    """What a strategy chooses from: the model's size, how many layers, and what it needs."""

    num_layers: int
    n: int
    allow_final: bool = False
    analysis: AnalysisResult | None = None
    model: Any = None  # the loaded model, for strategies that need it
    batches: list[dict] | None = None  # its calibration batches
    candidates: int = 5
    seed: int = 0
    progress: bool = True

    @property
    def final(self) -> int:
        return self.num_layers - 1


@dataclass(frozen=True)
class Choice:
    """The layers to remove, and what led to them (recorded in layerprune.json under `selection`)."""

    layers: list[int]
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Strategy:
    """One way to choose layers: its name, its help (the function's docstring), what it needs, its
    cost, and its choice for one n; `many`, where given, answers several n from one run."""

    name: str
    help: str
    needs: frozenset[str]
    cost: str
    choose: Callable[[Request], Choice]
    many: Callable[[Request, list[int]], dict[int, Choice]] | None = None

    def choose_many(self, request: Request, ns: Iterable[int]) -> dict[int, Choice]:
        """The choice for each n (one `choose` each, unless the strategy shares the work)."""
        wanted = sorted(set(ns))
        if self.many is not None:
            return self.many(request, wanted)
        return {n: self.choose(replace(request, n=n)) for n in wanted}


STRATEGIES: dict[str, Strategy] = {}


def strategy(
    name: str, *, cost: str, needs: Iterable[str] = (), many: Callable[..., dict[int, Choice]] | None = None
) -> Callable[[Callable[[Request], Choice]], Callable[[Request], Choice]]:
    """Register a function `choose(request) -> Choice` as a strategy; its docstring is the help."""

    def register(choose: Callable[[Request], Choice]) -> Callable[[Request], Choice]:
        help_text = " ".join((choose.__doc__ or "").split())
        STRATEGIES[name] = Strategy(name, help_text, frozenset(needs), cost, choose, many)
        return choose

    return register


def strategy_names() -> tuple[str, ...]:
    """The registered strategies' names (a config field's choices, read when asked)."""
    return tuple(STRATEGIES)


def get_strategy(name: str) -> Strategy:
    """The registered strategy of that name, or an error listing them with the closest match."""
    if name in STRATEGIES:
        return STRATEGIES[name]
    close = difflib.get_close_matches(name, STRATEGIES, n=1)
    hint = f" Did you mean {close[0]}?" if close else ""
    raise LayerpruneError(f"unknown strategy {name!r}.{hint} Choose one of {', '.join(STRATEGIES)}")


def _needs_analysis(request: Request) -> AnalysisResult:
    if request.analysis is None:
        raise LayerpruneError("this strategy needs an analysis")
    if request.analysis.num_layers != request.num_layers:
        raise LayerpruneError(
            f"the analysis is of {request.analysis.num_layers} layers, the model has {request.num_layers}"
        )
    return request.analysis


def _by_loss(request: Request, search: str) -> Selection:
    """Run a calibration-loss search (see `scoring`) for the request."""
    if request.model is None or request.batches is None:
        raise LayerpruneError(f"strategy {search} needs the model and calibration batches")
    return select_by_loss(
        request.model,
        request.batches,
        request.n,
        search,
        request.analysis,
        request.candidates,
        request.allow_final,
        request.progress,
    )


def _chosen(selection: Selection) -> Choice:
    provenance = {"candidates": selection.scored, "forward_passes": selection.forward_passes}
    return Choice(selection.removed, provenance | {"seconds": selection.seconds})


@strategy("angular", needs=[ANALYSIS], cost="1 forward pass")
def _angular(request: Request) -> Choice:
    """the block l*(n)..l*(n)+n-1 of smallest angular distance (Gromov et al. 2024)"""
    analysis = _needs_analysis(request)
    start = analysis.best_start(request.n, request.allow_final)
    return Choice(
        list(range(start, start + request.n)), {"angular_distance_of_block": analysis.angular[request.n][start]}
    )


@strategy("deepest", cost="a file copy")
def _deepest(request: Request) -> Choice:
    """the n layers just before the final layer (the paper's heuristic; the model is never loaded)"""
    return Choice(list(range(request.final - request.n, request.final)))


@strategy("bi", needs=[ANALYSIS], cost="1 forward pass")
def _block_influence(request: Request) -> Choice:
    """the n layers of lowest Block Influence (ShortGPT, Men et al. 2024; may be non-contiguous)"""
    influence = _needs_analysis(request).block_influence
    candidates = range(request.num_layers if request.allow_final else request.final)
    return Choice(sorted(sorted(candidates, key=influence.__getitem__)[: request.n]))


@strategy("loss", needs=[MODEL], cost="about (L-n)/2 passes of the layers, plus an LM head per block")
def _loss(request: Request) -> Choice:
    """the contiguous block whose removal gives the lowest calibration loss (exact search)"""
    return _chosen(_by_loss(request, "loss"))


@strategy("loss-repair", needs=[MODEL], cost="2 passes, plus about (L-n)/2 passes of the layers and a head per block")
def _loss_repair(request: Request) -> Choice:
    """the contiguous block whose removal, then repair by a linear map (prune --repair linear), gives the lowest
    calibration loss, each half of the documents scored with the map fitted on the other"""
    return _chosen(_by_loss(request, "loss-repair"))


@strategy("angular-rerank", needs=[ANALYSIS, MODEL], cost="1 + about k/2 passes of the layers, plus k heads")
def _angular_rerank(request: Request) -> Choice:
    """of the --candidates k best angular blocks, the one of lowest calibration loss"""
    _needs_analysis(request)
    return _chosen(_by_loss(request, "angular-rerank"))


def _iterative_path(request: Request, ns: list[int]) -> dict[int, Choice]:
    """One greedy run to the largest n: its path is nested, so each smaller n is a prefix."""
    longest = _by_loss(replace(request, n=ns[-1]), "iterative")
    return {n: _chosen(nested_prefix(longest, n)) for n in ns}


@strategy(
    "iterative",
    needs=[MODEL],
    cost="about L/2 passes of the layers, plus L heads, per layer removed",
    many=_iterative_path,
)
def _iterative(request: Request) -> Choice:
    """greedily, one layer at a time, the layer whose removal raises calibration loss least (SLEB-style)"""
    return _chosen(_by_loss(request, "iterative"))


@strategy("random", cost="nothing: the model is never loaded")
def _random(request: Request) -> Choice:
    """n layers drawn at random (seeded by --seed), a baseline for the other strategies"""
    candidates = range(request.num_layers if request.allow_final else request.final)
    return Choice(sorted(random.Random(request.seed).sample(candidates, request.n)), {"seed": request.seed})


def select_layers(
    num_layers: int,
    *,
    layers: list[int] | str | None = None,
    n: int | None = None,
    fraction: float | None = None,
    strategy: str = "angular",
    analysis: AnalysisResult | None = None,
    allow_final: bool = False,
    seed: int = 0,
) -> list[int]:
    """The layers to remove, given explicitly or chosen by a strategy that needs no model."""
    exactly_one(layers, n, fraction)
    if layers is not None:
        chosen = parse_layers(layers, num_layers) if isinstance(layers, str) else list(layers)
    else:
        count = layer_count(num_layers, n, fraction)
        request = Request(num_layers, count, allow_final, analysis=analysis, seed=seed)
        chosen = get_strategy(strategy).choose(request).layers
    return check_removal(num_layers, chosen, allow_final)
