"""Issue #18: `sphere run runner=ray` runs each round's evaluation and generation on Ray actors and gives the
same pairs and accuracies as `runner=local` on greedy settings, the per-round controls included (their
evaluations and the random-pairs control's sampling on the actors too); an unknown runner is an error."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SMALL = ["experiment=mini_planted", "data.mini_n=16", "eval.limit=30", "rounds=1"]
COMMON = [*SMALL, "search.temperature=0", "stages.stage3=true"]


def _run(out, *extra, common=COMMON):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "sphere.cli", "run", *common, *extra, f"hydra.run.dir={out}"],
                       capture_output=True, text=True, env=env, timeout=1200)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def _pairs(out):
    rows = [json.loads(x) for x in (out / "round_1" / "generate" / "pairs.jsonl").read_text().splitlines()]
    return sorted((r["problem_id"], r["stage"], json.dumps(r["chosen"]), json.dumps(r["rejected"])) for r in rows)


@pytest.mark.timeout(1800)  # two sphere runs with the RFT control each
def test_sphere_run_on_ray_equals_local(tmp_path):
    local = _run(tmp_path / "local", "controls.rft=true")
    ray = _run(tmp_path / "ray", "controls.rft=true", "runner=ray", "runner.workers=2")
    for r in (0, 1):  # every round's evaluation ran on actors
        assert (tmp_path / "ray" / f"round_{r}" / "eval" / "ray_runner.json").is_file()
        assert not (tmp_path / "local" / f"round_{r}" / "eval" / "ray_runner.json").exists()
    assert (tmp_path / "ray" / "round_1" / "generate" / "ray_runner.json").is_file()
    assert [x["eval"]["mini"]["accuracy"] for x in ray["rounds"]] == \
        [x["eval"]["mini"]["accuracy"] for x in local["rounds"]]
    assert _pairs(tmp_path / "ray") == _pairs(tmp_path / "local")
    assert _pairs(tmp_path / "ray"), "greedy settings with stage 3 on must still give pairs"
    # the RFT control: trained on the same pairs from the same start, evaluated on the actors, the same result
    assert (tmp_path / "ray" / "round_1" / "controls" / "rft" / "eval" / "ray_runner.json").is_file()
    rft = [s["rounds"][1]["controls"]["rft"] for s in (ray, local)]
    assert rft[0]["eval"] == rft[1]["eval"] and rft[0]["pairs"] == rft[1]["pairs"] > 0


@pytest.mark.timeout(1800)  # 4 trainings and evaluations on a local Ray cluster; slow on a loaded machine
def test_random_pairs_control_samples_on_the_actors(tmp_path):
    """`controls.random_pairs=true` with runner=ray: the start policy's samples come from the actors (a
    one-benchmark evaluation of the searched problems), in the harness's own records, and pair one right and
    one wrong sample per problem, as in one process (tests/test_controls.py)."""
    out = tmp_path / "ray"
    rec = _run(out, "controls.random_pairs=true", "runner=ray", "runner.workers=2", common=SMALL)["rounds"][1]
    cdir = out / "round_1" / "controls" / "random_pairs"
    info = json.loads((cdir / "samples" / "eval" / "ray_runner.json").read_text())
    assert info["workers"] == 2 and info["chunks"] >= 1
    samples = [json.loads(x) for x in (cdir / "samples" / "eval" / "problems.jsonl").read_text().splitlines()]
    assert len(samples) == 16 and all(len(s["completions"]) == len(s["verdicts"]) == 4 for s in samples)
    right = {s["id"]: {c for c, v in zip(s["completions"], s["verdicts"], strict=True) if v} for s in samples}
    pairs = [json.loads(x) for x in (cdir / "pairs.jsonl").read_text().splitlines()]
    assert 0 < len(pairs) == rec["controls"]["random_pairs"]["pairs"]
    for p in pairs:
        assert p["chosen"] in right[p["problem_id"]] and p["rejected"] not in right[p["problem_id"]]
    assert (cdir / "eval" / "ray_runner.json").is_file()
    assert rec["controls"]["random_pairs"]["eval"]["mini"]["n"] == 30


def test_unknown_runner_is_an_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "sphere.cli", "run", "runner=rayy", f"hydra.run.dir={tmp_path}"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode != 0 and "rayy" in (p.stdout + p.stderr)
