"""filters.chosen_min_step_score: a right answer reached through a step the scorer judges wrong is not a
chosen solution (issue #20: 35 of 81 chosen solutions of the honest mini policy had a wrong equation)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from sphere.generate.pairs import PairFilter, filter_pairs, make_pair
from sphere.rewards.symbolic import SymbolicStepScorer
from sphere.search.types import Trajectory

PROBLEM = {"id": "p1", "problem": "Tom has 3 boxes of 4 apples and eats 2. How many are left?",
           "answer": "10"}


def _traj(steps, correct, scorer):
    scores = [float(x) for x in scorer.score([(PROBLEM["problem"], steps)])[0]]
    return Trajectory(steps=steps, correct=correct, value=1.0 if correct else 0.0, rewards=scores,
                      scores=scores, finish="answer")


def _pair(chosen, rejected):
    return make_pair(stage=1, problem=PROBLEM, prompt="Problem: ...", chosen=chosen, rejected=rejected,
                     delimiter="\n\n", chosen_model="m", rejected_model="m", config_hash="h",
                     conversational=False)


def _cfg(**kw):
    base = {"dedup": True, "min_margin": 0.0, "min_edit_distance": 0.0, "max_length_ratio": 0.0}
    return OmegaConf.create({**base, **kw})


def test_a_chosen_solution_with_a_wrong_step_is_dropped():
    sc = SymbolicStepScorer(None)
    clean = _traj(["3 * 4 = 12", "12 - 2 = 10", "The answer is \\boxed{10}."], True, sc)
    slipped = _traj(["3 * 4 = 13", "13 - 2 = 10", "The answer is \\boxed{10}."], True, sc)  # right answer
    wrong = _traj(["3 * 4 = 12", "12 - 2 = 9", "The answer is \\boxed{9}."], False, sc)
    assert min(slipped.scores) == 0.0 and min(clean.scores) >= 0.5  # the checker sees the slip
    pairs = [_pair(clean, wrong), _pair(slipped, wrong)]
    assert pairs[1]["chosen_scores"] == slipped.scores and pairs[1]["rejected_scores"] == wrong.scores

    kept, drops = filter_pairs(pairs, PairFilter.from_cfg(_cfg(chosen_min_step_score=0.5)))
    assert [p["chosen"] for p in kept] == [pairs[0]["chosen"]] and drops["chosen_step_score"] == 1

    kept, drops = filter_pairs(pairs, PairFilter.from_cfg(_cfg()))  # off by default (field absent: 0)
    assert len(kept) == 2 and drops["chosen_step_score"] == 0


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_threshold_outside_0_1_is_refused(bad):
    with pytest.raises(ValueError, match=r"filters.chosen_min_step_score=.*allowed \[0, 1\]"):
        PairFilter.from_cfg(_cfg(chosen_min_step_score=bad))


def test_the_shipped_config_documents_and_disables_it():
    from sphere.schema import (  # the filters' type, default and doc (generate.yaml composes them)
        FiltersSettings,
        doc,
    )

    assert FiltersSettings().chosen_min_step_score == 0.0 and "0 = off" in doc("filters.chosen_min_step_score")
