"""Validate sphere.verify on the real benchmark files and print the figures.

    .venv/bin/python scripts/validate_verifier.py                     # MATH-500 + GSM8K test
    .venv/bin/python scripts/validate_verifier.py --benchmarks math500 gsm8k olympiadbench aime24
    .venv/bin/python scripts/validate_verifier.py --workers-only      # every check through math-verify

Figures: self-agreement (each reference solution vs its own gold; target >= 99% on MATH-500 and GSM8K)
and the cross false-positive rate (each solution vs another problem's different gold; target <= 1%).
Every miss is listed with the extracted answer; the known ones, with causes, are in
tests/fixtures/verify_validation_misses.json (tests/test_verify_validation.py keeps it current).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sphere.verify import Verifier  # noqa: E402
from sphere.verify.validate import BENCHMARK_FILES, validate  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("SPHERE_DATA_DIR", str(ROOT / "data/benchmarks")))
    ap.add_argument("--benchmarks", nargs="+", default=["math500", "gsm8k"], choices=sorted(BENCHMARK_FILES))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout-s", type=float, default=5.0)
    ap.add_argument("--shifts", type=int, nargs="+", default=[1], help="cross pairs: solution i vs gold i+s")
    ap.add_argument("--workers-only", action="store_true", help="no parent fast path: all via math-verify")
    ap.add_argument("--max-list", type=int, default=50, help="misses / false positives listed per benchmark")
    args = ap.parse_args()

    with Verifier(workers=args.workers, timeout_s=args.timeout_s) as v:
        rep = validate(v, args.data_dir, tuple(args.benchmarks), tuple(args.shifts), not args.workers_only)
        stats = v.stats()
    summary = {}
    for name, r in rep.items():
        print(f"\n== {name}: self-agreement {r['self_rate']:.2%} of {r['self_n']}   "
              f"cross false positives {r['cross_rate']:.2%} of {r['cross_n']}   ({r['seconds']} s)")
        for m in r["misses"][: args.max_list]:
            print(f"  MISS {m['id']}: gold={m['gold']!r:.60} extracted={m['extracted']!r:.60}")
        for m in r["false_positives"][: args.max_list]:
            print(f"  FALSE+ {m['id']} vs {m['other_id']}: gold={m['other_gold']!r:.40} "
                  f"extracted={m['extracted']!r:.40}")
        summary[name] = {k: r[k] for k in ("self_n", "self_rate", "cross_n", "cross_rate", "seconds")}
    summary["verifier"] = stats
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
