"""Monte-Carlo rollout step values (sphere.rewards.rollout.RolloutScorer)."""

from __future__ import annotations

import pytest

from sphere.backends import Candidate, SamplingParams
from sphere.prompts import build_prompt_ids, load_family
from sphere.rewards.rollout import RolloutScorer

PROBLEM = "Ann has 12 coins. Ann gets 5, then gets 3. How many coins now?"


class FakeRolloutBackend:
    """Returns, per prompt, a fixed list of completion texts (a test double for the fraction arithmetic)."""

    def __init__(self, tokenizer, texts):
        self.tokenizer = tokenizer
        self.texts = texts
        self.calls = []

    def complete(self, prompts, params):
        self.calls.append((prompts, params))
        return [[Candidate(t, [], 0.0, 0.0, "answer") for t in self.texts[: params.n]] for _ in prompts]


def test_soft_and_hard_values_from_fake_rollouts(tiny_transformers_backend):
    tok = tiny_transformers_backend.tokenizer
    fake = FakeRolloutBackend(tok, ["So \\boxed{20}.", "So \\boxed{21}.", "So \\boxed{20}.", "No answer."])
    steps = ["First, 12 + 5 = 17.", "Then, 17 + 3 = 20.", "The answer is \\boxed{20}."]
    soft = RolloutScorer(None, fake, m=4, mode="soft", seed=0).score([(PROBLEM, steps)], ["20"])
    assert soft == [[0.5, 0.5, 1.0]]  # 2 of 4 rollouts reach 20; the boxed step is checked directly
    prompts, params = fake.calls[0]
    assert params.n == 4 and len(prompts) == 2  # one prompt per non-final step, m rollouts each
    assert prompts[1] == build_prompt_ids(tok, PROBLEM, steps[:2], load_family("mini"))
    hard = RolloutScorer(None, fake, m=4, mode="hard").score([(PROBLEM, steps)], ["21"])
    assert hard == [[1.0, 1.0, 0.0]]


def test_rollout_values_with_the_tiny_model(tiny_transformers_backend):
    b = tiny_transformers_backend
    fam = load_family("mini")
    steps = ["First, 12 + 5 = 17."]
    greedy = b.complete([build_prompt_ids(b.tokenizer, PROBLEM, steps, fam)],
                        SamplingParams(n=1, temperature=0.0, max_tokens=64))[0][0]
    assert greedy.finish == "answer"
    from sphere.verify import extract_answer

    model_answer = extract_answer(greedy.text)
    sc = RolloutScorer(None, b, m=3, temperature=0.0, max_tokens=64)
    assert sc.score([(PROBLEM, steps)], [model_answer]) == [[1.0]]
    assert sc.score([(PROBLEM, steps)], ["-999"]) == [[0.0]]
    sampled = RolloutScorer(None, b, m=6, temperature=1.0, max_tokens=64, seed=3)
    v = sampled.score([(PROBLEM, steps)] * 2, [model_answer, model_answer])
    assert 0.0 <= v[0][0] <= 1.0 and v[0] == v[1]  # same prefix, same seed -> same value
    assert sampled.rollouts == 12


def test_rollout_needs_golds(tiny_transformers_backend):
    with pytest.raises(ValueError, match="gold"):
        RolloutScorer(None, tiny_transformers_backend, m=2).score([(PROBLEM, ["x"])])


def test_registered_golds_serve_the_stepscorer_call(tiny_transformers_backend):
    fake = FakeRolloutBackend(tiny_transformers_backend.tokenizer, ["So \\boxed{20}.", "So \\boxed{7}."])
    sc = RolloutScorer(None, fake, m=2, records=[{"problem": PROBLEM, "answer": "20"}])
    assert sc.score([(PROBLEM, ["First, 12 + 5 = 17."])]) == [[0.5]]
    with pytest.raises(KeyError, match="no gold answer"):
        sc.score([("Another problem?", ["x"])])


def test_make_scorer_factory_builds_rollout_and_prm(tiny_transformers_backend, tiny_prm_dir):
    from omegaconf import OmegaConf

    from sphere.rewards import make_scorer
    from sphere.rewards.prm import PRMScorer

    cfg = OmegaConf.create({"seed": 0, "model": {"prm": str(tiny_prm_dir), "family": "mini"},
                            "scorer": {"name": "rollout", "m": 2, "mode": "soft", "temperature": 0.0,
                                       "max_tokens": 32, "seed": "${seed}"}})
    sc = make_scorer(cfg, backend=tiny_transformers_backend)
    assert isinstance(sc, RolloutScorer) and sc.m == 2 and sc.seed == 0
    cfg.scorer = {"name": "prm", "model": "${model.prm}", "engine": "transformers"}
    prm = make_scorer(cfg)
    assert isinstance(prm, PRMScorer)
    assert len(prm.score([(PROBLEM, ["a", "b"])])[0]) == 2
