"""The mini world's exact process reward: a step is right when it is the problem's next step.

``scorer=mini_world`` (conf/scorer/mini_world.yaml). The symbolic checker (``scorer=symbolic``) only
checks that a step's equation holds (``a op b = c``); it cannot see a *copied operand*: ``17 * 2 = 34``
when the problem starts with 13 is arithmetic that holds on the wrong number. This scorer reads the
problem the way a strong PRM does: it parses the problem's chain of operations (the sentence templates of
``sphere.mini.world``) and judges each step of a solution against it, so a step is right when it applies
the problem's next operation to the previous step's true total, with the problem's operand, and the
arithmetic holds; the final ``The answer is \\boxed{N}.`` step is right when N is the chain's result.

Scores follow the PRM convention of ``sphere.rewards.base``: the score of step t judges the prefix
``steps[:t+1]``, so it is 1.0 when every step so far is right and 0.0 from the first wrong step on (a
step after the answer, or one that does not parse, is wrong). It is the mini world's *oracle* PRM: the
ceiling a trained mini PRM would approach. It sees the problem text only (never the reference solution or
the answer field), but it knows the world's grammar, as a PRM trained on the world would. Only mini-world
problems are accepted: any other problem text is refused with the text and what to use instead.

``flip_rate`` (default 0) makes it an imperfect PRM on purpose: each step verdict is flipped with that
probability (a deterministic hash of the problem, the prefix and ``seed``), so an ablation can ask how
accurate a step scorer must be for the search to pay off.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from sphere.mini.world import PHRASES
from sphere.mini.world import apply_op as _world_apply

_START = re.compile(r"^\w+ has (?P<total>\d+) [a-z]+\.$")
_START_PRODUCT = re.compile(r"^\w+ has (?P<a>\d+) [a-z]+ with (?P<b>\d+) [a-z]+ each\.$")
_QUESTION = re.compile(r"^How many [a-z]+ does \w+ have now\?$")
_STEP = re.compile(r", so (?P<a>\d+) (?P<op>[-+*/]) (?P<b>\d+) = (?P<c>\d+)\.$")
_ANSWER = re.compile(r"^The answer is \\boxed\{(?P<n>-?\d+)\}\.$")
_SENTENCE = re.compile(r"(?<=[.?])\s+")


def _op_patterns() -> list[tuple[str, re.Pattern]]:
    out = []
    for op, phrases in PHRASES.items():
        for sentence, _step in phrases:
            pat = re.escape(sentence)
            pat = pat.replace(re.escape("{P}"), r"(?:he|she)").replace(re.escape("{I}"), r"[a-z]+")
            pat = pat.replace(re.escape("{b}"), r"(?P<b>\d+)")
            out.append((op, re.compile("^" + pat + "$")))
    return out


_OPS = _op_patterns()


def _apply(op: str, a: int, b: int) -> int | None:
    """The world's arithmetic (``sphere.mini.world.apply_op``); None for a division that is not exact."""
    if op == "/" and not (b and a % b == 0):
        return None
    return _world_apply(op, a, b)


def reference_chain(problem: str) -> list[tuple[int, str, int, int]] | None:
    """The equations ``(a, op, b, c)`` the problem's solution must write, in order; None if ``problem`` is
    not a mini-world problem."""
    sents = [s.strip() for s in _SENTENCE.split(problem.strip()) if s.strip()]
    if len(sents) < 2 or not _QUESTION.match(sents[-1]):
        return None
    chain: list[tuple[int, str, int, int]] = []
    m = _START_PRODUCT.match(sents[0])
    if m:
        a, b = int(m["a"]), int(m["b"])
        total = a * b
        chain.append((a, "*", b, total))
    else:
        m = _START.match(sents[0])
        if not m:
            return None
        total = int(m["total"])
    for s in sents[1:-1]:
        for op, pat in _OPS:
            m = pat.match(s)
            if m:
                b = int(m["b"])
                c = _apply(op, total, b)
                if c is None:
                    return None
                chain.append((total, op, b, c))
                total = c
                break
        else:
            return None
    return chain


class MiniWorldStepScorer:
    """Exact step verifier of the mini world (see the module docstring)."""

    def __init__(self, cfg: Any = None):
        get = (lambda k, d: cfg.get(k, d)) if cfg is not None else (lambda k, d: d)
        self.flip_rate = float(get("flip_rate", 0.0))
        if not 0.0 <= self.flip_rate <= 0.5:
            raise ValueError(
                f"scorer.flip_rate={self.flip_rate} (conf/scorer/mini_world.yaml): allowed [0, 0.5] "
                "(the chance a step verdict is flipped; 0 = exact)"
            )
        self.seed = int(get("seed", 0))
        self.calls = 0
        self.steps_scored = 0
        self._chains: dict[str, list[tuple[int, str, int, int]]] = {}

    def chain(self, problem: str) -> list[tuple[int, str, int, int]]:
        ch = self._chains.get(problem)
        if ch is None:
            ch = reference_chain(problem)
            if ch is None:
                raise ValueError(
                    "scorer=mini_world scores only mini-world problems (sphere.mini.world's sentence "
                    f"templates); this problem is not one: {problem[:200]!r}. Use scorer=symbolic or "
                    "scorer=prm for other data."
                )
            self._chains[problem] = ch
        return ch

    def step_right(self, chain: list[tuple[int, str, int, int]], t: int, step: str) -> bool:
        """Whether ``step`` is the right step ``t`` of the problem whose equations are ``chain``."""
        step = step.strip()
        if t < len(chain):
            m = _STEP.search(step)
            return bool(m) and (int(m["a"]), m["op"], int(m["b"]), int(m["c"])) == chain[t]
        if t == len(chain):
            m = _ANSWER.match(step)
            final = chain[-1][3] if chain else None
            return bool(m) and final is not None and int(m["n"]) == final
        return False

    def _flip(self, problem: str, steps: list[str], t: int) -> bool:
        if not self.flip_rate:
            return False
        h = hashlib.blake2b(digest_size=8)
        h.update(f"{self.seed}\x00{problem}\x00".encode())
        h.update("\x00".join(steps[: t + 1]).encode())
        return int.from_bytes(h.digest(), "big") / 2**64 < self.flip_rate

    def score_steps(self, problem: str, steps: list[str]) -> list[float]:
        chain = self.chain(problem)
        out, ok = [], True
        for t, st in enumerate(steps):
            ok = ok and self.step_right(chain, t, st)
            verdict = ok != self._flip(problem, steps, t)
            out.append(1.0 if verdict else 0.0)
        return out

    # -- StepScorer ------------------------------------------------------------------------------------
    def score(self, items: list[tuple[str, list[str]]]) -> list[list[float]]:
        """One score per step: 1.0 while the prefix is the problem's solution, 0.0 from the first wrong
        step on (before ``flip_rate``)."""
        self.calls += 1
        out = []
        for problem, steps in items:
            out.append(self.score_steps(problem, list(steps)))
            self.steps_scored += len(steps)
        return out

    def stats(self) -> dict:
        return {"scorer/calls": self.calls, "scorer/steps": self.steps_scored}

    def close(self) -> None:
        pass
