"""Symbolic step checker on correct and corrupted arithmetic steps; reward shaping; make_scorer."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from sphere.rewards import StepScorer, combine_outcome, make_scorer, shape_rewards
from sphere.rewards.symbolic import SymbolicStepScorer

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("SPHERE_DATA_DIR", ROOT / "data" / "benchmarks"))


@pytest.fixture(scope="module")
def scorer():
    return SymbolicStepScorer()


CORRECT = [
    "Tom has 3 boxes of 12 apples, so 3 * 12 = 36 apples.",
    "She gives away 5, so 36 - 5 = 31.",
    "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.",
    "80,000+50,000=$<<80000+50000=130000>>130,000",
    "The total is $\\frac{3}{4} \\times 8 = 6$.",
    "So 2^{10} = 1024",
    "Then 12 ÷ 4 − 1 = 2",
    "3 · 4 = 12 and 10 \\cdot 3 = 30",
    "3 x 4 = 12",
    "5! = 120",
    "(3 + 4) * 2 = 14",
    "\\sqrt{16} = 4",
    "-3 + 5 = 2",
    "2 + 3 = 5 = 5",
    "1.5 * 2 = 3.0",
    "10 / 3 = 3.33",  # rounded
    "2 / 3 = 0.66",  # truncated
    "\\sqrt{2} \\approx 1.414",
    "Therefore, the team won 22 – 7 = 15 games.",  # en dash as minus
    "He paid 25 / 1/3 = 75 dollars",  # tight fraction first
]

CORRUPTED = [
    "Tom has 3 boxes of 12 apples, so 3 * 12 = 35 apples.",
    "She gives away 5, so 36 - 5 = 32.",
    "Janet sells 16 - 3 - 4 = <<16-3-4=9>>8 duck eggs a day.",
    "80,000+50,000=$130,001",
    "The total is $\\frac{3}{4} \\times 8 = 7$.",
    "So 2^{10} = 1000",
    "3 x 4 = 13",
    "5! = 24",
    "(3 + 4) * 2 = 10",
    "10 / 3 = 3.4",  # neither rounded nor truncated
    "\\sqrt{2} \\approx 1.42",
    "Therefore, the team won 22 – 7 = 14 games.",
]

UNCHECKABLE = [
    "The answer is \\boxed{36}.",
    "First, find how many apples Tom has.",
    "x + 3 = 5",
    "x - 3 = 5",
    "2x = 6",
    "y = 2x + 3",
    "20% of 50 = 10",
    "12 = 3 times 4",
    "so 36 = 30 + x",
    "100 cents = $1",
    "15 gallons = 120 pints",
    "From 8:00 to 11:00 she works 11:00-8:00 = 3 hours",
    "He read for 4 / 3 = 1 and 1/3 hours",
    "It took 5 - 1 - 1/2 = 3 1/2 hours",
    "shoe size 25 + shoe size 5 = 30",
    "2^{2^{100}} = 1",  # too large to compute: skipped, not evaluated
    "10^{10^{10^{10}}} = 5",
]


@pytest.mark.parametrize("step", CORRECT)
def test_correct_steps_score_one(scorer, step):
    assert scorer.equations(step), step
    assert scorer.step_score(step) == 1.0


@pytest.mark.parametrize("step", CORRUPTED)
def test_corrupted_steps_score_zero(scorer, step):
    assert scorer.step_score(step) == 0.0


@pytest.mark.parametrize("step", UNCHECKABLE)
def test_uncheckable_steps_get_the_neutral_score(scorer, step):
    assert scorer.step_score(step) == 0.5
    assert SymbolicStepScorer(neutral_score=0.25).step_score(step) == 0.25


def test_share_of_equations_that_hold(scorer):
    assert scorer.step_score("2 + 3 = 5 = 6") == 0.5
    assert scorer.step_score("2 + 2 = 4, 3 + 3 = 6, 4 + 4 = 9 and then 1 + 1 = 3") == 0.5


def test_mini_world_solutions_and_their_corruptions(scorer):
    from sphere.mini.world import generate_problems

    rng = random.Random(0)
    for p in generate_problems(200, seed=3):
        steps = p["solution"].split("\n\n")
        scores = scorer.score([(p["problem"], steps)])[0]
        assert scores[:-1] == [1.0] * (len(steps) - 1), (steps, scores)
        assert scores[-1] == 0.5  # "The answer is \boxed{N}."
        # corrupt one equation's result
        k = rng.randrange(len(steps) - 1)
        head, _, tail = steps[k].rpartition("= ")
        value = tail.rstrip(".")
        bad = f"{head}= {int(value) + rng.choice([-2, -1, 1, 7])}."
        assert scorer.step_score(bad) == 0.0, bad


@settings(max_examples=200, deadline=None)
@given(
    a=st.integers(-10**6, 10**6),
    b=st.integers(-10**6, 10**6).filter(lambda x: x != 0),
    op=st.sampled_from(["+", "-", "*", "/"]),
    delta=st.integers(1, 50),
)
def test_random_arithmetic_correct_and_off_by_delta(a, b, op, delta):
    from fractions import Fraction

    s = SymbolicStepScorer()
    val = {"+": Fraction(a + b), "-": Fraction(a - b), "*": Fraction(a * b), "/": Fraction(a, b)}[op]
    rhs = f"\\frac{{{val.numerator}}}{{{val.denominator}}}" if val.denominator != 1 else str(val.numerator)
    lhs = f"{a} {op} ({b})"
    assert s.step_score(f"Thus: {lhs} = {rhs} items") == 1.0
    wrong = val + delta
    rhs_w = (f"\\frac{{{wrong.numerator}}}{{{wrong.denominator}}}" if wrong.denominator != 1
             else str(wrong.numerator))
    assert s.step_score(f"Thus: {lhs} = {rhs_w} items") == 0.0


@pytest.mark.parametrize(
    "step",
    ["9" * 5000 + " * 9 = 1", "(" * 5000 + "1" + ")" * 5000 + " = 1", "1 = " * 20000, "=" * 100_000,
     "2^2^2^2^2^2^2^2^2 = 1", "2^{2000} = \\sqrt{2}", bytes(range(256)).decode("latin-1") * 300],
)
@pytest.mark.timeout(60)  # a hang fails the test (pytest-timeout); no wall-clock assertion
def test_hostile_steps_are_bounded(scorer, step):
    v = scorer.step_score(step)
    assert 0.0 <= v <= 1.0


@pytest.mark.skipif(not (DATA / "gsm8k" / "test.jsonl").is_file(), reason="GSM8K test file not found")
def test_gsm8k_reference_steps_almost_all_hold(scorer, capsys):
    """Real data: GSM8K test reference solutions (human-written, so a few typos are real errors)."""
    held = wrong = neutral = 0
    for line in open(DATA / "gsm8k" / "test.jsonl", encoding="utf-8"):
        sol = json.loads(line)["solution"]
        for step in sol.split("\n"):
            verdicts = [v for v in (scorer.holds(a, b) for a, b in scorer.equations(step)) if v is not None]
            if not verdicts:
                neutral += 1
            elif all(verdicts):
                held += 1
            else:
                wrong += 1
    rate = held / (held + wrong)
    with capsys.disabled():
        print(f"\nGSM8K test steps: {held} hold, {wrong} flagged, {neutral} without a checkable equation "
              f"({rate:.2%} of checked steps hold)")
    assert held > 2500
    assert rate >= 0.995


def test_scorer_protocol_and_shapes(scorer):
    assert isinstance(scorer, StepScorer)
    out = scorer.score([("p", ["1 + 1 = 2", "so 2 * 3 = 7", "The answer is \\boxed{6}."]), ("q", [])])
    assert out == [[1.0, 0.0, 0.5], []]


def test_shape_rewards():
    s = [0.9, 0.6, 0.8, 0.3]
    assert shape_rewards(s, "raw") == s
    adv = shape_rewards(s, "advantage")
    assert adv[0] == 0.9 and adv[1:] == pytest.approx([-0.3, 0.2, -0.5])
    assert sum(adv) == pytest.approx(s[-1])  # the paper's rewards telescope to the last score
    assert shape_rewards(s, "min") == [0.9, 0.6, 0.6, 0.3]
    assert shape_rewards([], "advantage") == []
    with pytest.raises(ValueError, match="allowed raw, advantage, min"):
        shape_rewards(s, "sum")
    with pytest.raises(ValueError, match="not finite"):
        shape_rewards([float("nan")], "raw")


def test_combine_outcome():
    assert combine_outcome(0.3, True, "none", 1.0) == 0.3
    assert combine_outcome(0.3, True, "replace") == 1.0
    assert combine_outcome(0.9, False, "replace") == 0.0
    assert combine_outcome(0.4, True, "mix", 0.5) == pytest.approx(0.7)
    assert combine_outcome(0.4, False, "mix", 0.25) == pytest.approx(0.3)
    assert combine_outcome(0.4, True, "add", 2.0) == pytest.approx(2.4)
    assert combine_outcome(0.4, False, "add", 2.0) == pytest.approx(-1.6)
    with pytest.raises(ValueError, match="allowed none, replace, mix, add"):
        combine_outcome(0.4, True, "max")
    with pytest.raises(ValueError, match="0 <= w <= 1"):
        combine_outcome(0.4, True, "mix", 1.5)


def test_make_scorer_from_config_group():
    from sphere.schema import defaults
    from sphere.schema_scorers import SymbolicScorerSettings

    node = OmegaConf.load(ROOT / "conf" / "scorer" / "symbolic.yaml")  # name: symbolic, over its dataclass's defaults
    node = OmegaConf.merge(defaults(SymbolicScorerSettings), {k: v for k, v in node.items() if k != "defaults"})
    s = make_scorer(node)
    assert isinstance(s, SymbolicStepScorer) and s.neutral_score == node.neutral_score
    full = OmegaConf.create({"scorer": dict(OmegaConf.to_container(node), neutral_score=0.1)})
    assert make_scorer(full).neutral_score == 0.1
    with pytest.raises(ValueError, match="allowed symbolic, prm, rollout"):
        make_scorer(OmegaConf.create({"name": "oracle"}))
    with pytest.raises(ValueError, match="neutral_score"):
        SymbolicStepScorer(neutral_score=2.0)
