"""sphere/rewards/ (symbolic, prm, shared_prefix, mini_world, rollout): the step scores the search ranks by,
asserted value by value (the mutation run, scripts/mutation.sh / docs/mutation.md; each test fails on a
mutant the rest of the suite let through)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from sphere.rewards.symbolic import SymbolicStepScorer


@pytest.mark.parametrize("step, score", [
    ("3 * 12 = 36", 1.0), ("3 * 12 = 37", 0.0), ("2 + 3 = 5. Then 4 + 4 = 9.", 0.5), ("2 + 3 = 5 = 5", 1.0),
    ("2 + 3 = 5 = 6", 0.5), ("The answer is \\boxed{5}.", 0.5), ("10 / 3 = 3.33", 1.0), ("10 / 3 = 3.4", 0.0),
    ("2 / 3 = 0.67", 1.0), ("2 / 3 = 0.66", 1.0), ("2 / 3 = 0.6", 1.0), ("2 / 3 = 0.5", 0.0),
    ("x + 3 = 5", 0.5), ("2x = 6", 0.5), ("1,000 + 1 = 1,001", 1.0), ("3 x 4 = 12", 1.0),
    ("\\sqrt{2} \\approx 1.41", 1.0), ("\\sqrt{2} = 1.5", 0.0), ("2^{2^{100}} = 1", 0.5),
    ("<<48/2=24>> 48 / 2 = 24", 1.0), ("3 * 12 apples = 36", 1.0), ("$5 + $5 = $10", 1.0),
])
def test_step_scores(step, score):
    assert SymbolicStepScorer().step_score(step) == score


def test_settings_and_their_bounds():
    s = SymbolicStepScorer(OmegaConf.create({"scorer": {"neutral_score": 0.25, "decimal_tolerance": False,
                                                          "max_bits": 64, "max_equations": 1}}))
    assert (s.neutral_score, s.decimal_tolerance, s.max_bits, s.max_equations) == (0.25, False, 64, 1)
    assert s.step_score("no equation") == 0.25
    assert s.step_score("10 / 3 = 3.33") == 0.0  # no decimal tolerance
    assert s.step_score("1 + 1 = 2. So 1 + 1 = 3") == 1.0  # one equation checked
    assert s.step_score("2^{70} = 2^{70}") == 0.25  # over 64 bits: skipped
    d = SymbolicStepScorer()
    assert (d.neutral_score, d.decimal_tolerance, d.max_bits, d.max_equations) == (0.5, True, 4096, 64)
    assert SymbolicStepScorer(neutral_score=0.0).neutral_score == 0.0
    assert SymbolicStepScorer({"neutral_score": 1.0}).neutral_score == 1.0
    for bad in [dict(neutral_score=-0.01), dict(neutral_score=1.01)]:
        with pytest.raises(ValueError, match=r"scorer\.neutral_score must be in \[0, 1\]"):
            SymbolicStepScorer(**bad)
    for bad in [dict(max_bits=63), dict(max_equations=0)]:
        with pytest.raises(ValueError, match="max_bits must be >= 64 and scorer.max_equations >= 1"):
            SymbolicStepScorer(**bad)
    SymbolicStepScorer(max_bits=64, max_equations=1)


def test_score_counts_calls_and_steps():
    s = SymbolicStepScorer()
    assert s.score([("p", ["1 + 1 = 2", "1 + 1 = 3"]), ("q", ["prose"])]) == [[1.0, 0.0], [0.5]]
    assert s.stats() == {"scorer/calls": 1, "scorer/steps": 3}
    s.score([("p", ["a"])])
    assert s.stats() == {"scorer/calls": 2, "scorer/steps": 4}
