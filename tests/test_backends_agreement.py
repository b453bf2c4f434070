"""Greedy next steps from transformers and vLLM agree (float32, same tiny model)."""

from __future__ import annotations

import pytest

from sphere.backends import SamplingParams
from test_backends import make_prompts


@pytest.mark.vllm
@pytest.mark.slow
def test_greedy_next_steps_agree_transformers_vs_vllm(tiny_transformers_backend, tiny_vllm_backend):
    prompts = make_prompts(tiny_transformers_backend.tokenizer, 64, seed=2024)
    assert prompts == make_prompts(tiny_vllm_backend.tokenizer, 64, seed=2024)  # same tokenizer, same ids
    sp = SamplingParams(n=1, temperature=0.0, max_tokens=32, stop=["\n\n"])
    hf = tiny_transformers_backend.next_steps(prompts, sp)
    vl = tiny_vllm_backend.next_steps(prompts, sp)
    same = sum(a[0].text == b[0].text for a, b in zip(hf, vl))
    assert same / len(prompts) >= 0.9, f"only {same}/64 greedy steps agree"
    # where the texts agree, so do the per-token logprobs (float32 on both sides)
    for a, b in zip(hf, vl):
        if a[0].token_ids == b[0].token_ids:
            assert a[0].token_logprobs == pytest.approx(b[0].token_logprobs, abs=5e-3)
