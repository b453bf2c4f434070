"""The objectives study's plumbing (issue 33): sweeps/objectives.yaml's jobs, the Optuna preset composes with
the plugin, and `sphere report` tabulates a sweep of runs with each job's paired interval, best first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_objectives_sweep_file_runs_one_search_first_then_every_construction():
    from omegaconf import OmegaConf

    from sphere.sweep import build_commands

    spec = OmegaConf.to_container(OmegaConf.load(ROOT / "sweeps" / "objectives.yaml"), resolve=False)
    cmds = build_commands(spec, [], "OUT")
    assert [c[-1] for c in cmds][0] == "hydra.sweep.dir=OUT/search"  # the search block runs first
    names = {a.split("=", 1)[1] for c in cmds for a in c if a.startswith("construction=")}
    assert names == {"sphere", "first_wrong_step", "siblings", "best_worst_of_n"}
    for c in cmds:
        assert c[:2] == ["run", "-m"] and "experiment=mini_honest" in c
        assert any("dev_hard.jsonl" in a for a in c)  # chosen on the dev split, never the test split
        assert not any("test_hard" in a for a in c)
        if c[-1] != "hydra.sweep.dir=OUT/search":
            assert "construction.search_from=${hydra:sweep.dir}/../search/0/round_1/generate" in c
    for name in names:  # every construction has its config file
        assert (ROOT / "conf" / "construction" / f"{name}.yaml").is_file()


def test_optuna_preset_composes_with_the_plugin(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sphere.cli", "run", "hydra/sweeper=objectives_optuna",
                        "--cfg", "hydra"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper" in r.stdout
    assert "construction: choice(sphere, first_wrong_step, siblings, best_worst_of_n)" in r.stdout
    assert "direction: maximize" in r.stdout


def _job(root: Path, name: str, overrides: list[str], delta: float, lo: float, hi: float, controls=None):
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    r1 = {"round": 1, "eval": {"dev": {"accuracy": 0.14 + delta}}, "pairs_per_stage": {"1": 10, "2": 5},
          "paired": {"dev": {"vs_r0": {"delta": delta, "ci_low": lo, "ci_high": hi, "n": 1000, "gained": 1,
                                       "lost": 1, "mcnemar_p": 0.5}}}}
    if controls:
        r1["controls"] = {n: {"eval": {"dev": {"accuracy": 0.1}}, "paired": {"dev": {"sphere_vs_control": c}}}
                          for n, c in controls.items()}
    (d / "summary.json").write_text(json.dumps({"rounds": [{"round": 0, "eval": {"dev": {"accuracy": 0.14}}}, r1]}))


def test_report_tabulates_a_sweep_with_paired_intervals_best_first(tmp_path):
    from sphere.runreport.jobs import find_jobs
    from sphere.runreport.markdown import report_markdown, sweep_markdown

    _job(tmp_path, "a", ["construction=sphere", "train.loss.type=sigmoid"], 0.004, -0.008, 0.016)
    _job(tmp_path, "b", ["construction=siblings", "train.loss.type=apo_zero"], 0.021, 0.006, 0.035,
         controls={"rft": {"delta": 0.01, "ci_low": -0.002, "ci_high": 0.02}})
    _job(tmp_path, "c", ["construction=first_wrong_step", "train.loss.type=ipo"], -0.03, -0.05, -0.01)
    jobs = find_jobs(tmp_path)
    table = [ln for ln in sweep_markdown(jobs) if ln.startswith("| ") and "job" not in ln]
    assert [ln.split(" | ")[0] for ln in table] == ["| b", "| a", "| c"]  # best first
    assert "construction=siblings, type=apo_zero" in table[0]
    assert "+2.1 [+0.6, +3.5]" in table[0] and "+1.0 [-0.2, +2.0]" in table[0]  # vs rft
    assert "| 15 |" in table[0]  # the pairs that trained the job
    assert "-3.0 [-5.0, -1.0]" in table[2]
    assert "## Sweep: paired change per job" in report_markdown(tmp_path, jobs, [], tmp_path)
    assert sweep_markdown(jobs[:1]) == []  # one run is no sweep
