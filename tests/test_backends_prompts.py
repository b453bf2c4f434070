"""Prompt families (sphere.prompts): plain template, chat template, steps, reflection prompt."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from sphere.prompts import (
    FAMILIES,
    build_prompt_ids,
    build_prompt_text,
    build_reflection_ids,
    build_reflection_text,
    load_family,
)
from sphere.standins.tiny import CHATML


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def chat_tok(tiny_model_dir):
    t = AutoTokenizer.from_pretrained(tiny_model_dir)
    t.chat_template = CHATML
    return t


def test_every_family_loads_and_has_the_blank_line_delimiter():
    for f in FAMILIES:
        fam = load_family(f)
        assert fam["name"] == f and fam["step_delimiter"] == "\n\n"
        assert "{problem}" in fam["template"]
        fam["reflection"].format(problem="p", attempt="a", instruction="i")  # placeholders are valid
    with pytest.raises(FileNotFoundError, match="available"):
        load_family("nope")


def test_plain_template_with_steps(tok):
    fam = load_family("mini")
    text = build_prompt_text(tok, "What is 1+1?", ["1 + 1 = 2.", "So 2."], fam)
    assert text == "Problem: What is 1+1?\n\nSolution:\n1 + 1 = 2.\n\nSo 2.\n\n"
    ids = build_prompt_ids(tok, "What is 1+1?", [], fam)
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == \
        "Problem: What is 1+1?\n\nSolution:\n"


def test_chat_template_used_when_present_and_wanted(chat_tok, tok):
    fam = load_family("qwen2_5_math")
    text = build_prompt_text(chat_tok, "What is 1+1?", ["1 + 1 = 2."], fam)
    assert text.startswith("<|im_start|>system\nPlease reason step by step")
    assert text.endswith("<|im_start|>assistant\n1 + 1 = 2.\n\n")
    ids = build_prompt_ids(chat_tok, "What is 1+1?", [], fam)
    assert ids[0] != chat_tok.bos_token_id  # the chat template renders its own specials; no extra BOS
    # no chat template on the tokenizer: the family's plain template is used
    plain = build_prompt_text(tok, "What is 1+1?", [], fam)
    assert plain.startswith("<|im_start|>system\nPlease reason") and "What is 1+1?" in plain
    r1 = build_prompt_text(chat_tok, "Q?", [], load_family("deepseek_r1"))
    assert r1.endswith("<|im_start|>assistant\n<think>\n") and "\\boxed{}" in r1


def test_reflection_prompt(tok, chat_tok):
    fam = load_family("mini")
    # the mini models never saw a reflection format: their stage 2 is a fresh attempt on the plain prompt
    text = build_reflection_text(tok, "P?", ["a = 1.", "b = 3."], fam, continue_steps=["a = 1."])
    assert text == "Problem: P?\n\nSolution:\na = 1.\n\n"
    fam = {**fam, "reflection": "Problem: {problem}\n\nAttempt:\n{attempt}\n\nThe attempt has a mistake. "
                                "Corrected solution:\n"}
    text = build_reflection_text(tok, "P?", ["a = 1.", "b = 3."], fam, continue_steps=["a = 1."])
    assert text == "Problem: P?\n\nAttempt:\na = 1.\n\nb = 3.\n\nThe attempt has a mistake. Corrected solution:\na = 1.\n\n"
    fam = load_family("qwen2_5_math")
    ids = build_reflection_ids(chat_tok, "P?", ["a = 1."], fam)
    # the wording comes from conf/prompt/qwen2_5_math.yaml (tests/test_chat_templates.py: exact renders)
    body = fam["reflection"].format(problem="P?", attempt="a = 1.", instruction=fam["instruction"])
    assert chat_tok.decode(ids).endswith(f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n")
