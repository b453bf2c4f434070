"""Issue #28 item 1 (dry-run half): every length budget against every model's window (sphere/budgets.py).

The paper's budgets (16 x 512-token steps, R1: 24 x 1,024) pass Qwen2.5-Math-PRM-7B's 4,096 positions and the
stand-ins' 2,048; the dry run says so with its numbers and what happens to such chains, and refuses a budget
where not even one step fits.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from sphere.budget_prompts import local_tokenizer, prm_input_ids
from sphere.budget_windows import LengthBudgetError
from sphere.budgets import check_length_budgets, format_budgets, length_budgets

ROOT = Path(__file__).resolve().parents[1]
PAPER = ["paper_qwen2_5_7b", "paper_phi4", "paper_deepseek_r1_distill_qwen_7b", "transfer_phi4",
         "transfer_qwen2_5_1_5b", "transfer_qwen2_5_math_7b"]
STANDIN = {"paper_qwen2_5_7b": "standin_qwen2_5", "paper_phi4": "standin_phi4",
           "paper_deepseek_r1_distill_qwen_7b": "standin_deepseek_r1"}
# the real models' windows (config.json on the hub; backend.max_model_len 32,768, phi-4 16,384)
REAL = {"paper_qwen2_5_7b": dict(policy=32768, small=32768, eval=32768),
        "paper_phi4": dict(policy=16384, small=16384, eval=16384),
        "paper_deepseek_r1_distill_qwen_7b": dict(policy=32768, small=32768, eval=32768),
        "transfer_phi4": dict(policy=32768, eval=16384),
        "transfer_qwen2_5_1_5b": dict(policy=32768, eval=32768),
        "transfer_qwen2_5_math_7b": dict(policy=32768, eval=4096)}


def _cfg(exp: str, *over: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("run", overrides=[f"experiment={exp}", *over])


def _check(b: dict, name: str) -> dict:
    return next(c for c in b["checks"] if c["check"] == name)


@pytest.mark.parametrize("exp", PAPER)
def test_paper_budgets_against_the_real_models_windows(exp):
    cfg = _cfg(exp)
    b = length_budgets(cfg)
    w = {k: v["tokens"] for k, v in b["windows"].items()}
    assert {k: w[k] for k in REAL[exp]} == REAL[exp]
    assert w["prm"] == 4096  # Qwen2.5-Math-PRM-7B scores every policy
    prm = _check(b, "step scorer (PRM)")
    assert prm["status"] == "over" and prm["limit"] == 4096
    S, D = int(cfg.search.max_step_tokens), int(cfg.search.max_depth)
    assert prm["need"] == b["prompts"]["prm"]["longest"] + D * (S + 1)
    if str(cfg.scorer.get("long_chains", "end")) == "recent":  # R1: the PRM reads the newest steps that fit
        assert "long_chains: recent" in prm["line"] and "no chain ends here" in prm["line"]
    else:
        assert 'finish "window"' in prm["line"] and "generate_stats.json" in prm["line"]
    c1 = _check(b, "stage 1 (policy)")
    assert c1["need"] == b["prompts"]["policy"]["longest"] + D * (S + b["step"]["delimiter_tokens"])
    assert c1["limit"] == REAL[exp]["policy"]
    # 32k / 16k hold the whole chain of 16 x 512; R1's 96 x 512 does not: its chains end at the window
    assert c1["status"] == ("over" if "deepseek" in exp else "ok")
    assert not any(c["status"] == "refused" for c in b["checks"])
    text = format_budgets(b)
    for what in ("stage 1 (policy)", "stage 2 (policy)", "step scorer (PRM)", "DPO", "evaluation"):
        assert f"  - {what}" in text, what
    assert "4,096" in text


@pytest.mark.parametrize("exp", list(STANDIN))
def test_paper_budgets_against_the_standins_2048_windows(exp):
    cfg = _cfg(exp, f"model={STANDIN[exp]}", "data.problems=mini")
    b = length_budgets(cfg)
    assert {k: v["tokens"] for k, v in b["windows"].items()} == {k: 2048 for k in ("policy", "small", "prm", "eval")}
    assert b["prompts"]["policy"]["how"].startswith("measured with standin-")  # the shipped tokenizers
    recent = str(cfg.scorer.get("long_chains", "end")) == "recent"
    for name, how in (("stage 1 (policy)", 'finish "length"'),
                      ("step scorer (PRM)", "long_chains: recent" if recent else 'finish "window"'),
                      ("stage 3 (small)", 'finish "length"')):
        c = _check(b, name)
        assert c["status"] == "over" and c["limit"] == 2048 and c["need"] > 2048 and how in c["line"], name
    # after the longest prompt the windows stop a chain short of the 2,048 positions
    assert 0 < b["longest_chain"] < 2048
    # the memory plan's PRM input: what the chain reaches, at most the PRM's window (phi-4's longer prompt
    # leaves the policy less room, so its chains stop before the PRM's window)
    assert b["prm_input_max"] == 2048 if exp == "paper_qwen2_5_7b" else 1500 < b["prm_input_max"] <= 2048
    ev = _check(b, "evaluation")  # the stand-ins' tokenizer spends ~1.3 characters a token: long olympiad
    assert ev["status"] == "over" and "overflow" in ev["line"]  # problems do not fit at all


def test_a_step_larger_than_the_policy_window_is_refused_before_any_tokenizer_loads(monkeypatch):
    import sphere.budget_prompts as budget_prompts  # where the budgets' prompt measurement looks it up

    def no_tokenizer(name):
        raise AssertionError("a step larger than the window needs no prompt measurement")

    monkeypatch.setattr(budget_prompts, "local_tokenizer", no_tokenizer)
    with pytest.raises(LengthBudgetError) as e:
        check_length_budgets(_cfg("paper_qwen2_5_7b", "model=standin_qwen2_5", "data.problems=mini",
                                  "search.max_step_tokens=4096"))
    msg = str(e.value)
    assert "\n" not in msg
    assert "search.max_step_tokens=4096" in msg and "4,097" in msg and "2,048" in msg
    assert "backend.max_model_len" in msg


def test_one_step_after_a_typical_measured_prompt_is_refused():
    # 2,000 alone fits 2,048; after the stand-in's measured prompt of ~67 tokens it does not
    with pytest.raises(LengthBudgetError, match=r"search.max_step_tokens=2000: one step after a typical prompt "
                                                r"of \d+ tokens \(measured .*\) needs 2,0\d\d tokens > the policy "
                                                r"window 2,048"):
        check_length_budgets(_cfg("paper_qwen2_5_7b", "model=standin_qwen2_5", "data.problems=mini",
                                  "search.max_step_tokens=2000"))
    # 1,900 fits after the plain prompt but not after stage 2's reflection prompt (~200 tokens before any
    # attempt): no stage-2 search could take a step
    with pytest.raises(LengthBudgetError, match=r"search.max_step_tokens=1900: one stage-2 step after a typical "
                                                r"reflection prompt of \d+ tokens without its attempt"):
        check_length_budgets(_cfg("paper_qwen2_5_7b", "model=standin_qwen2_5", "data.problems=mini",
                                  "search.max_step_tokens=1900"))
    b = check_length_budgets(_cfg("paper_qwen2_5_7b", "model=standin_qwen2_5", "data.problems=mini",
                                  "search.max_step_tokens=1800"))
    assert _check(b, "stage 1 (policy)")["status"] == "over"


def test_a_prm_that_cannot_score_one_step_is_refused():
    with pytest.raises(LengthBudgetError) as e:
        check_length_budgets(_cfg("paper_qwen2_5_7b", "model=standin_qwen2_5", "data.problems=mini",
                                  "scorer.max_length=512"))
    msg = str(e.value)
    assert "PRM cannot score even a one-step item" in msg and "514" in msg and "512" in msg
    assert "scorer.max_length" in msg and "search.max_step_tokens=512" in msg
    # a smaller step budget scores in the same window: chains end there instead
    b = check_length_budgets(_cfg("paper_qwen2_5_7b", "model=standin_qwen2_5", "data.problems=mini",
                                  "scorer.max_length=512", "search.max_step_tokens=96"))
    assert _check(b, "step scorer (PRM)")["status"] == "over" and b["prm_input_max"] == 512


def test_an_evaluation_prompt_that_fills_the_window_is_refused():
    # rounds=0: evaluation only (no search, no PRM, no DPO lines); a 64-token window holds no benchmark prompt
    with pytest.raises(LengthBudgetError, match="evaluation: a typical benchmark prompt of .* leaves no room in "
                                                "the window 64"):
        check_length_budgets(_cfg("paper_qwen2_5_7b", "model=standin_qwen2_5", "rounds=0",
                                  "backend.max_model_len=64"))
    b = check_length_budgets(_cfg("paper_qwen2_5_7b", "model=standin_qwen2_5", "rounds=0"))
    assert [c["check"] for c in b["checks"]] == ["evaluation"]


def test_dpo_pairs_longer_than_max_length_are_said_to_be_dropped_and_counted():
    b = length_budgets(_cfg("paper_qwen2_5_7b", "model=standin_qwen2_5", "data.problems=mini",
                            "train.max_length=1024"))
    c = _check(b, "DPO")
    assert c["status"] == "over" and c["limit"] == 1024 and c["need"] > 1024
    assert "dropped and counted" in c["line"] and "never cut" in c["line"]
    ok = length_budgets(_cfg("paper_qwen2_5_7b", "model=standin_qwen2_5", "data.problems=mini",
                             "train.max_length=4096"))
    assert _check(ok, "DPO")["status"] == "ok"


def test_the_prm_input_is_built_as_the_prm_scorer_builds_it():
    """budgets.prm_input_ids mirrors PRMScorer.build_ids (that module imports torch; a dry run does not)."""
    from sphere.rewards.prm import DEFAULT_SYSTEM, PRMScorer

    tok = local_tokenizer("standin-qwen2_5-prm")
    me = SimpleNamespace(tokenizer=tok, system=DEFAULT_SYSTEM, step_tag="<extra_0>")
    for steps in ([""], ["a = 3 + 4 = 7", "b = 7 * 2 = 14", "The answer is \\boxed{14}."]):
        assert prm_input_ids(tok, DEFAULT_SYSTEM, "<extra_0>", "What is (3 + 4) * 2?", steps) == \
            PRMScorer.build_ids(me, "What is (3 + 4) * 2?", steps)


def _sphere(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sphere.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_dry_run_prints_the_budgets_and_refuses_in_one_line(tmp_path):
    base = ["run", "experiment=paper_qwen2_5_7b", "model=standin_qwen2_5", "data.problems=mini", "dry_run=true"]
    ok = _sphere(*base, f"hydra.run.dir={tmp_path}/a")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "Length budgets (tokens):" in ok.stderr
    assert "    - prm: 2,048 = standin-qwen2_5-prm's max_position_embeddings 2,048" in ok.stderr
    assert '  - step scorer (PRM): prompt ' in ok.stderr and 'finish "window"' in ok.stderr
    import json

    assert json.loads(ok.stdout)["length_budgets"]["windows"]["policy"]["tokens"] == 2048
    bad = _sphere(*base, "search.max_step_tokens=4096", f"hydra.run.dir={tmp_path}/b")
    assert bad.returncode != 0
    assert "Traceback" not in bad.stderr
    err = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    # the error in one line (sphere/cli.py adds its fixed "(verbose=true ... traceback)" hint below it)
    assert len(err) == 2 and err[1].startswith("(verbose=true"), bad.stderr
    assert err[0].startswith("sphere run: error: length budget: search.max_step_tokens=4096")
    assert "4,097" in err[0] and "2,048" in err[0]


@pytest.mark.parametrize("command,extra", [("run", []), ("generate", []), ("generate", ["runner=ray"])])
def test_a_real_run_refuses_the_budget_before_any_model_loads(tmp_path, command, extra):
    """Not only the dry run: `sphere run` and `sphere generate` (either runner) refuse a step no window can take
    before a model, a Ray cluster or an output file is opened."""
    bad = _sphere(command, "experiment=paper_qwen2_5_7b", "model=standin_qwen2_5", "data.problems=mini",
                  "search.max_step_tokens=4096", *extra, f"hydra.run.dir={tmp_path}/o")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert f"sphere {command}: error: length budget: search.max_step_tokens=4096" in bad.stderr, bad.stderr[-2000:]
    assert not (tmp_path / "o" / "stages").exists() and not (tmp_path / "o" / "round_0").exists()


def test_a_step_larger_than_the_small_models_window_is_refused(tmp_path):
    """Stage 3's small model has its own window: a local model directory whose config.json says 512."""
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 512}')
    with pytest.raises(LengthBudgetError) as e:
        check_length_budgets(_cfg("paper_qwen2_5_7b", "data.problems=mini", f"model.small={tmp_path}"))
    msg = str(e.value)
    assert "one step of the small model" in msg and "513" in msg and "its window 512" in msg
    b = check_length_budgets(_cfg("paper_qwen2_5_7b", "data.problems=mini", f"model.small={tmp_path}",
                                  "stages.stage3=false"))
    assert "stage 3 (small)" not in [c["check"] for c in b["checks"]]


def test_sphere_generate_checks_the_generation_budgets_only():
    """`sphere generate experiment=paper_*` composes the run's settings; its budgets are the search's and the
    PRM's (no DPO, no evaluation), with the same refusal."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("generate", overrides=["+experiment=paper_qwen2_5_7b", "model=standin_qwen2_5",
                                             "data.problems=mini"])
        bad = compose("generate", overrides=["+experiment=paper_qwen2_5_7b", "model=standin_qwen2_5",
                                             "data.problems=mini", "search.max_step_tokens=4096"])
    b = check_length_budgets(cfg, phases=("generate",))
    assert [c["check"] for c in b["checks"]] == ["stage 1 (policy)", "step scorer (PRM)", "stage 2 (policy)",
                                                 "stage 3 (small)"]
    assert "eval" not in b["windows"]
    with pytest.raises(LengthBudgetError, match="search.max_step_tokens=4096"):
        check_length_budgets(bad, phases=("generate",))
