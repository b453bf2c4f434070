"""What each command prints where (third reliability pass, items 4 and 5): results (tables, the last-line
JSON) on stdout, progress and log lines on stderr, the same for every command; third-party notices go to the
job's log file (<run dir>/<job>.log), not the console, unless verbose=true asks for them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "disabled", **extra}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def _sphere(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sphere.cli", *args], capture_output=True, text=True,
                          env=env or _env(), timeout=timeout, cwd=ROOT)


# ---------------------------------------------------------------------- item 5: results on stdout, everywhere
def test_bench_engine_and_eval_print_their_results_on_stdout(tmp_path):
    """Before: `sphere bench engine` drew its results table on stderr while `sphere eval` prints its table on
    stdout. Now both print the table on stdout, then the one JSON object as the last stdout line; stderr
    carries no results."""
    bench = _sphere("bench", "engine", "trees=8", "rounds=3", "py_rounds=1", "peers=false",
                    f"hydra.run.dir={tmp_path / 'bench'}")
    ev = _sphere("eval", "backend=replay", "replay.references=true", "limit=2", f"hydra.run.dir={tmp_path / 'ev'}")
    for proc, title, row in ((bench, "sphere bench engine: 8 trees", "cpp_selects_per_s"),
                             (ev, "# Evaluation results", "| mini world (test) | 2 |")):
        assert proc.returncode == 0, proc.stderr[-2000:]
        lines = proc.stdout.strip().splitlines()
        json.loads(lines[-1])  # the last stdout line: one JSON object
        assert title in proc.stdout and row in proc.stdout, proc.stdout[-2000:]
        assert title not in proc.stderr and row not in proc.stderr, proc.stderr[-2000:]
        assert proc.stdout.index(row) < proc.stdout.rindex(lines[-1])


def test_bench_tables_go_to_stdout(capsys):
    """The table helpers of the other benchmarks (`sphere bench verify` through metrics_table, `sphere bench
    prm`) draw on stdout too."""
    from sphere.bench import metrics_table
    from sphere.bench.prm import _table

    metrics_table("t", {"a": 1}, ["a"])
    _table({"E": 5, "rows": [{"model": "m", "length": 3, "skipped": "no model"}]})
    out, err = capsys.readouterr()
    assert "PRM work per expansion" in out and "│ a " in out.replace("┃", "│"), out
    assert err == ""
