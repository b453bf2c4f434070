"""One behavioural suite, run on every backend with the tiny model: transformers, vLLM offline, vLLM serve.

Each behaviour is a plain function taking a backend; the parametrised ``backend`` fixture supplies the three
real backends (the vLLM ones start an engine / a server once per session).
"""

from __future__ import annotations

import random

import pytest

from sphere.backends import FINISH_REASONS, ContextOverflowError, SamplingParams
from sphere.prompts import build_prompt_ids, load_family
from sphere.standins.tiny import arithmetic_problem

DELIM = "\n\n"


@pytest.fixture(
    scope="module",
    params=[
        "transformers",
        pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.slow]),
        pytest.param("openai", marks=[pytest.mark.vllm, pytest.mark.slow]),
    ],
)
def backend(request):
    return request.getfixturevalue(f"tiny_{request.param}_backend")


def make_prompts(tok, k: int, seed: int = 0) -> list[list[int]]:
    """k prompts: problems with 0, 1 or 2 of their steps already written."""
    fam = load_family("mini")
    rng = random.Random(seed)
    out = []
    for i in range(k):
        problem, steps, _, _ = arithmetic_problem(rng)
        out.append(build_prompt_ids(tok, problem, steps[: i % 3], fam))
    return out


def test_next_steps_n_candidates_stop_and_logprobs(backend):
    prompts = make_prompts(backend.tokenizer, 6)
    res = backend.next_steps(prompts, SamplingParams(n=3, temperature=0.8, max_tokens=48, seed=1, stop=[DELIM]))
    assert len(res) == len(prompts)
    finishes = []
    for row in res:
        assert len(row) == 3
        for c in row:
            assert c.finish in FINISH_REASONS
            assert DELIM not in c.text  # stopped at the delimiter, which is not part of the text
            assert len(c.token_ids) > 0
            assert len(c.token_logprobs) == len(c.token_ids)
            assert all(lp <= 1e-6 for lp in c.token_logprobs)
            assert c.logprob_sum == pytest.approx(sum(c.token_logprobs), abs=1e-4)
            assert c.logprob_mean == pytest.approx(c.logprob_sum / len(c.token_ids), abs=1e-4)
            assert c.logprob_sum < 0  # sampled text has some uncertainty
            finishes.append(c.finish)
    # The tiny model writes one short step at a time: most candidates end at the delimiter.
    assert finishes.count("step") >= len(finishes) // 2
    # Prompts with two steps written continue with the boxed answer step.
    assert "answer" in finishes


def test_token_ids_round_trip(backend):
    prompts = make_prompts(backend.tokenizer, 4, seed=3)
    res = backend.next_steps(prompts, SamplingParams(n=2, temperature=1.0, max_tokens=48, seed=5, stop=[DELIM]))
    for row in res:
        for c in row:
            assert backend.tokenizer.decode(c.token_ids, skip_special_tokens=True) == c.text


def test_greedy_is_deterministic(backend):
    prompts = make_prompts(backend.tokenizer, 5, seed=7)
    sp = SamplingParams(n=2, temperature=0.0, max_tokens=48, stop=[DELIM])
    a = backend.next_steps(prompts, sp)
    b = backend.next_steps(prompts, sp)
    for ra, rb in zip(a, b):
        assert len(ra) == 2
        assert ra[0].text == ra[1].text  # greedy n=2: the same candidate twice
        assert [c.token_ids for c in ra] == [c.token_ids for c in rb]


def test_seeded_sampling_is_reproducible(backend):
    prompts = make_prompts(backend.tokenizer, 3, seed=11)
    sp = SamplingParams(n=4, temperature=1.0, max_tokens=32, seed=123, stop=[DELIM])
    a = backend.next_steps(prompts, sp)
    b = backend.next_steps(prompts, sp)
    assert [[c.text for c in r] for r in a] == [[c.text for c in r] for r in b]


def test_complete_full_solution_and_length(backend):
    prompts = make_prompts(backend.tokenizer, 4, seed=13)
    full = backend.complete(prompts, SamplingParams(n=1, temperature=0.0, max_tokens=120))
    for row in full:
        c = row[0]
        assert c.finish == "answer", c
        assert "\\boxed{" in c.text
    short = backend.complete(prompts, SamplingParams(n=2, temperature=0.8, max_tokens=3, seed=0))
    for row in short:
        assert len(row) == 2
        for c in row:
            assert c.finish == "length" and len(c.token_ids) == 3


def test_score_matches_generation_logprobs(backend):
    prompts = make_prompts(backend.tokenizer, 3, seed=17)
    res = backend.next_steps(prompts, SamplingParams(n=1, temperature=0.0, max_tokens=24, stop=[DELIM]))
    conts = [r[0].token_ids for r in res]
    scores = backend.score(prompts, conts)
    for s, r in zip(scores, res):
        assert len(s) == len(r[0].token_ids)
        assert s == pytest.approx(r[0].token_logprobs, abs=2e-3)


@pytest.mark.timeout(60)  # a hang fails the test (pytest-timeout); no wall-clock assertion
def test_context_overflow_fails_at_once(backend):
    tok = backend.tokenizer
    long_prompt = make_prompts(tok, 1)[0] * 200  # far beyond the 512-token test window
    with pytest.raises(ContextOverflowError, match="context window"):
        backend.next_steps([make_prompts(tok, 1)[0], long_prompt], SamplingParams(n=1, max_tokens=8))
    with pytest.raises(ContextOverflowError):
        backend.score([long_prompt], [[5, 6]])
