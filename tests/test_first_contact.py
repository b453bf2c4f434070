"""Issue #15, first contact: what a new user meets in the first minutes, through the real CLI."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "WANDB_MODE": "disabled"}


def sphere(*args, cwd=None, env=None, umask=None, timeout=600):
    pre = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run([sys.executable, "-m", "sphere.cli", *args], capture_output=True, text=True,
                          env=env or ENV, cwd=cwd, timeout=timeout, preexec_fn=pre)


def test_top_level_help_lists_every_command_with_a_line():
    from sphere.cli import DESCRIPTIONS, HYDRA_COMMANDS, PLAIN_COMMANDS

    p = sphere("--help")
    assert p.returncode == 0
    for key in [*HYDRA_COMMANDS, *PLAIN_COMMANDS]:
        line = next((ln for ln in p.stdout.splitlines() if ln.strip().startswith(" ".join(key) + " ")), None)
        assert line and DESCRIPTIONS[key] in line, key
    assert "sphere <command> --help" in p.stdout


def test_command_help_describes_the_command_not_hydra():
    p = sphere("run", "--help")
    assert p.returncode == 0
    assert "self-evolution loop" in p.stdout and "powered by Hydra" not in p.stdout
    assert "experiment" in p.stdout and "paper_qwen2_5_7b" in p.stdout  # groups a user chooses
    assert "hydra/" not in p.stdout and "accelerate" not in p.stdout  # groups a user cannot choose
    # what an override must spell, and the effective defaults (the default experiment's overrides win)
    assert re.search(r"^  train_opts@train +\[full\]", p.stdout, re.M)
    assert re.search(r"^  model +\[mini\]", p.stdout, re.M)
    assert re.search(r"^  experiment +\[loop_check\]", p.stdout, re.M)


def test_a_single_benchmark_name_without_brackets(tmp_path):
    p = sphere("eval", "benchmarks=math500", "limit=3", "backend=replay", "replay.references=true",
               f"hydra.run.dir={tmp_path / 'e'}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert '"math500": 1.0' in p.stdout.splitlines()[-1]


def test_an_unknown_benchmark_fails_before_any_engine_starts(tmp_path):
    p = sphere("eval", "benchmarks=[math500,nosuch]", "backend=vllm", "model=mini",
               f"hydra.run.dir={tmp_path / 'u'}")
    assert p.returncode != 0
    assert "unknown benchmark 'nosuch'" in p.stderr and "Traceback" not in p.stderr
    assert "EngineCore" not in p.stdout + p.stderr  # the vLLM engine never started


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_output_files_respect_the_umask(tmp_path, umask, mode):
    out = tmp_path / "run"
    p = sphere("eval", "benchmarks=[math500]", "limit=2", "backend=replay", "replay.references=true",
               f"hydra.run.dir={out}", umask=umask)
    assert p.returncode == 0, p.stderr[-2000:]
    for f in (out / "eval" / "results.json", out / "eval" / "results.md", out / ".hydra" / "config.yaml"):
        assert stat.S_IMODE(f.stat().st_mode) == mode, f
    assert not [f for f in out.glob("*.log") if f.stat().st_size == 0]  # no empty log files


@pytest.mark.slow
def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    out = tmp_path / "gen"
    # Ctrl-C in a terminal: SIGINT with its default disposition. A test run started in the background from
    # a script (`cmd &`) inherits SIGINT *ignored*, and Python keeps an inherited ignore (as every POSIX
    # program should): restore the default in the child, or the signal below is ignored and the test hangs.
    proc = subprocess.Popen([sys.executable, "-m", "sphere.cli", "generate", "data.mini_n=2000",
                             f"hydra.run.dir={out}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    log = out / "stages" / "stage1.jsonl"
    while not log.exists() or log.stat().st_size == 0:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no problem finished within 300 s"
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted; rerun the same command" in stderr
    assert "Traceback" not in stderr, stderr[-3000:]
    assert Path(out / "stages" / "stage1.jsonl").read_text().strip()  # finished work kept for the resume
