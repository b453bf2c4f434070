"""The verifier worker process: math-verify (sympy) runs only here, never in the caller's process.

Started as ``python -m sphere.verify._worker --memory-limit-mb N`` (a fresh interpreter: no fork of a
process holding torch/vLLM threads, no re-import of the caller's ``__main__``). Protocol: JSON lines on
stdin/stdout (never pickle):

    parent -> worker   {"soft": seconds, "items": [[pred_answer, gold], ...]}      (EOF = stop)
    worker -> parent   "ready" once after imports; then one [verdict, timed_out] per item, in order,
                       so the parent can time each item and kill a stuck worker.

Each item gets a soft timeout (``setitimer`` raising a BaseException that math-verify's ``except
Exception`` blocks cannot swallow); work stuck in C code (a huge integer power) is not interruptible, and
the parent's hard timeout kills the process. The address space is capped (``RLIMIT_AS``) so a hostile
expression hits MemoryError instead of the machine's memory.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
from collections import OrderedDict

from sphere.verify.extract import fast_verdict, is_prose


class _SoftTimeout(BaseException):
    """Raised by SIGALRM inside a check. BaseException so library ``except Exception`` cannot eat it."""


def _on_alarm(signum, frame):  # noqa: ARG001
    raise _SoftTimeout()


_GOLD_CACHE: OrderedDict[str, list] = OrderedDict()
_GOLD_CACHE_SIZE = 4096


def _mv():
    import math_verify  # imported lazily so the module imports cheaply in the parent (for tests)

    return math_verify


def _configs():
    mv = _mv()
    return [mv.LatexExtractionConfig(boxed_match_priority=0), mv.ExprExtractionConfig()]


def _parse(ans: str) -> list:
    mv = _mv()
    # Gold-guided: both sides are the extracted answer spans, offered to math-verify as a \boxed{} so its
    # extraction takes the whole span; the parse is latex first, then plain expression.
    return mv.parse("\\boxed{" + ans + "}", extraction_config=_configs(), parsing_timeout=None)


def _gold(gold: str) -> list:
    got = _GOLD_CACHE.get(gold)
    if got is None:
        got = _parse(gold)
        _GOLD_CACHE[gold] = got
        if len(_GOLD_CACHE) > _GOLD_CACHE_SIZE:
            _GOLD_CACHE.popitem(last=False)
    else:
        _GOLD_CACHE.move_to_end(gold)
    return got


def check_pair(pred: str, gold: str) -> bool:
    """math-verify verdict on two extracted answers, or'ed with the cheap opinion (normalised strings or
    exact values equal); prose answers are compared as strings only; an exact-rational guard vetoes
    math-verify's float-precision Trues.

    Unsafe outside a worker (sympy on model text, no timeout): call it only from here or from tests."""
    if fast_verdict(pred, gold) is True:  # the second opinion: normalised strings / exact values agree
        return True
    if is_prose(gold) or is_prose(pred):  # math-verify would compare a fragment of the text
        return False
    if _is_equation_not_assignment(pred) and not _is_equation_not_assignment(gold) and "=" not in gold:
        return False  # "2x - y + 2z - 18 = 0" is a plane, not the value 0 (math-verify compares the rhs)
    g = _gold(gold)
    if not g:
        return False
    p = _parse(pred)
    if not p:
        return False
    if not _mv().verify(g, p, timeout_seconds=None):
        return False
    return not _exact_disagree(g[0], p[0], pred, gold)


def _exact_disagree(a, b, pred: str, gold: str) -> bool:
    """True when both sides are exact rationals that differ.

    math-verify compares numbers at ~15 significant digits, so 1/2004! == 1/2006! and 1/2^99 == 1/2^98
    (huggingface/Math-Verify#14). Decimals are left to math-verify's rounding rules (0.333 vs 1/3)."""
    if "." in pred or "." in gold:
        return False
    try:
        from sympy import Basic

        if not (isinstance(a, Basic) and isinstance(b, Basic)):
            return False
        a, b = a.doit(), b.doit()
        return bool(a.is_Rational and b.is_Rational and a != b)
    except Exception:  # noqa: BLE001
        return False


_RELATION = re.compile(r"\\(?:le|ge|ne|leq|geq|neq)(?![a-zA-Z])|[<>!]=|=>|<=")
_VARIABLE = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]")  # a letter that is not part of a \command
_ASSIGN_LHS = re.compile(r"^\s*(?:[a-zA-Z](?:_\{?\w+\}?)?|\\[a-zA-Z]+|[a-zA-Z]\s*\(\s*[a-z]\s*\))\s*$")


def _is_equation_not_assignment(ans: str) -> bool:
    """An equation in variables whose left side is not a lone name: "2x - y + 2z - 18 = 0" (but not
    "x = 3", "f(x) = 2x", or a numeric chain "\\frac{8}{24} = \\frac{1}{3}")."""
    s = _RELATION.sub(" ", ans)
    if s.count("=") != 1:
        return False
    lhs = s.split("=", 1)[0]
    if not _VARIABLE.search(lhs):
        return False
    return not _ASSIGN_LHS.match(lhs)


def _limit_memory(mb: int) -> None:
    if mb <= 0:
        return
    try:
        import resource

        lim = mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    except (ImportError, ValueError, OSError):  # not on this platform / not permitted: hard timeout remains
        pass


def worker_main(memory_limit_mb: int, stdin=None, stdout=None) -> None:
    """Serve checks on ``stdin``/``stdout`` (JSON lines) until EOF."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which stops us
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    logging.getLogger("latex2sympy2_extended").setLevel(logging.CRITICAL)
    _mv()
    import sympy  # noqa: F401  (warm the import before declaring ready)

    _limit_memory(memory_limit_mb)
    signal.signal(signal.SIGALRM, _on_alarm)
    try:
        stdout.write('"ready"\n')
        stdout.flush()
    except (BrokenPipeError, OSError):  # the parent is gone (killed, interrupted): nothing to serve
        return
    for line in stdin:
        try:
            msg = json.loads(line)
            soft = float(msg["soft"])
            items = [(str(p), str(g)) for p, g in msg["items"]]
        except (ValueError, KeyError, TypeError):
            return  # a malformed request means a broken parent: exit, the parent restarts us
        for pred, gold in items:
            timed_out = False
            verdict = False
            try:
                signal.setitimer(signal.ITIMER_REAL, max(0.01, soft))
                try:
                    verdict = check_pair(pred, gold)
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except _SoftTimeout:
                timed_out = True
            except (MemoryError, RecursionError):
                verdict = False
            except Exception:  # noqa: BLE001  (any parser failure is a "not equal")
                verdict = False
            try:
                stdout.write(f"[{'true' if verdict else 'false'},{'true' if timed_out else 'false'}]\n")
                stdout.flush()
            except (BrokenPipeError, OSError):
                return


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="sphere verifier worker (started by sphere.verify.pool)")
    ap.add_argument("--memory-limit-mb", type=int, default=3072)
    try:
        worker_main(ap.parse_args().memory_limit_mb)
    except BrokenPipeError:  # the parent went away mid-write: exit quietly, no traceback on the terminal
        os._exit(0)
