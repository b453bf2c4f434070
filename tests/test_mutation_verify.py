"""sphere/verify/: the grader's own decisions asserted value by value (the mutation run, scripts/mutation.sh /
docs/mutation.md; each test fails on a mutant the rest of the suite let through)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from sphere.verify import arith
from sphere.verify.arith import NotArithmetic, evaluate, tokenize, try_evaluate

F = Fraction


@pytest.mark.parametrize("text, value", [
    ("1+2*3", F(7)), ("(1+2)*3", F(9)), ("10-4-3", F(3)), ("12/4/3", F(1)), ("2^3^2", F(512)),
    ("-2^2", F(-4)), ("(-2)^2", F(4)), ("+5", F(5)), ("--5", F(5)), ("2^-1", F(1, 2)), ("3!", F(6)),
    ("3!!", F(720)), ("0!", F(1)), ("2(5)", F(10)), ("2[3]", F(6)), ("2{3}", F(6)), ("\\frac12", F(1, 2)),
    ("\\frac{1}2", F(1, 2)), ("\\dfrac{3}{4}", F(3, 4)), ("\\tfrac{3}{4}", F(3, 4)), ("\\sqrt{9}", F(3)),
    ("\\sqrt{\\frac{4}{9}}", F(2, 3)), ("3\\sqrt{4}", F(6)), ("6 \\div 4", F(3, 2)), ("2 \\cdot 3", F(6)),
    ("2 \\times 3", F(6)), ("2 \\ast 3", F(6)), ("2×3", F(6)), ("2·3", F(6)), ("2∙3", F(6)), ("9÷3", F(3)),
    ("5−3", F(2)), ("5–3", F(2)), ("\\left(1+1\\right)*2", F(4)), ("\\big(2\\big)", F(2)), (".5+1.25", F(7, 4)),
    ("1^{-3}", F(1)), ("(-1)^3", F(-1)), ("0^5", F(0)), ("2^0", F(1)), ("(1/2)^2", F(1, 4)),
    ("  7  ", F(7)), ("1-2", F(-1)), ("6/4", F(3, 2)), ("2*3/4", F(3, 2)),
])
def test_exact_values(text, value):
    v = evaluate(text)
    assert isinstance(v, Fraction) and v == value, (text, v)


@pytest.mark.parametrize("text, value", [
    ("\\sqrt{2}", math.sqrt(2)), ("2\\pi", 2 * math.pi), ("\\pi", math.pi), ("4^{0.5}", 2.0),
    ("2^{1/2}", math.sqrt(2)), ("\\sqrt{2}^2", 2.0), ("\\pi^2", math.pi ** 2), ("(-8)^{2}", 64),
])
def test_irrational_values_are_floats(text, value):
    v = evaluate(text)
    assert v == pytest.approx(value, rel=1e-12), (text, v)
    if text not in ("(-8)^{2}",):
        assert isinstance(v, float)


@pytest.mark.parametrize("text, why", [
    ("", "empty"), ("   ", "empty"), ("x+1", "unexpected character"), ("\\alpha", "unsupported command"),
    ("1/0", "division by zero"), ("\\frac{1}{0}", "division by zero"), ("0^{-1}", "division by zero"),
    ("\\sqrt{-4}", "negative"), ("(-8)^{1/3}", "complex power"), ("(1+2", "expected )"),
    ("1+2)", "trailing tokens"), ("1 2", "trailing tokens"), ("2^{2^{100}}", "power too large"),
    ("(1/2)!", "factorial"), ("(-1)!", "factorial"), ("301!", "factorial"), ("1" * 61, "too long"),
    ("+".join(["1"] * 201), "expression too long"), ("(" * 61 + "1" + ")" * 61, "nesting too deep"),
    ("-" * 61 + "1", "nesting too deep"), ("2^" * 61 + "2", "nesting too deep"), ("\\frac{1}", "expected a {group}"),
    ("\\frac", "expected a {group}"), ("*", "unexpected token"), ("1+", "unexpected end"),
    ("\\pi^{100000}", "power too large"), ("10^{1025}", "power too large"),
    ("\\frac123", "trailing tokens from ('num', '3')"), ("\\frac1234", "trailing tokens from ('num', '34')"), ("(\\sqrt{2})^{20000}", "power too large"),
])
def test_refusals_name_the_reason(text, why):
    with pytest.raises(NotArithmetic, match=r"(?i)" + __import__("re").escape(why)):
        evaluate(text)
    assert try_evaluate(text) is None


def test_bounds_are_the_documented_ones():
    assert (arith.MAX_TOKENS, arith.MAX_DEPTH, arith.MAX_DIGITS, arith.MAX_FACTORIAL, arith.DEFAULT_MAX_BITS) == (
        400, 60, 60, 300, 4096)
    assert evaluate("1" * 60) == int("1" * 60)
    assert evaluate("300!") == math.factorial(300)
    assert len(tokenize("+".join(["1"] * 200))) == 399
    assert evaluate("(" * 59 + "1" + ")" * 59) == 1
    assert evaluate("2^{2048}") == 2 ** 2048  # 2 has 2 bits: 2 * 2048 = 4096 bits allowed
    with pytest.raises(NotArithmetic, match="power too large"):
        evaluate("2^{2049}")
    assert evaluate("(1/2)^{-2048}") == 2 ** 2048 and evaluate("(-1)^{100001}") == -1
    assert evaluate("2^{11}", max_bits=22) == 2048
    with pytest.raises(NotArithmetic, match="power too large"):
        evaluate("2^{12}", max_bits=22)
    assert evaluate("1024*1024", max_bits=21) == 2 ** 20
    with pytest.raises(NotArithmetic, match="value too large"):
        evaluate("1024*2048", max_bits=21)
    with pytest.raises(NotArithmetic, match="value too large"):
        evaluate("1/2048/1024", max_bits=21)
    with pytest.raises(NotArithmetic, match="value too large"):
        evaluate("2048*1024+1", max_bits=21)
    assert try_evaluate("2^{12}", max_bits=22) is None and try_evaluate("2^{11}", max_bits=22) == 2048
    with pytest.raises(NotArithmetic, match="value not finite"):
        evaluate("\\pi^{300}*\\pi^{300}*\\pi^{300}")
    with pytest.raises(NotArithmetic, match="power out of range"):
        evaluate("(\\pi^{300})^{3}")


def test_tokens():
    assert tokenize("\\left( 3 \\cdot \\dfrac12 \\right) − 1.5") == [
        ("op", "("), ("num", "3"), ("op", "*"), ("cmd", "\\frac"), ("num", "12"), ("op", ")"), ("op", "-"),
        ("num", "1.5")]
    assert tokenize("2 ") == [("num", "2")]
