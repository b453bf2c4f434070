"""Answer verification: extraction, normalisation and a process-pool checker with hard timeouts.

Public API::

    extract_answer(text) -> str | None          # last \\boxed{}, "#### N", "the answer is", last number
    normalize_answer(s) -> str                  # canonical string (units, %, degrees, separators, ...)
    check_answer(completion, gold, timeout_s=None) -> bool
    check_answers(pairs, timeout_s=None) -> list[bool]
    get_verifier(workers=2, timeout_s=5.0) -> Verifier   # process-wide; .check_many, .stats(), .close()

sympy / math-verify only ever see model text inside the worker processes (``sphere.verify._worker``).
"""

from __future__ import annotations

from sphere.verify.extract import extract_answer, fast_verdict, normalize_answer, parse_number
from sphere.verify.pool import Verifier, check_answer, check_answers, get_verifier, reset_verifier

# Bumped whenever a verdict can change (extraction, normalisation, fast path, worker rules); recorded with
# evaluation results (sphere.evaluation.harness.checker_info) so scores from different checkers are not mixed.
CHECKER_VERSION = "sphere-verify-2"  # 2: a truncated \\boxed{ is no answer; Unicode math normalised

__all__ = [
    "CHECKER_VERSION",
    "extract_answer",
    "normalize_answer",
    "parse_number",
    "fast_verdict",
    "check_answer",
    "check_answers",
    "get_verifier",
    "reset_verifier",
    "Verifier",
]
