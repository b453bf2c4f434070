"""Validate the checker on real benchmark data (used by ``scripts/validate_verifier.py`` and the tests).

Two figures per benchmark:
- self-agreement: each reference ``solution`` checked against its own gold ``answer`` (should be ~100%);
- cross false-positive rate: each solution checked against the gold answer of the problem ``shift``
  places later, over pairs whose two golds differ after normalisation (should be ~0%).
"""

from __future__ import annotations

import time
from pathlib import Path

from sphere.io import iter_jsonl_strict
from sphere.verify.extract import extract_answer, normalize_answer
from sphere.verify.pool import Verifier

# Hostile completions that must come back False within the hard timeout (power towers, 100k-character
# strings, 10k nested braces, binary junk, deep parentheses, undefined values).
PATHOLOGICAL_INPUTS = [
    "\\boxed{10^{10^{10^{10}}}}",
    "\\boxed{2^{2^{2^{2^{2^{2^{2}}}}}}}",
    "\\boxed{9^{9^{9^{9}}}!}",
    "x" * 100_000,
    "\\boxed{" + "1+" * 400 + "1}",
    "1" * 100_000,
    "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    "\\boxed{" + "(" * 450 + "1" + ")" * 450 + "}",
    bytes(range(256)).decode("latin-1") * 400,
    "\\boxed{\\frac{1}{0}}",
    "\\boxed{\\infty - \\infty}",
    "\\boxed{\\x00\\ud800}",
]

# benchmark name -> file under the data dir
BENCHMARK_FILES = {
    "math500": "math500/test.jsonl",
    "gsm8k": "gsm8k/test.jsonl",
    # informational: their solutions do not end in a \boxed / #### answer, so extraction falls back to
    # "the answer is" / the last number and self-agreement is expected to be well below 100%
    "aime24": "aime24/test.jsonl",
    "olympiadbench": "olympiadbench/test.jsonl",
    "math_train": "math/train.jsonl",
}


def load_rows(data_dir: str | Path, name: str) -> list[dict]:
    path = Path(data_dir) / BENCHMARK_FILES[name]
    return [r for r in iter_jsonl_strict(path, required=("id", "problem", "answer")) if r.get("solution")]


def cross_pairs(rows: list[dict], shift: int = 1) -> list[tuple[int, int]]:
    """(i, j) with j = i + shift (mod n) whose gold answers differ after normalisation."""
    n = len(rows)
    out = []
    for i in range(n):
        j = (i + shift) % n
        if i != j and normalize_answer(rows[i]["answer"]) != normalize_answer(rows[j]["answer"]):
            out.append((i, j))
    return out


def validate(
    verifier: Verifier, data_dir: str | Path, names: tuple[str, ...] = ("math500", "gsm8k"),
    shifts: tuple[int, ...] = (1,), fast_path: bool = True,
) -> dict:
    """Figures and misses per benchmark: ``{name: {self_rate, self_n, misses: [...], cross_rate, cross_n,
    false_positives: [...], seconds}}``."""
    report: dict = {}
    for name in names:
        rows = load_rows(data_dir, name)
        t0 = time.perf_counter()
        verdicts = verifier.check_many([(r["solution"], r["answer"]) for r in rows], fast_path=fast_path)
        misses = [
            {"id": r["id"], "gold": r["answer"], "extracted": extract_answer(r["solution"])}
            for r, ok in zip(rows, verdicts, strict=True) if not ok
        ]
        cps = [p for s in shifts for p in cross_pairs(rows, s)]
        cross = [(rows[i]["solution"], rows[j]["answer"]) for i, j in cps]
        cv = verifier.check_many(cross, fast_path=fast_path)
        fps = [
            {"id": rows[i]["id"], "other_id": rows[j]["id"], "gold": rows[i]["answer"],
             "other_gold": rows[j]["answer"], "extracted": extract_answer(rows[i]["solution"])}
            for (i, j), ok in zip(cps, cv, strict=True) if ok
        ]
        report[name] = {
            "self_n": len(rows),
            "self_rate": (len(rows) - len(misses)) / max(1, len(rows)),
            "misses": misses,
            "cross_n": len(cps),
            "cross_rate": len(fps) / max(1, len(cps)),
            "false_positives": fps,
            "seconds": round(time.perf_counter() - t0, 2),
        }
    return report
