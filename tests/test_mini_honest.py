"""Issue #20: the paired accuracy-change interval of `sphere run`'s summary, the planted-misconception
experiment (`experiment=mini_planted`, the loop's unit-level check) and the honest easy-to-hard mini world
(`experiment=mini_easy_to_hard`: problem files, recipe options that leave the shipped recipes unchanged)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sphere.evaluation.metrics import paired_accuracy_change
from sphere.evaluation.paired import paired_changes
from sphere.loop.summary import summary_markdown, write_summary

ROOT = Path(__file__).resolve().parents[1]
HONEST = ROOT / "assets" / "mini_honest"


def _sphere(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sphere.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


# --- the paired interval -------------------------------------------------------------------------------

def test_paired_change_counts_and_interval():
    # 1000 problems: 100 gained, 40 lost -> +6.0 points; the interval excludes zero, McNemar p tiny
    before = [False] * 100 + [True] * 40 + [True] * 500 + [False] * 360
    after = [True] * 100 + [False] * 40 + [True] * 500 + [False] * 360
    c = paired_accuracy_change(before, after)
    assert (c["n"], c["gained"], c["lost"]) == (1000, 100, 40)
    assert c["delta"] == pytest.approx(0.06)
    assert c["before"] == pytest.approx(0.54) and c["after"] == pytest.approx(0.60)
    # the paired (Wald) half-width here is 1.96 * sqrt(140 - 60^2/1000) / 1000 = 0.0223
    assert c["ci_low"] == pytest.approx(0.06 - 0.0223, abs=0.004)
    assert c["ci_high"] == pytest.approx(0.06 + 0.0223, abs=0.004)
    assert c["excludes_zero"] and c["mcnemar_p"] < 1e-4
    assert paired_accuracy_change(before, after) == c  # deterministic (seeded)


def test_paired_change_no_difference_and_symmetric_noise():
    same = [True, False] * 50
    c = paired_accuracy_change(same, same)
    assert c["delta"] == 0 and c["ci_low"] == 0 and c["ci_high"] == 0 and c["mcnemar_p"] == 1.0
    assert not c["excludes_zero"]
    # 30 gained, 30 lost: the change is zero and the interval straddles it
    before = [False] * 30 + [True] * 30 + [True] * 40
    after = [True] * 30 + [False] * 30 + [True] * 40
    c = paired_accuracy_change(before, after)
    assert c["delta"] == 0 and c["ci_low"] < 0 < c["ci_high"] and not c["excludes_zero"]
    assert c["mcnemar_p"] == pytest.approx(1.0)


def test_paired_interval_is_narrower_than_unpaired_when_rounds_agree():
    # the same 5 problems flip in a 2000-problem set where everything else agrees: an unpaired Wilson
    # interval of each accuracy would be +-2.2 points; the paired one is a fraction of a point
    before = [True] * 1000 + [False] * 1000
    after = list(before)
    for i in range(1000, 1005):
        after[i] = True
    c = paired_accuracy_change(before, after)
    assert c["delta"] == pytest.approx(0.0025)
    assert c["ci_high"] - c["ci_low"] < 0.006 and c["ci_low"] >= 0


def test_paired_change_rejects_unpaired_input():
    with pytest.raises(ValueError, match="same problems"):
        paired_accuracy_change([True, False], [True])


def _write_eval(rdir: Path, bench: str, verdicts: dict[str, bool], order: list[str]) -> None:
    (rdir / "eval").mkdir(parents=True, exist_ok=True)
    with open(rdir / "eval" / f"{bench}.jsonl", "w") as f:
        for i in order:
            f.write(json.dumps({"id": i, "verdicts": [verdicts[i]], "extracted": ["1"], "finish": ["stop"]})
                    + "\n")


def test_summary_pairs_rounds_by_problem_id(tmp_path):
    ids = [f"p{i}" for i in range(200)]
    r0 = {i: k < 80 for k, i in enumerate(ids)}            # 40%
    r1 = {i: k < 80 or 100 <= k < 130 for k, i in enumerate(ids)}  # +30 gained, none lost -> 55%
    r2 = {**r1, "p0": False}                                # one lost against round 1
    _write_eval(tmp_path / "round_0", "mini", r0, ids)
    _write_eval(tmp_path / "round_1", "mini", r1, ids[::-1])  # another order: pairing must go by id
    _write_eval(tmp_path / "round_2", "mini", r2, ids)
    rounds = [{"round": r, "eval": {"mini": {"accuracy": sum(v.values()) / 200}},
               "pairs_per_stage": None if r == 0 else {"1": 3, "2": 1, "3": 0}, "wall_s": 1.0}
              for r, v in enumerate((r0, r1, r2))]
    write_summary(tmp_path, rounds)
    s = json.loads((tmp_path / "summary.json").read_text())["rounds"]
    assert "paired" not in s[0]
    c1 = s[1]["paired"]["mini"]["vs_r0"]
    assert (c1["gained"], c1["lost"], c1["n"]) == (30, 0, 200) and c1["delta"] == pytest.approx(0.15)
    assert c1["ci_low"] > 0 and "vs_prev" not in s[1]["paired"]["mini"]
    c2 = s[2]["paired"]["mini"]["vs_prev"]
    assert (c2["gained"], c2["lost"]) == (0, 1)
    assert s[2]["paired"]["mini"]["vs_r0"]["gained"] == 30 and s[2]["paired"]["mini"]["vs_r0"]["lost"] == 1
    md = (tmp_path / "summary.md").read_text()
    assert "95% paired CI" in md
    assert "| 1 | mini | round 0 | 200 | +15.0 |" in md and "| 30/0 |" in md
    assert "| 2 | mini | round 1 | 200 | -0.5 |" in md
    # the per-round table is unchanged
    assert "| 1 | 55.0% | +15.0 | 3/1/0 | 1 |" in md
    assert paired_changes(tmp_path, 1, ["other"]) == {}  # no records -> no interval
    assert "paired" not in summary_markdown([{"round": 0, "eval": {}, "wall_s": 0.0}])


# --- the planted-misconception world: the loop's unit-level check ------------------------------------

def test_mini_planted_experiment_pins_the_planted_setting():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="run", overrides=["experiment=mini_planted"])
    assert cfg.model.policy == "mini" and cfg.model.prm == "symbolic" and cfg.rounds == 2
    assert cfg.data.problems == "mini" and cfg.data.mini_n == 768 and cfg.data.mini_seed == 7
    assert cfg.stages.stage2 and not cfg.stages.stage3
    assert cfg.train.lr == 1.0e-4 and cfg.train.loss.rpo_alpha == 1.0 and not cfg.train.lora.enabled
    assert cfg.search.mode == "paper" and cfg.scorer.name == "symbolic"
    assert list(cfg.eval.benchmarks) == ["mini"] and cfg.eval.limit == 500 and cfg.eval.n == 1
    recipe = json.loads((ROOT / "assets" / "mini" / "mini" / "recipe.json").read_text())["recipe"]
    assert recipe["train"]["slip_rate"] == 0.9 and recipe["train"]["slip_kinds"] == ["divide"]


def test_the_run_default_is_the_loop_check_and_the_honest_study_one_override_away():
    """Issue "a main command that fits in 15 minutes": `sphere run` with no overrides is experiment=loop_check
    (the planted world, every setting of mini_planted, with both controls on and its own `about`);
    experiment=mini_honest is the honest study; model=X, another experiment, or any key still wins."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="run")
        planted = compose(config_name="run", overrides=["experiment=mini_planted"])
        for key in ("model", "data", "search", "scorer", "train", "stages", "eval", "rounds"):
            assert cfg[key] == planted[key], key  # loop_check changes nothing of the planted world ...
        assert cfg.controls.rft and cfg.controls.random_pairs  # ... but turns both controls on
        assert not planted.controls.rft and not planted.controls.random_pairs
        assert "loop_check" in cfg.about and "mini_honest" in cfg.about and cfg.about != planted.about
        honest = compose(config_name="run", overrides=["experiment=mini_honest"])
        assert honest.model.policy.endswith("assets/mini_honest/mini-honest")
        assert honest.data.problems.endswith("train_hard.jsonl") and honest.data.limit == 6144
        assert honest.search.expansions == 2 and honest.train.loss.beta == 0.01
        assert honest.controls.rft and honest.controls.random_pairs and not honest.stages.stage3
        assert [b.rsplit("/", 1)[-1] for b in honest.eval.benchmarks] == ["test_hard.jsonl"]
        assert honest.eval.limit == 2000
        other = compose(config_name="run", overrides=["model=standin_qwen2_5", "data.limit=10"])
        assert other.model.policy == "standin-qwen2_5" and other.model.prm == "standin-qwen2_5-prm"
        assert other.data.limit == 10
        paper = compose(config_name="run", overrides=["experiment=paper_qwen2_5_7b"])
        assert paper.search.expansions == 5 and not paper.controls.rft
        assert paper.data.problems != honest.data.problems
        abl = compose(config_name="run", overrides=["experiment=ablation", "variant=no_stage2"])
        assert abl.model.policy == honest.model.policy and abl.data.limit == 6144  # ablates the honest world
        assert not abl.stages.stage2 and abl.stages.stage3 and not abl.controls.rft
        assert "no_stage2" in abl.about


@pytest.mark.parametrize("exp", ["mini_planted", "mini_easy_to_hard", "mini_honest"])
def test_mini_experiments_dry_run(exp, tmp_path):
    if exp != "mini_planted" and not (HONEST / "mini-honest" / "config.json").is_file():
        pytest.skip("assets/mini_honest/mini-honest not built")
    r = _sphere("run", f"experiment={exp}", "dry_run=true", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-3000:]
    plan = json.loads(r.stdout[r.stdout.index("{"):])
    assert plan["problems"] == {"mini_easy_to_hard": 384, "mini_honest": 6144, "mini_planted": 768}[exp]
    assert plan["stages"] == {"1": True, "2": True, "3": False}
    assert plan["search"]["E"] == (2 if exp == "mini_honest" else 5)
    assert plan["train"]["loss"]["beta"] == (0.01 if exp == "mini_honest" else 0.1)
    if exp == "mini_planted":
        assert plan["estimate_per_round_controls"] == {}
    else:  # both controls on: what each adds to a round is in the plan
        n = plan["problems"]
        assert plan["estimate_per_round_controls"] == {
            "rft": {"trainings": 1, "evaluations": 1},
            "random_pairs": {"trainings": 1, "evaluations": 1, "sampled_solutions": 4 * n}}
    if exp != "mini_planted":
        assert plan["models"]["policy"].endswith("assets/mini_honest/mini-honest")
        assert plan["eval"]["limit"] == 2000 and plan["eval"]["benchmarks"][0].endswith("test_hard.jsonl")
        assert plan["controls"] == ["rft", "random_pairs"]  # the honest harness reports its controls
    else:
        assert plan["models"]["policy"] == "mini" and plan["eval"]["benchmarks"] == ["mini"]
        assert plan["controls"] == []
    assert not (tmp_path / "summary.json").exists()


# --- the honest world: data files and recipe options ---------------------------------------------------

def _jsonl(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def test_honest_problem_files_regenerate_and_are_disjoint():
    from sphere.mini.world import WorldSpec, load_mini_benchmark, training_problems

    hw = WorldSpec(min_steps=5, max_steps=6)
    keep = ("id", "problem", "answer", "source")
    test, dev, train = (_jsonl(HONEST / f"{s}_hard.jsonl") for s in ("test", "dev", "train"))
    assert test == [{k: p[k] for k in keep} for p in load_mini_benchmark("test", 2000, hw)]
    assert dev == [{k: p[k] for k in keep} for p in load_mini_benchmark("dev", 1000, hw)]
    want = training_problems(6144, 1007, hw, holdout=2000)  # the first 1,536: mini_easy_to_hard's 384/round
    assert train == [{**{k: p[k] for k in keep}, "id": p["id"].replace("mini-train", "mini-hard-train")}
                     for p in want]
    texts = [{p["problem"] for p in s} for s in (test, dev, train)]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    # every problem of the hard world has 5-6 equations (one sentence per operation plus the question)
    assert all(p["problem"].count("Then ") + (" with " in p["problem"]) in (5, 6) for p in test)


def test_hard_examples_default_is_off_and_shipped_recipes_do_not_use_it():
    from sphere.mini import load_recipe
    from sphere.mini.examples import hard_examples
    from sphere.mini.world import WorldSpec

    w = WorldSpec()
    assert hard_examples({}, w, 1) == [] and hard_examples({"hard_n": 0}, w, 1) == []
    for which in ("policy", "small"):
        tr = load_recipe(which)["train"]
        assert "hard_n" not in tr and "hard_world" not in tr
    hard = hard_examples({"hard_n": 5, "hard_world": {"min_steps": 5, "max_steps": 6}}, w, 1)
    assert len(hard) == 5 and all(p["id"].startswith("mini-train-hard") for p in hard)
    assert all(p["solution"].count(" = ") in (5, 6) for p in hard)


def test_honest_recipe_shares_the_policy_tokenizer_and_is_clean():
    from omegaconf import OmegaConf

    from sphere.mini import load_recipe

    honest = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "mini" / "honest.yaml"), resolve=True)
    assert honest["tokenizer"] == load_recipe("policy")["tokenizer"]
    assert honest["world"] == load_recipe("policy")["world"]
    assert honest["train"]["slip_rate"] == 0.0 and honest["eval"]["split"] == "dev"  # tuned on dev only
    shipped = HONEST / "mini-honest" / "recipe.json"
    if shipped.is_file():
        assert json.loads(shipped.read_text())["recipe"] == honest


def test_pretrain_with_hard_problems_and_hard_eval_world(tmp_path):
    from test_mini_model import TINY  # tests/ is on sys.path (pytest's default import mode)

    from sphere.mini.pretrain import pretrain

    recipe = json.loads(json.dumps(TINY))
    recipe["model"]["max_position_embeddings"] = 256  # the harder problems are longer
    recipe["train"].update(hard_n=8, hard_world={"min_steps": 3, "max_steps": 3}, hard_holdout=50)
    recipe["eval"] = {**recipe["eval"], "world": {"min_steps": 3, "max_steps": 3}}
    rec = pretrain(recipe, tmp_path / "m", progress=False)
    assert rec["metrics"]["n"] == recipe["eval"]["n"] and rec["train"]["n_params"] > 0


def test_every_summary_figure_comes_from_the_problems_this_evaluation_covers(tmp_path):
    """A rerun in place with a smaller eval.limit: the records of the earlier, larger attempt stay in
    round_<r>/eval/<bench>.jsonl, but the paired intervals (rounds and controls) are computed over the
    problems this evaluation covers, as its accuracy is (issue "the third reliability pass")."""
    from sphere.evaluation.paired import evaluated_ids

    ids = [f"p{i}" for i in range(32)]
    r0 = {i: False for i in ids}
    r1 = {i: k >= 16 for k, i in enumerate(ids)}  # the 16 gains are all past the first 16 problems
    _write_eval(tmp_path / "round_0", "mini", r0, ids)
    _write_eval(tmp_path / "round_1", "mini", r1, ids[::-1])
    _write_eval(tmp_path / "round_1" / "controls" / "rft", "mini", r1, ids)
    rounds = [{"round": 0, "eval": {"mini": {"accuracy": 0.0}}, "wall_s": 1.0},
              {"round": 1, "eval": {"mini": {"accuracy": 0.0}}, "wall_s": 1.0,
               "controls": {"rft": {"eval": {"mini": {"accuracy": 0.0}}, "pairs": 1}}}]
    write_summary(tmp_path, json.loads(json.dumps(rounds)), None, {"mini": ids[:16]})
    s = json.loads((tmp_path / "summary.json").read_text())["rounds"]
    c = s[1]["paired"]["mini"]["vs_r0"]
    assert (c["n"], c["gained"], c["delta"]) == (16, 0, 0.0)  # not n=32 with 16 gained
    ctl = s[1]["controls"]["rft"]["paired"]["mini"]
    assert ctl["vs_start"]["n"] == 16 and ctl["sphere_vs_control"]["n"] == 16
    write_summary(tmp_path, json.loads(json.dumps(rounds)))  # without ids: every record (the old reading)
    assert json.loads((tmp_path / "summary.json").read_text())["rounds"][1]["paired"]["mini"]["vs_r0"]["n"] == 32
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="run", overrides=["experiment=mini_planted", "eval.limit=16"])
    got = evaluated_ids(cfg)
    assert list(got) == ["mini"] and len(got["mini"]) == 16 and got["mini"][0] == "mini-test-0"
