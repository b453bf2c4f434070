"""The phi-4- and R1-shaped stand-ins (sphere/standins/families.py, shipped in assets/standin/):
the shapes and conventions the sibling paper experiments meet, checked on the shipped checkpoints."""

from __future__ import annotations

import json

import pytest

from sphere.model_paths import resolve_model

FAMILY = {"standin-phi4": "phi4", "standin-phi4-mini": "phi4", "standin-r1-distill": "deepseek_r1",
          "standin-r1-distill-small": "deepseek_r1"}


@pytest.mark.parametrize("name,arch", [("standin-phi4", "Phi3ForCausalLM"), ("standin-phi4-mini", "Phi3ForCausalLM"),
                                       ("standin-r1-distill", "Qwen2ForCausalLM"),
                                       ("standin-r1-distill-small", "Qwen2ForCausalLM")])
def test_shapes_templates_and_recipes(name, arch):
    from transformers import AutoTokenizer

    from sphere.standins.families import MODELS, TOKENIZERS, template_text

    d = resolve_model(name)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == [arch]
    assert cfg["hidden_size"] // cfg["num_attention_heads"] >= 32  # vLLM's CPU attention needs head_dim >= 32
    t = TOKENIZERS[MODELS[name]["tokenizer"]]
    tok = AutoTokenizer.from_pretrained(d)
    assert tok.chat_template == template_text(t["template"])  # the real model's template, byte for byte
    assert tok.eos_token == t["eos"]
    rec = json.loads((d / "recipe.json").read_text())
    floor = 0.25 if MODELS[name]["role"] == "policy" else 0.08
    assert rec["metrics"]["greedy_accuracy"] >= floor  # solves a useful share, so every stage gets pairs
    if name.startswith("standin-r1"):
        assert tok("x")["input_ids"][0] == tok.bos_token_id  # BOS in front of every encoding, as R1's
        head = tok.apply_chat_template([{"role": "user", "content": "Q"}], add_generation_prompt=True,
                                       tokenize=False)
        assert head == "<｜begin▁of▁sentence｜><｜User｜>Q<｜Assistant｜><think>\n"
        assert "</think>" in rec["metrics"]["example"]


def test_phi4_mini_stops_at_end_of_turn_that_only_its_generation_config_names():
    """Phi-4-mini's tokenizer EOS is <|endoftext|>; turns end with <|end|>, listed only in
    generation_config.json. The backend must stop there and keep the token out of the text."""
    from sphere.backends.base import SamplingParams, model_eos_ids
    from sphere.backends.transformers_backend import TransformersBackend
    from sphere.prompts import build_prompt_ids, load_family

    d = resolve_model("standin-phi4-mini")
    be = TransformersBackend(d, device="cpu", batch_size=8)
    try:
        end = be.tokenizer.convert_tokens_to_ids("<|end|>")
        assert end in model_eos_ids(d, be.tokenizer) and end != be.tokenizer.eos_token_id
        fam = load_family("phi4")
        ids = build_prompt_ids(be.tokenizer, "Ann has 3 apples and gets 4 more. How many apples does she have?",
                               [], fam)
        (cands,) = be.next_steps([ids], SamplingParams(n=4, temperature=0.8, max_tokens=200, seed=0))
        assert all(c.finish in ("eos", "answer") for c in cands), [c.finish for c in cands]
        assert not any("<|end|>" in c.text or end in c.token_ids for c in cands)
    finally:
        be.close()


def test_shipped_templates_are_the_fixture_copies():
    """sphere/standins/templates/ ships byte-identical copies of the test fixtures (whose sources are recorded)."""
    from pathlib import Path

    from sphere.standins.families import TOKENIZERS, template_text

    fixtures = Path(__file__).resolve().parent / "fixtures" / "chat_templates"
    for t in TOKENIZERS.values():
        assert template_text(t["template"]) == (fixtures / t["template"]).read_text()
