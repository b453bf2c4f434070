"""Per-round controls of `sphere run` (issue #20, sphere/controls.py, sphere/loop/controls.py): SFT on SPHERE's chosen solutions (RFT)
and DPO on randomly paired right/wrong samples, trained from the same start policy and compared over the same
problems."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sphere.controls import enabled_controls, random_pairs, rft_train_config, validate_controls_config
from sphere.loop.plan import validate_run_config
from sphere.loop.summary import write_summary

ROOT = Path(__file__).resolve().parents[1]


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name="run", overrides=list(overrides))


def _rec(pid: str, texts: list[str], verdicts: list[bool]) -> dict:
    return {"id": pid, "completions": texts, "verdicts": verdicts}


PROBLEMS = {f"p{i}": {"id": f"p{i}", "problem": f"problem {i}", "answer": "1", "source": "mini"}
            for i in range(40)}


def test_random_pairs_take_one_right_and_one_wrong_per_problem():
    recs = [_rec("p0", ["r1", "w1", "r2", "w2"], [True, False, True, False]),
            _rec("p1", ["r", "r", "r", "r"], [True] * 4),           # no wrong sample: no pair
            _rec("p2", ["w1", "w2", "w3", "w4"], [False] * 4),      # no right sample: no pair
            _rec("p3", ["a", " ", "b", "c"], [False, True, True, False])]  # blank texts are not used
    pairs = random_pairs(recs, PROBLEMS, max_pairs=None, seed=0, pair_prompt=lambda p: f"Q: {p['problem']}",
                         model="m")
    assert [p["problem_id"] for p in pairs] == ["p0", "p3"]
    assert pairs[0]["chosen"] in ("r1", "r2") and pairs[0]["rejected"] in ("w1", "w2")
    assert pairs[1] == {**pairs[1], "chosen": "b", "prompt": "Q: problem 3"}
    assert pairs[1]["rejected"] in ("a", "c")
    assert all(p["chosen_correct"] and not p["rejected_correct"] and p["route"] == "random_pair"
               for p in pairs)


def test_random_pairs_are_random_deterministic_and_capped():
    recs = [_rec(f"p{i}", [f"r{i}a", f"r{i}b", f"w{i}a", f"w{i}b"], [True, True, False, False])
            for i in range(40)]
    kw = dict(pair_prompt=lambda p: p["problem"])
    a = random_pairs(recs, PROBLEMS, max_pairs=None, seed=1, **kw)
    assert len(a) == 40 and a == random_pairs(recs, PROBLEMS, max_pairs=None, seed=1, **kw)
    b = random_pairs(recs, PROBLEMS, max_pairs=None, seed=2, **kw)
    assert a != b  # another seed picks other samples
    picks = {(p["chosen"][-1], p["rejected"][-1]) for p in a}
    assert len(picks) > 1  # not always the first right / first wrong sample
    capped = random_pairs(recs, PROBLEMS, max_pairs=10, seed=1, **kw)
    ids = [p["problem_id"] for p in capped]
    assert len(capped) == 10 and ids == sorted(ids, key=lambda s: int(s[1:]))  # a subset, in problem order
    assert ids != [f"p{i}" for i in range(10)]  # a random subset, not the first ten


def test_random_pairs_conversational_format():
    recs = [_rec("p0", ["good", "bad"], [True, False])]
    msgs = [{"role": "user", "content": "Q"}]
    (p,) = random_pairs(recs, PROBLEMS, max_pairs=None, seed=0, pair_prompt=lambda _p: msgs,
                        conversational=True, response_prefix="<think>\n")
    assert p["prompt"] == msgs
    assert p["chosen"] == [{"role": "assistant", "content": "<think>\ngood"}]
    assert p["rejected"] == [{"role": "assistant", "content": "<think>\nbad"}]


def test_rft_recipe_switches_the_dpo_term_off_and_keeps_the_nll_term():
    t = rft_train_config(OmegaConf.create({"lr": 1e-4, "loss": {"beta": 0.1, "rpo_alpha": 2.0}}), 1e-4)
    assert t.loss.beta == 1e-4 and t.loss.rpo_alpha == 2.0 and t.lr == 1e-4
    t = rft_train_config(OmegaConf.create({"loss": {"beta": 0.1, "rpo_alpha": None}}), 1e-4)
    assert t.loss.rpo_alpha == 1.0  # a recipe without the NLL term gets it: SFT needs it


def test_controls_are_on_in_the_default_off_in_the_planted_check_and_named_when_on():
    assert enabled_controls(_cfg()) == ["rft", "random_pairs"]  # the default, experiment=loop_check
    assert enabled_controls(_cfg("experiment=mini_honest")) == ["rft", "random_pairs"]
    assert enabled_controls(_cfg("experiment=mini_planted")) == []
    on = _cfg("experiment=mini_planted", "controls.random_pairs=true", "controls.rft=true")
    assert enabled_controls(on) == ["rft", "random_pairs"]


@pytest.mark.parametrize("override, words", [
    ("+controls.rtf=true", "unknown key(s) ['rtf']"),
    ("controls.samples=1", "controls.samples=1: allowed an integer >= 2"),
    ("controls.rft_beta=0.5", "controls.rft_beta=0.5: allowed a number in (0, 0.01]"),
    ("controls.rft=maybe", "controls.rft='maybe': allowed true or false"),
    ("controls.seed=abc", "controls.seed='abc': allowed an integer or null"),
])
def test_bad_controls_config_is_refused_naming_the_field(override, words):
    with pytest.raises(ValueError) as e:
        validate_controls_config(_cfg(override))
    assert words in str(e.value)


def test_controls_refused_in_a_transfer_run_only():
    """The controls run on either runner (tests/test_run_ray.py runs them on Ray); a transfer run
    (model.train_target) has no self-evolution loop to compare them with."""
    validate_run_config(_cfg("controls.rft=true", "controls.random_pairs=true", "runner=ray"))
    with pytest.raises(ValueError, match="transfer run"):
        validate_run_config(_cfg("experiment=transfer_qwen2_5_1_5b", "controls.rft=true"))


def _write_eval(d: Path, bench: str, verdicts: dict[str, bool]) -> None:
    (d / "eval").mkdir(parents=True, exist_ok=True)
    (d / "eval" / f"{bench}.jsonl").write_text(
        "".join(json.dumps({"id": i, "verdicts": [v]}) + "\n" for i, v in verdicts.items()))


def test_summary_compares_each_control_with_its_start_and_with_sphere(tmp_path):
    ids = [f"q{i}" for i in range(100)]
    r0 = {i: k < 40 for k, i in enumerate(ids)}                    # start policy: 40%
    r1 = {i: k < 50 for k, i in enumerate(ids)}                    # SPHERE: +10 (10 gained)
    ctrl = {i: k < 40 or 90 <= k < 93 for k, i in enumerate(ids)}  # control: +3
    _write_eval(tmp_path / "round_0", "mini", r0)
    _write_eval(tmp_path / "round_1", "mini", r1)
    _write_eval(tmp_path / "round_1" / "controls" / "rft", "mini", ctrl)
    rounds = [{"round": 0, "eval": {"mini": {"accuracy": 0.4}}, "wall_s": 1.0},
              {"round": 1, "eval": {"mini": {"accuracy": 0.5}}, "pairs_per_stage": {"1": 5}, "wall_s": 1.0,
               "controls": {"rft": {"pairs": 5, "eval": {"mini": {"accuracy": 0.43}}}}}]
    write_summary(tmp_path, rounds)
    c = json.loads((tmp_path / "summary.json").read_text())["rounds"][1]["controls"]["rft"]["paired"]["mini"]
    assert (c["vs_start"]["gained"], c["vs_start"]["lost"]) == (3, 0)
    assert c["vs_start"]["delta"] == pytest.approx(0.03)
    sv = c["sphere_vs_control"]  # SPHERE gains 10 the control misses, loses the control's 3
    assert (sv["gained"], sv["lost"]) == (10, 3) and sv["delta"] == pytest.approx(0.07)
    md = (tmp_path / "summary.md").read_text()
    assert "Per-round controls" in md
    assert "| 1 | SFT on SPHERE's chosen solutions (RFT) | 5 | mini | 43.0% | +3.0 [" in md
    assert "| +7.0 [" in md


def test_sphere_run_with_controls_end_to_end_and_resumes(tmp_path):
    """A real one-round run on the mini world (transformers backend, TRL): both controls train from round 0's
    policy, are evaluated on the same problems, and a rerun into the same directory reuses all of it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    args = [sys.executable, "-m", "sphere.cli", "run", "experiment=mini_planted", "rounds=1",
            "data.mini_n=48", "eval.limit=60",
            "controls.rft=true", "controls.random_pairs=true", f"hydra.run.dir={tmp_path}"]
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((tmp_path / "summary.json").read_text())["rounds"][1]
    ctrls = rec["controls"]
    assert set(ctrls) == {"rft", "random_pairs"}
    n_sphere = sum(1 for _ in (tmp_path / "round_1" / "generate" / "pairs.jsonl").open())
    assert ctrls["rft"]["pairs"] == n_sphere
    assert ctrls["rft"]["pairs_path"] == str(tmp_path / "round_1" / "generate" / "pairs.jsonl")
    assert 0 < ctrls["random_pairs"]["pairs"] <= n_sphere
    samples = [json.loads(x) for x in (tmp_path / "round_1" / "controls" / "random_pairs" / "samples" / "eval"
                                       / "problems.jsonl").read_text().splitlines()]
    assert len(samples) == 48 and all(len(s["completions"]) == 4 for s in samples)
    right = {s["id"]: {c for c, v in zip(s["completions"], s["verdicts"], strict=True) if v} for s in samples}
    for p in map(json.loads, (tmp_path / "round_1" / "controls" / "random_pairs" / "pairs.jsonl").open()):
        assert p["chosen"] in right[p["problem_id"]] and p["rejected"] not in right[p["problem_id"]]
    def base(d: Path) -> str:
        return json.loads((d / "signature.json").read_text())["train"]["signature"]["base_model.sha256"]

    start = base(tmp_path / "round_1" / "train")  # SPHERE's round 1 trained from round 0's policy
    for name, c in ctrls.items():
        assert c["eval"]["mini"]["n"] == 60 and set(c["paired"]["mini"]) == {"vs_start", "sphere_vs_control"}
        assert c["paired"]["mini"]["vs_start"]["n"] == 60
        assert base(tmp_path / "round_1" / "controls" / name / "train") == start  # not SPHERE's round-1 model
    md = (tmp_path / "summary.md").read_text()
    assert "DPO on random right/wrong samples" in md and "SFT on SPHERE's chosen solutions (RFT)" in md
    assert rec["controls_s"] > 0
    r2 = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert r2.stderr.count("is complete, skipping training") == 3  # SPHERE's and both controls'
    again_rec = json.loads((tmp_path / "summary.json").read_text())["rounds"][1]
    again = again_rec["controls"]
    assert {k: v["eval"] for k, v in again.items()} == {k: v["eval"] for k, v in ctrls.items()}
    # the rerun reused everything: the round's recorded times stay those of the run that did the work
    assert {k: again_rec[k] for k in ("wall_s", "controls_s")} == {k: rec[k] for k in ("wall_s", "controls_s")}
    # another pairing seed on the finished directory: refused, naming it, before pairs.jsonl is rewritten
    rp = tmp_path / "round_1" / "controls" / "random_pairs" / "pairs.jsonl"
    before = rp.read_bytes()
    r3 = subprocess.run([*args, "controls.seed=5"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=900)
    assert r3.returncode != 0 and "controls.seed: 0 -> 5" in r3.stderr, r3.stderr[-2000:]
    assert rp.read_bytes() == before


def test_summary_shows_a_rounds_evaluation_before_the_next_rounds_pairs_exist(tmp_path, monkeypatch):
    """summary.json/md carry round r's accuracy as soon as it is evaluated, not only once round r+1's pairs
    are generated and trained (hours on the paper's setting): a generation that dies still leaves round 0."""
    from sphere.generate import generator
    from sphere.loop import rounds as loop

    def boom(*a, **k):
        raise RuntimeError("generation died (test double)")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(generator.Generator, "run", boom)
    cfg = _cfg("experiment=mini_planted", "rounds=1", "data.mini_n=8", "eval.limit=20")
    with pytest.raises(RuntimeError, match="generation died"):
        loop.run(cfg, tmp_path)
    rounds = json.loads((tmp_path / "summary.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0] and rounds[0]["eval"]["mini"]["n"] == 20
    assert "| 0 |" in (tmp_path / "summary.md").read_text()


def test_controls_not_a_mapping_is_refused():
    cfg = _cfg()
    OmegaConf.set_struct(cfg, False)
    cfg.controls = "foo"
    assert enabled_controls(cfg) == []
    with pytest.raises(ValueError, match=r"config controls='foo': allowed a mapping of"):
        validate_controls_config(cfg)
