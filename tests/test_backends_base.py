"""Shared candidate post-processing (sphere.backends.base): finish reasons, stop cutting, token trimming."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from sphere.backends.base import SamplingParams, cut_at_stop, finalize, has_boxed_answer, trim_to_text


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_has_boxed_answer_needs_closed_braces():
    assert has_boxed_answer("so \\boxed{12}.")
    assert has_boxed_answer("\\boxed{\\frac{1}{2}}")
    assert not has_boxed_answer("\\boxed{\\frac{1}{2}")
    assert not has_boxed_answer("no answer")
    assert has_boxed_answer("\\boxed{3 \\boxed{4}")  # the inner one is closed


def test_cut_at_earliest_stop():
    assert cut_at_stop("a\n\nb", ["\n\n"]) == ("a", True)
    assert cut_at_stop("ab. c\n\n", ["\n\n", ". "]) == ("ab", True)
    assert cut_at_stop("abc", ["\n\n"]) == ("abc", False)
    assert cut_at_stop("abc", None) == ("abc", False)


def test_finish_reasons(tok):
    def ids(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    step = ids("First, 1 + 2 = 3.\n\nThen")
    c = finalize(tok, step, [-0.5] * len(step), stop=["\n\n"], hit_eos=False, hit_length=False)
    assert (c.text, c.finish) == ("First, 1 + 2 = 3.", "step")
    assert tok.decode(c.token_ids) == c.text and len(c.token_logprobs) == len(c.token_ids)
    assert c.logprob_sum == pytest.approx(-0.5 * len(c.token_ids))
    ans = ids("The answer is \\boxed{3}.")
    assert finalize(tok, ans, [0.0] * len(ans), stop=["\n\n"], hit_eos=True, hit_length=False).finish == "answer"
    assert finalize(tok, ans[:4], [0.0] * 4, stop=None, hit_eos=True, hit_length=False).finish == "eos"
    assert finalize(tok, ans[:4], [0.0] * 4, stop=None, hit_eos=False, hit_length=True).finish == "length"
    # engine-cut text (vLLM): the stop string is gone from the text, the engine says it stopped
    eng = finalize(tok, step, [-1.0] * len(step), stop=["\n\n"], hit_eos=False, hit_length=False,
                   text="First, 1 + 2 = 3.", hit_stop=True)
    assert eng.finish == "step" and tok.decode(eng.token_ids) == "First, 1 + 2 = 3."


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="abc 12+=.\\{}\n", min_size=0, max_size=40),
       st.text(alphabet="xyz 3.\n", min_size=0, max_size=20))
def test_trim_to_text_keeps_exactly_the_tokens_of_the_text(tok, head, tail):
    ids = tok(head + "\n\n" + tail, add_special_tokens=False)["input_ids"]
    k = trim_to_text(tok, ids, head)
    assert tok.decode(ids[:k]).startswith(head)
    if k:
        assert len(tok.decode(ids[: k - 1])) < len(head)


def test_sampling_params_validation():
    with pytest.raises(ValueError, match="n must be"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    assert SamplingParams(temperature=0.0).greedy
