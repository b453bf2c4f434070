"""Prompt families rendered through the models' real chat templates (tests/fixtures/chat_templates/, sources
and licences in SOURCES.md): the exact generation prompt, the pair prompt as DPO training sees it, and the
stage-2 reflection prompt, for every family a config names.

The tokenizer is the tiny test model's byte-level BPE with the family's special tokens added and the real
template set as its ``chat_template`` (no hub). The expected strings spell out each template's framing by
hand; the family's own texts (system message, instruction, reflection wording) are read from
conf/prompt/<family>.yaml, so rewording a prompt does not break these tests but a change in how it is framed
does.
"""

from __future__ import annotations

from itertools import takewhile
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from sphere.prompts import (
    build_prompt_ids,
    build_prompt_text,
    build_reflection_ids,
    build_reflection_text,
    header_text,
    load_family,
)

FIX = Path(__file__).parent / "fixtures" / "chat_templates"
PROBLEM = "Tom has 3 boxes of 4 pens and gives away 5 pens. How many pens are left?"
STEPS = ["First, 3 * 4 = 12.", "Then, 12 - 5 = 7.", "The answer is \\boxed{7}."]
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# special tokens of each model family's tokenizer (tokenizer_config.json), so {{ bos_token }} / {{ eos_token }}
# render as in the real model
SPECIALS = {
    "qwen": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
             "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]},
    "deepseek": {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>",
                 "additional_special_tokens": ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]},
    "phi4": {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
             "additional_special_tokens": ["<|im_start|>", "<|im_sep|>", "<|im_end|>"]},
    "phi4mini": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                 "additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]},
}

# family -> [(template file, specials, end of an assistant turn)]
CASES = {
    "qwen2_5": [("Qwen-Qwen2.5-Instruct.jinja", "qwen", "<|im_end|>\n")],
    "qwen2_5_math": [("Qwen-Qwen2.5-Math-Instruct.jinja", "qwen", "<|im_end|>\n")],
    "phi4": [("microsoft-phi-4.jinja", "phi4", "<|im_end|>"),
             ("microsoft-phi-4-first-release.jinja", "phi4", "<|im_end|>"),
             ("microsoft-Phi-4-mini-instruct.jinja", "phi4mini", "<|end|><|endoftext|>")],
    "deepseek_r1": [("deepseek-ai-DeepSeek-R1-Distill-Qwen.jinja", "deepseek", "<｜end▁of▁sentence｜>"),
                    ("deepseek-ai-DeepSeek-R1-Distill-Qwen-first-release.jinja", "deepseek",
                     "<｜end▁of▁sentence｜>")],
}
PARAMS = [pytest.param(fam, f, sp, end, id=f.removesuffix(".jinja")) for fam, lst in CASES.items()
          for f, sp, end in lst]


def framing(family: str, template: str, user: str, system: str) -> str:
    """The generation prompt for one (system, user) turn, written out by hand for each real template."""
    if template.startswith("Qwen-"):
        default = QWEN_DEFAULT_SYSTEM if "Math" not in template else (
            "Please reason step by step, and put your final answer within \\boxed{}.")
        return (f"<|im_start|>system\n{system or default}<|im_end|>\n"
                f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
    if template.startswith("microsoft-phi-4"):  # both revisions render this conversation identically
        sys_turn = f"<|im_start|>system<|im_sep|>{system}<|im_end|>" if system else ""
        return f"{sys_turn}<|im_start|>user<|im_sep|>{user}<|im_end|><|im_start|>assistant<|im_sep|>"
    if template.startswith("microsoft-Phi-4-mini"):
        sys_turn = f"<|system|>{system}<|end|>" if system else ""
        return f"{sys_turn}<|user|>{user}<|end|><|assistant|>"
    if template.startswith("deepseek-ai-"):
        # BOS, the system prompt (none here) and the user turn; ONE "<think>\n" whichever revision: the
        # current template writes it itself, for the first release the family's assistant_prefix adds it
        return f"<｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜><think>\n"
    raise AssertionError(template)


def make_tokenizer(tiny_model_dir, template: str, specials: str):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_special_tokens(SPECIALS[specials])
    tok.chat_template = (FIX / template).read_text(encoding="utf-8")
    return tok


def user_text(fam: dict, problem: str) -> str:
    return f"{problem}\n{fam['instruction']}" if fam["instruction"] else problem


def test_every_chat_family_has_a_real_template_fixture():
    from sphere.prompts import FAMILIES

    assert set(CASES) == {f for f in FAMILIES if load_family(f)["use_chat_template"]}
    assert sorted(p.name for p in FIX.glob("*.jinja")) == sorted(f for lst in CASES.values() for f, _, _ in lst)
    sources = (FIX / "SOURCES.md").read_text(encoding="utf-8")
    assert all(f"`{p.name}`" in sources for p in FIX.glob("*.jinja"))


@pytest.mark.parametrize("family,template,specials,end", PARAMS)
def test_generation_prompt_exact(tiny_model_dir, family, template, specials, end):
    fam = load_family(family)
    tok = make_tokenizer(tiny_model_dir, template, specials)
    head = framing(family, template, user_text(fam, PROBLEM), fam["system"])
    assert header_text(tok, PROBLEM, fam) == head
    assert build_prompt_text(tok, PROBLEM, [], fam) == head
    assert build_prompt_text(tok, PROBLEM, STEPS[:2], fam) == head + "First, 3 * 4 = 12.\n\nThen, 12 - 5 = 7.\n\n"
    assert head.count("<think>") <= 1
    # token ids: the template's text only (no extra BOS from the tokenizer), specials as single tokens
    ids = build_prompt_ids(tok, PROBLEM, STEPS[:1], fam)
    assert tok.decode(ids) == head + "First, 3 * 4 = 12.\n\n"
    assert ids.count(tok.bos_token_id) == head.count(tok.bos_token)
    for t in SPECIALS[specials]["additional_special_tokens"]:
        assert ids.count(tok.convert_tokens_to_ids(t)) == head.count(t), t


@pytest.mark.parametrize("family,template,specials,end", PARAMS)
def test_reflection_prompt_exact(tiny_model_dir, family, template, specials, end):
    fam = load_family(family)
    tok = make_tokenizer(tiny_model_dir, template, specials)
    body = fam["reflection"].format(problem=PROBLEM, attempt="\n\n".join(STEPS), instruction=fam["instruction"])
    assert PROBLEM in body and "First, 3 * 4 = 12.\n\nThen, 12 - 5 = 7.\n\nThe answer is \\boxed{7}." in body
    head = framing(family, template, body, fam["system"])
    assert build_reflection_text(tok, PROBLEM, STEPS, fam) == head
    assert build_reflection_text(tok, PROBLEM, STEPS, fam, continue_steps=STEPS[:1]) == \
        head + "First, 3 * 4 = 12.\n\n"
    ids = build_reflection_ids(tok, PROBLEM, STEPS, fam)
    assert tok.decode(ids) == head


def trl_training_view(tok, prompt_msgs: list[dict], completion: str) -> tuple[str, str]:
    """What TRL's DPOTrainer trains on for a conversational pair (trl/trainer/dpo_trainer.py tokenize_fn, here
    on text): the prompt rendered with the generation prompt, prompt + completion rendered as a conversation;
    the training context is their common prefix and the completion is the rest."""
    prompt = tok.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(prompt_msgs + [{"role": "assistant", "content": completion}], tokenize=False)
    n = sum(1 for _ in takewhile(lambda ab: ab[0] == ab[1], zip(prompt, full)))
    return full[:n], full[n:]


@pytest.mark.parametrize("family,template,specials,end", PARAMS)
def test_pair_prompt_trains_in_the_generation_context(tiny_model_dir, family, template, specials, end):
    """A chat family's pair prompt is a message list (sphere/generate/generator.py _pair_prompt): system (if any) +
    user. DPO must score the chosen solution in the very context the policy generated it in: TRL's training
    context equals the generation prompt (header_text) and the completion is the solution plus the end of
    the assistant turn."""
    from types import SimpleNamespace

    from sphere.generate.generator import Generator

    fam = load_family(family)
    tok = make_tokenizer(tiny_model_dir, template, specials)
    gen = SimpleNamespace(fam=fam, delim=fam["step_delimiter"])
    msgs = Generator._pair_prompt(gen, tok, {"problem": PROBLEM})
    want_msgs = ([{"role": "system", "content": fam["system"]}] if fam["system"] else []) + [
        {"role": "user", "content": user_text(fam, PROBLEM)}]
    assert msgs == want_msgs
    solution = "\n\n".join(STEPS)
    # the pair's chosen content as Generator + make_pair write it (R1: the assistant_prefix "<think>\n" first)
    from sphere.generate.pairs import make_pair
    from sphere.search.types import Trajectory

    gen.fam, gen._conv = fam, (lambda t: Generator._conv(gen, t))
    sol = Trajectory(list(STEPS), True, 1.0, [], [], "answer")
    pair = make_pair(stage=1, problem={"id": "p", "problem": PROBLEM, "answer": "0"}, prompt=msgs, chosen=sol,
                     rejected=sol, delimiter="\n\n", chosen_model="m", rejected_model="m", config_hash="h",
                     conversational=True, response_prefix=Generator._prefix(gen, tok))
    chosen = pair["chosen"][0]["content"]
    context, completion = trl_training_view(tok, msgs, chosen)
    head = header_text(tok, PROBLEM, fam)
    # the solution is scored right after the exact generation prompt; where a template's generation prompt
    # lacks the assistant_prefix (R1's first release), TRL's context stops before it and the completion
    # starts with it: the same tokens in chosen and rejected, so they cancel in the DPO log-ratio difference
    assert context + completion == head + solution + end
    assert head.startswith(context) and completion == head[len(context):] + solution + end
