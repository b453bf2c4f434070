"""Issue #16 item 2: the GPU memory plan and the single owner of the models' lifecycle."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from sphere.memplan import MemoryPlanError, check_memory_plan, memory_plan, param_count
from sphere.modelinfo import KNOWN_SHAPES, model_shape


@pytest.mark.parametrize("name,billions", [
    ("Qwen/Qwen2.5-7B-Instruct", 7.62), ("Qwen/Qwen2.5-3B-Instruct", 3.09), ("Qwen/Qwen2.5-1.5B-Instruct", 1.54),
    ("Qwen/Qwen2.5-Math-PRM-7B", 7.07), ("microsoft/phi-4", 14.66), ("microsoft/Phi-4-mini-instruct", 3.84),
])
def test_param_count_matches_the_published_sizes(name, billions):
    assert param_count(KNOWN_SHAPES[name]) / 1e9 == pytest.approx(billions, rel=0.01)


@pytest.mark.parametrize("tied", [True, False])
def test_param_count_of_a_local_config_equals_the_instantiated_model(tmp_path, tied):
    """The formula against transformers itself: a small Qwen2 built from a config.json."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(tmp_path)
    n = sum(p.numel() for p in model.parameters())
    assert param_count(model_shape(str(tmp_path))) == n


def _paper_cfg(**over):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=os.path.join(root, "conf"), version_base="1.3"):
        return compose("run", overrides=["experiment=paper_qwen2_5_7b", *[f"{k}={v}" for k, v in over.items()]])


def test_paper_config_fits_one_80gb_gpu_and_not_24gb():
    plan = check_memory_plan(_paper_cfg(**{"hardware.gpu_memory_gb": 80}))
    assert plan["fits"] is True
    assert set(plan["phases"]) == {"generate", "stage3", "train"}
    assert all(ph["total_gb"] <= 80 for ph in plan["phases"].values())
    with pytest.raises(MemoryPlanError) as e:
        check_memory_plan(_paper_cfg(**{"hardware.gpu_memory_gb": 24}))
    assert "15.2 GB of weights" in str(e.value) and "phase train" in str(e.value)


def test_keeping_the_policy_open_during_stage3_does_not_fit_80gb():
    cfg = _paper_cfg(**{"hardware.gpu_memory_gb": 80, "stages.close_policy_before_small": False})
    plan = memory_plan(cfg)
    assert plan["fits"] is False
    assert any("phase stage3" in p and "close_policy_before_small" in p for p in plan["problems"])


def test_no_hardware_no_verdict():
    plan = memory_plan(_paper_cfg(**{"hardware.gpu_memory_gb": "null"}))
    assert plan["fits"] is None and plan["problems"] == []


def test_dry_run_prints_a_fitting_plan_and_refuses_24gb(tmp_path):
    cmd = [sys.executable, "-m", "sphere.cli", "run", "experiment=paper_qwen2_5_7b", "dry_run=true",
           "data.problems=mini"]  # the plan does not depend on the problems (the paper pools are not shipped)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run([*cmd, "hardware.gpu_memory_gb=80", f"hydra.run.dir={tmp_path}/a"], capture_output=True,
                        text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "GPU memory plan" in ok.stderr and "fits: yes" in ok.stderr
    assert json.loads(ok.stdout)["memory_plan"]["fits"] is True
    bad = subprocess.run([*cmd, "hardware.gpu_memory_gb=24", f"hydra.run.dir={tmp_path}/b"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert bad.returncode != 0
    assert "does not fit hardware.gpu_memory_gb=24" in bad.stderr and "Traceback" not in bad.stderr


def _prm_item(plan: dict) -> dict:
    return next(it for it in plan["phases"]["generate"]["items"] if it["what"] == "PRM")


def test_the_prm_input_is_what_the_chain_reaches_capped_at_the_prm_window():
    """Issue #28 item 1: the plan assumed PRM inputs of max_solution_tokens + 1024 (3,072 here), which the
    PRM does not bound: 16 x 512-token chains pass Qwen2.5-Math-PRM-7B's 4,096 positions, where the search
    ends them; a short chain budget needs less, a smaller scorer.max_length caps it."""
    from sphere.budgets import length_budgets

    cfg = _paper_cfg()
    assert _prm_item(memory_plan(cfg))["max_len"] == 4096  # the chain could reach 9k tokens: the window stops it
    short = _paper_cfg(**{"search.max_depth": 2, "search.max_step_tokens": 64})
    b = length_budgets(short, measure=False)
    # allowance prompt 1,024 + 2 steps x (64 + 1 reward token)
    assert b["prm_input_max"] == 1024 + 2 * 65 < 4096
    assert _prm_item(memory_plan(short, b))["max_len"] == 1024 + 130
    capped = _paper_cfg(**{"scorer.max_length": 3000})
    assert _prm_item(memory_plan(capped))["max_len"] == 3000


def test_engines_hold_one_sequence_of_their_own_window():
    """The vLLM KV cache is sized for the model's window as the backend clamps it (a stand-in's 2,048, not
    backend.max_model_len's 32,768); the PRM's vLLM engine gets the PRM's window, not the policy's."""
    cfg = _paper_cfg(**{"model": "standin_qwen2_5"})
    items = memory_plan(cfg)["phases"]["generate"]["items"]
    assert items[0]["max_len"] == 2048
    real = _paper_cfg(**{"scorer.engine": "vllm"})
    assert _prm_item(memory_plan(real))["max_len"] == 4096


def test_every_known_hub_model_has_a_known_window():
    from sphere.modelinfo import KNOWN_WINDOWS, model_window

    assert set(KNOWN_WINDOWS) == set(KNOWN_SHAPES)
    assert model_window("Qwen/Qwen2.5-Math-PRM-7B") == (4096, "hub config.json, known")
    assert model_window("microsoft/phi-4")[0] == 16384
    assert model_window("standin-qwen2_5-prm") == (2048, "config.json")
    assert model_window("nobody/unknown-model") == (None, "unknown")


# ------------------------------------------------------------------------------------------ Models
class _BackendDouble:
    """Named test double for a backend: records open/close into a shared log."""

    def __init__(self, path, log):
        self.path, self.log = str(path), log
        self.tokenizer = None
        log.append(f"open {self.path}")

    def close(self):
        self.log.append(f"close {self.path}")


def _models(monkeypatch, close_first: bool, scorer: str = "symbolic"):
    import sphere.backends as backends
    from sphere.lifecycle import Models

    log: list[str] = []
    monkeypatch.setattr(backends, "make_backend", lambda cfg, path: _BackendDouble(path, log))
    cfg = OmegaConf.create({"scorer": {"name": scorer}, "stages": {"close_policy_before_small": close_first},
                            "model": {"policy": "P", "small": "S"}})
    return Models(cfg, policy="/m/policy", small="/m/small"), log


def test_models_close_the_policy_before_the_small_model_when_asked(monkeypatch):
    m, log = _models(monkeypatch, close_first=True)
    m.policy()
    m.small()
    assert log == ["open /m/policy", "close /m/policy", "open /m/small"]
    m.close_all()
    assert log[-1] == "close /m/small"


def test_models_keep_the_policy_open_otherwise_and_close_everything_before_training(monkeypatch):
    m, log = _models(monkeypatch, close_first=False)
    with m:
        m.policy()
        m.small()
        assert log == ["open /m/policy", "open /m/small"]
    assert sorted(log[2:]) == ["close /m/policy", "close /m/small"]  # nothing stays resident through DPO


def test_models_refuse_closing_the_policy_under_a_rollout_scorer(monkeypatch):
    m, _ = _models(monkeypatch, close_first=True, scorer="rollout")
    with pytest.raises(ValueError, match="rollout"):
        m.small()


def test_runners_and_generate_use_the_lifecycle_owner():
    """No module opens a small model on its own any more (the four factories of issue #18)."""
    import inspect

    import sphere.generate.local as gen
    import sphere.runners as runners  # the round loop opens its models through the runner seam
    import sphere.scale.workers as ray_workers  # the Ray actor bodies (were in sphere.scale.ray_runner)

    for mod in (gen, runners, ray_workers):
        src = inspect.getsource(mod)
        assert "small_factory" not in src and "Models(" in src, mod.__name__
