"""First contact (issue #29): `sphere generate --help` and `sphere eval --help` tell a user how to choose
problems, models and benchmarks (they printed the runner module's developer docstring, "Imports go downward
only..."); `sphere viz --help` lists its sub-commands (it said "unknown command")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _sphere(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sphere.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


@pytest.mark.parametrize("command,needles", [
    ("generate", ["data.problems=", "math_train", "PATH.jsonl", "hf:NAME", "data.limit=N", "model=M",
                  "model.small=", "backend=", "search=paper|mcts", "examples:"]),
    ("eval", ["benchmarks=[B,...]", "math500", "aime24", "PATH.jsonl", "limit=N", "model=M", "backend=",
              "replay", "sampling.n=K", "examples:"]),
])
def test_phase_help_tells_how_to_choose_what_to_work_on(command, needles):
    proc = _sphere(command, "--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Imports go downward" not in out and "sphere.scale" not in out  # no developer docstring
    for n in needles:
        assert n in out, (n, out)
    assert "config groups" in out and "experiment" in out  # the groups still follow


@pytest.mark.parametrize("group", ["viz", "bench"])
def test_group_word_help_lists_its_commands(group):
    proc = _sphere(group, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "unknown command" not in proc.stdout + proc.stderr
    assert f"sphere {group} <command>" in proc.stdout
    if group == "viz":
        assert "viz tree" in proc.stdout and "HTML page" in proc.stdout
    else:
        assert "bench engine" in proc.stdout and "bench verify" in proc.stdout
