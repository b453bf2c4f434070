"""The mini world: multi-step arithmetic word problems with exact integer answers.

Every problem is a chain: a starting amount, then ``steps`` operations (+, -, *, exact /) applied to a
running total. The reference solution uses the real pipeline's step format — one sentence per step,
each with exactly one ``a op b = c`` equation (what the symbolic step checker verifies), steps
separated by ``"\\n\\n"``, a final step ``The answer is \\boxed{N}.`` — so search, scoring, pairs and
DPO run the same code as for MATH.

Generation is a pure function of ``(n, seed, knobs)`` (``random.Random(seed)``, stable across
Python versions). The held-out test split uses a fixed seed that no training recipe uses, and
training sets drop any problem whose text appears in the test split.

    >>> p = generate_problems(1, seed=0)[0]
    >>> sorted(p)  # doctest: +SKIP
    ['answer', 'id', 'problem', 'solution', 'source']
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field

# The mini family's prompt (plain text, no chat template). The mini models are trained on exactly
# this string followed by the solution, so sphere.prompts' "mini" family must produce it verbatim.
# It ends on "\n", a token boundary of the mini tokenizer, so prompt ids + solution ids equal the
# ids of the concatenated text.
MINI_PROMPT_TEMPLATE = "Problem: {problem}\n\nSolution:\n"
STEP_DELIMITER = "\n\n"

# Fixed seeds of the splits. Training recipes use their own seed (conf/mini/*.yaml `seed`), and the
# generator refuses those below for "train".
SPLIT_SEEDS = {"test": 1_000_003, "dev": 1_000_033}
OPS = ("+", "-", "*", "/")

_NAMES = [
    ("Sam", "he"),
    ("Mia", "she"),
    ("Leo", "he"),
    ("Ava", "she"),
    ("Ben", "he"),
    ("Zoe", "she"),
    ("Max", "he"),
    ("Lily", "she"),
    ("Tom", "he"),
    ("Emma", "she"),
    ("Noah", "he"),
    ("Ruby", "she"),
]
_ITEMS = ["marbles", "apples", "stickers", "coins", "cards", "books", "shells", "stamps", "pens", "beads"]
_BOXES = ["bags", "boxes", "jars", "packs", "baskets", "cups"]
# op -> list of (problem sentence, solution step prefix). {N}=name {P}=pronoun {I}=item {b}=operand.
# Steps are short on purpose: every token costs CPU time in training, search and evaluation.
PHRASES: dict[str, list[tuple[str, str]]] = {
    "+": [
        ("Then {P} finds {b} more.", "{N} finds {b} more"),
        ("Then {P} gets {b} more from a friend.", "{N} gets {b} more"),
        ("Then {P} buys {b} more.", "{N} buys {b} more"),
    ],
    "-": [
        ("Then {P} gives away {b}.", "{N} gives away {b}"),
        ("Then {P} loses {b}.", "{N} loses {b}"),
        ("Then {P} sells {b}.", "{N} sells {b}"),
    ],
    "*": [
        ("Then the number of {I} becomes {b} times as large.", "The number grows {b} times"),
        ("Then {P} makes {b} times as many.", "{N} makes {b} times as many"),
    ],
    "/": [
        ("Then {P} splits them into {b} equal groups and keeps one group.", "{N} keeps one of {b} groups"),
        ("Then {P} packs them into {b} equal boxes and keeps one box.", "{N} keeps one of {b} boxes"),
    ],
}


@dataclass(frozen=True)
class WorldSpec:
    """Difficulty knobs of the mini world (conf/mini/*.yaml `world`)."""

    min_steps: int = 2  # fewest equations per solution (>= 1)
    max_steps: int = 4  # most equations per solution (>= min_steps)
    max_operand: int = 40  # largest starting amount / + and - operand (>= 10)
    max_factor: int = 5  # largest * factor and / divisor (>= 2)
    max_value: int = 200  # running totals stay in [1, max_value] (>= max_operand)
    ops: tuple[str, ...] = field(default=OPS)  # subset of "+", "-", "*", "/"

    def __post_init__(self) -> None:
        bad = [o for o in self.ops if o not in OPS]
        if bad or not self.ops:
            raise ValueError(
                f"mini world `ops`: {list(self.ops)} has {bad or 'nothing'}; allowed: {list(OPS)}"
            )
        if not (1 <= self.min_steps <= self.max_steps):
            raise ValueError(
                f"mini world: need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}"
            )
        if self.max_operand < 10 or self.max_factor < 2 or self.max_value < self.max_operand:
            raise ValueError(
                "mini world: need max_operand >= 10, max_factor >= 2, max_value >= max_operand; got "
                f"{self.max_operand}, {self.max_factor}, {self.max_value}"
            )

    @classmethod
    def from_mapping(cls, m) -> WorldSpec:
        d = dict(m or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"mini world: unknown key(s) {sorted(unknown)}; allowed: {sorted(cls.__dataclass_fields__)}"
            )
        if "ops" in d:
            d["ops"] = tuple(str(o) for o in d["ops"])
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ops"] = list(self.ops)
        return d


def apply_op(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a // b


def _pick_op(rng: random.Random, total: int, w: WorldSpec) -> tuple[str, int] | None:
    """An operation and operand keeping the total in [1, max_value], or None if none fits."""
    choices: list[tuple[str, int]] = []
    for op in w.ops:
        if op == "+" and total + 2 <= w.max_value:
            choices.append((op, rng.randint(2, min(w.max_operand, w.max_value - total))))
        elif op == "-" and total > 2:
            choices.append((op, rng.randint(2, min(w.max_operand, total - 1))))
        elif op == "*" and total * 2 <= w.max_value:
            choices.append((op, rng.randint(2, min(w.max_factor, w.max_value // total))))
        elif op == "/":
            divs = [d for d in range(2, w.max_factor + 1) if total % d == 0]
            if divs:
                choices.append((op, rng.choice(divs)))
    return rng.choice(choices) if choices else None


def make_problem(rng: random.Random, w: WorldSpec, pid: str) -> dict:
    """One problem record ``{id, problem, answer, solution, source}`` drawn from ``rng``."""
    name, pron = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    n_steps = rng.randint(w.min_steps, w.max_steps)
    sents: list[str] = []
    steps: list[str] = []
    if "*" in w.ops and rng.random() < 0.4:
        # The start is itself a product: "4 bags with 12 marbles each" (one equation).
        a = rng.randint(2, w.max_factor)
        b = rng.randint(2, min(w.max_operand, w.max_value // a))
        box = rng.choice(_BOXES)
        total = a * b
        sents.append(f"{name} has {a} {box} with {b} {item} each.")
        steps.append(f"{name} has {a} {box} of {b}, so {a} * {b} = {total}.")
    else:
        total = rng.randint(2, w.max_operand)
        sents.append(f"{name} has {total} {item}.")
    while len(steps) < n_steps:
        pick = _pick_op(rng, total, w)
        if pick is None:  # pragma: no cover - every total in [1, max_value] admits + or -
            break
        op, b = pick
        new = apply_op(op, total, b)
        q, s = rng.choice(PHRASES[op])
        fmt = {"N": name, "P": pron, "I": item, "b": b}
        sents.append(q.format(**fmt))
        steps.append(f"{s.format(**fmt)}, so {total} {op} {b} = {new}.")
        total = new
    sents.append(f"How many {item} does {name} have now?")
    steps.append(f"The answer is \\boxed{{{total}}}.")
    return {
        "id": pid,
        "problem": " ".join(sents),
        "answer": str(total),
        "solution": STEP_DELIMITER.join(steps),
        "source": "mini",
    }


def generate_problems(
    n: int,
    seed: int,
    *,
    min_steps: int = 2,
    max_steps: int = 4,
    max_operand: int = 40,
    max_factor: int = 5,
    max_value: int = 200,
    ops: tuple[str, ...] | list[str] = OPS,
    id_prefix: str = "mini",
    exclude: set[str] | None = None,
) -> list[dict]:
    """``n`` problems drawn deterministically from ``seed``; problems whose text is in ``exclude`` are
    skipped (and replaced), so a training set can avoid the test split."""
    if n < 0:
        raise ValueError(f"generate_problems: n must be >= 0, got {n}")
    w = WorldSpec(min_steps, max_steps, max_operand, max_factor, max_value, tuple(ops))
    rng = random.Random(seed)
    out: list[dict] = []
    while len(out) < n:
        p = make_problem(rng, w, f"{id_prefix}-{len(out)}")
        if exclude and p["problem"] in exclude:
            continue
        out.append(p)
    return out


def load_mini_benchmark(
    split: str = "test", n: int = 500, world: WorldSpec | dict | None = None
) -> list[dict]:
    """The held-out ``split`` ("test" or "dev") of the mini world: ``n`` problem records
    (benchmark "mini")."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"mini benchmark split {split!r}; allowed: {sorted(SPLIT_SEEDS)}")
    w = world if isinstance(world, WorldSpec) else WorldSpec.from_mapping(world)
    return generate_problems(n, SPLIT_SEEDS[split], id_prefix=f"mini-{split}", **_kw(w))


def training_problems(
    n: int, seed: int, world: WorldSpec | dict | None = None, holdout: int = 1000
) -> list[dict]:
    """``n`` training problems from ``seed``, disjoint (by problem text) from the first ``holdout``
    problems of the test and dev splits."""
    if seed in SPLIT_SEEDS.values():
        raise ValueError(
            f"mini training seed {seed} is reserved for a held-out split ({SPLIT_SEEDS}); pick another"
        )
    w = world if isinstance(world, WorldSpec) else WorldSpec.from_mapping(world)
    held = {p["problem"] for s in SPLIT_SEEDS for p in load_mini_benchmark(s, holdout, w)}
    return generate_problems(n, seed, id_prefix="mini-train", exclude=held, **_kw(w))


_OP_STEP = re.compile(r"^(?P<head>.*, so )(?P<a>\d+) (?P<op>[-+*/]) (?P<b>\d+) = (?P<c>\d+)\.$")


SLIP_KINDS = ("carry", "divide")


def _slip(op: str, a: int, b: int, c: int, kinds: tuple[str, ...] = ("carry",)) -> int:
    """The written result of ``a op b`` (= ``c``) under the planted misconceptions ``kinds``: "carry" = a
    subtraction that needs a borrow forgets it (+10), an addition that needs a carry forgets it (-10);
    "divide" = "keeps one of b groups" multiplies instead (``a / b = a * b``). Else ``c``."""
    if "carry" in kinds:
        if op == "-" and a % 10 < b % 10:
            return c + 10
        if op == "+" and a % 10 + b % 10 >= 10:
            return c - 10
    if "divide" in kinds and op == "/":
        return a * b
    return c


def plant_slips(problems: list[dict], rate: float, seed: int, max_value: int = 200,
                kinds: tuple[str, ...] | list[str] = ("carry",)) -> list[dict]:
    """Copies of ``problems`` whose reference solutions carry a systematic misconception: in a share
    ``rate`` of the solutions, every subtraction that needs a borrow forgets it (writes ``a - b + 10``)
    and every addition that needs a carry forgets it (``a + b - 10``): the classic column-arithmetic
    bugs. Later steps continue from the written value and the boxed answer is the slipped chain's, as in
    a real flawed demonstration (``answer`` follows). A solution whose slipped chain would leave the
    world (an inexact division, a total outside [1, max_value]) stays clean. Problem texts never change.

    The mini policy's recipe (conf/mini/policy.yaml ``train.slip_rate``) uses this to give the policy an
    error that greedy decoding makes systematically, that sampling avoids part of the time, and that the
    step checker (the mini world's PRM) sees: the kind of flaw SPHERE's search + DPO is meant to fix.
    ``kinds`` picks the misconceptions (SLIP_KINDS; see _slip): "carry" (the default) and "divide" (a
    division written as a product, ``a / b = a * b``).
    ``rate`` = 0 returns the problems unchanged. Deterministic in ``seed`` (its own RNG stream)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"mini recipe train.slip_rate={rate} (conf/mini/*.yaml): allowed [0, 1]")
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in SLIP_KINDS]
    if bad or not kinds:
        raise ValueError(f"mini recipe train.slip_kinds={list(kinds)} (conf/mini/*.yaml): allowed a non-empty "
                         f"subset of {list(SLIP_KINDS)}")
    if rate == 0.0:
        return list(problems)
    rng = random.Random(seed)
    out = []
    for p in problems:
        if rng.random() >= rate:
            out.append(p)
            continue
        new_steps: list[str] = []
        total, slipped, ok = None, False, True
        for st in p["solution"].split(STEP_DELIMITER):
            m = _OP_STEP.match(st)
            if m is None:
                new_steps.append(st)
                continue
            a, op, b = int(m["a"]), m["op"], int(m["b"])
            if total is not None:
                a = total  # continue from the written running total
            if op == "/" and a % b and "divide" not in kinds:
                ok = False
                break
            exact = apply_op(op, a, b)
            c = _slip(op, a, b, exact, kinds)
            slipped |= c != exact
            if not 1 <= c <= max_value:
                ok = False
                break
            total = c
            new_steps.append(f"{m['head']}{a} {op} {b} = {c}.")
        if not (ok and slipped):  # slipped implies a written total
            out.append(p)
            continue
        new_steps[-1] = f"The answer is \\boxed{{{total}}}."
        out.append({**p, "answer": str(total), "solution": STEP_DELIMITER.join(new_steps)})
    return out


def _kw(w: WorldSpec) -> dict:
    d = w.to_dict()
    d["ops"] = tuple(d["ops"])
    return d


def format_prompt(problem: str) -> str:
    """The mini family's prompt text for one problem (see MINI_PROMPT_TEMPLATE)."""
    return MINI_PROMPT_TEMPLATE.format(problem=problem)
