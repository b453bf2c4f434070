"""`sphere report DIR [out=OUT_DIR]`: plots and a markdown report from a run or a (multi)run directory.

    sphere report outputs/run/2026-01-01_00-00-00          # one `sphere run`
    sphere report multirun/sweep-pruning/2026-01-01_00-00-00  # a `sphere sweep` / Hydra multirun

Finds every job under DIR: a ``sphere run`` job (``summary.json``), a ``sphere generate`` job
(``generate_stats.json``) or a ``sphere eval`` job (``eval/results.json``), with the overrides Hydra
recorded in ``<job>/.hydra/overrides.yaml``. Overrides whose values differ between jobs are the swept
settings; a numeric one (a pruning threshold) becomes the x axis, the rest label the lines, and jobs that
do not set it (other pruning policies) are drawn as horizontal reference lines.

Writes ``OUT_DIR/report.md`` (default OUT_DIR = DIR) and beside it, where the data allow:
``accuracy_per_round.png`` (accuracy per round per benchmark, 95% CI bars), ``pairs_per_stage.png``
(stacked pairs per stage per round or per job), ``yield_vs_<key>.png`` (yield and pairs against the swept
setting) and ``accuracy_vs_<key>.png`` (final accuracy against the swept setting).
"""

# The code (issue #18; this package was sphere/report.py, renamed away from sphere/evaluation/report.py, which
# writes eval/results.md): sphere/runreport/jobs.py finds and labels the jobs, plots.py draws the figures,
# markdown.py writes report.md; write_report and main (whose help is this docstring) stay here.

from __future__ import annotations

import os
import sys
from pathlib import Path

from sphere.io import atomic_write_text
from sphere.rundir import command_errors
from sphere.runreport.jobs import STAGES, Job, find_jobs, numeric_axis
from sphere.runreport.markdown import report_markdown
from sphere.runreport.plots import (
    STAGE_COLORS,
    plot_accuracy_against,
    plot_accuracy_per_round,
    plot_pairs_per_stage,
    plot_yield_against,
    series_against,
)

__all__ = [
    "STAGES",
    "STAGE_COLORS",
    "Job",
    "find_jobs",
    "main",
    "numeric_axis",
    "plot_accuracy_against",
    "plot_accuracy_per_round",
    "plot_pairs_per_stage",
    "plot_yield_against",
    "report_markdown",
    "series_against",
    "write_report",
]


def write_report(root: str | os.PathLike, out: str | os.PathLike | None = None) -> tuple[Path, list[Path]]:
    """Find the jobs under ``root``, draw the figures and write ``report.md``; returns (report, figures)."""
    root = Path(root)
    jobs = find_jobs(root)
    if not jobs:
        raise FileNotFoundError(
            f"{root}: no jobs found; expected summary.json (sphere run), generate_stats.json "
            "(sphere generate) "
            "or eval/results.json (sphere eval) in DIR or its subdirectories")
    out = Path(out) if out is not None else root
    out.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, Path]] = []
    for title, fn in (("Accuracy per round", plot_accuracy_per_round),
                      ("Accuracy against the swept setting", plot_accuracy_against),
                      ("Yield and pairs against the swept setting", plot_yield_against),
                      ("Pairs per stage", plot_pairs_per_stage)):
        p = fn(jobs, out)
        if p is not None:
            figures.append((title, p))

    report = out / "report.md"
    atomic_write_text(report, report_markdown(root, jobs, figures, out))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(report, 0o666 & ~umask)  # the atomic write's temp file was 0600
    return report, [p for _, p in figures]


def main(argv: list[str]) -> int:
    """argv after ``sphere report``; returns the exit code."""
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    root, out = None, None
    for a in argv:
        key, eq, val = a.partition("=")
        if eq and key == "out":
            out = val
        elif eq and not Path(a).exists():
            print(f"sphere report: unknown option {key!r}; allowed: out=OUT_DIR", file=sys.stderr)
            return 2
        elif root is None:
            root = a
        else:
            print(f"sphere report: one directory expected, got {root!r} and {a!r}", file=sys.stderr)
            return 2
    if root is None:
        print("sphere report: missing DIR (a run or multirun directory)", file=sys.stderr)
        return 2

    try:
        with command_errors("report"):  # a full disk, a read-only out=, no matplotlib: one line
            report, figs = write_report(root, out)
    except (FileNotFoundError, ValueError) as e:
        print(f"sphere report: {e}", file=sys.stderr)
        return 2
    print(f"sphere report: wrote {report}" + "".join(f"\n  {p}" for p in figs))
    return 0
