"""The mini world's exact step verifier (scorer=mini_world): reference solutions score 1.0 everywhere, a
copied operand / arithmetic slip / wrong answer scores 0.0 from that step on, other problems are refused."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from sphere.mini.world import STEP_DELIMITER, WorldSpec, generate_problems
from sphere.rewards import StepScorer, make_scorer
from sphere.rewards.mini_world import MiniWorldStepScorer, reference_chain
from sphere.rewards.symbolic import SymbolicStepScorer

PROBLEMS = generate_problems(400, seed=11, min_steps=2, max_steps=6)


def test_reference_solutions_score_one_on_every_step():
    sc = MiniWorldStepScorer()
    assert isinstance(sc, StepScorer)
    items = [(p["problem"], p["solution"].split(STEP_DELIMITER)) for p in PROBLEMS]
    for (_, steps), scores in zip(items, sc.score(items), strict=True):
        assert scores == [1.0] * len(steps)
    # every template occurs (product start, all four ops), so the parser covers the world's grammar
    assert any(" has " in p["problem"] and " each." in p["problem"] for p in PROBLEMS)
    ops = {op for p in PROBLEMS for _, op, _, _ in reference_chain(p["problem"])}
    assert ops == {"+", "-", "*", "/"}
    assert all(str(reference_chain(p["problem"])[-1][3]) == p["answer"] for p in PROBLEMS)


def test_copied_operand_is_wrong_here_and_right_for_the_symbolic_checker():
    p = next(q for q in PROBLEMS
             if len(q["solution"].split(STEP_DELIMITER)) >= 4 and " each." not in q["problem"])
    steps = p["solution"].split(STEP_DELIMITER)
    a, op, b, c = reference_chain(p["problem"])[1]
    wrong_b = b + 1 if op != "/" else b  # keep the division exact: change the left operand instead
    wrong_a = a if op != "/" else a * 2
    from sphere.mini.world import apply_op

    bad = steps[1].split(", so ")[0] + f", so {wrong_a} {op} {wrong_b} = {apply_op(op, wrong_a, wrong_b)}."
    path = steps[:1] + [bad] + steps[2:]
    assert MiniWorldStepScorer().score_steps(p["problem"], path) == [1.0] + [0.0] * (len(path) - 1)
    # the symbolic checker only sees that the arithmetic holds
    assert SymbolicStepScorer().score([(p["problem"], path)])[0][1] == 1.0


def test_slip_and_wrong_answer_and_extra_step():
    p = PROBLEMS[0]
    steps = p["solution"].split(STEP_DELIMITER)
    sc = MiniWorldStepScorer()
    slip = steps[0][: steps[0].rindex("=")] + "= 999."
    assert sc.score_steps(p["problem"], [slip] + steps[1:])[0] == 0.0
    wrong_answer = steps[:-1] + ["The answer is \\boxed{100000}."]
    assert sc.score_steps(p["problem"], wrong_answer) == [1.0] * (len(steps) - 1) + [0.0]
    assert sc.score_steps(p["problem"], steps + ["More text."])[-1] == 0.0
    assert sc.score_steps(p["problem"], ["Some prose without an equation."]) == [0.0]
    assert sc.score_steps(p["problem"], []) == []


def test_other_problems_are_refused_naming_what_to_use():
    with pytest.raises(ValueError, match="mini-world problems.*scorer=symbolic"):
        MiniWorldStepScorer().score([("What is 2 + 3?", ["2 + 3 = 5."])])


def test_flip_rate_flips_about_that_share_deterministically():
    items = [(p["problem"], p["solution"].split(STEP_DELIMITER)) for p in PROBLEMS]
    n = sum(len(s) for _, s in items)
    a = MiniWorldStepScorer({"flip_rate": 0.2, "seed": 3}).score(items)
    assert a == MiniWorldStepScorer({"flip_rate": 0.2, "seed": 3}).score(items)
    assert a != MiniWorldStepScorer({"flip_rate": 0.2, "seed": 4}).score(items)
    flipped = sum(x == 0.0 for row in a for x in row)
    assert 0.15 * n < flipped < 0.25 * n
    with pytest.raises(ValueError, match=r"scorer.flip_rate=0.7.*\[0, 0.5\]"):
        MiniWorldStepScorer({"flip_rate": 0.7})


def test_make_scorer_builds_it_from_the_shipped_config():
    cfg = OmegaConf.load("conf/scorer/mini_world.yaml")
    sc = make_scorer(cfg)
    assert isinstance(sc, MiniWorldStepScorer) and sc.flip_rate == 0.0


def test_harder_world_parses():
    world = {**WorldSpec(min_steps=5, max_steps=6).to_dict(), "ops": ("+", "-", "*", "/")}
    for p in generate_problems(100, seed=5, **world):
        assert MiniWorldStepScorer().score_steps(p["problem"], p["solution"].split(STEP_DELIMITER))[-1] == 1.0


def test_a_bad_flip_rate_fails_the_dry_run_before_any_work(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "sphere.cli", "run", "scorer=mini_world", "scorer.flip_rate=0.9",
                        "dry_run=true", f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode != 0 and "scorer.flip_rate=0.9" in p.stderr and "Traceback" not in p.stderr
