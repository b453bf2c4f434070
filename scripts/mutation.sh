#!/usr/bin/env bash
# Mutation testing of the modules that decide the data (mutmut 3; config: pyproject.toml [tool.mutmut]).
# Part of the nightly job (scripts/nightly.sh), never of CI: the full set takes hours on a small machine.
#   bash scripts/mutation.sh                           # every configured module
#   bash scripts/mutation.sh 'sphere.generate.stages*' 'sphere.evaluation.metrics*'   # some modules
#   bash scripts/mutation.sh --summary                 # only print/write the score of what has been run
# Env: MUTATION_CHILDREN (default 1 worker), MUTATION_NICE (default 15), SPHERE_VENV (default .venv),
# MUTATION_MIN_SCORE (e.g. 0.90: exit 1 when the measured score is lower; unset: report only).
# Prints killed / total per module (equivalent mutants, listed with their reason in docs/mutation.md, are
# left out of the total) and writes docs/mutation.json. Work dir: mutants/ (git-ignored); delete it to start
# over (results of unchanged functions are kept between runs).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SPHERE_VENV:-.venv}
VPY="$VENV/bin/python"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
export MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 SPHERE_HYPOTHESIS_PROFILE=sphere-ci

summary_only=0
if [ "${1:-}" = "--summary" ]; then summary_only=1; shift; fi

if [ "$summary_only" = 0 ]; then
  "$VPY" -c "import mutmut" 2>/dev/null || "$VPY" -m pip install -q "mutmut>=3.8.1,<4"
  # The tests import `sphere` from mutants/ (mutmut puts it first on sys.path). Three things make that work:
  # the compiled engine next to the mutated package, the shipped files where sphere.resources looks for them
  # (the package's parent directory), and no editable-install finder redirecting `sphere` to the checkout.
  mkdir -p mutants/sphere
  core=$("$VPY" -c "import importlib.util as u; print(u.find_spec('sphere._core').origin)")
  cp -p "$core" mutants/sphere/
  for d in assets data; do [ -e "mutants/$d" ] || ln -s "../$d" "mutants/$d"; done
  children=${MUTATION_CHILDREN:-1}
  nice -n "${MUTATION_NICE:-15}" "$VPY" - run --max-children "$children" "$@" <<'EOF'
import sys

# scikit-build-core's editable install maps `sphere.*` to the checkout ahead of sys.path: drop that finder so
# the mutated copy under mutants/ is the one imported (mutmut's forked workers inherit this process).
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "ScikitBuildRedirectingFinder"]
sys.argv[0] = "mutmut"
from mutmut.__main__ import cli

cli()
EOF
fi

"$VPY" - <<'EOF'
"""killed / total per module from mutants/**/*.py.meta, equivalents (docs/mutation.md) left out."""
import json
import os
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

from mutmut.stats import status_by_exit_code

eq = set(re.findall(r"^- `([\w.]+__mutmut_\d+)`", Path("docs/mutation.md").read_text(), re.M)) \
    if Path("docs/mutation.md").exists() else set()
by_mod: dict[str, Counter] = defaultdict(Counter)
not_run: Counter = Counter()  # mutants not run yet (an interrupted run): outside the score, reported
survivors = []
for meta in sorted(Path("mutants").rglob("*.py.meta")):
    mod = ".".join(meta.relative_to("mutants").with_suffix("").with_suffix("").parts)
    for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
        st = status_by_exit_code[code]
        if st == "not checked":
            not_run[mod] += 1
            continue
        if name in eq:
            st = "equivalent"
        elif st not in ("killed", "timeout", "caught by type check"):
            survivors.append(f"{name}: {st}")
        by_mod[mod]["killed" if st in ("timeout", "caught by type check") else st] += 1
rows, tot = [], Counter()
print(f"{'module':40s} {'killed':>7s} {'total':>6s} {'score':>7s} {'equiv':>6s} {'survived':>8s} {'no tests':>8s}"
      f" {'not run':>7s}")
for mod in sorted(set(by_mod) | set(not_run)):
    c = by_mod[mod]
    total = sum(v for k, v in c.items() if k != "equivalent")
    tot.update(c)
    score = c["killed"] / total if total else None
    rows.append({"module": mod, "killed": c["killed"], "total": total, "equivalent": c["equivalent"],
                 "survived": c["survived"], "no_tests": c["no tests"], "other": total - c["killed"]
                 - c["survived"] - c["no tests"], "score": score, "not_run": not_run[mod]})
    print(f"{mod:40s} {c['killed']:7d} {total:6d} {(f'{score:.1%}' if score is not None else '-'):>7s} "
          f"{c['equivalent']:6d} {c['survived']:8d} {c['no tests']:8d} {not_run[mod]:7d}")
total = sum(v for k, v in tot.items() if k != "equivalent")
score = tot["killed"] / total if total else None
print(f"{'ALL (measured)':40s} {tot['killed']:7d} {total:6d} {(f'{score:.1%}' if score is not None else '-'):>7s} "
      f"{tot['equivalent']:6d} {tot['survived']:8d} {tot['no tests']:8d} {sum(not_run.values()):7d}")
Path("docs/mutation.json").write_text(json.dumps(
    {"killed": tot["killed"], "total": total, "equivalent": tot["equivalent"], "score": score,
     "not_run": sum(not_run.values()), "modules": rows, "not_killed": survivors}, indent=1) + "\n")
print(f"mutation: {tot['killed']}/{total} killed"
      + (f" ({score:.1%})" if score is not None else "") + f", {tot['equivalent']} equivalent excluded; "
      f"{len(survivors)} not killed (docs/mutation.json)"
      + (f"; {sum(not_run.values())} mutants not run yet (outside the score)" if not_run else ""))
floor = os.environ.get("MUTATION_MIN_SCORE")
if floor and (score is None or score < float(floor)):
    print(f"mutation: score {score} under MUTATION_MIN_SCORE={floor}")
    sys.exit(1)
EOF
