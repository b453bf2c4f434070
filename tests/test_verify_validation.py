"""Validation on the real benchmark files: each reference solution against its own gold answer
(>= 99% on MATH-500 and GSM8K test) and against another problem's different gold (<= 1% accepted).
Prints the figures; every miss must be listed, with its cause, in
tests/fixtures/verify_validation_misses.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sphere.verify import Verifier
from sphere.verify.validate import validate

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("SPHERE_DATA_DIR", ROOT / "data" / "benchmarks"))
FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "verify_validation_misses.json").read_text())
NAMES = ("math500", "gsm8k", "aime24")

pytestmark = pytest.mark.skipif(
    not (DATA / "math500" / "test.jsonl").is_file() or not (DATA / "gsm8k" / "test.jsonl").is_file(),
    reason=f"benchmark files not found under {DATA} (set SPHERE_DATA_DIR)",
)


def _check(report: dict, mode: str) -> None:
    for name in NAMES:
        r = report[name]
        print(f"[{mode}] {name}: self-agreement {r['self_rate']:.2%} of {r['self_n']}, "
              f"cross false positives {r['cross_rate']:.2%} of {r['cross_n']} ({r['seconds']} s)")
    for name in ("math500", "gsm8k"):
        assert report[name]["self_rate"] >= 0.99, report[name]["misses"]
        assert report[name]["cross_rate"] <= 0.01, report[name]["false_positives"]
    for name in NAMES:
        misses = {m["id"] for m in report[name]["misses"]}
        fps = {f"{m['id']}->{m['other_id']}" for m in report[name]["false_positives"]}
        assert misses == set(FIXTURE[name]["misses"]), (name, "misses", report[name]["misses"])
        assert fps == set(FIXTURE[name]["false_positives"]), (name, "false+", report[name]["false_positives"])


@pytest.fixture(scope="module")
def verifier():
    with Verifier(workers=2, timeout_s=5.0) as v:
        yield v


def test_validation_on_real_benchmarks(verifier, capsys):
    report = validate(verifier, DATA, NAMES, shifts=(1,), fast_path=True)
    with capsys.disabled():
        _check(report, "production")


def test_validation_on_real_benchmarks_math_verify_only(verifier, capsys):
    """The same figures with the parent fast path off: every check goes through math-verify."""
    report = validate(verifier, DATA, NAMES, shifts=(1,), fast_path=False)
    with capsys.disabled():
        _check(report, "workers-only")
