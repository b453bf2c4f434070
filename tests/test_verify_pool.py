"""The worker pool: verdicts through math-verify, publicly reported checker failures, pathological input,
hard timeouts (kill + replace), concurrent callers. One module-scoped pool keeps the startup cost low."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from sphere.verify import Verifier, check_answer, check_answers, get_verifier, reset_verifier
from sphere.verify.validate import PATHOLOGICAL_INPUTS as PATHOLOGICAL

# (completion, gold, expected verdict, where the case comes from)
REGRESSIONS = [
    ("Final Answer: **73**", "73", True, "huggingface/Math-Verify#76 (markdown bold)"),
    ("Thus the answer is **73**.", "73", True, "huggingface/Math-Verify#76"),
    ("$\\boxed{\\text{13}}$", "13", True, "huggingface/Math-Verify#37 (\\text{13})"),
    ("\\boxed{\\frac{1}{2006!}}", "\\frac{1}{2004!}", False, "huggingface/Math-Verify#14 (tiny values)"),
    ("\\boxed{\\frac{1}{2^{98}}}", "\\frac{1}{2^{99}}", False, "huggingface/Math-Verify#14"),
    ("\\boxed{2021}", "\\pm 2021", False, "huggingface/Math-Verify#14 (±)"),
    ("\\boxed{\\pm 2021}", "\\pm 2021", True, "±"),
    ("\\boxed{1\\pm\\sqrt{5}}", "1\\pm\\sqrt{5}", True, "± in MATH-500"),
    ("\\boxed{1+\\sqrt{5}}", "1\\pm\\sqrt{5}", False, "± is not +"),
    ("\\boxed{1:00}", "12:00", False, "huggingface/Math-Verify#14 (times)"),
    ("\\boxed{4\\sqrt{2}}", "4", False, "huggingface/Math-Verify#41"),
    ("\\boxed{\\frac{2}{3}}", "2/3", True, "huggingface/Math-Verify#1 (a/b)"),
    ("\\boxed{\\frac12}", "\\frac{1}{2}", True, "huggingface/Math-Verify#35 (\\frac12)"),
    ("\\boxed{(3, \\frac{2\\pi}{3})}", "\\left( 3, \\frac{\\pi}{2} \\right)", False,
     "huggingface/Math-Verify#56"),
    ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", True,
     "huggingface/Math-Verify#56"),
    ("\\boxed{(2,1)}", "(1,2)", False, "tuples are ordered"),
    ("\\boxed{[2,5)}", "[2,5]", False, "interval end points"),
    ("\\boxed{[2,5)}", "[2,5)", True, "interval"),
    ("\\boxed{(-\\infty, 2) \\cup (3, \\infty)}", "(-\\infty, 2) \\cup (3, \\infty)", True, "union"),
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", True,
     "matrix"),
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 3 \\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", False,
     "matrix"),
    ("\\boxed{120}", "5!", True, "factorial"),
    ("\\boxed{5!}", "120", True, "factorial"),
    ("\\boxed{24}", "5!", False, "factorial"),
    ("\\boxed{50\\%}", "50", True, "percent"),
    ("\\boxed{0.5}", "\\frac{1}{2}", True, "decimal vs fraction"),
    ("\\boxed{0.333}", "\\frac{1}{3}", False, "rounding to 3 places is not equal"),
    ("\\boxed{30^\\circ}", "30", True, "degrees"),
    ("\\boxed{10 \\text{ cm}}", "10", True, "units"),
    ("The answer is $1,000$.", "1000", True, "thousands separator"),
    ("\\boxed{10,080}", "10,\\!080", True, "MATH-500 separator style"),
    ("\\boxed{\\text{(C)}}", "\\text{(C)}", True, "multiple choice"),
    ("\\boxed{C}", "\\text{(C)}", True, "multiple choice letter"),
    ("\\boxed{\\text{(B)}}", "\\text{(C)}", False, "multiple choice"),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", True, "algebraic equivalence"),
    ("\\boxed{x = 3}", "3", True, "assignment"),
    ("\\boxed{Evelyn}", "\\text{Evelyn}", True, "word answer"),
    ("\\boxed{Navin}", "\\text{Evelyn}", False, "word answer"),
    ("\\boxed{2x - y + 2z - 18 = 0}", "0", False, "MATH train precalculus/900 vs 905 (equation vs value)"),
    ("\\boxed{f(x) = 2x}", "2x", True, "function assignment"),
    ("\\boxed{\\frac{8}{24}=\\frac{1}{3}}", "\\frac{1}{3}", True, "numeric chain (OlympiadBench 2836)"),
    ("\\boxed{y = 2x + 3}", "y = 2x + 3", True, "equation vs the same equation"),
    ("#### 18", "18", True, "GSM8K"),
    ("#### 17", "18", False, "GSM8K"),
]



@pytest.fixture(scope="module")
def verifier():
    v = Verifier(workers=2, timeout_s=5.0)
    yield v
    v.close()


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "workers-only"])
def test_regressions(verifier, fast_path):
    got = verifier.check_many([(c, g) for c, g, _, _ in REGRESSIONS], fast_path=fast_path)
    wrong = [(src, c, g, e) for (c, g, e, src), r in zip(REGRESSIONS, got, strict=True) if r != e]
    assert not wrong, wrong


# Hangs are pytest-timeout's job (a stuck check would block check_many forever): these markers fail such a
# test with a traceback; no wall-clock assertion inside the tests (speed belongs to the benchmarks).
@pytest.mark.timeout(300)
def test_pathological_inputs_return_within_timeout():
    with Verifier(workers=2, timeout_s=1.0) as v:
        for text in PATHOLOGICAL:
            got = v.check_many([(text, "5"), (text, text[:200])])
            assert got[0] is False
        s = v.stats()
        assert s["checks"] == 2 * len(PATHOLOGICAL)
        # still healthy after all of it
        assert v.check_many([("\\boxed{\\frac{1}{2}}", "0.5")], fast_path=False) == [True]


@pytest.mark.timeout(300)
def test_hard_timeout_kills_and_replaces_a_stuck_worker(monkeypatch):
    # A FakeWorker that blocks with SIGALRM ignored stands in for sympy stuck in C code.
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "fixtures"))
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent / "fixtures"))
    with Verifier(workers=1, timeout_s=1.0, worker_module="verify_fake_worker") as v:
        got = v.check_many([("\\boxed{7}", "7"), ("\\boxed{HANG}", "1"), ("\\boxed{8}", "8"),
                            ("\\boxed{DIE}", "1"), ("\\boxed{9}", "8")], fast_path=False)
        s = v.stats()
        assert v.check_many([("\\boxed{3}", "3")], fast_path=False) == [True]
    assert got == [True, False, True, False, False]
    assert s["timeouts"] == 1 and s["hard_kills"] == 1 and s["crashes"] == 1 and s["restarts"] == 2


def test_cache_answers_repeats_but_never_timeouts(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent / "fixtures"))
    with Verifier(workers=1, timeout_s=1.0, worker_module="verify_fake_worker") as v:
        pairs = [("\\boxed{abc}", "abd"), ("\\boxed{HANG}", "1"), ("\\boxed{xyz}", "abc")]
        assert v.check_many(pairs) == [False, False, False]
        assert v.check_many(pairs) == [False, False, False]
        s = v.stats()
    assert s["worker_checks"] == 4 and s["cache_hits"] == 2  # the second abc/abd and xyz/abc: cache
    assert s["timeouts"] == 2 and s["hard_kills"] == 2  # the hung check was retried, not cached


def test_concurrent_callers_get_their_own_answers(verifier):
    errors: list[str] = []

    def run(k: int) -> None:
        pairs = [(f"\\boxed{{\\frac{{{i}}}{{{k}}}}}", f"{i}/{k}") for i in range(1, 30)]
        pairs += [(f"\\boxed{{{i}}}", f"{i + 1}") for i in range(30)]
        want = [True] * 29 + [False] * 30
        got = verifier.check_many(pairs, fast_path=False)
        if got != want:
            errors.append(f"thread {k}: {got}")

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2, 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors


def test_module_level_api_and_singleton():
    reset_verifier()  # other tests in the session may have used the process-wide singleton already
    try:
        assert check_answer("so the answer is \\boxed{\\dfrac{1}{2}}.", "0.5") is True
        assert check_answers([("#### 5", "5"), ("#### 5", "6"), ("no answer", "6")]) == [True, False, False]
        v = get_verifier()
        assert v is get_verifier()
        s = v.stats()
        assert s["checks"] == 4 and set(s) >= {"checks", "timeouts", "restarts"}
    finally:
        reset_verifier()


def test_closed_verifier_refuses_work():
    v = Verifier(workers=1, timeout_s=1.0)
    v.close()
    with pytest.raises(RuntimeError, match="closed"):
        v.check_many([("1", "1")])
    with pytest.raises(ValueError, match="timeout_s"):
        Verifier(workers=1, timeout_s=0)


@pytest.mark.timeout(300)
def test_interpreter_exit_stops_workers_without_close(tmp_path):
    """A script that never calls close(): it must exit promptly and leave no worker process behind."""
    import os
    import subprocess
    import sys

    script = tmp_path / "use_verifier.py"
    script.write_text(
        "from sphere.verify import check_answers, get_verifier\n"
        "print(check_answers([('\\\\boxed{x^2}', 'x^2'), ('#### 4', '5')]))\n"
        "print(*get_verifier().worker_pids())\n"
    )
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "[True, False]"
    # each worker exits on its own once the interpreter is gone (stdin EOF / the parent's exit hook); a
    # worker that never does hangs here, which the timeout marker turns into a failure
    pids = list(map(int, lines[1].split()))
    assert pids
    for pid in pids:
        while _running(pid):
            time.sleep(0.1)


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (Linux /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
