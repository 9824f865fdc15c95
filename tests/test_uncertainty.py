"""Paired intervals: calibrated on synthetic data with a known difference, narrower than unpaired
ones when documents share their difficulty; the tolerance rule; break points."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerprune.evaluation.uncertainty import Documents, break_point, compare, upper_bound, verdict


def paired_answers(rng, documents, easy_share=0.7, flip=0.08):
    """Two models' correctness on the same documents: both answer the easy ones, and the pruned
    one loses each answer with probability `flip` (true accuracy drop: easy_share * flip)."""
    easy = rng.random(documents) < easy_share
    lost = rng.random(documents) < flip
    full = easy.astype(float)
    pruned = (easy & ~lost).astype(float)
    ids = tuple(map(str, range(documents)))
    return Documents(ids, tuple(full), (1.0,) * documents), Documents(ids, tuple(pruned), (1.0,) * documents)


def test_the_paired_interval_covers_a_known_difference_95_times_in_100():
    rng = np.random.default_rng(7)
    truth = -0.7 * 0.08
    repeats, covered, harm_covered = 300, 0, 0
    for repeat in range(repeats):
        full, pruned = paired_answers(rng, 300)
        found = compare(full, pruned, higher_is_better=True, seed=repeat)
        low, high = found.change_interval
        covered += low <= truth <= high
        harm_covered += found.harm_upper >= 0.08  # the relative drop is 0.08: its one-sided bound
    assert 0.92 <= covered / repeats <= 0.98, covered / repeats
    assert 0.92 <= harm_covered / repeats <= 0.99, harm_covered / repeats


def test_the_paired_interval_of_a_ratio_covers_a_known_loss_difference():
    """Loss per token, documents of different lengths: the truth is the ratio of expected sums."""
    rng = np.random.default_rng(3)
    repeats, covered = 200, 0
    for repeat in range(repeats):
        tokens = rng.integers(20, 200, size=150).astype(float)
        difficulty = rng.gamma(4.0, 0.75, size=150)
        full = difficulty * tokens
        pruned = (difficulty + 0.2 + rng.normal(0, 0.3, size=150)) * tokens
        ids = tuple(map(str, range(150)))
        found = compare(Documents(ids, tuple(full), tuple(tokens)), Documents(ids, tuple(pruned), tuple(tokens)),
                        higher_is_better=False, seed=repeat)  # fmt: skip
        low, high = found.change_interval
        covered += low <= 0.2 <= high
    assert 0.91 <= covered / repeats <= 0.99, covered / repeats


def test_pairing_narrows_the_interval_when_documents_share_their_difficulty():
    full, pruned = paired_answers(np.random.default_rng(1), 400)
    found = compare(full, pruned, higher_is_better=True)
    paired = found.change_interval[1] - found.change_interval[0]
    unpaired = found.unpaired_interval[1] - found.unpaired_interval[0]
    print(f"paired width {paired:.4f}, unpaired width {unpaired:.4f}")
    assert paired * 2 <= unpaired


def test_only_shared_documents_are_compared_in_the_references_order():
    ref = Documents(("a", "b", "c", "d"), (1.0, 0.0, 1.0, 1.0), (1.0,) * 4)
    new = Documents(("d", "c", "b", "x"), (1.0, 0.0, 0.0, 1.0), (1.0,) * 4)
    found = compare(ref, new, higher_is_better=True)
    assert found.documents == 3 and found.reference == pytest.approx(2 / 3) and found.candidate == pytest.approx(1 / 3)
    assert found.harm == pytest.approx(0.5)


def test_verdicts_and_the_documents_that_would_decide():
    assert verdict(0.01, -0.02, 0.04, 0.05, 100).state == "within"
    assert verdict(0.20, 0.10, 0.30, 0.05, 100).state == "beyond"
    undecided = verdict(0.02, -0.01, 0.08, 0.05, 100)
    assert undecided.state == "undecided" and undecided.documents_to_decide == math.ceil(100 * (0.06 / 0.03) ** 2)
    assert verdict(0.05, 0.0, 0.1, 0.05, 100).documents_to_decide is None  # on the tolerance: no count decides


def test_an_undecided_point_is_mostly_decided_by_the_documents_it_asks_for():
    """The count is a forecast from the current estimate; the true relative drop here is 0.12, the
    tolerance 0.05. Given twice the documents forecast, most undecided points then decide."""
    rng = np.random.default_rng(11)
    asked, decided = 0, 0
    for repeat in range(60):
        full, pruned = paired_answers(rng, 60, flip=0.12)
        found = compare(full, pruned, higher_is_better=True, seed=repeat)
        first = verdict(found.harm, found.harm_lower, found.harm_upper, 0.05, found.documents)
        if first.state != "undecided" or not first.documents_to_decide or first.documents_to_decide > 5000:
            continue
        asked += 1
        full, pruned = paired_answers(rng, 2 * first.documents_to_decide, flip=0.12)
        again = compare(full, pruned, higher_is_better=True, seed=repeat)
        decided += verdict(again.harm, again.harm_lower, again.harm_upper, 0.05, again.documents).state == "beyond"
    assert asked >= 10 and decided / asked >= 0.7, (asked, decided)


def test_one_models_bounds_surround_its_estimate():
    docs = Documents(tuple("abcdef"), (0.1, 0.3, 0.2, 0.5, 0.2, 0.1), (10.0, 20.0, 10.0, 30.0, 10.0, 10.0))
    estimate, low, high = upper_bound(docs)
    assert estimate == pytest.approx(1.4 / 90) and low <= estimate <= high


@settings(max_examples=60, deadline=None)
@given(
    knot=st.integers(1, 6),
    slopes=st.tuples(st.floats(-1, 1), st.floats(-8, 8)).filter(lambda s: abs(s[1] - s[0]) > 0.5),
    start=st.floats(-2, 2),
)
def test_a_two_piece_line_breaks_at_its_knot(knot, slopes, start):
    xs = [i / 10 for i in range(8)]
    ys = [start + slopes[0] * x + (slopes[1] - slopes[0]) * max(0.0, x - xs[knot]) for x in xs]
    assert break_point(xs, ys) == pytest.approx(xs[knot])


def test_too_few_points_have_no_break():
    assert break_point([0, 0.1, 0.2], [1, 1, 0]) is None


def test_twenty_unchanged_answers_do_not_prove_a_point_within_five_percent():
    """A bootstrap of 20 identical answers has no spread at all; Agresti-Min's interval keeps one."""
    answers = tuple(float(i % 3 != 0) for i in range(20))
    ids = tuple(map(str, range(20)))
    same = Documents(ids, answers, (1.0,) * 20)
    found = compare(same, same, higher_is_better=True)
    assert found.change == 0 and found.change_interval[0] < -0.05 < 0.05 < found.change_interval[1]
    assert verdict(found.harm, found.harm_lower, found.harm_upper, 0.05, 20).state == "undecided"
    many = Documents(tuple(map(str, range(2000))), answers * 100, (1.0,) * 2000)
    wide = compare(many, many, higher_is_better=True)
    assert verdict(wide.harm, wide.harm_lower, wide.harm_upper, 0.05, 2000).state == "within"
