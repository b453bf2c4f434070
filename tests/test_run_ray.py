"""Issue #18: `sphere run runner=ray` runs each round's evaluation and generation on Ray actors and gives the
same pairs and accuracies as `runner=local` on greedy settings; an unknown runner is an error."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

COMMON = ["experiment=mini_planted",
          "data.mini_n=16", "eval.limit=30", "rounds=1", "search.temperature=0", "stages.stage3=true"]


def _run(out, *extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "sphere.cli", "run", *COMMON, *extra, f"hydra.run.dir={out}"],
                       capture_output=True, text=True, env=env, timeout=1200)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def _pairs(out):
    rows = [json.loads(x) for x in (out / "round_1" / "generate" / "pairs.jsonl").read_text().splitlines()]
    return sorted((r["problem_id"], r["stage"], json.dumps(r["chosen"]), json.dumps(r["rejected"])) for r in rows)


def test_sphere_run_on_ray_equals_local(tmp_path):
    local = _run(tmp_path / "local")
    ray = _run(tmp_path / "ray", "runner=ray", "runner.workers=2")
    for r in (0, 1):  # every round's evaluation ran on actors
        assert (tmp_path / "ray" / f"round_{r}" / "eval" / "ray_runner.json").is_file()
        assert not (tmp_path / "local" / f"round_{r}" / "eval" / "ray_runner.json").exists()
    assert (tmp_path / "ray" / "round_1" / "generate" / "ray_runner.json").is_file()
    assert [x["eval"]["mini"]["accuracy"] for x in ray["rounds"]] == \
        [x["eval"]["mini"]["accuracy"] for x in local["rounds"]]
    assert _pairs(tmp_path / "ray") == _pairs(tmp_path / "local")
    assert _pairs(tmp_path / "ray"), "greedy settings with stage 3 on must still give pairs"


def test_unknown_runner_is_an_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "sphere.cli", "run", "runner=rayy", f"hydra.run.dir={tmp_path}"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode != 0 and "rayy" in (p.stdout + p.stderr)
