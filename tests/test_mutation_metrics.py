"""sphere/evaluation/metrics.py: behaviour the mutation run (scripts/mutation.sh, docs/mutation.md) found
unasserted -- each test here fails on at least one mutant that the rest of the suite let through."""

from __future__ import annotations

import math

import pytest

from sphere.evaluation.metrics import (
    _binom_two_sided_p,
    majority_vote,
    normalize_answer,
    paired_accuracy_change,
    pass_at_k,
    pass_ks,
    summarize,
    wilson_ci,
)


@pytest.mark.parametrize("correct,n", [(-1, 5), (6, 5), (0, -1), (3, 2)])
def test_wilson_refuses_impossible_counts_naming_them(correct, n):
    with pytest.raises(ValueError, match=rf"wilson_ci: need 0 <= correct <= n, got correct={correct}, n={n}"):
        wilson_ci(correct, n)


def test_pass_at_k_refuses_naming_the_values_and_is_1_when_every_draw_must_hit():
    with pytest.raises(ValueError, match=r"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n=4, c=5, k=1"):
        pass_at_k(4, 5, 1)
    # n - c < k: every k-subset holds a correct sample
    assert pass_at_k(5, 3, 3) == 1.0
    # n - c == k: exactly one all-wrong subset of C(5, 2) = 10
    assert pass_at_k(5, 3, 2) == pytest.approx(1 - 1 / 10)


@pytest.mark.parametrize("raw,key", [
    ("\\left(1, 2\\right)", "(1,2)"), ("3\\!000", "3000"), ("$5$", "5"), ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("\\tfrac{1}{2}", "\\frac{1}{2}"), ("7.", "7"), ("7..", "7"), (".5", ".5"), ("  ", None), (None, None),
    ("x.y", "x.y"), ("12 ", "12"), ("2X", "2X"), ("X.", "X"),
])
def test_normalize_answer(raw, key):
    assert normalize_answer(raw) == key


def test_majority_vote_counts_every_sample_and_skips_unanswered_ones():
    # None (no answer) neither stops the count nor votes
    assert majority_vote([None, "1", "2", "2"]) == 2
    assert majority_vote(["3", "4", "5", "4", "3", "3"]) == 0
    # a tie goes to the answer seen first
    assert majority_vote(["9", "8", "8", "9"]) == 0
    assert majority_vote([None, None]) is None


def test_pass_ks_stops_below_n():
    assert pass_ks(8) == [1, 2, 4, 8]
    assert pass_ks(6) == [1, 2, 4, 6]
    assert pass_ks(1) == [1]


def _rec(verdicts, extracted, finish, maj=None):
    r = {"verdicts": verdicts, "extracted": extracted, "finish": finish}
    if maj is not None:
        r["maj_verdict"] = maj
    return r


def test_summarize_counts_sample_zero_of_each_problem():
    recs = [
        _rec([True, False], ["1", None], ["answer", "length"], maj=True),
        _rec([False, True], [None, "2"], ["length", "answer"], maj=False),
        _rec([False, False], ["3", "3"], ["overflow", "answer"], maj=False),
    ]
    s = summarize(recs, 2)
    lo, hi = wilson_ci(1, 3)
    assert s == {"n": 3, "correct": 1, "accuracy": pytest.approx(1 / 3), "ci95_low": lo, "ci95_high": hi,
                 "samples": 2, "no_answer": 1, "truncated": 1, "overflow": 1,
                 "pass@1": pytest.approx(1 / 3), "pass@2": pytest.approx(2 / 3),
                 "maj@2": pytest.approx(1 / 3), "maj@2_correct": 1}


def test_summarize_one_sample_has_no_pass_at_k_and_empty_is_zero():
    s = summarize([_rec([True], ["1"], ["overflow"])], 1)
    assert "pass@1" not in s and "maj@1" not in s and s["overflow"] == 1 and s["accuracy"] == 1.0
    e = summarize([], 4)
    assert e["accuracy"] == 0.0 and e["n"] == 0 and "pass@1" not in e


@pytest.mark.parametrize("k,n,p", [(0, 0, 1.0), (0, 1, 1.0), (0, 5, 2 / 32), (1, 5, 2 * 6 / 32),
                                   (5, 5, 2 / 32), (2, 5, 1.0), (0, 10, 2 / 1024), (3, 10, 2 * 176 / 1024)])
def test_mcnemar_exact_two_sided_p(k, n, p):
    assert _binom_two_sided_p(k, n) == pytest.approx(p)


def test_paired_change_empty_and_refusals():
    assert paired_accuracy_change([], []) == {
        "n": 0, "before": 0.0, "after": 0.0, "delta": 0.0, "gained": 0, "lost": 0, "ci_low": 0.0,
        "ci_high": 0.0, "level": 0.95, "mcnemar_p": 1.0, "excludes_zero": False}
    with pytest.raises(ValueError, match=r"paired_accuracy_change: 2 verdicts before, 1 after; "
                                         r"a paired interval needs the same problems"):
        paired_accuracy_change([True, False], [True])
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=rf"paired_accuracy_change: level={bad}; allowed \(0, 1\)"):
            paired_accuracy_change([True], [False], level=bad)


def test_paired_change_counts_and_defaults():
    before = [True, True, False, False, False, True, False, False, False, False]
    after = [True, False, True, True, True, True, True, False, False, True]
    r = paired_accuracy_change(before, after)
    assert (r["n"], r["gained"], r["lost"]) == (10, 5, 1)
    assert r["before"] == pytest.approx(0.3) and r["after"] == pytest.approx(0.7)
    assert r["delta"] == pytest.approx(0.4) and r["level"] == 0.95
    assert r["mcnemar_p"] == pytest.approx(_binom_two_sided_p(1, 6)) == pytest.approx(14 / 64)
    assert r["ci_low"] <= r["delta"] <= r["ci_high"]
    # the documented defaults (n_boot=10000, seed=0): deterministic, and not seeded from entropy
    assert r == paired_accuracy_change(before, after, n_boot=10000, seed=0)
    assert r == paired_accuracy_change(before, after)
    assert r["excludes_zero"] == (r["ci_low"] > 0 or r["ci_high"] < 0)


def test_paired_change_interval_matches_the_bootstrap_of_the_shares():
    """The interval is the quantiles of (gained - lost) / n over multinomial draws of the three shares."""
    import numpy as np

    before = [False] * 6 + [True] * 2 + [True] * 12
    after = [True] * 6 + [False] * 2 + [True] * 12
    r = paired_accuracy_change(before, after, n_boot=4000, seed=3)
    draws = np.random.default_rng(3).multinomial(20, [6 / 20, 2 / 20, 12 / 20], size=4000)
    boot = (draws[:, 0] - draws[:, 1]) / 20
    assert (r["ci_low"], r["ci_high"]) == tuple(float(x) for x in np.quantile(boot, [0.025, 0.975]))
    # the defaults: seed 0, 10000 draws
    before, after = [False] * 53 + [True] * 31 + [False] * 116, [True] * 53 + [False] * 31 + [False] * 116
    r = paired_accuracy_change(before, after)
    draws = np.random.default_rng(0).multinomial(200, [53 / 200, 31 / 200, 116 / 200], size=10000)
    boot = (draws[:, 0] - draws[:, 1]) / 200
    assert (r["ci_low"], r["ci_high"]) == tuple(float(x) for x in np.quantile(boot, [0.025, 0.975]))
    other = np.random.default_rng(1).multinomial(200, [53 / 200, 31 / 200, 116 / 200], size=10000)
    assert (r["ci_low"], r["ci_high"]) != tuple(
        float(x) for x in np.quantile((other[:, 0] - other[:, 1]) / 200, [0.025, 0.975]))


@pytest.mark.parametrize("lo_hi,excl", [((0.05, 0.3), True), ((-0.3, -0.05), True), ((-0.1, 0.2), False),
                                        ((0.0, 0.2), False), ((-0.2, 0.0), False), ((0.5, 0.9), True)])
def test_excludes_zero_is_strict_on_both_ends(monkeypatch, lo_hi, excl):
    import numpy as np

    monkeypatch.setattr(np, "quantile", lambda boot, qs: np.array(lo_hi))
    r = paired_accuracy_change([True, False, False], [True, True, False])
    assert r["excludes_zero"] is excl


def test_paired_change_all_gained_is_excluded_from_zero():
    r = paired_accuracy_change([False] * 30, [True] * 30)
    assert r["excludes_zero"] is True and r["ci_low"] == r["ci_high"] == 1.0
    assert r["mcnemar_p"] == pytest.approx(2 / 2**30)
    assert math.isclose(r["after"], 1.0) and r["before"] == 0.0


def test_mcnemar_p_with_more_than_1023_discordant_problems():
    """A large benchmark (MATH: 5000 problems) can have over 1023 discordant problems: 2.0**n overflowed
    there (OverflowError from the run summary); the tail is computed over integers."""
    assert _binom_two_sided_p(600, 1200) == pytest.approx(1.0)
    assert 0.0 < _binom_two_sided_p(500, 1200) < 1e-7
    n = 3000
    before = [False] * 700 + [True] * 500 + [False] * (n - 1200)
    after = [True] * 700 + [False] * 500 + [False] * (n - 1200)
    r = paired_accuracy_change(before, after)
    assert r["gained"] == 700 and r["lost"] == 500 and r["mcnemar_p"] < 1e-7 and r["excludes_zero"]


def test_paired_change_default_draws_on_a_large_benchmark():
    """On a fine-grained bootstrap distribution (3000 problems) the percentiles depend on every draw: the
    default is exactly 10000 draws of seed 0."""
    import numpy as np

    n = 3000
    before = [False] * 700 + [True] * 500 + [False] * (n - 1200)
    after = [True] * 700 + [False] * 500 + [False] * (n - 1200)
    r = paired_accuracy_change(before, after)
    draws = np.random.default_rng(0).multinomial(n, [700 / n, 500 / n, 1800 / n], size=10000)
    want = tuple(float(x) for x in np.quantile((draws[:, 0] - draws[:, 1]) / n, [0.025, 0.975]))
    assert (r["ci_low"], r["ci_high"]) == want


def test_wilson_one_success_has_a_positive_lower_end():
    lo, hi = wilson_ci(1, 10)
    assert lo == pytest.approx(0.01787, abs=1e-5) and hi == pytest.approx(0.40415, abs=1e-5)
