"""Symbolic step checker for arithmetic: the mini world's default PRM (no model, exact, cheap).

Every equation ``lhs = rhs`` in a step whose two sides are arithmetic (numbers, ``+ - − * × · / ÷ ^``,
parentheses, ``n!``, LaTeX ``\\frac \\cdot \\times \\div \\sqrt``) is evaluated exactly with rationals by the
safe parser of ``sphere.verify.arith`` (no eval; values capped at ``max_bits`` bits, so a hostile step such
as ``2^{2^{100}} = 1`` is skipped, not computed). A step's score is the share of its equations that hold;
a step with no checkable equation gets ``neutral_score`` (default 0.5: no evidence either way, so the
search neither rewards nor punishes prose steps or the final "The answer is \\boxed{N}." step).

What counts as an equation (text around it is ignored):
- ``Tom has 3 boxes of 12 apples, so 3 * 12 = 36 apples.`` -> 3*12 = 36;
- chains ``2 + 3 = 5 = 5``: every adjacent pair; ``≈`` / ``\\approx`` count like ``=``;
- thousands separators (``1,000``), ``$`` signs, GSM8K calculator annotations ``<<48/2=24>>`` (dropped:
  they repeat the equation in the text) and ``3 x 4`` (a lone x between numbers means times);
- one unit word may sit between the left side and ``=``: ``3 * 12 apples = 36``.
A side is NOT checkable (so the equation is skipped, never counted wrong) when it touches a variable or a
word operator: ``x + 3 = 5`` (left side starts with a binary operator after a letter), ``2x = 6``
(number glued to a letter), ``20% of 50 = 10`` (``of``), ``= 36 + x``, ``<= 5``.
With ``decimal_tolerance`` a decimal literal may be the exact value rounded or truncated at its own
number of places: ``10 / 3 = 3.33`` and ``2 / 3 = 0.67`` hold, ``10 / 3 = 3.4`` does not.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any

from sphere.verify.arith import DEFAULT_MAX_BITS, NotArithmetic, evaluate

_TOKEN = re.compile(
    r"(?P<space>\s+)"
    r"|(?P<clock>\d{1,2}:\d{2}(?::\d{2})?|0\d+)"  # 11:00, 0730: clock times are not arithmetic
    r"|(?P<num>\d+(?:\.\d+)?|\.\d+)"
    r"|(?P<rel><=|>=|!=|==?=?|\\(?:neq|ne|leq|le|geq|ge|lt|gt)(?![a-zA-Z])|[<>≠≤≥])"
    r"|(?P<approx>\\approx(?![a-zA-Z])|≈)"
    r"|(?P<cmd>\\(?:frac|dfrac|tfrac|sqrt|cdot|times|div|pi|left|right)(?![a-zA-Z]))"
    r"|(?P<op>[-+*/^(){}\[\]×·∙÷−–!])"
    r"|(?P<word>\\text\{[^{}]{0,200}\}|\\[a-zA-Z]+|[A-Za-z]+)"
    r"|(?P<other>.)",
    re.DOTALL,
)
_ANNOT = re.compile(r"<<[^<>]{0,400}>>")
_THOUSANDS = re.compile(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?![\d])")
# Words that continue an arithmetic expression in prose: a side next to one of these is only part of it.
_OPERATOR_WORDS = frozenset(
    "of times plus minus by over per than divided multiplied half twice double triple thrice squared cubed "
    "percent more less sum product difference quotient".split()
)
# After a right side, a scale or unit change makes the number mean something else: "= 50 cents",
# "= 5 thousand".
_RIGHT_STOP_WORDS = _OPERATOR_WORDS | {"cents", "cent", "hundred", "thousand", "million", "billion", "dozen"}
# Before a left side, "and" also continues an expression ("the sum of 3 and 4 = 7"); after a right side
# it starts a new clause ("= 6 and 2 + 2 = 4").
_LEFT_OPERATOR_WORDS = _OPERATOR_WORDS | {"and"}
_BINARY = frozenset("+*/^")
_DEC_LIT = re.compile(r"^\s*[-−]?\s*(\d*)\.(\d+)\s*$")
_MAX_STEP_CHARS = 20_000


class _Tok:
    __slots__ = ("kind", "text", "space_before")

    def __init__(self, kind: str, text: str, space_before: bool):
        self.kind, self.text, self.space_before = kind, text, space_before

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"{self.kind}:{self.text!r}"


def _tokens(step: str) -> list[_Tok]:
    s = _ANNOT.sub("", step[:_MAX_STEP_CHARS])
    s = s.replace("\\$", " ").replace("$", " ").replace("{,}", "")
    s = re.sub(r"\\[()\[\]]", " ", s)
    s = _THOUSANDS.sub(lambda m: m.group(0).replace(",", ""), s)
    out: list[_Tok] = []
    space = True
    for m in _TOKEN.finditer(s):
        kind = m.lastgroup
        if kind == "space":
            space = True
            continue
        text = m.group(0)
        if kind == "approx":
            kind, text = "eq", "="
        elif kind == "clock":
            kind = "word"
        elif kind == "rel" and text in ("=", "=="):
            kind, text = "eq", "="
        elif kind == "cmd":
            kind = "op"
        out.append(_Tok(kind, text, space))
        space = False
    # "3 x 4": a lone x between operands is multiplication; "!" is a factorial only right after an operand
    # and before an operator / "=" (else it ends a sentence: "= 36!").
    for i, t in enumerate(out):
        if t.kind == "word" and t.text in ("x", "X") and 0 < i < len(out) - 1:
            # "12 x 3", "2000x 10/100", "12 marigolds x $3": x before a number means times (after a unit
            # word too, which then makes the right operand's run start with "*", so it is skipped)
            a, b = out[i - 1], out[i + 1]
            if (b.kind == "num" or b.text == "(") and (a.kind not in ("op", "eq", "rel") or a.text == ")"):
                t.kind, t.text = "op", "*"
        elif t.kind == "op" and t.text == "!":
            prev_ok = i > 0 and not t.space_before and (out[i - 1].kind == "num" or out[i - 1].text in ")}")
            nxt = out[i + 1] if i + 1 < len(out) else None
            next_ok = nxt is not None and (nxt.kind == "eq" or (nxt.kind == "op" and nxt.text not in "({["))
            if not (prev_ok and next_ok):
                t.kind = "other"
    return out


def _items(toks: list[_Tok]) -> list[tuple[str, Any]]:
    """Group tokens into ("run", [tokens]) of arithmetic and single boundary items."""
    items: list[tuple[str, Any]] = []
    run: list[_Tok] = []
    for t in toks:
        if t.kind in ("num", "op"):
            run.append(t)
            continue
        if run:
            items.append(("run", run))
            run = []
        items.append((t.kind, t))
    if run:
        items.append(("run", run))
    return items


_TIGHT_FRACTION = re.compile(r"(?<![\d.)}])(\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)(?![\d.({])")


def _has_adjacent_numbers(run: list[_Tok]) -> bool:
    return any(a.kind == "num" and b.kind == "num" for a, b in zip(run, run[1:], strict=False))


def _side_text(run: list[_Tok]) -> str:
    """The side as text, spacing kept."""
    return "".join((" " if t.space_before and i else "") + t.text for i, t in enumerate(run))


def _readings(text: str) -> list[str]:
    """Readings of a side. With both a spaced and a tight slash ("25 / 1/3", "500/ 2/5") the text is
    ambiguous: left-to-right, or the tight fraction first (25 / (1/3)). Both are tried."""
    if re.search(r"\s/|/\s", text):
        grouped = _TIGHT_FRACTION.sub(r"(\1/\2)", text)
        if grouped != text:
            return [text, grouped]
    return [text]


def _starts_ok(run: list[_Tok], before: tuple[str, Any] | None, before2: tuple[str, Any] | None) -> bool:
    """May the left side start here? ``before`` / ``before2``: the one / two items in front of it."""
    first = run[0]
    if first.kind == "op" and first.text in _BINARY:
        return False  # "x + 3 = 5": the left side continues an expression with a variable
    if first.text in ("-", "−", "–") and not (
        before is None or before[0] == "eq" or (before[0] == "other" and before[1].text in ":;,(")
    ):
        return False  # "11 a.m. - 2 hours = 9": a leading minus after prose is a binary minus
    if before is not None and before[0] == "other":
        if not first.space_before:
            return False  # glued to a symbol: "√25 = 5", "17&19 = 4", "0,2 = ..."
        if before[1].text in ",:." and before2 is not None and before2[0] == "run":
            return False  # "7,980 : 420 = 19", "14, 400 / 80 = 180": a number list / ratio / typo
    if before is not None and before[0] == "word":
        w = before[1]
        if not first.space_before:
            return False  # glued to a word: "x2", "\text{a}3"
        if w.text.lower() in _LEFT_OPERATOR_WORDS:
            return False  # "20% of 50 = 10", "3 times 4 = 12" (prose operators are not parsed)
        if first.text in ("-", "−", "–"):
            return False  # "x - 3 = 5", "50 socks – 35 socks = 15"
    if before is not None and before[0] == "other" and before[1].text == "%":
        return False  # "20% * 50 = 10": percent is not parsed
    return True


def _continues_expression(items: list[tuple[str, Any]], li: int) -> bool:
    """True when, earlier in the same clause, a run ends with an operator whose operand is prose:
    "shoe size 25 + shoe size 5 = 30" (the left side "5" is only the tail of the expression)."""
    for j in range(li - 1, -1, -1):
        kind, val = items[j]
        if kind == "run":
            last = val[-1]
            return last.kind == "op" and last.text not in (")", "}", "]", "!")
        if kind in ("eq", "rel") or (kind == "other" and val.text in ",.;:?!\n"):
            return False
    return False


def _ends_ok(run: list[_Tok], after: tuple[str, Any] | None) -> bool:
    last = run[-1]
    if last.kind == "op" and last.text not in (")", "}", "]", "!"):
        return False  # "= 36 + x"
    if after is not None and after[0] == "word":
        t = after[1]
        if not t.space_before or t.text[0].isdigit():  # "= 36x"; "= 18 000" (spaced thousands)
            return False
        if t.text.lower() in _RIGHT_STOP_WORDS:
            return False  # "12 = 3 times 4", "$1 / 2 = 50 cents"
    if after is not None and after[0] == "other" and after[1].text in "%°":
        return False  # "= 20%" (percent is not parsed), "= 30°"
    return True


def _rounds_to(exact, literal, places: int) -> bool:
    """``literal`` (with ``places`` decimals) is ``exact`` rounded to nearest or truncated toward zero."""
    scale = 10**places
    if isinstance(exact, float) or isinstance(literal, float):
        e, lit = float(exact), float(literal)
        return abs(e - lit) <= 0.5 / scale * (1 + 1e-9) or abs(math.trunc(e * scale) / scale - lit) < 1e-12
    if abs(exact - literal) <= Fraction(1, 2 * scale):
        return True
    return Fraction(math.trunc(exact * scale), scale) == literal


def _dec_places(text: str) -> int | None:
    m = _DEC_LIT.match(text)
    return len(m.group(2)) if m else None


class SymbolicStepScorer:
    """StepScorer for arithmetic steps (see the module docstring).

    Args (also read from ``cfg`` = conf/scorer/symbolic.yaml, or the full config with a ``scorer`` node):
        neutral_score: score of a step with no checkable equation, in [0, 1].
        decimal_tolerance: a decimal literal may round or truncate the exact value.
        max_bits: largest intermediate value (bits) computed; larger -> the equation is skipped.
        max_equations: equations checked per step at most.
    """

    name = "symbolic"

    def __init__(self, cfg: Any = None, *, neutral_score: float | None = None,
                 decimal_tolerance: bool | None = None, max_bits: int | None = None,
                 max_equations: int | None = None, **_ignored: Any):
        s: Any = {}
        if cfg is not None:
            s = cfg.get("scorer", cfg) if hasattr(cfg, "get") else cfg
            if s is None:
                s = {}

        def pick(key, given, default):
            return given if given is not None else (s.get(key, default) if hasattr(s, "get") else default)

        self.neutral_score = float(pick("neutral_score", neutral_score, 0.5))
        if not 0.0 <= self.neutral_score <= 1.0:
            raise ValueError(f"scorer.neutral_score must be in [0, 1] (got {self.neutral_score})")
        self.decimal_tolerance = bool(pick("decimal_tolerance", decimal_tolerance, True))
        self.max_bits = int(pick("max_bits", max_bits, DEFAULT_MAX_BITS))
        self.max_equations = int(pick("max_equations", max_equations, 64))
        if self.max_bits < 64 or self.max_equations < 1:
            raise ValueError("scorer.max_bits must be >= 64 and scorer.max_equations >= 1")
        self.calls = 0
        self.steps_scored = 0

    # -- equations -------------------------------------------------------------------------------------
    def equations(self, step: str) -> list[tuple[str, str]]:
        """The checkable ``(lhs, rhs)`` pairs of a step, in order (at most ``max_equations``)."""
        items = _items(_tokens(step))
        out: list[tuple[str, str]] = []
        for k, (kind, _) in enumerate(items):
            if kind != "eq":
                continue
            li = k - 1
            # one unit word between a computed left side and "=": "3 * 12 apples = 36" (a bare number there
            # is a unit conversion, "100 cents = $1", "15 gallons = 120 pints": not arithmetic)
            if (li >= 1 and items[li][0] == "word" and items[li - 1][0] == "run" and items[li][1].space_before
                    and items[li][1].text.isalpha() and len(items[li][1].text) >= 2
                    and items[li][1].text.lower() not in _OPERATOR_WORDS
                    and any(t.kind == "op" and t.text in "+-*/^×·÷−–" for t in items[li - 1][1])):
                li -= 1
            if li < 0 or items[li][0] != "run" or k + 1 >= len(items) or items[k + 1][0] != "run":
                continue
            lrun, rrun = items[li][1], items[k + 1][1]
            if not _starts_ok(lrun, items[li - 1] if li >= 1 else None, items[li - 2] if li >= 2 else None):
                continue
            if _continues_expression(items, li):
                continue
            if lrun[-1].kind == "op" and lrun[-1].text not in (")", "}", "]", "!"):
                continue
            if rrun[0].kind == "op" and rrun[0].text in _BINARY:
                continue
            if not _ends_ok(rrun, items[k + 2] if k + 2 < len(items) else None):
                continue
            if (k + 3 < len(items) and items[k + 2][0] == "word" and items[k + 2][1].text.lower() == "and"
                    and items[k + 3][0] == "run" and any(t.text == "/" for t in items[k + 3][1][:5])):
                continue  # "17/3 = 5 and 2/3": a mixed number
            if _has_adjacent_numbers(lrun) or _has_adjacent_numbers(rrun):
                continue  # "1 1/2" (a mixed number), "18 000" (a spaced thousands separator)
            out.append((_side_text(lrun), _side_text(rrun)))
            if len(out) >= self.max_equations:
                break
        return out

    def holds(self, lhs: str, rhs: str) -> bool | None:
        """True / False if both sides evaluate (True if any reading of an ambiguous side holds); None if
        either side is not checkable."""
        verdicts = [self._holds1(a, b) for a in _readings(lhs) for b in _readings(rhs)]
        if any(v is True for v in verdicts):
            return True
        return False if any(v is False for v in verdicts) else None

    def _holds1(self, lhs: str, rhs: str) -> bool | None:
        try:
            return self._compare(lhs, rhs)
        except (NotArithmetic, OverflowError, ZeroDivisionError, ValueError, RecursionError):
            return None  # not checkable (or a huge exact value next to a float)

    def _compare(self, lhs: str, rhs: str) -> bool:
        lv = evaluate(lhs, self.max_bits)
        rv = evaluate(rhs, self.max_bits)
        if isinstance(lv, Fraction) and isinstance(rv, Fraction) and lv == rv:
            return True
        if self.decimal_tolerance:
            # a decimal literal may be the exact value rounded (half either way) or truncated at its places
            for lit, val, lit_v in ((rhs, lv, rv), (lhs, rv, lv)):
                places = _dec_places(lit)
                if places is not None and _rounds_to(val, lit_v, min(places, 50)):
                    return True
        if isinstance(lv, Fraction) and isinstance(rv, Fraction):
            return False
        return abs(float(lv) - float(rv)) <= 1e-9 * max(1.0, abs(float(lv)), abs(float(rv)))

    def step_score(self, step: str) -> float:
        verdicts = [v for v in (self.holds(a, b) for a, b in self.equations(step)) if v is not None]
        if not verdicts:
            return self.neutral_score
        return sum(verdicts) / len(verdicts)

    # -- StepScorer ------------------------------------------------------------------------------------
    def score(self, items: list[tuple[str, list[str]]]) -> list[list[float]]:
        """One score per step (the problem text is not needed: each step is checked on its own)."""
        self.calls += 1
        out = []
        for _problem, steps in items:
            out.append([self.step_score(st) for st in steps])
            self.steps_scored += len(steps)
        return out

    def stats(self) -> dict:
        return {"scorer/calls": self.calls, "scorer/steps": self.steps_scored}

    def close(self) -> None:
        pass

