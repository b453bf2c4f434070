"""`sphere report`: job discovery, swept settings, plots and report.md on synthetic run / sweep dirs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sphere.runreport import find_jobs, numeric_axis, series_against, write_report
from sphere.runreport import main as report_main


def _png_ok(path: Path) -> None:
    import matplotlib.image as mpimg

    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 300 and img.std() > 0.01  # not blank


def _links(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def _acc(a: float, n: int = 200) -> dict:
    return {"n": n, "correct": round(a * n), "accuracy": a, "ci95_low": a - 0.05, "ci95_high": a + 0.05}


def _run_summary(d: Path, accs: list[float], overrides: list[str] | None = None) -> None:
    rounds = []
    for r, a in enumerate(accs):
        rec = {"round": r, "policy": f"round_{r}", "eval": {"mini": _acc(a), "gsm8k": _acc(a / 2)},
               "pairs_per_stage": None if r == 0 else {"1": 10 * r, "2": 3, "3": 5}, "wall_s": 12.0}
        rounds.append(rec)
    rounds[-1]["next_round_pairs_per_stage"] = {"1": 7, "2": 1, "3": 2}
    d.mkdir(parents=True, exist_ok=True)
    (d / "summary.json").write_text(json.dumps({"rounds": rounds}))
    # a run directory also holds per-round generate/eval outputs: they must not count as jobs
    (d / "round_0" / "generate").mkdir(parents=True)
    (d / "round_0" / "generate" / "generate_stats.json").write_text('{"pairs_per_stage": {"1": 1}}')
    if overrides is not None:
        (d / ".hydra").mkdir()
        (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))


def _gen_job(d: Path, overrides: list[str], pps: dict, problems: int = 48) -> None:
    d.mkdir(parents=True)
    tot = sum(pps.values())
    (d / "generate_stats.json").write_text(json.dumps(
        {"problems": problems, "pairs_per_stage": {k: v for k, v in pps.items()}, "pairs_total": tot,
         "yield": tot / problems, "wall_s": 30.0, "routes": {}}))
    (d / ".hydra").mkdir()
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (d / "trees").mkdir()  # a snapshot dir is not searched


@pytest.fixture
def pruning_sweep(tmp_path: Path) -> Path:
    """The layout `sphere sweep sweeps/pruning.yaml` leaves: <dir>/<block>/<job>/."""
    root = tmp_path / "sweep"
    for i, pol in enumerate(["none", "minmax", "topk"]):
        _gen_job(root / "policies" / str(i), ["data.mini_n=48", f"search.pruning.policy={pol}"],
                 {"1": 10 + 5 * i, "2": 2, "3": 4})
    for i, tau in enumerate(["0.0", "0.25", "0.5", "1.0"]):
        _gen_job(root / "threshold" / str(i), ["data.mini_n=48", "search.pruning.policy=threshold",
                                               "search.pruning.relative=true", f"search.pruning.tau={tau}"],
                 {"1": 20 - 4 * i, "2": 1, "3": i})
    (root / "threshold" / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_single_run_report(tmp_path):
    d = tmp_path / "run"
    _run_summary(d, [0.30, 0.38, 0.41])
    jobs = find_jobs(d)
    assert [(j.rel, j.kind) for j in jobs] == [(".", "run")]
    assert jobs[0].pairs_per_stage() == {"1": 10 + 20 + 7, "2": 3 + 3 + 1, "3": 5 + 5 + 2}
    report, figs = write_report(d)
    assert {p.name for p in figs} == {"accuracy_per_round.png", "pairs_per_stage.png"}
    for p in figs:
        _png_ok(p)
        assert p.parent == d
    md = report.read_text()
    assert report == d / "report.md"
    assert sorted(_links(md)) == ["accuracy_per_round.png", "pairs_per_stage.png"]
    assert "41.0% [36.0, 46.0] (+11.0 vs round 0)" in md and "20.5%" in md
    assert "| 1 | 19.0% | 38.0% | 10/3/5 | - | - | 12 |" in md  # per-round table (gsm8k, mini)


def test_pruning_sweep_report(pruning_sweep):
    jobs = find_jobs(pruning_sweep)
    assert [j.rel for j in jobs] == [f"policies/{i}" for i in range(3)] + [f"threshold/{i}" for i in range(4)]
    assert all(j.kind == "generate" for j in jobs)
    assert jobs[0].swept == {"policy": "none"}
    assert jobs[4].swept == {"policy": "threshold", "relative": "true", "tau": "0.25"}
    assert numeric_axis(jobs) == "tau"
    lines, refs = series_against(jobs, "tau", lambda j: j.data["pairs_total"])
    assert lines == {"policy=threshold, relative=true": [(0.0, 21.0), (0.25, 18.0), (0.5, 15.0), (1.0, 12.0)]}
    assert refs == [("policy=none", 16.0), ("policy=minmax", 21.0), ("policy=topk", 26.0)]

    assert report_main([str(pruning_sweep)]) == 0
    md = (pruning_sweep / "report.md").read_text()
    assert sorted(_links(md)) == ["pairs_per_stage.png", "yield_vs_tau.png"]
    for link in _links(md):
        _png_ok(pruning_sweep / link)
    assert "| threshold/3 | policy=threshold, relative=true, tau=1.0 | 8 | 1 | 3 | 12 |" in md
    assert "Swept settings: `policy`, `relative`, `tau`." in md


def test_multirun_of_runs_plots_accuracy_against_setting(tmp_path):
    root = tmp_path / "multi"
    for i, tau in enumerate(["0.1", "0.3", "0.5"]):
        _run_summary(root / str(i), [0.30, 0.33 + 0.02 * i],
                     overrides=[f"search.pruning.tau={tau}", "rounds=1"])
    out = tmp_path / "elsewhere"
    report, figs = write_report(root, out)
    assert report == out / "report.md"
    assert {p.name for p in figs} == {"accuracy_per_round.png", "accuracy_vs_tau.png", "pairs_per_stage.png"}
    jobs = find_jobs(root)
    lines, refs = series_against(jobs, "tau", lambda j: 100 * j.final_accuracy()["mini"]["accuracy"])
    assert refs == [] and [round(y, 6) for _, y in lines["value"]] == [33.0, 35.0, 37.0]
    md = report.read_text()
    for link in _links(md):
        _png_ok(out / link)


def test_categorical_sweep_without_numeric_axis(tmp_path):
    root = tmp_path / "cat"
    for i, pol in enumerate(["none", "minmax"]):
        _gen_job(root / str(i), [f"search.pruning.policy={pol}"], {"1": 5 + i, "2": 0, "3": 1})
    report, figs = write_report(root)
    assert numeric_axis(find_jobs(root)) is None
    assert "yield_vs_setting.png" in {p.name for p in figs}


def test_errors_name_the_file(tmp_path, capsys):
    assert report_main([str(tmp_path)]) == 2
    assert "no jobs found" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "generate_stats.json").write_text('{"pairs_per_stage": \n')
    assert report_main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad / 'generate_stats.json'}:" in err and "invalid JSON" in err
    (bad / "generate_stats.json").write_text('{"yield": 1}')
    assert report_main([str(bad)]) == 2
    assert "missing key 'pairs_per_stage'" in capsys.readouterr().err
    assert report_main([str(tmp_path / "nope")]) == 2
    assert report_main([str(tmp_path), "colour=red"]) == 2


def test_cli_dispatch(pruning_sweep):
    from sphere import cli

    with pytest.raises(SystemExit) as ei:
        cli.main(["report", str(pruning_sweep)])
    assert ei.value.code == 0 and (pruning_sweep / "report.md").is_file()


def test_yield_interval_is_wilson(pruning_sweep):
    from sphere.evaluation.metrics import wilson_ci
    from sphere.runreport.plots import _yield_ci

    j = find_jobs(pruning_sweep)[0]
    y, lo, hi = _yield_ci(j)
    assert y == pytest.approx(16 / 48) and (lo, hi) == pytest.approx(wilson_ci(16, 48))
    assert lo < y < hi
    j.data["pairs_total"] = 60  # more pairs than problems: not a proportion, no interval
    assert _yield_ci(j) == pytest.approx(16 / 48)


@pytest.mark.slow
def test_report_on_a_real_generate_multirun(tmp_path, tiny_model_dir):
    """A real (small) pruning sweep through the CLI: `sphere generate -m` with the tiny test model on its own
    arithmetic problems, then `sphere report` on the sweep directory."""
    import os
    import random
    import subprocess
    import sys

    from sphere.standins.tiny import arithmetic_problem

    rng = random.Random(4321)
    probs = tmp_path / "problems.jsonl"
    with open(probs, "w") as f:
        for i in range(6):
            p, _, ans, _ = arithmetic_problem(rng)
            f.write(json.dumps({"id": f"t{i}", "problem": p, "answer": ans}) + "\n")
    sweep = tmp_path / "sweep" / "threshold"
    cmd = [sys.executable, "-m", "sphere.cli", "generate", "-m", f"model.policy={tiny_model_dir}",
           f"model.small={tiny_model_dir}", f"data.problems={probs}", "search.pruning.policy=threshold",
           "search.pruning.relative=true", "search.pruning.tau=0.0,1.0", "search.max_depth=4",
           "output.snapshot_every=3", f"hydra.sweep.dir={sweep}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path,
                       env={**os.environ, "WANDB_MODE": "disabled"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert report_main([str(tmp_path / "sweep")]) == 0
    jobs = find_jobs(tmp_path / "sweep")
    assert [j.rel for j in jobs] == ["threshold/0", "threshold/1"] and all(j.kind == "generate" for j in jobs)
    assert [j.swept for j in jobs] == [{"tau": "0.0"}, {"tau": "1.0"}]
    md = (tmp_path / "sweep" / "report.md").read_text()
    assert sorted(_links(md)) == ["pairs_per_stage.png", "yield_vs_tau.png"]
    for link in _links(md):
        _png_ok(tmp_path / "sweep" / link)
    for j in jobs:
        stats = json.loads((j.path / "generate_stats.json").read_text())
        assert f"| {j.rel} | tau={j.swept['tau']} | " + " | ".join(
            str(stats["pairs_per_stage"][s]) for s in ("1", "2", "3")) in md


def test_run_report_carries_the_paired_intervals_and_the_controls(tmp_path):
    d = tmp_path / "run"
    _run_summary(d, [0.30, 0.38])
    s = json.loads((d / "summary.json").read_text())
    ci = {"n": 200, "delta": 0.08, "ci_low": 0.03, "ci_high": 0.13, "gained": 20, "lost": 4,
          "mcnemar_p": 0.001}
    s["rounds"][1]["paired"] = {"mini": {"vs_r0": ci}}
    s["rounds"][1]["controls"] = {"rft": {"pairs": 13, "eval": {"mini": _acc(0.33)}, "paired": {"mini": {
        "vs_start": {**ci, "delta": 0.03}, "sphere_vs_control": {**ci, "delta": 0.05}}}}}
    (d / "summary.json").write_text(json.dumps(s))
    md = write_report(d)[0].read_text()
    assert "| 1 | mini | round 0 | 200 | +8.0 | [+3.0, +13.0] | 20/4 | 0.001 |" in md
    row = "| 1 | SFT on SPHERE's chosen solutions (RFT) | 13 | mini | 33.0% | +3.0 [+3.0, +13.0] | +5.0 ["
    assert row in md
