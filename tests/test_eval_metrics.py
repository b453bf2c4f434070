"""Wilson interval, unbiased pass@k, majority vote and the per-benchmark summary."""

from __future__ import annotations

from itertools import combinations
from math import comb

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sphere.evaluation.metrics import majority_vote, pass_at_k, pass_ks, summarize, wilson_ci


def test_wilson_known_values():
    lo, hi = wilson_ci(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_ci(50, 100)
    assert (lo, hi) == (pytest.approx(0.4038, abs=1e-4), pytest.approx(0.5962, abs=1e-4))
    lo, hi = wilson_ci(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-4)
    assert wilson_ci(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_ci(3, 2)


@given(st.integers(1, 200).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n))))
def test_wilson_contains_the_point_estimate(nc):
    n, c = nc
    lo, hi = wilson_ci(c, n)
    assert 0.0 <= lo <= c / n <= hi <= 1.0


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_equals_the_exact_combinatorial_probability(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            samples = [1] * c + [0] * (n - c)
            subsets = list(combinations(range(n), k))
            exact = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
            assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_pass_at_1_is_the_fraction_correct():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_majority_vote():
    assert majority_vote(["1", "2", "2", None]) == 1
    assert majority_vote(["3", "4"]) == 0  # tie -> first seen
    assert majority_vote([None, None]) is None
    assert majority_vote(["\\frac{1}{2}", "7", "\\dfrac{1}{2}", " \\frac{1}{2} "]) == 0
    assert majority_vote(["x", "\\left(1,2\\right)", "(1, 2)"]) == 1


def test_pass_ks():
    assert pass_ks(1) == [1]
    assert pass_ks(8) == [1, 2, 4, 8]
    assert pass_ks(6) == [1, 2, 4, 6]


def test_summarize_sampled():
    recs = [
        {"verdicts": [True, False, True, True], "extracted": ["1", "2", "1", "1"], "finish": ["eos"] * 4,
         "maj_verdict": True},
        {"verdicts": [False, False, False, True], "extracted": [None, "5", "5", "3"],
         "finish": ["length"] * 4,
         "maj_verdict": False},
    ]
    s = summarize(recs, 4)
    assert (s["n"], s["correct"], s["accuracy"]) == (2, 1, 0.5)
    assert s["pass@1"] == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert s["pass@4"] == 1.0
    assert s["maj@4"] == 0.5 and s["maj@4_correct"] == 1
    assert s["no_answer"] == 1 and s["truncated"] == 1
    assert s["ci95_low"] < 0.5 < s["ci95_high"]
