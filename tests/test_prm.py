"""PRM step scorer (Qwen2.5-Math-PRM style) on a tiny locally built PRM, through transformers and vLLM."""

from __future__ import annotations

import pytest

from sphere.rewards.prm import PRMScorer
from sphere.rewards.prm_model import QwenProcessRewardModel

PROBLEM = "Ann has 12 coins. Ann gets 5, then gets 3. How many coins now?"
GOOD = ["First, 12 + 5 = 17.", "Then, 17 + 3 = 20.", "The answer is \\boxed{20}."]
BAD = ["First, 12 + 5 = 19.", "Then, 19 + 3 = 22.", "The answer is \\boxed{22}."]


@pytest.fixture(scope="module")
def hf_prm(tiny_prm_dir):
    return PRMScorer(None, tiny_prm_dir, engine="transformers")


def test_one_score_per_step_in_unit_interval(hf_prm):
    items = [(PROBLEM, GOOD), (PROBLEM, BAD), (PROBLEM, GOOD[:1]), (PROBLEM, [])]
    scores = hf_prm.score(items)
    assert [len(s) for s in scores] == [3, 3, 1, 0]
    assert all(0.0 <= x <= 1.0 for s in scores for x in s)
    assert scores[0] != scores[1]  # the steps differ, so the scores do


def test_prefix_consistency_and_batching(hf_prm):
    """A causal PRM scores a step from what precedes it: appending steps leaves earlier scores unchanged,
    and padding in a batch changes nothing."""
    full = hf_prm.score([(PROBLEM, GOOD)])[0]
    parts = hf_prm.score([(PROBLEM, GOOD[:1]), (PROBLEM, GOOD[:2]), (PROBLEM, BAD)])
    assert parts[0] == pytest.approx(full[:1], abs=1e-5)
    assert parts[1] == pytest.approx(full[:2], abs=1e-5)


def test_reward_token_inside_a_step_is_removed(hf_prm):
    tag = hf_prm.step_tag
    a = hf_prm.score([(PROBLEM, [GOOD[0] + tag, GOOD[1]])])[0]
    b = hf_prm.score([(PROBLEM, GOOD[:2])])[0]
    assert a == pytest.approx(b, abs=1e-6)


def test_checkpoint_layout_is_checked(tiny_model_dir):
    with pytest.raises(ValueError, match="Qwen PRM layout"):
        QwenProcessRewardModel.from_pretrained(tiny_model_dir)  # a causal LM, not a PRM


@pytest.mark.parametrize("flag", [None, False, True])
def test_trust_remote_code_comes_from_config_and_defaults_false(tiny_prm_dir, monkeypatch, flag):
    """The PRM is a downloaded model: every config/tokenizer load gets scorer.trust_remote_code (False unless
    a config says so), the PRM body's AutoConfig included (tests/test_security.py checks the same statically)."""
    import transformers

    seen = []
    for name in ("AutoConfig", "AutoTokenizer"):
        cls = getattr(transformers, name)
        orig = cls.from_pretrained.__func__

        def spy(klass, *a, _orig=orig, _name=name, **kw):
            seen.append((_name, kw.get("trust_remote_code")))
            return _orig(klass, *a, **kw)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    over = {} if flag is None else {"trust_remote_code": flag}
    PRMScorer(None, tiny_prm_dir, engine="transformers", **over)
    want = bool(flag)
    assert seen and all(v is want for _, v in seen), seen
    assert {n for n, _ in seen} == {"AutoConfig", "AutoTokenizer"} and len(seen) >= 3  # tokenizer, scorer, body


def test_missing_prm_path_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PRMScorer(None, tmp_path / "nope", engine="transformers")


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_pooling_matches_transformers(tiny_prm_dir, hf_prm):
    from conftest import TINY_BLOCK_SIZE, require_vllm

    require_vllm()
    v = PRMScorer(None, tiny_prm_dir, engine="vllm", max_model_len=512, block_size=TINY_BLOCK_SIZE)
    try:
        items = [(PROBLEM, GOOD), (PROBLEM, BAD), (PROBLEM, GOOD[:2])]
        got, want = v.score(items), hf_prm.score(items)
        for g, w in zip(got, want):
            assert g == pytest.approx(w, abs=2e-3)
    finally:
        v.close()
