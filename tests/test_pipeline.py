"""`sphere run`: every experiment config composes and passes its dry run; the summary table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sphere.loop.summary import summary_markdown

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


def _sphere(*args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sphere.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _plan(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{"):])


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_every_experiment_dry_run(exp, tmp_path):
    extra = ["variant=no_stage3"] if exp == "ablation" else []
    paper = exp.startswith("paper_") or exp.startswith("transfer_")
    if paper:  # the paper's pools (NuminaMath-CoT, MetaMathQA) are not shipped: refused, naming the override
        r = _sphere("run", f"experiment={exp}", "dry_run=true", f"hydra.run.dir={tmp_path}")
        assert r.returncode != 0 and "data.training.fallback" in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr
        extra = ["data.training.fallback=[math_train,gsm8k_train]"]
    r = _sphere("run", f"experiment={exp}", "dry_run=true", *extra, f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-3000:]
    plan = _plan(r.stdout)
    assert plan["problems"] > 0
    assert plan["estimate_per_round_stage1"]["backend_calls"] > 0
    assert not (tmp_path / "summary.json").exists()  # a dry run trains and evaluates nothing
    if paper:
        # MATH train + GSM8K train (~20K, the paper's scale), minus 87 that overlap the six benchmarks
        assert plan["problems"] == 11998 + 7473 - 87
        assert plan["search"]["E"] == 5 and plan["search"]["E_small"] == 10
        assert plan["search"]["temperature"] == 0.8 and plan["search"]["pruning"] == "minmax"
        assert "math500" in plan["eval"]["benchmarks"]
    if exp.startswith("transfer_"):
        assert plan["models"]["train_target"] and plan["models"]["policy"] == "Qwen/Qwen2.5-7B-Instruct"
    if exp == "ablation":
        assert plan["stages"]["3"] is False and plan["stages"]["2"] is True


def test_dry_run_rejects_bad_config(tmp_path):
    r = _sphere("run", "dry_run=true", "search.pruning.policy=best", f"hydra.run.dir={tmp_path}")
    assert r.returncode != 0
    assert "search.pruning.policy" in r.stderr and "minmax" in r.stderr
    r = _sphere("run", "dry_run=true", "rounds=-1", f"hydra.run.dir={tmp_path}")
    assert r.returncode != 0 and "rounds" in r.stderr


def test_summary_markdown_shows_change_against_round0():
    rounds = [
        {"round": 0, "eval": {"mini": {"accuracy": 0.40}}, "pairs_per_stage": None, "wall_s": 10.0},
        {"round": 1, "eval": {"mini": {"accuracy": 0.55}}, "pairs_per_stage": {"1": 5, "2": 2, "3": 1},
         "wall_s": 100.0},
    ]
    md = summary_markdown(rounds)
    assert "| 1 | 55.0% | +15.0 | 5/2/1 | 100 |" in md
    assert "| 0 | 40.0% | +0.0 | — | 10 |" in md


def _ci(delta, lo, hi, n=100):
    return {"n": n, "delta": delta, "ci_low": lo, "ci_high": hi, "gained": 0, "lost": 0, "mcnemar_p": 1.0}


def test_summary_says_what_the_run_shows_read_off_the_intervals():
    """summary.md opens with the experiment's `about` text and one plain line per interval: above zero is
    "better", below zero "worse" / "the control better", spanning zero "no difference this run can detect"."""
    from sphere.loop.summary import verdict_markdown

    rounds = [
        {"round": 0, "eval": {"mini": {"accuracy": 0.4}}, "wall_s": 1.0},
        {"round": 1, "eval": {"mini": {"accuracy": 0.5}}, "wall_s": 1.0,
         "paired": {"mini": {"vs_r0": _ci(0.10, 0.07, 0.14)}},
         "controls": {"rft": {"paired": {"mini": {"sphere_vs_control": _ci(-0.036, -0.062, -0.010)}}},
                      "random_pairs": {"paired": {"mini": {"sphere_vs_control": _ci(0.02, -0.012, 0.054)}}}}},
        {"round": 2, "eval": {"mini": {"accuracy": 0.48}}, "wall_s": 1.0,
         "paired": {"mini": {"vs_r0": _ci(0.08, 0.05, 0.11), "vs_prev": _ci(-0.02, -0.03, -0.005)}}},
    ]
    md = summary_markdown(rounds, about="The   loop's\n check.")
    assert md.index("## What this run shows") < md.index("| round |")  # first, before the tables
    assert "The loop's check." in md  # the experiment's words, whitespace folded
    lines = [ln for ln in verdict_markdown(rounds) if ln.startswith("- ")]
    assert lines[0].startswith("- Round 1 against the policy it started from, mini (100 problems): +10.0 points "
                               "[+7.0, +14.0]: better (interval above zero)")
    assert "control SFT on SPHERE's chosen solutions (RFT)" in lines[1] and "the control better" in lines[1]
    assert "random right/wrong" in lines[2] and "no difference this run can detect" in lines[2]
    # round 2 is read against round 1 (the policy it started from), not against round 0
    assert lines[3].startswith("- Round 2 against the policy it started from") and "-2.0 points" in lines[3]
    assert "worse (interval below zero)" in lines[3]
    assert len(lines) == 4
    assert verdict_markdown(rounds[:1]) == []  # round 0 alone: nothing to read


def test_summary_json_keeps_the_about_text(tmp_path):
    import json

    from sphere.loop.summary import write_summary

    write_summary(tmp_path, [{"round": 0, "eval": {}, "wall_s": 0.0}], "what it shows")
    assert json.loads((tmp_path / "summary.json").read_text())["about"] == "what it shows"
    assert "what it shows" in (tmp_path / "summary.md").read_text()
