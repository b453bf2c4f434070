"""A small, safe arithmetic evaluator: exact rationals, no eval, bounded work.

Grammar (plain text and the LaTeX subset models write)::

    expr    := term (("+" | "-") term)*
    term    := unary (("*" | "/" | implicit) unary)*          # implicit: 3\\sqrt{2}, 2(5), 288\\pi
    unary   := ("-" | "+") unary | power
    power   := postfix ("^" unary)?                           # right-associative
    postfix := atom "!"*
    atom    := NUMBER | "(" expr ")" | "{" expr "}" | "[" expr "]"
             | \\frac G G | \\sqrt G | \\pi                       # G: {expr} or one digit (\\frac12)

Operators: ``+ - − * × · ∙ / ÷ ^``, LaTeX ``\\cdot \\times \\div \\frac \\dfrac \\tfrac \\sqrt \\pi``;
``\\left``/``\\right`` are ignored. Values are ``Fraction`` (exact) or ``float`` (after an irrational
``\\sqrt`` or ``\\pi``). Anything else (letters, units, relations) raises ``NotArithmetic``.

Bounds keep hostile input cheap: at most ``MAX_TOKENS`` tokens, nesting ``MAX_DEPTH``, number literals of
``MAX_DIGITS`` digits, results of ``max_bits`` bits (``2^{2^{100}}`` is refused, not computed), ``n!`` for
n <= ``MAX_FACTORIAL``.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

MAX_TOKENS = 400
MAX_DEPTH = 60
MAX_DIGITS = 60
MAX_FACTORIAL = 300
DEFAULT_MAX_BITS = 4096

Value = Fraction | float


class NotArithmetic(ValueError):
    """The text is not an arithmetic expression of this grammar (or exceeds a bound)."""


_TOKEN = re.compile(
    r"\s*(?:"
    r"(?P<num>\d+(?:\.\d+)?|\.\d+)"
    r"|(?P<cmd>\\[a-zA-Z]+)"
    r"|(?P<op>[-+*/^(){}\[\]!×·∙÷−–])"
    r")"
)
_CMD_OPS = {"\\cdot": "*", "\\times": "*", "\\div": "/", "\\ast": "*"}
_CMD_ATOMS = {"\\frac", "\\dfrac", "\\tfrac", "\\sqrt", "\\pi"}
_CMD_SKIP = {"\\left", "\\right", "\\big", "\\Big", "\\bigl", "\\bigr", "\\Bigl", "\\Bigr"}
_UNICODE_OPS = {"×": "*", "·": "*", "∙": "*", "÷": "/", "−": "-", "–": "-"}  # – (en dash): GSM8K minus


def tokenize(text: str) -> list[tuple[str, str]]:
    """``[(kind, value)]`` with kind in {"num", "op"} (LaTeX ops mapped to + - * / ^ ( ) etc.)."""
    toks: list[tuple[str, str]] = []
    pos, n = 0, len(text)
    while pos < n:
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise NotArithmetic(f"unexpected character {text[pos]!r} at {pos}")
        pos = m.end()
        if m.group("num") is not None:
            if len(m.group("num")) > MAX_DIGITS:
                raise NotArithmetic("number literal too long")
            toks.append(("num", m.group("num")))
        elif m.group("cmd") is not None:
            c = m.group("cmd")
            if c in _CMD_SKIP:
                continue
            if c in _CMD_OPS:
                toks.append(("op", _CMD_OPS[c]))
            elif c in _CMD_ATOMS:
                toks.append(("cmd", "\\frac" if c in ("\\dfrac", "\\tfrac") else c))
            else:
                raise NotArithmetic(f"unsupported command {c}")
        else:
            o = m.group("op")
            toks.append(("op", _UNICODE_OPS.get(o, o)))
        if len(toks) > MAX_TOKENS:
            raise NotArithmetic("expression too long")
    if not toks:
        raise NotArithmetic("empty expression")
    return toks


class _Parser:
    def __init__(self, toks: list[tuple[str, str]], max_bits: int):
        self.toks = toks
        self.i = 0
        self.depth = 0
        self.max_bits = max_bits

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, kind: str | None = None, val: str | None = None) -> tuple[str, str]:
        t = self.peek()
        if t is None or (kind and t[0] != kind) or (val and t[1] != val):
            raise NotArithmetic(f"expected {val or kind}, got {t}")
        self.i += 1
        return t

    def _check(self, v: Value) -> Value:
        if isinstance(v, Fraction):
            if max(v.numerator.bit_length(), v.denominator.bit_length()) > self.max_bits:
                raise NotArithmetic("value too large")
        elif not math.isfinite(v):
            raise NotArithmetic("value not finite")
        return v

    def expr(self) -> Value:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise NotArithmetic("nesting too deep")
        v = self.term()
        while (t := self.peek()) in (("op", "+"), ("op", "-")):
            self.i += 1
            w = self.term()
            v = self._check(v + w if t[1] == "+" else v - w)
        self.depth -= 1
        return v

    def _starts_atom(self, t: tuple[str, str] | None) -> bool:
        return t is not None and (t[0] == "cmd" or t in (("op", "("), ("op", "{"), ("op", "[")))

    def term(self) -> Value:
        v = self.unary()
        while True:
            t = self.peek()
            if t in (("op", "*"), ("op", "/")):
                self.i += 1
                w = self.unary()
                if t[1] == "*":
                    v = self._check(v * w)
                else:
                    if w == 0:
                        raise NotArithmetic("division by zero")
                    v = self._check(v / w)
            elif self._starts_atom(t):  # implicit multiplication: 3\sqrt{2}, 2(5)
                v = self._check(v * self.power())
            else:
                return v

    def unary(self) -> Value:
        t = self.peek()
        if t in (("op", "-"), ("op", "+")):
            self.i += 1
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise NotArithmetic("nesting too deep")
            v = self.unary()
            self.depth -= 1
            return -v if t[1] == "-" else v
        return self.power()

    def power(self) -> Value:
        base = self.postfix()
        if self.peek() == ("op", "^"):
            self.i += 1
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise NotArithmetic("nesting too deep")
            exp = self.unary()
            self.depth -= 1
            return self._pow(base, exp)
        return base

    def _pow(self, base: Value, exp: Value) -> Value:
        if isinstance(exp, Fraction) and exp.denominator == 1:
            e = exp.numerator
            if isinstance(base, Fraction):
                if base == 0 and e < 0:
                    raise NotArithmetic("division by zero")
                if base in (0, 1, -1):
                    return base ** e
                bits = max(base.numerator.bit_length(), base.denominator.bit_length())
                if bits * abs(e) > self.max_bits:
                    raise NotArithmetic("power too large")
                return self._check(base ** e)
            if abs(e) > 10_000:
                raise NotArithmetic("power too large")
        b = float(base)
        x = float(exp)
        if b < 0 and not float(x).is_integer():
            raise NotArithmetic("complex power")
        try:
            r = b ** x
        except (OverflowError, ZeroDivisionError):
            raise NotArithmetic("power out of range") from None
        if isinstance(r, complex):
            raise NotArithmetic("complex power")
        return self._check(r)

    def postfix(self) -> Value:
        v = self.atom()
        while self.peek() == ("op", "!"):
            self.i += 1
            if not (isinstance(v, Fraction) and v.denominator == 1 and 0 <= v <= MAX_FACTORIAL):
                raise NotArithmetic(f"factorial needs an integer 0..{MAX_FACTORIAL}")
            v = self._check(Fraction(math.factorial(int(v))))
        return v

    def group(self) -> Value:
        t = self.peek()
        if t == ("op", "{"):
            self.i += 1
            v = self.expr()
            self.take("op", "}")
            return v
        if t is not None and t[0] == "num":  # \frac12: one digit per argument
            self.i += 1
            if len(t[1]) == 1:
                return Fraction(t[1])
            # \frac123 is \frac{1}{2}3: split the literal
            self.toks[self.i - 1 : self.i] = [("num", t[1][0]), ("num", t[1][1:])]
            return Fraction(t[1][0])
        raise NotArithmetic("expected a {group}")

    def atom(self) -> Value:
        t = self.peek()
        if t is None:
            raise NotArithmetic("unexpected end")
        if t[0] == "num":
            self.i += 1
            return Fraction(t[1])
        if t[0] == "cmd":
            self.i += 1
            if t[1] == "\\pi":
                return math.pi
            if t[1] == "\\frac":
                a = self.group()
                b = self.group()
                if b == 0:
                    raise NotArithmetic("division by zero")
                return self._check(a / b)
            if t[1] == "\\sqrt":
                return self._sqrt(self.group())
        closing = {"(": ")", "{": "}", "[": "]"}
        if t[0] == "op" and t[1] in closing:
            self.i += 1
            v = self.expr()
            self.take("op", closing[t[1]])
            return v
        raise NotArithmetic(f"unexpected token {t}")

    def _sqrt(self, v: Value) -> Value:
        if v < 0:
            raise NotArithmetic("square root of a negative number")
        if isinstance(v, Fraction):
            n, d = math.isqrt(v.numerator), math.isqrt(v.denominator)
            if n * n == v.numerator and d * d == v.denominator:
                return Fraction(n, d)
        return math.sqrt(float(v))


def evaluate(text: str, max_bits: int = DEFAULT_MAX_BITS) -> Value:
    """Value of an arithmetic expression; raises ``NotArithmetic`` for anything else."""
    p = _Parser(tokenize(text), max_bits)
    v = p.expr()
    if p.i != len(p.toks):
        raise NotArithmetic(f"trailing tokens from {p.toks[p.i]}")
    return v


def try_evaluate(text: str, max_bits: int = DEFAULT_MAX_BITS) -> Value | None:
    """``evaluate`` or None (never raises on any str)."""
    try:
        return evaluate(text, max_bits)
    except (NotArithmetic, OverflowError, ZeroDivisionError, ValueError, RecursionError):
        return None
