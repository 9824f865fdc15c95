"""How sure a comparison is: paired intervals, the tolerance rule, and break points.

Every metric here is a ratio over documents, sum(num) / sum(den): accuracy (num = correct,
den = 1), next-token loss (num = summed loss, den = tokens) and KL divergence (likewise). Two
models evaluated on the same documents are compared pair by pair: each bootstrap resample
draws documents with replacement and recomputes both models' metrics on the same draw, so
the documents' shared difficulty cancels out of the difference (a paired bootstrap,
percentile intervals). An accuracy, right or wrong per document, gets Agresti and Min's exact-style
interval for paired proportions instead, which a handful of documents cannot fool. The unpaired
interval, which resamples each model on its own, is given beside it to show what pairing saves.

A leaf module: numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

CONFIDENCE = 0.95
RESAMPLES = 2000
SEED = 0
METHOD = (
    "paired comparison on the same documents: for accuracies, Agresti and Min's interval for paired proportions; "
    f"for losses and KL divergences, a paired bootstrap over documents ({RESAMPLES} resamples, percentile intervals)"
)


@dataclass(frozen=True)
class Documents:
    """One model's per-document numerators and denominators, by document id."""

    ids: tuple[str, ...]
    num: tuple[float, ...]
    den: tuple[float, ...]

    @classmethod
    def of(cls, stored: dict[str, Any], num: str, den: str | None = None) -> Documents:
        """From a result's stored `documents` columns (den None: one per document)."""
        ids = tuple(map(str, stored["id"]))
        return cls(ids, tuple(stored[num]), tuple(stored[den]) if den else (1.0,) * len(ids))

    def estimate(self) -> float:
        return sum(self.num) / sum(self.den)


def _aligned(reference: Documents, candidate: Documents) -> tuple[Any, Any, Any, Any]:
    """Both models' columns on the documents they share, in the reference's order."""
    import numpy as np

    where = {doc: i for i, doc in enumerate(candidate.ids)}
    shared = [i for i, doc in enumerate(reference.ids) if doc in where]
    other = [where[reference.ids[i]] for i in shared]
    take = lambda values, rows: np.asarray(values, dtype=np.float64)[rows]  # noqa: E731
    return (
        take(reference.num, shared),
        take(reference.den, shared),
        take(candidate.num, other),
        take(candidate.den, other),
    )


def _resampled(num: Any, den: Any, draws: Any) -> Any:
    return num[draws].sum(axis=1) / den[draws].sum(axis=1)


def _draws(count: int, seed: int) -> Any:
    import numpy as np

    return np.random.default_rng(seed).integers(0, count, size=(RESAMPLES, count))


@dataclass(frozen=True)
class Comparison:
    """A candidate against a reference on shared documents: the change in the metric and the
    relative harm (positive = worse), each with paired bootstrap bounds."""

    documents: int
    reference: float
    candidate: float
    change: float  # candidate - reference
    change_interval: tuple[float, float]  # two-sided, paired
    unpaired_interval: tuple[float, float]  # two-sided, each model resampled on its own
    harm: float  # relative: (reference - candidate) / reference where higher is better, else the opposite
    harm_lower: float  # one-sided bounds at CONFIDENCE
    harm_upper: float

    def record(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(self).items()}


def compare(reference: Documents, candidate: Documents, higher_is_better: bool, seed: int = SEED) -> Comparison:
    """The paired comparison of `candidate` with `reference` on the documents both evaluated."""
    import numpy as np

    ref_num, ref_den, new_num, new_den = _aligned(reference, candidate)
    count = len(ref_num)
    if count < 2:
        raise ValueError("a paired comparison needs at least two shared documents")
    draws = _draws(count, seed)
    ref, new = _resampled(ref_num, ref_den, draws), _resampled(new_num, new_den, draws)
    ref_alone = _resampled(ref_num, ref_den, _draws(count, seed + 1))
    new_alone = _resampled(new_num, new_den, _draws(count, seed + 2))
    sign = 1.0 if higher_is_better else -1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        harms = sign * (ref - new) / np.abs(ref)
    harms = np.nan_to_num(harms, nan=0.0, posinf=math.inf, neginf=-math.inf)
    ref_value, new_value = ref_num.sum() / ref_den.sum(), new_num.sum() / new_den.sum()
    tail = (1 - CONFIDENCE) * 100
    change_interval = _interval(new - ref)
    harm_bounds = float(np.percentile(harms, tail)), float(np.percentile(harms, 100 - tail))
    if _binary(ref_num, ref_den) and _binary(new_num, new_den) and ref_value:  # right or wrong: Agresti-Min
        change_interval = _agresti_min(ref_num, new_num, CONFIDENCE)
        one_sided = _agresti_min(ref_num, new_num, 1 - 2 * (1 - CONFIDENCE))
        low, high = sorted(sign * -change / ref_value for change in one_sided)
        harm_bounds = low, high
    return Comparison(
        documents=count,
        reference=float(ref_value),
        candidate=float(new_value),
        change=float(new_value - ref_value),
        change_interval=change_interval,
        unpaired_interval=_interval(new_alone - ref_alone),
        harm=float(sign * (ref_value - new_value) / abs(ref_value)) if ref_value else 0.0,
        harm_lower=harm_bounds[0],
        harm_upper=harm_bounds[1],
    )


def _binary(num: Any, den: Any) -> bool:
    import numpy as np

    return bool(np.all(den == 1) and np.all((num == 0) | (num == 1)))


def _agresti_min(reference: Any, candidate: Any, confidence: float) -> tuple[float, float]:
    """Agresti and Min's (2005) interval for a difference of paired proportions: half a document
    added to each of the four right/wrong cells, then the Wald interval. Unlike a bootstrap, it
    stays honest when few or no documents change their answer (a bootstrap of 20 unchanged
    answers would claim no uncertainty at all)."""
    count = len(reference) + 2
    gained = (float(((reference == 0) & (candidate == 1)).sum()) + 0.5) / count
    lost = (float(((reference == 1) & (candidate == 0)).sum()) + 0.5) / count
    centre = gained - lost
    spread = NormalDist().inv_cdf(1 - (1 - confidence) / 2) * math.sqrt(max(gained + lost - centre**2, 0.0) / count)
    return centre - spread, centre + spread


def _interval(samples: Any) -> tuple[float, float]:
    import numpy as np

    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def upper_bound(documents: Documents, seed: int = SEED) -> tuple[float, float, float]:
    """(estimate, one-sided lower, one-sided upper bound at CONFIDENCE) of one model's metric."""
    import numpy as np

    num, den = np.asarray(documents.num, dtype=np.float64), np.asarray(documents.den, dtype=np.float64)
    samples = _resampled(num, den, _draws(len(num), seed))
    tail = (1 - CONFIDENCE) * 100
    return documents.estimate(), float(np.percentile(samples, tail)), float(np.percentile(samples, 100 - tail))


@dataclass(frozen=True)
class Verdict:
    """Whether a point's harm is within the tolerance, beyond it, or not yet decided."""

    state: str  # "within" | "beyond" | "undecided"
    documents_to_decide: int | None = None  # likely enough, when undecided (None: too close to tell)


def verdict(estimate: float, lower: float, upper: float, tolerance: float, documents: int) -> Verdict:
    """Within: the one-sided upper bound is at most the tolerance. Beyond: the lower bound is
    above it. Otherwise undecided, with the documents that would likely decide it: the bound's
    distance from the estimate shrinks as 1/sqrt(documents), and must shrink below the
    estimate's distance from the tolerance."""
    if upper <= tolerance:
        return Verdict("within")
    if lower > tolerance:
        return Verdict("beyond")
    gap = abs(estimate - tolerance)
    spread = max(upper - estimate, estimate - lower)
    if gap < 1e-12 or not math.isfinite(spread):
        return Verdict("undecided")
    return Verdict("undecided", math.ceil(documents * (spread / gap) ** 2))


def break_point(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Where a curve breaks: the knot of the best continuous two-piece linear fit (least squares,
    the knot tried at every interior x). None with fewer than four points."""
    import numpy as np

    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if len(x) < 4:
        return None
    best, knot_at = math.inf, None
    for knot in x[1:-1]:
        design = np.column_stack([np.ones_like(x), x, np.maximum(0.0, x - knot)])
        coefficients, *_ = np.linalg.lstsq(design, y, rcond=None)
        error = float(((design @ coefficients - y) ** 2).sum())
        if error < best - 1e-15:
            best, knot_at = error, float(knot)
    return knot_at
