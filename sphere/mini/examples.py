"""The mini world's exact grading and extra training data, shared by `sphere pretrain-mini`, the stand-in
builds and the mini experiments: the last ``\\boxed{}`` answer and its exact match (``boxed_answer``,
``is_correct``), wrong equations in a text (``equation_slips``), arithmetic drills (``drill_examples``)
and harder-world problems for the easy-to-hard recipes (``hard_world``, ``hard_examples``).
"""

from __future__ import annotations

import re

from sphere.mini.world import STEP_DELIMITER, WorldSpec, generate_problems, plant_slips, training_problems

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_EQ = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def boxed_answer(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (stripped), or None."""
    m = _BOXED.findall(text)
    return m[-1].strip() if m else None


def is_correct(completion: str, gold: str) -> bool:
    """Exact match of the last boxed answer with the integer gold answer."""
    a = boxed_answer(completion)
    return a is not None and a == str(gold).strip()


def equation_slips(text: str) -> tuple[int, int]:
    """(equations, wrong equations) among ``a op b = c`` in ``text`` (exact integer arithmetic)."""
    n = bad = 0
    for a, op, b, c in _EQ.findall(text):
        a, b, c = int(a), int(b), int(c)
        ok = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op] == c
        n += 1
        bad += not ok
    return n, bad


DRILL_PROBLEM = "Compute."


def drill_examples(n: int, per: int, seed: int, world, slip_rate: float = 0.0,
                   slip_kinds: tuple[str, ...] = ("carry",)) -> list[dict]:
    """``n`` arithmetic drills: the prompt's problem is "Compute.", the solution ``per`` equations
    ``a op b = c.`` (delimiter-separated) taken from freshly generated problems of the same world. A word
    problem has ~8 answer digits in ~120 tokens; a drill has ~25: the tiny model learns the arithmetic
    several times faster per CPU second. The model never sees this prompt at evaluation. ``slip_rate``:
    the source solutions carry the recipe's planted slips (sphere.mini.world.plant_slips), so drills and
    word problems teach the same arithmetic."""
    if n <= 0:
        return []
    eq = re.compile(r"(\d+ [-+*/] \d+ = \d+)")
    pool: list[str] = []
    src = generate_problems(
        n * per // 2 + 8, seed, id_prefix="mini-drill-src", **{**world.to_dict(), "ops": world.ops}
    )
    src = plant_slips(src, slip_rate, seed + 17, world.max_value, slip_kinds)
    for p in src:
        pool += eq.findall(p["solution"])
    out = []
    for i in range(n):
        eqs = [pool[(i * per + j) % len(pool)] + "." for j in range(per)]
        out.append({"id": f"mini-drill-{i}", "problem": DRILL_PROBLEM, "solution": STEP_DELIMITER.join(eqs)})
    return out


def hard_world(world, overrides):
    """``world`` with the fields of ``overrides`` (a mapping of WorldSpec fields) replaced."""
    return WorldSpec.from_mapping({**world.to_dict(), **dict(overrides or {})})


def hard_examples(tr: dict, world, seed: int) -> list[dict]:
    """``train.hard_n`` extra clean training problems from the harder world ``world`` + ``train.hard_world``
    (e.g. ``{min_steps: 5, max_steps: 6}``), disjoint from that world's held-out test/dev splits (first
    ``train.hard_holdout`` problems of each). The easy-to-hard recipes (conf/mini/honest*.yaml) show the
    policy a few harder problems, so that it solves them sometimes when sampling but not reliably greedily.
    0 (the default) adds nothing."""
    n = int(tr.get("hard_n", 0) or 0)
    if n <= 0:
        return []
    hw = hard_world(world, tr.get("hard_world"))
    probs = training_problems(n, seed + 29, hw, holdout=int(tr.get("hard_holdout", 2000)))
    return [{**p, "id": p["id"].replace("mini-train", "mini-train-hard")} for p in probs]
