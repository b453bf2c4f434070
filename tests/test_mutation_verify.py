"""sphere/verify/: the grader's own decisions asserted value by value (the mutation run, scripts/mutation.sh /
docs/mutation.md; each test fails on a mutant the rest of the suite let through)."""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import os
import signal
import sys
import time
import types
from collections import OrderedDict
from fractions import Fraction
from pathlib import Path

import pytest
import sympy

from sphere.verify import _worker, arith, pool
from sphere.verify import extract as ex
from sphere.verify import validate as val
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
    # the mutation run's trampolines add frames per call: room for the 60 levels the parser allows
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 20_000))
    with pytest.raises(NotArithmetic, match=r"(?i)" + __import__("re").escape(why)):
        evaluate(text)
    assert try_evaluate(text) is None


def test_bounds_are_the_documented_ones():
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 20_000))  # see test_refusals_name_the_reason
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


# ---------------------------------------------------------------------------------------------------------
# sphere/verify/_worker.py, called in this process (the pool's workers run it in subprocesses, which the
# mutation run cannot see). math-verify is used with its own alarms off; pytest runs tests in the main thread.
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_gold_cache(monkeypatch):
    cache: OrderedDict = OrderedDict()
    monkeypatch.setattr(_worker, "_GOLD_CACHE", cache)
    return cache


@pytest.fixture
def alarm_state():
    """Save and restore SIGALRM / SIGINT handlers, the real-time timer (pytest-timeout's) and the loggers
    worker_main silences."""
    alrm, intr = signal.getsignal(signal.SIGALRM), signal.getsignal(signal.SIGINT)
    timer = signal.getitimer(signal.ITIMER_REAL)
    levels = {n: logging.getLogger(n).level for n in ("math_verify", "latex2sympy2_extended")}
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, alrm)
    signal.signal(signal.SIGINT, intr)
    if timer[0] > 0:
        signal.setitimer(signal.ITIMER_REAL, *timer)
    for n, lv in levels.items():
        logging.getLogger(n).setLevel(lv)


class _RLimits:
    """Stands in for resource.setrlimit: records the calls (the test process must keep its memory)."""

    def __init__(self, exc: BaseException | None = None):
        self.calls: list = []
        self.exc = exc

    def __call__(self, which, limits):
        self.calls.append((which, limits))
        if self.exc is not None:
            raise self.exc


@pytest.fixture
def rlimits(monkeypatch):
    import resource

    rec = _RLimits()
    monkeypatch.setattr(resource, "setrlimit", rec)
    return rec


def test_worker_configs_and_parse():
    mv = _worker._mv()
    import math_verify

    assert mv is math_verify
    assert _worker._configs() == [math_verify.LatexExtractionConfig(boxed_match_priority=0),
                                  math_verify.ExprExtractionConfig()]
    assert _worker._parse("1/2") == [sympy.Rational(1, 2), "\\frac{1}{2}"]
    assert [str(x) for x in _worker._parse("x = 3")] == ["Eq(x, 3)", "x = 3"]
    assert _worker._parse("}{") == []
    # the whole span, as a \\boxed{} first: not the "final answer is ... I hope" inside it
    assert [str(x) for x in _worker._parse("final answer is 3 I hope")][1:] == ["final answer is 3 I hope"]


def test_worker_parse_and_verify_leave_the_soft_timer_alone(alarm_state, fresh_gold_cache):
    """math-verify's own timeouts (signal.alarm) would cancel the worker's soft timer: they are off."""
    signal.signal(signal.SIGALRM, lambda *a: None)
    signal.setitimer(signal.ITIMER_REAL, 100.0)
    assert [str(x) for x in _worker._parse("x+1")] == ["x + 1", "x+1"]
    assert signal.getitimer(signal.ITIMER_REAL)[0] > 50
    assert _worker.check_pair("x^2+2x+1", "(x+1)^2") is True
    assert signal.getitimer(signal.ITIMER_REAL)[0] > 50


def test_worker_gold_cache_is_an_lru(monkeypatch, fresh_gold_cache):
    monkeypatch.setattr(_worker, "_GOLD_CACHE_SIZE", 2)
    one = _worker._gold("1")
    assert one == [sympy.Integer(1), "1"] and list(fresh_gold_cache) == ["1"]
    assert fresh_gold_cache["1"] is one
    two = _worker._gold("2")
    assert list(fresh_gold_cache) == ["1", "2"]  # two entries fit: nothing evicted yet
    assert _worker._gold("1") is one  # a hit: the same parse, moved to the end
    assert list(fresh_gold_cache) == ["2", "1"]
    assert _worker._gold("3") == [sympy.Integer(3), "3"]
    assert list(fresh_gold_cache) == ["1", "3"]  # the least recently used ("2") went
    assert _worker._gold("2") is not two and list(fresh_gold_cache) == ["3", "2"]


@pytest.mark.parametrize("pred, gold, want", [
    ("0.5", "\\frac{1}{2}", True),  # fast path
    ("5 apples and more pears", "5", True),  # the fast path's True comes before the prose rule
    ("x^2+2x+1", "(x+1)^2", True),  # math-verify
    ("x+y-1=0", "x+y=1", True),  # an equation against an equation goes to math-verify
    ("2x - y + 3 = 0", "y = 2x + 3", True),  # ... and against an assignment
    ("f(x)=0", "0", True),  # an assignment: its value is compared
    ("\\pi", "3.14159265358979", True),
    ("the answer: 5 and more", "5", False),  # prose pred (math-verify alone says True)
    ("5", "the answer: 5 and more", False),  # prose gold (math-verify alone says True)
    ("2x - y + 2z - 18 = 0", "0", False),  # a plane is not the value 0 (math-verify alone says True)
    ("3x=0", "0", False),
    ("3", "}{", False),  # gold does not parse
    ("}{", "3", False),  # pred does not parse
    ("x+2", "x+1", False),
    ("\\frac{1}{2^{98}}", "\\frac{1}{2^{99}}", False),  # the exact-rational guard vetoes math-verify's True
    ("\\frac{1}{2^{99}}", "\\frac{1}{2^{98}}", False),
])
def test_worker_check_pair(pred, gold, want, fresh_gold_cache):
    assert _worker.check_pair(pred, gold) is want


def test_worker_math_verify_alone_would_say_true():
    """The rules check_pair adds are needed: math-verify's own verdict on these is True."""
    mv = _worker._mv()
    for pred, gold in [("the answer: 5 and more", "5"), ("5", "the answer: 5 and more"),
                       ("2x - y + 2z - 18 = 0", "0"), ("\\frac{1}{2^{98}}", "\\frac{1}{2^{99}}")]:
        assert mv.verify(_worker._parse(gold), _worker._parse(pred), timeout_seconds=None) is True


class _NotSympy:
    """Not a sympy value, though it looks like one."""

    def doit(self):
        return sympy.Rational(1, 3)


class _NoDoit(sympy.Basic):
    def doit(self, **hints):
        raise ValueError("no")


@pytest.mark.parametrize("a, b, pred, gold, want", [
    (sympy.Rational(1, 2), sympy.Rational(1, 3), "a", "b", True),
    (sympy.Rational(1, 2), sympy.Rational(1, 2), "a", "b", False),
    (sympy.Rational(1, 2), sympy.Rational(1, 3), "0.5", "b", False),  # decimals: math-verify's rounding rules
    (sympy.Rational(1, 2), sympy.Rational(1, 3), "a", "0.3", False),
    (sympy.Rational(1, 2), "1/3", "a", "b", False),  # not sympy on one side
    ("1/2", sympy.Rational(1, 3), "a", "b", False),
    (sympy.Rational(1, 2), sympy.sqrt(2), "a", "b", False),  # irrational on one side
    (sympy.sqrt(2), sympy.Rational(1, 2), "a", "b", False),
    (sympy.Add(1, 1, evaluate=False), sympy.Integer(3), "a", "b", True),  # unevaluated: doit() first
    (sympy.Integer(3), sympy.Add(1, 1, evaluate=False), "a", "b", True),
    (sympy.Add(1, 1, evaluate=False), sympy.Integer(2), "a", "b", False),
    (_NoDoit(), sympy.Integer(2), "a", "b", False),  # a failing doit is "no opinion"
    (sympy.Rational(1, 2), _NotSympy(), "a", "b", False),  # only sympy values are compared
    (_NotSympy(), sympy.Rational(1, 2), "a", "b", False),
])
def test_worker_exact_disagree(a, b, pred, gold, want):
    assert _worker._exact_disagree(a, b, pred, gold) is want


@pytest.mark.parametrize("ans, want", [
    ("2x - y + 2z - 18 = 0", True), ("3x=0", True), ("xy = 0", True), ("\\alpha x = 0", True),
    ("2x \\le y = 0", True), ("2x <= 1 = 0", True),  # relations do not count as "="
    ("x = 3", False), ("x = 2y", False), ("f(x) = 2x", False), ("f ( x ) = 0", False), ("x_1 = 0", False),
    ("x_{12}=0", False), ("\\alpha = 0", False), ("\\frac{8}{24} = \\frac{1}{3}", False), ("3 = 3", False),
    ("2x = 0 = 0", False), ("1 \\le 2 = 0", False), ("2x + 1", False), ("2x >= 1", False), ("2x != 1", False), ("x => y", False),
    ("2x <= 1", False), ("", False),
])
def test_worker_equation_not_assignment(ans, want):
    assert _worker._is_equation_not_assignment(ans) is want


def test_worker_limit_memory(rlimits, monkeypatch):
    import resource

    _worker._limit_memory(0)
    _worker._limit_memory(-5)
    assert rlimits.calls == []
    _worker._limit_memory(1)
    _worker._limit_memory(3072)
    assert rlimits.calls == [(resource.RLIMIT_AS, (1048576, 1048576)),
                             (resource.RLIMIT_AS, (3072 * 1048576, 3072 * 1048576))]
    for exc in (ValueError("no"), OSError("not permitted")):  # the hard timeout remains: no error
        rlimits.exc = exc
        _worker._limit_memory(7)
    monkeypatch.setitem(sys.modules, "resource", None)  # no resource module on this platform
    _worker._limit_memory(7)
    assert len(rlimits.calls) == 4


def _serve(lines, memory_limit_mb=0, stdout=None, **kw) -> str:
    out = stdout if stdout is not None else io.StringIO()
    _worker.worker_main(memory_limit_mb, stdin=io.StringIO("".join(x + "\n" for x in lines)), stdout=out, **kw)
    return out.getvalue()


def _req(items, soft=5.0) -> str:
    return json.dumps({"soft": soft, "items": items})


def test_worker_main_serves_json_lines(alarm_state, rlimits, monkeypatch, fresh_gold_cache):
    import resource

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    out = _serve([_req([["1/2", "0.5"], ["3", "4"], [5, "5"], ["x^2+2x+1", "(x+1)^2"]]),
                  _req([["2x - y + 2z - 18 = 0", "0"]])], memory_limit_mb=3)
    assert out == '"ready"\n[true,false]\n[false,false]\n[true,false]\n[true,false]\n[false,false]\n'
    assert os.environ["OMP_NUM_THREADS"] == "1"
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # Ctrl-C is the parent's business
    assert signal.getsignal(signal.SIGALRM) is _worker._on_alarm
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # no soft timer left running
    assert logging.getLogger("math_verify").level == logging.CRITICAL
    assert logging.getLogger("latex2sympy2_extended").level == logging.CRITICAL
    assert rlimits.calls == [(resource.RLIMIT_AS, (3 * 1048576, 3 * 1048576))]


def test_worker_main_keeps_a_set_thread_count(alarm_state, rlimits, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert _serve([]) == '"ready"\n'
    assert os.environ["OMP_NUM_THREADS"] == "4" and rlimits.calls == []


def test_worker_main_defaults_to_the_standard_streams(alarm_state, rlimits, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(_req([["7", "7"], ["7", "8"]]) + "\n"))
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    _worker.worker_main(0)
    assert out.getvalue() == '"ready"\n[true,false]\n[false,false]\n'


def _sleepy(pred, gold):
    time.sleep(0.5)
    return True


def test_worker_main_soft_timeout(alarm_state, rlimits, monkeypatch):
    """A check past the soft timeout (at least 10 ms) answers [false, true]; the next item runs normally."""
    calls = []

    def check(pred, gold):
        calls.append(pred)
        return _sleepy(pred, gold) if pred == "slow" else pred == gold

    monkeypatch.setattr(_worker, "check_pair", check)
    out = _serve([_req([["slow", "slow"], ["1", "1"]], soft=0.0), _req([["slow", "slow"]], soft=-3)])
    assert out == '"ready"\n[false,true]\n[true,false]\n[false,true]\n'
    assert calls == ["slow", "1", "slow"]
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


@pytest.mark.parametrize("exc", [MemoryError, RecursionError, ValueError, KeyError, ZeroDivisionError])
def test_worker_main_a_failing_check_is_not_equal(alarm_state, rlimits, monkeypatch, exc):
    def check(pred, gold):
        if pred == "boom":
            raise exc("boom")
        return pred == gold

    monkeypatch.setattr(_worker, "check_pair", check)
    assert _serve([_req([["boom", "boom"], ["2", "2"]])]) == '"ready"\n[false,false]\n[true,false]\n'


@pytest.mark.parametrize("bad", [
    "not json", json.dumps({"items": [["1", "1"]]}), json.dumps({"soft": 1.0}),
    json.dumps({"soft": "x", "items": []}), json.dumps({"soft": None, "items": []}),
    json.dumps({"soft": 1.0, "items": 5}), json.dumps({"soft": 1.0, "items": [["1"]]}),
    json.dumps({"SOFT": 1.0, "ITEMS": [["1", "1"]]}),
])
def test_worker_main_stops_on_a_malformed_request(alarm_state, rlimits, bad):
    out = _serve([_req([["1", "1"]]), bad, _req([["2", "2"]])])
    assert out == '"ready"\n[true,false]\n'


class _Pipe(io.StringIO):
    """A stdout whose ``fail_at``-th write raises (the parent went away)."""

    def __init__(self, fail_at: int, exc: BaseException):
        super().__init__()
        self.fail_at, self.exc, self.writes = fail_at, exc, 0

    def write(self, s):
        self.writes += 1
        if self.writes >= self.fail_at:
            raise self.exc
        return super().write(s)


@pytest.mark.parametrize("exc", [BrokenPipeError(), OSError("gone")])
def test_worker_main_stops_when_the_parent_is_gone(alarm_state, rlimits, monkeypatch, exc):
    calls = []

    def check(pred, gold):
        calls.append(pred)
        return True

    monkeypatch.setattr(_worker, "check_pair", check)
    lines = [_req([["1", "1"], ["2", "2"]]), _req([["3", "3"]])]
    assert _serve(lines, stdout=_Pipe(1, exc)) == "" and calls == []  # no "ready": nothing served
    assert _serve(lines, stdout=_Pipe(3, exc)) == '"ready"\n[true,false]\n' and calls == ["1", "2"]


# ---------------------------------------------------------------------------------------------------------
# sphere/verify/extract.py
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, want", [
    ("√2", "\\sqrt{2}"), ("√2.25", "\\sqrt{2.25}"), ("√x", "\\sqrt{x}"), ("√X", "\\sqrt{X}"),
    ("√(x+1)", "\\sqrt{x+1}"), ("√{ab}", "\\sqrt{ab}"), ("√(7)", "\\sqrt{7}"), ("∛(27)", "\\sqrt[3]{27}"),
    ("∜{16}", "\\sqrt[4]{16}"), ("2√ (10)", "2\\sqrt{10}"),
])
def test_unicode_roots(text, want):
    assert ex.unicode_math(text) == want


def test_parse_number_bounds_and_signs():
    assert ex.parse_number("1" * 200) == (F(int("1" * 200)), True)  # MAX_NUMBER_DIGITS characters: still a number
    assert ex.parse_number("1" * 201) is None
    assert ex.parse_number("\\frac{3}{4}") == (F(3, 4), True)
    assert ex.parse_number("-\\frac{3}{4}") == (F(-3, 4), True)
    assert ex.parse_number("\\frac{-3}{4}") == (F(-3, 4), True)
    assert ex.parse_number("-\\frac{-3}{4}") == (F(3, 4), True)
    assert ex.parse_number("\\frac{3}{0}") is None and ex.parse_number("3/0") is None
    assert ex.parse_number("-3/4") == (F(-3, 4), True)
    assert ex.parse_number("-3.25") == (F(-13, 4), False) and ex.parse_number(".5") == (F(1, 2), False)
    assert ex.parse_number("") is None and ex.parse_number("x") is None


@pytest.mark.parametrize("ans, want", [
    ("f(x)=ax+b, where b is an arbitrary integer", True), ("abc def ghi", True), ("the answer: 5 and more", True),
    ("two apples", False), ("ab cd ef gh", False), ("xabc", False), ("\\frac \\sqrt \\alpha", False),
    ("one two\\text{three}", False), ("one two\\textbf{three four}", False), ("one two three", True),
    ("5", False), ("", False), ("a\\text{b}c d\\text{e}", False),
])
def test_is_prose(ans, want):
    assert ex.is_prose(ans) is want


def test_balanced_from_scans_at_most_max_answer_chars():
    n = ex.MAX_ANSWER_CHARS
    assert n == 1000
    assert ex.balanced_from("{" + "a" * n + "}", 0) == ("a" * n, n + 2)
    assert ex.balanced_from("xx{" + "a" * n + "}", 2) == ("a" * n, n + 4)
    assert ex.balanced_from("{" + "a" * (n + 1) + "}", 0) is None
    assert ex.balanced_from("xx{" + "a" * (n + 1) + "}", 2) is None
    assert ex.balanced_from("{a{b}\\}c}d", 0) == ("a{b}\\}c", 9)
    assert ex.balanced_from("{a{b}", 0) is None


@pytest.mark.parametrize("text, want", [
    ("\\boxed", True), ("so \\boxed  \t{3", True), ("\\fbox{3", True), ("\\boxed{3} then \\fbox{", True),
    ("\\boxed {3}", False), ("\\boxed X", False), ("\\boxed 5", False), ("no box", False), ("\\boxed{{3}", True),
    ("\\fbox{1} \\boxed{2}", False), ("\\boxed{3 \\boxed{4}", False),  # the last box decides
])
def test_has_open_box(text, want):
    assert ex.has_open_box(text) is want


# ---------------------------------------------------------------------------------------------------------
# sphere/verify/pool.py: the parent side, with tests/fixtures/verify_fake_worker.py as the worker (it answers
# pred == gold without sympy; "HANG" blocks, "DIE" exits), so no math-verify import is paid per worker.
# ---------------------------------------------------------------------------------------------------------


_FAKE = "verify_fake_worker"


@pytest.fixture
def fake_worker_env(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent / "fixtures"))


def _stats(**kw):
    base = dict.fromkeys(("checks", "fast_decided", "cache_hits", "worker_checks", "timeouts", "hard_kills",
                          "restarts", "crashes"), 0)
    base.update(kw)
    return base


def test_pool_check_passes_its_timeout(fake_worker_env):
    # fast path off and a pool timeout no reply can meet: only the per-call timeout lets the answer through
    with pool.Verifier(workers=1, timeout_s=1e-9, fast_path=False, worker_module=_FAKE) as v:
        v._all[0].wait_ready()
        assert v.check("\\boxed{7}", "7", timeout_s=30) is True
        assert v.check("\\boxed{7}", "8", timeout_s=30) is False
        assert v.stats() == dict(_stats(checks=2, worker_checks=2), workers=1, timeout_s=1e-9)


def test_pool_fast_path_and_cache(fake_worker_env):
    with pool.Verifier(workers=1, timeout_s=30, worker_module=_FAKE, cache_size=2) as v:
        pairs = [("no answer here", "5"), ("\\boxed{5}", None), ("\\boxed{5}", "  "), (None, "5"),
                 ("\\boxed{5}", "5.0"), ("\\boxed{4}", "5"), ("\\boxed{abc}", "abd"), ("\\boxed{HANG}", "HANG")]
        assert v.check_many(pairs) == [False, False, False, False, True, False, False, True]
        assert v.stats() == dict(_stats(checks=8, fast_decided=7, worker_checks=1), workers=1, timeout_s=30.0)
        assert list(v._cache.items()) == [(("abc", "abd"), False)]
        assert v.check_many([("\\boxed{abc}", "abd"), ("\\boxed{u}", "v"), ("\\boxed{w}", "z")]) == [False] * 3
        assert v.stats()["cache_hits"] == 1 and v.stats()["worker_checks"] == 3
        assert list(v._cache) == [("u", "v"), ("w", "z")]  # at most cache_size entries: the oldest went
        assert v.check_many([("\\boxed{u}", "v")]) == [False]
        assert v.stats()["cache_hits"] == 2 and v.stats()["worker_checks"] == 3
        # fast_path=False: every answer goes to the workers, the cache is neither read nor written
        assert v.check_many([("\\boxed{u}", "v"), ("\\boxed{5}", "5"), ("\\boxed{q}", "r")], fast_path=False) == [
            False, True, False]
        s = v.stats()
        assert (s["checks"], s["fast_decided"], s["cache_hits"], s["worker_checks"]) == (15, 7, 2, 6)
        assert sorted(v._cache) == [("u", "v"), ("w", "z")]


def test_pool_cache_evicts_the_least_recently_used(fake_worker_env):
    with pool.Verifier(workers=1, timeout_s=30, worker_module=_FAKE, cache_size=2) as v:
        assert v.check_many([("\\boxed{a}", "b"), ("\\boxed{c}", "d")]) == [False, False]
        assert list(v._cache) == [("a", "b"), ("c", "d")]
        assert v.check_many([("\\boxed{a}", "b")]) == [False]  # a hit: ("a", "b") is now the most recent
        assert list(v._cache) == [("c", "d"), ("a", "b")]
        assert v.check_many([("\\boxed{e}", "f")]) == [False]
        assert list(v._cache) == [("a", "b"), ("e", "f")]  # ("c", "d") was the least recently used
        assert v.stats()["cache_hits"] == 1 and v.stats()["worker_checks"] == 3


def test_pool_without_cache(fake_worker_env):
    with pool.Verifier(workers=1, timeout_s=30, worker_module=_FAKE, cache_size=0) as v:
        assert v.check_many([("\\boxed{a}", "b")] * 3) == [False] * 3
        assert v.check_many([("\\boxed{a}", "b")]) == [False]
        assert v.stats()["worker_checks"] == 4 and v.stats()["cache_hits"] == 0 and not v._cache


def test_pool_settings_are_validated(fake_worker_env):
    for kw, msg in [({"workers": 0}, "verify.workers must be >= 1 (got 0)"),
                    ({"timeout_s": -1}, "verify.timeout_s must be > 0 seconds (got -1)"),
                    ({"timeout_s": None}, "verify.timeout_s must be > 0 seconds (got None)")]:
        with pytest.raises(ValueError, match=__import__("re").escape(msg)):
            pool.Verifier(**{"workers": 1, "timeout_s": 1.0, "worker_module": _FAKE, **kw})
    with pool.Verifier(workers=2, timeout_s=2, chunk_size=0, memory_limit_mb=7, worker_module=_FAKE,
                       cache_size=-3) as v:
        assert (v.workers, v.timeout_s, v.chunk_size, v.memory_limit_mb, v.fast_path, v.cache_size) == (
            2, 2.0, 1, 7, True, 0)
        assert len(v.worker_pids()) == 2 and len(set(v.worker_pids())) == 2
        assert all(p.proc.args[-2:] == ["--memory-limit-mb", "7"] for p in v._all)
        assert all(p.proc.args[1:3] == ["-m", _FAKE] for p in v._all)
    assert v._closed and v._all == []
    with pytest.raises(RuntimeError, match="sphere.verify: Verifier is closed"):
        v.check_many([("\\boxed{1}", "1")])
    v.close()  # idempotent


def test_pool_singleton(fake_worker_env):
    pool.reset_verifier()
    try:
        v = pool.get_verifier(workers=1, timeout_s=3, worker_module=_FAKE)
        assert (v.workers, v.timeout_s) == (1, 3.0)
        assert pool.get_verifier(workers=2, timeout_s=9) is v  # the singleton keeps its settings
        assert pool.check_answers([("\\boxed{ab}", "ab"), ("\\boxed{ab}", "cd")]) == [True, False]
        assert pool.check_answer("\\boxed{HANG}", "1", timeout_s=0.5) is False
        assert pool.check_answer("\\boxed{x}", "x") is True
        s = v.stats()
        assert (s["checks"], s["worker_checks"], s["timeouts"], s["hard_kills"], s["restarts"]) == (4, 2, 1, 1, 1)
        pool.reset_verifier()
        assert v._closed
        w = pool.get_verifier(workers=1, timeout_s=4, worker_module=_FAKE)
        assert w is not v and w.timeout_s == 4.0
        w.close()
        assert pool.get_verifier(workers=1, timeout_s=5, worker_module=_FAKE) is not w  # a closed one is replaced
    finally:
        pool.reset_verifier()
    assert pool._SINGLETON is None


# ---------------------------------------------------------------------------------------------------------
# sphere/verify/validate.py, on a small benchmark file and the fake worker
# ---------------------------------------------------------------------------------------------------------


def _bench(tmp_path, name, rows):
    path = tmp_path / val.BENCHMARK_FILES[name]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_validate_figures_on_a_small_benchmark(tmp_path, fake_worker_env, monkeypatch):
    assert val.BENCHMARK_FILES["math500"] == "math500/test.jsonl" and val.BENCHMARK_FILES["gsm8k"] == "gsm8k/test.jsonl"
    clock = itertools.cycle([100.0, 101.23456])  # each benchmark's timing reads the clock twice
    monkeypatch.setattr(val, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    rows = [
        {"id": "a", "problem": "p", "answer": "5", "solution": "so \\boxed{5}"},
        {"id": "b", "problem": "p", "answer": "5.0", "solution": "#### 7"},  # a miss; same gold as a
        {"id": "e", "problem": "p", "answer": "7", "solution": "the answer is 7"},
        {"id": "c", "problem": "p", "answer": "abc", "solution": "\\boxed{abd}"},  # a miss (worker)
        {"id": "d", "problem": "p", "answer": "9", "solution": ""},  # no solution: not a validation row
    ]
    _bench(tmp_path, "math500", rows)
    # "1" vs "1.0" and "2" vs "2.0": equal on the fast path only (the fake worker compares strings)
    _bench(tmp_path, "gsm8k", [{"id": "g1", "problem": "p", "answer": "1.0", "solution": "#### 1"},
                                {"id": "g2", "problem": "p", "answer": "3", "solution": "#### 2"},
                                {"id": "g3", "problem": "p", "answer": "2.0", "solution": "#### 2.0"}])
    _bench(tmp_path, "aime24", [{"id": "x", "problem": "p", "answer": "4", "solution": "\\boxed{4}"}])
    assert [r["id"] for r in val.load_rows(tmp_path, "math500")] == ["a", "b", "e", "c"]
    with pool.Verifier(workers=1, timeout_s=30, worker_module=_FAKE) as v:
        rep = val.validate(v, tmp_path, names=("math500", "gsm8k", "aime24"), shifts=(1,))
        rep2 = val.validate(v, tmp_path, names=("math500",), shifts=(1, 3), fast_path=False)
        rep3 = val.validate(v, tmp_path, names=("gsm8k",), fast_path=False)
    assert list(rep) == ["math500", "gsm8k", "aime24"]
    assert rep["math500"] == {
        "self_n": 4, "self_rate": 0.5,
        "misses": [{"id": "b", "gold": "5.0", "extracted": "7"}, {"id": "c", "gold": "abc", "extracted": "abd"}],
        "cross_n": 3, "cross_rate": 1 / 3,  # (a, b) has equal golds after normalisation: not a cross pair
        "false_positives": [{"id": "b", "other_id": "e", "gold": "5.0", "other_gold": "7", "extracted": "7"}],
        "seconds": 1.23,
    }
    assert rep["gsm8k"] == {
        "self_n": 3, "self_rate": 2 / 3, "misses": [{"id": "g2", "gold": "3", "extracted": "2"}],
        "cross_n": 3, "cross_rate": 1 / 3,
        "false_positives": [{"id": "g2", "other_id": "g3", "gold": "3", "other_gold": "2.0", "extracted": "2"}],
        "seconds": 1.23,
    }
    assert rep["aime24"] == {"self_n": 1, "self_rate": 1.0, "misses": [], "cross_n": 0, "cross_rate": 0.0,
                             "false_positives": [], "seconds": 1.23}
    m2 = rep2["math500"]
    assert (m2["self_n"], m2["self_rate"], m2["cross_n"]) == (4, 0.5, 6)
    assert [(f["id"], f["other_id"]) for f in m2["false_positives"]] == [("b", "e")]
    g3 = rep3["gsm8k"]  # the workers alone: "1" is not "1.0" to the fake worker
    assert (g3["self_rate"], [m["id"] for m in g3["misses"]], g3["cross_n"], g3["false_positives"]) == (
        1 / 3, ["g1", "g2"], 3, [])


def test_load_rows_requires_the_fields(tmp_path):
    _bench(tmp_path, "math500", [{"id": "a", "answer": "1", "solution": "#### 1"}])
    with pytest.raises(ValueError, match=r"test.jsonl:1: field 'problem' must be a non-empty string \(got None\)"):
        val.load_rows(tmp_path, "math500")


def test_validate_cross_pairs():
    rows = [{"answer": a} for a in ("1", "1.0", "2", "\\frac{1}{2}", "0.5")]
    assert val.cross_pairs(rows) == [(1, 2), (2, 3), (3, 4), (4, 0)]  # 1/2 vs 0.5: strings differ
    assert val.cross_pairs(rows, 2) == [(0, 2), (1, 3), (2, 4), (3, 0), (4, 1)]
    assert val.cross_pairs(rows, 5) == []  # j == i
    assert val.cross_pairs([], 1) == []


def test_validate_empty_benchmark(tmp_path, fake_worker_env):
    _bench(tmp_path, "aime24", [{"id": "x", "problem": "p", "answer": "1"}])  # no solutions at all
    with pool.Verifier(workers=1, timeout_s=30, worker_module=_FAKE) as v:
        r = val.validate(v, tmp_path, names=("aime24",))["aime24"]
    assert (r["self_n"], r["self_rate"], r["cross_n"], r["cross_rate"]) == (0, 0.0, 0, 0.0)


_ENV_WORKER = '''import json, os, sys
sys.stdout.write('"ready"\\n')
sys.stdout.flush()
for line in sys.stdin:
    for pred, gold in json.loads(line)["items"]:
        if pred.startswith("fd"):
            try:
                os.fstat(int(pred[2:]))
                got = "open"
            except OSError:
                got = "closed"
        else:
            got = os.environ.get(pred, "unset")
        sys.stdout.write(json.dumps([got == gold, False]) + "\\n")
        sys.stdout.flush()
'''


def test_pool_worker_environment(tmp_path, monkeypatch):
    """Workers get OMP_NUM_THREADS=1, the package root first on PYTHONPATH, and no inherited descriptors."""
    (tmp_path / "env_worker.py").write_text(_ENV_WORKER)
    monkeypatch.chdir(tmp_path)  # `python -m env_worker` finds it in the working directory
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    r, w = os.pipe()
    os.set_inheritable(r, True)
    try:
        with pool.Verifier(workers=1, timeout_s=30, worker_module="env_worker", fast_path=False) as v:
            got = v.check_many([("\\boxed{OMP_NUM_THREADS}", "1"), ("\\boxed{PYTHONPATH}", pool._PKG_ROOT),
                                (f"\\boxed{{fd{r}}}", "closed")])
        assert got == [True, True, True]
        monkeypatch.setenv("PYTHONPATH", "/some/where")
        with pool.Verifier(workers=1, timeout_s=30, worker_module="env_worker", fast_path=False) as v:
            assert v.check("\\boxed{PYTHONPATH}", pool._PKG_ROOT + os.pathsep + "/some/where") is True
    finally:
        os.close(r)
        os.close(w)


def test_pool_proc_reads_lines(tmp_path, monkeypatch):
    (tmp_path / "env_worker.py").write_text(_ENV_WORKER)
    monkeypatch.chdir(tmp_path)
    p = pool._Proc(0, "env_worker")
    try:
        p._buf = b"\nabc\n"
        assert p.readline(5) == b""  # an empty line is a line
        assert p.readline(5) == b"abc"
        p.wait_ready()
        assert p.ready is True
        assert p.readline(0.05) is None  # nothing more within the timeout
        p.send(1.0, [("OMP_NUM_THREADS", "1"), ("OMP_NUM_THREADS", "2")])
        assert (p.readline(5), p.readline(5)) == (b"[true, false]", b"[false, false]")
        p.proc.stdin.close()  # the worker exits on EOF
        with pytest.raises(EOFError, match="verifier worker exited"):
            p.readline(5)
    finally:
        p.kill()
    assert p.proc.returncode is not None


def test_pool_proc_default_worker_module():
    p = pool._Proc(5)
    try:
        assert p.proc.args[1:] == ["-m", "sphere.verify._worker", "--memory-limit-mb", "5"]
        assert p.ready is False
    finally:
        p.kill()


def test_text_commands_are_read_as_a_space_between_words():
    # "ab\text{q}cd": two 2-letter words, not one 4-letter word glued across the command
    assert not ex.is_prose("ab\\text{q}cd ef\\text{q}gh ij\\text{q}kl")
    assert ex.is_prose("the \\text{x} answer is here")


def test_square_roots_of_zero_and_of_negatives():
    assert evaluate("\\sqrt{0}") == 0 and isinstance(evaluate("\\sqrt{0}"), Fraction)
    with pytest.raises(NotArithmetic) as e:
        evaluate("\\sqrt{-1}")
    assert str(e.value) == "square root of a negative number"


def test_pool_replace_swaps_only_the_dead_worker(fake_worker_env):
    with pool.Verifier(workers=2, timeout_s=30, worker_module=_FAKE) as v:
        dead, alive = v._all
        q = v._replace(dead)
        assert v._all == [alive, q] and q is not dead and dead.proc.poll() is not None
        assert len(set(v.worker_pids())) == 2 and v.stats()["restarts"] == 1


def test_module_level_checks_pass_their_timeout(monkeypatch):
    seen = []

    class RecordingVerifier:  # test double of the process-wide Verifier
        def check_many(self, pairs, timeout_s=None):
            seen.append((pairs, timeout_s))
            return [True] * len(pairs)

    monkeypatch.setattr(pool, "get_verifier", lambda: RecordingVerifier())
    assert pool.check_answer("\\boxed{1}", "1", timeout_s=2.5) is True
    assert pool.check_answers([("a", "b")], timeout_s=1.5) == [True]
    assert seen == [([("\\boxed{1}", "1")], 2.5), ([("a", "b")], 1.5)]


@pytest.mark.parametrize("text, msg", [
    ("\\frac{1)2", "expected }, got ('op', ')')"), ("\\frac{1]{2}", "expected }, got ('op', ']')"),
    ("\\frac{1", "expected }, got None"), ("\\fracx", "unsupported command \\fracx"),
    ("\\frac{1}", "expected a {group}"), ("\\frac(1){2}", "expected a {group}"),
])
def test_groups_close_with_their_own_brace(text, msg):
    with pytest.raises(NotArithmetic) as e:
        evaluate(text)
    assert str(e.value) == msg


def test_a_forked_child_gets_its_own_verifier(fake_worker_env):
    """A child forked after the parent built the process-wide Verifier inherits it without its executor's
    threads: checks that need a worker hung forever there (seen in the mutation run's forked workers)."""
    pool.reset_verifier()
    try:
        parent = pool.get_verifier(workers=1, timeout_s=30, worker_module=_FAKE)
        assert parent.check_many([("\\boxed{abc}", "abd")]) == [False]
        pid = os.fork()
        if pid == 0:  # the child: exit status 0 = its own verifier answered
            code = 1
            try:
                v = pool.get_verifier(workers=1, timeout_s=30, worker_module=_FAKE)
                code = 0 if v is not parent and v.check_many([("\\boxed{abc}", "abd")]) == [False] else 3
            finally:
                os._exit(code)
        deadline = time.monotonic() + 60
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if done[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child's check never returned")
        assert os.waitstatus_to_exitcode(done[1]) == 0
        assert pool.get_verifier() is parent and parent.check_many([("\\boxed{u}", "v")]) == [False]
    finally:
        pool.reset_verifier()


@pytest.mark.parametrize("norm, top", [
    ("(1,2)", True), ("3,5,7", True), ("[2,5)", True), ("\\frac{1,2}{3}", False), ("{1,2}", False),
    ("{{1}},2", True), ("{a}{b,c}", False), ("{1}{2},3", True), ("12", False), ("", False),
    ("}{,", True), ("{1}},2", False),
])
def test_top_level_commas_are_counted_outside_brace_groups(norm, top):
    assert ex._has_top_level_comma(norm) is top


@pytest.mark.parametrize("norm, expr", [
    ("x^3+3x-6", True), ("(a+5)(b+2)", True), ("8n^2+4n+1", True), ("Ab+1", False), ("xy+1", False),
    ("AB+1", False), ("x+\\pi", True), ("e^x", False), ("2i+x", False), ("x_1+1", False), ("3.5x", False),
    ("12", False), ("x=1", False), ("\\frac{x}{2}", True), ("ab", False),
])
def test_expressions_in_one_letter_variables(norm, expr):
    assert ex._is_expression_in_variables(norm) is expr
