"""The mini world generator: determinism, the step format of the real pipeline, the difficulty knobs."""

from __future__ import annotations

import re

import pytest

from sphere.mini.world import (
    MINI_PROMPT_TEMPLATE,
    SPLIT_SEEDS,
    STEP_DELIMITER,
    WorldSpec,
    format_prompt,
    generate_problems,
    load_mini_benchmark,
    plant_slips,
    training_problems,
)

EQ = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def _check(rec: dict, w: WorldSpec) -> None:
    steps = rec["solution"].split(STEP_DELIMITER)
    assert w.min_steps + 1 <= len(steps) <= w.max_steps + 1
    assert steps[-1] == f"The answer is \\boxed{{{rec['answer']}}}."
    prev = None
    for s in steps[:-1]:
        eqs = EQ.findall(s)
        assert len(eqs) == 1, s  # exactly one equation per step: what the symbolic checker scores
        a, op, b, c = eqs[0]
        a, b, c = int(a), int(b), int(c)
        assert op in w.ops
        assert {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op] == c
        if op == "/":
            assert a % b == 0  # exact division only
        assert 1 <= c <= w.max_value
        if prev is not None:
            assert a == prev  # a chain: each step starts from the last result
        prev = c
        assert "\n" not in s
    assert int(rec["answer"]) == prev


def test_deterministic_and_seed_dependent():
    a = generate_problems(50, seed=3)
    assert a == generate_problems(50, seed=3)
    assert a != generate_problems(50, seed=4)
    assert [p["id"] for p in a[:2]] == ["mini-0", "mini-1"]


def test_reference_solutions_have_the_pipeline_step_format():
    w = WorldSpec()
    for rec in generate_problems(300, seed=11):
        assert set(rec) == {"id", "problem", "answer", "solution", "source"}
        _check(rec, w)


@pytest.mark.parametrize(
    "kw",
    [
        dict(min_steps=1, max_steps=1, ops=("+",)),
        dict(min_steps=3, max_steps=5, max_operand=20, max_value=200),
        dict(ops=("*", "/"), max_factor=3, min_steps=2, max_steps=2),
        dict(ops=("-", "+"), max_operand=999, max_value=999),
    ],
)
def test_knobs_are_respected(kw):
    w = WorldSpec(**{k: tuple(v) if k == "ops" else v for k, v in kw.items()})
    for rec in generate_problems(200, seed=5, **kw):
        _check(rec, w)


def test_all_ops_and_step_counts_occur():
    recs = generate_problems(400, seed=0)
    ops = {m[1] for r in recs for m in EQ.findall(r["solution"])}
    assert ops == {"+", "-", "*", "/"}
    counts = {len(r["solution"].split(STEP_DELIMITER)) - 1 for r in recs}
    assert counts == {2, 3, 4}


@pytest.mark.parametrize(
    "kw, key",
    [
        (dict(ops=("^",)), "ops"),
        (dict(min_steps=3, max_steps=2), "min_steps"),
        (dict(max_operand=5), "max_operand"),
        (dict(max_factor=1), "max_factor"),
    ],
)
def test_bad_knobs_name_the_key(kw, key):
    with pytest.raises(ValueError, match=key):
        WorldSpec(**kw)
    with pytest.raises(ValueError, match="unknown key"):
        WorldSpec.from_mapping({"steps": 3})


def test_held_out_split_is_fixed_and_disjoint_from_training():
    test = load_mini_benchmark("test", 500)
    assert len(test) == 500 and test[0]["id"] == "mini-test-0"
    assert test == load_mini_benchmark("test", 500)
    assert load_mini_benchmark("test", 10) == test[:10]  # a prefix: `limit` never changes the problems
    train = training_problems(3000, seed=1)
    held = {p["problem"] for p in test}
    assert not held & {p["problem"] for p in train}
    with pytest.raises(ValueError, match="reserved"):
        training_problems(5, seed=SPLIT_SEEDS["test"])
    with pytest.raises(ValueError, match="allowed"):
        load_mini_benchmark("train", 5)


def test_prompt_template():
    assert format_prompt("X?") == "Problem: X?\n\nSolution:\n"
    assert MINI_PROMPT_TEMPLATE.endswith("\n")


def test_prompt_family_mini_matches_the_training_template():
    from sphere.prompts import load_family

    fam = load_family("mini")
    assert fam["template"].format(problem="Q", instruction="", system="") + fam[
        "assistant_prefix"
    ] == format_prompt("Q")
    assert fam["step_delimiter"] == STEP_DELIMITER


def test_recipes_train_on_the_default_world():
    """Evaluation (load_mini_benchmark) and generation (training_problems) use WorldSpec's defaults, so the
    shipped recipes must train on exactly that world."""
    from sphere.mini import load_recipe

    for which in ("policy", "small"):
        assert WorldSpec.from_mapping(load_recipe(which)["world"]) == WorldSpec()


def _slip_expected(op: str, a: int, b: int) -> int:
    c = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
    if op == "-" and a % 10 < b % 10:
        return c + 10  # forgot to borrow
    if op == "+" and a % 10 + b % 10 >= 10:
        return c - 10  # forgot to carry
    return c


def test_plant_slips_writes_the_misconception_and_keeps_chains_consistent():
    w = WorldSpec()
    probs = generate_problems(600, seed=11)
    planted = plant_slips(probs, 1.0, seed=3, max_value=w.max_value)
    assert plant_slips(probs, 1.0, seed=3) == planted  # deterministic
    assert plant_slips(probs, 0.0, seed=3) == probs  # rate 0: unchanged
    changed = 0
    for p, q in zip(probs, planted):
        assert q["problem"] == p["problem"] and q["id"] == p["id"]  # texts never change
        if q is p:
            continue
        changed += 1
        steps = q["solution"].split(STEP_DELIMITER)
        assert steps[-1] == f"The answer is \\boxed{{{q['answer']}}}."
        prev, wrong = None, 0
        for s in steps[:-1]:
            a, op, b, c = EQ.findall(s)[0]
            a, b, c = int(a), int(b), int(c)
            if prev is not None:
                assert a == prev  # the chain continues from the written (slipped) value
            assert c == _slip_expected(op, a, b) and 1 <= c <= w.max_value
            wrong += c != {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
            prev = c
        assert wrong >= 1 and int(q["answer"]) == prev
    assert changed > 150  # about half of the problems have a borrow or a carry


def test_plant_slips_rate_is_the_share_of_solutions_and_is_checked():
    probs = generate_problems(2000, seed=12)
    full = sum(q is not p for p, q in zip(probs, plant_slips(probs, 1.0, seed=1)))
    half = sum(q is not p for p, q in zip(probs, plant_slips(probs, 0.5, seed=1)))
    assert abs(half / full - 0.5) < 0.07
    with pytest.raises(ValueError, match="slip_rate"):
        plant_slips(probs, 1.5, seed=1)


def test_plant_slips_divide_kind_writes_products_for_divisions():
    probs = generate_problems(800, seed=13)
    planted = plant_slips(probs, 1.0, seed=2, kinds=["divide"])
    changed = 0
    for p, q in zip(probs, planted):
        if q is p:
            continue
        changed += 1
        prev = None
        for s in q["solution"].split(STEP_DELIMITER)[:-1]:
            a, op, b, c = EQ.findall(s)[0]
            a, b, c = int(a), int(b), int(c)
            if prev is not None:
                assert a == prev
            assert c == (a * b if op == "/" else {"+": a + b, "-": a - b, "*": a * b}[op])
            prev = c
        assert int(q["answer"]) == prev and " / " in q["solution"]
    assert changed > 80
    with pytest.raises(ValueError, match="slip_kinds"):
        plant_slips(probs, 0.5, seed=1, kinds=["typo"])
