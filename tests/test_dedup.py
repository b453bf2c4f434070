"""Duplicate candidates (issue #19, ``search.dedup_candidates``): identical samples of one expansion become
one child that keeps their multiplicity (prior = the summed prior of the copies, count in ``step_mult``), each
distinct (problem, steps) item is scored once per call, and the paper mode's Sol_max / Sol_min and pairs are
the same with and without merging on greedy settings (and on sampled ones, for a deterministic scorer).

Test doubles: FakeStepBackend (tests/test_generate.py) and the doubles below; the tiny model test uses the
real transformers backend with greedy decoding.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from omegaconf import OmegaConf
from test_generate import FakeStepBackend, FakeTokenizer, _cfg, _problems, _prompt_fn

from sphere.backends.base import Candidate, SamplingParams
from sphere.generate.generator import Generator
from sphere.io import read_jsonl_tolerant
from sphere.search.candidates import merge_duplicates
from sphere.search.config import validate_search_config
from sphere.search.driver import SearchDriver
from sphere.search.types import SearchJob


def _c(text: str, lp: float = -1.0, finish: str = "step") -> Candidate:
    return Candidate(text, [ord(x) for x in text], lp * max(1, len(text)), lp, finish)


class FixedBackend:
    """Test double: the same candidate list (texts, mean logprobs) after every prompt."""

    name = "fixed"

    def __init__(self, cands: list[tuple[str, float]]):
        self.tokenizer = FakeTokenizer()
        self.cands = cands
        self.calls = 0

    def next_steps(self, prompts, params: SamplingParams):
        self.calls += 1
        assert params.n == len(self.cands)
        return [[_c(t, lp) for t, lp in self.cands] for _ in prompts]


class RecordingScorer:
    """Scorer double: 0.5 for every step; records each call's items."""

    def __init__(self):
        self.calls: list[list[tuple[str, tuple[str, ...]]]] = []

    def score(self, items):
        self.calls.append([(p, tuple(s)) for p, s in items])
        return [[0.5] * len(s) for _, s in items]


class GreedyFakeBackend(FakeStepBackend):
    """FakeStepBackend that decodes greedily when asked to, as the real backends do: temperature 0 gives the
    n candidates as copies of one (here: the first sample)."""

    def next_steps(self, prompts, params: SamplingParams):
        if not params.greedy:
            return super().next_steps(prompts, params)
        one = SamplingParams(
            n=1,
            temperature=0.0,
            top_p=params.top_p,
            max_tokens=params.max_tokens,
            seed=params.seed,
            stop=params.stop,
        )
        return [
            [Candidate(**c.__dict__) for _ in range(params.n) for c in row]
            for row in super().next_steps(prompts, one)
        ]


class WordyRepeatBackend(FakeStepBackend):
    """FakeStepBackend whose candidates come in a few wordings of the same step: many exact repeats (as at
    T=0.8) and distinct texts that the symbolic scorer ties, so the tie-breaking of minmax matters."""

    def next_steps(self, prompts, params):
        out = super().next_steps(prompts, params)
        for cl in out:
            for j, c in enumerate(cl):
                c.text = (
                    random.Random(f"{c.text}|{j}|{len(self.batch_sizes)}").choice(["", "", "So "]) + c.text
                )
        return out


def _verifier(pairs):
    from sphere.verify import check_answers

    return check_answers(pairs)


def _mcts_cfg(**over):
    cfg = _cfg()
    cfg.search = OmegaConf.merge(
        cfg.search,
        {"mode": "mcts", "k": 1, "simulations": 3, "max_depth": 2, "pruning": {"policy": "none"}, **over},
    )
    return cfg


# ------------------------------------------------------------------------------------------ merging
def test_merge_duplicates_keeps_first_occurrence_order_and_counts():
    row = [_c("b"), _c("a"), _c("b"), _c("a", finish="answer"), _c("b"), _c("c")]
    out, mult = merge_duplicates([row, [], [_c("x")]])
    assert [(c.text, c.finish) for c in out[0]] == [
        ("b", "step"),
        ("a", "step"),
        ("a", "answer"),
        ("c", "step"),
    ]
    assert mult == [[3, 1, 1, 1], [], [1]]
    assert out[0][0] is row[0]  # the first occurrence is the representative


def test_merged_child_count_multiplicity_and_prior():
    cands = [("a", -1.0), ("b", -2.0), ("a", -1.0), ("a", -1.0), ("c", -3.0)]  # a x3, b, c
    runs = {}
    for dedup in (True, False):
        be, sc = FixedBackend(cands), RecordingScorer()
        d = SearchDriver(be, sc, _verifier, _mcts_cfg(dedup_candidates=dedup).search)
        p = {"id": "p", "problem": "Add: 1, 2", "answer": "3"}
        d.run([SearchJob("p", p, _prompt_fn(be.tokenizer, p))], lambda r: None)
        snap = d.forest.tree_snapshot(0)
        kids = np.nonzero(snap["parent"] == 0)[0]
        runs[dedup] = (
            d,
            sc,
            [d.steps[int(x)] for x in snap["payload"][kids]],
            snap["prior"][kids],
            [d.step_mult[int(x)] for x in snap["payload"][kids]],
        )
    d, sc, texts, priors, mult = runs[True]
    assert texts == ["a", "b", "c"] and mult == [3, 1, 1]
    d0, sc0, texts0, priors0, mult0 = runs[False]
    assert texts0 == ["a", "b", "a", "a", "c"] and mult0 == [1] * 5
    # the merged child carries the policy's mass: its prior is the sum of its copies' priors
    np.testing.assert_allclose(priors, [priors0[[0, 2, 3]].sum(), priors0[1], priors0[4]], rtol=1e-6)
    w = np.array([3 * np.exp(0.0), np.exp(-1.0), np.exp(-2.0)])
    np.testing.assert_allclose(priors, w / w.sum(), rtol=1e-6)
    assert d.stats.candidates == d0.stats.candidates == 5 * d.stats.leaves
    assert d.stats.merged == 2 * d.stats.leaves and d0.stats.merged == 0
    # each distinct step scored once: no call repeats an item, and only distinct children were scored
    for call in sc.calls:
        assert len(call) == len(set(call))
    assert sum(map(len, sc.calls)) == d.stats.scored_items == 3 * d.stats.leaves
    assert sum(map(len, sc0.calls)) == d0.stats.scored_items == 5 * d0.stats.leaves


def test_scorer_sees_each_distinct_item_once_per_call():
    be = FakeStepBackend(0.5)  # right or off by one: at most 2 distinct texts out of E=5
    sc = RecordingScorer()
    cfg = _cfg()
    d = SearchDriver(be, sc, _verifier, cfg.search)
    d.run([SearchJob(p["id"], p, _prompt_fn(be.tokenizer, p)) for p in _problems(10)], lambda r: None)
    assert d.stats.merged > 0
    for call in sc.calls:
        assert len(call) == len(set(call))
    assert d.stats.scored_items == sum(map(len, sc.calls)) < d.stats.candidates


def test_dedup_switch_is_validated():
    cfg = _cfg()
    cfg.search.dedup_candidates = "yes"
    with pytest.raises(ValueError, match=r"search\.dedup_candidates"):
        validate_search_config(cfg.search)


# ------------------------------------------------------------------------------------------ paper mode
def _extremes(cfg, be_factory, n=16):
    out, stats = {}, None
    d = SearchDriver(be := be_factory(), _scorer(), _verifier, cfg.search)
    d.run(
        [SearchJob(p["id"], p, _prompt_fn(be.tokenizer, p)) for p in _problems(n, seed=3)],
        lambda r: out.__setitem__(
            r.job.job_id,
            (
                r.sol_max.steps,
                r.sol_max.correct,
                r.sol_max.rewards,
                r.sol_min.steps,
                r.sol_min.correct,
                r.sol_min.rewards,
            ),
        ),
    )
    stats = d.stats
    return out, stats


def _scorer():
    from sphere.rewards.symbolic import SymbolicStepScorer

    return SymbolicStepScorer()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_paper_extremes_unchanged_by_dedup(temperature):
    cfg_on = _cfg(**{"search.temperature": temperature, "search.dedup_candidates": True})
    cfg_off = _cfg(**{"search.temperature": temperature, "search.dedup_candidates": False})
    factory = (lambda: GreedyFakeBackend(None)) if temperature == 0 else (lambda: WordyRepeatBackend(None))
    on, st_on = _extremes(cfg_on, factory)
    off, st_off = _extremes(cfg_off, factory)
    assert st_on.merged > 0 and st_off.merged == 0  # there was something to merge
    assert on == off
    if temperature > 0:  # ties between distinct wordings were there to break
        assert any(len(set(r[0])) != len(r[0]) or r[0] != r[3] for r in on.values())


def test_paper_backend_calls_unchanged_by_dedup():
    """Sampled settings: the driver makes the same calls (same prompts, same order, same seeds) with and without
    merging, so a seeded backend samples the same and the search is the same (chain heads go out in chain
    order, not node-id order: merging renumbers the nodes)."""
    logs = {}
    for dedup in (True, False):
        cfg = _cfg(**{"search.dedup_candidates": dedup, "search.batch_leaves": 16})
        be = WordyRepeatBackend(None)
        calls = []
        inner = be.next_steps

        def record(prompts, params, inner=inner, calls=calls, tok=be.tokenizer):
            calls.append((params.seed, [tok.decode(p) for p in prompts]))
            return inner(prompts, params)

        be.next_steps = record
        d = SearchDriver(be, _scorer(), _verifier, cfg.search)
        d.run([SearchJob(p["id"], p, _prompt_fn(be.tokenizer, p)) for p in _problems(40)], lambda r: None)
        logs[dedup] = (calls, d.stats.merged)
    assert logs[True][1] > 0 and len(logs[True][0]) > 3
    assert logs[True][0] == logs[False][0]


def _pairs_without_hash(path):
    out = []
    for p in read_jsonl_tolerant(path):
        p = dict(p)
        p.pop("config_hash", None)
        out.append(json.dumps(p, sort_keys=True))
    return sorted(out)


def test_paper_mode_pairs_unchanged_by_dedup_on_greedy_settings(tmp_path):
    """All three stages, greedy policy and small model: the pairs are the same with dedup on and off."""
    from sphere.rewards.symbolic import SymbolicStepScorer
    from sphere.verify import check_answers

    res = {}
    for dedup in (True, False):
        cfg = _cfg(**{"search.temperature": 0.0, "search.dedup_candidates": dedup})
        out = tmp_path / str(dedup)
        stats = Generator(cfg, out).run(
            _problems(24),
            GreedyFakeBackend(None),
            SymbolicStepScorer(),
            check_answers,
            small_backend_factory=lambda: GreedyFakeBackend(0.3),
        )
        res[dedup] = (stats, _pairs_without_hash(out / "pairs.jsonl"))
    assert res[True][1] == res[False][1]
    assert len(res[True][1]) > 0, "the fixture must produce pairs"
    assert res[True][0]["pairs_per_stage"] == res[False][0]["pairs_per_stage"]
    # greedy: every expansion's E copies became one child (E=5)
    pol = res[True][0]["search"]["policy"]
    assert pol["merged"] == 4 * pol["leaves"]
    assert (
        res[True][0]["search"]["policy"]["scored_items"] < res[False][0]["search"]["policy"]["scored_items"]
    )


def test_greedy_tiny_model_extremes_unchanged_by_dedup(tiny_transformers_backend):
    """The real tiny policy, greedy: E identical samples merge into one child; Sol_max / Sol_min unchanged."""
    from sphere.prompts import build_prompt_ids, load_family
    from sphere.standins.tiny import arithmetic_problem

    rng = random.Random(5)
    probs = []
    for i in range(6):
        text, _, ans, _ = arithmetic_problem(rng)
        probs.append({"id": f"t{i}", "problem": text, "answer": ans})
    fam = load_family("mini")
    tok = tiny_transformers_backend.tokenizer
    res = {}
    for dedup in (True, False):
        cfg = _cfg(
            **{
                "search.temperature": 0.0,
                "search.dedup_candidates": dedup,
                "search.max_step_tokens": 24,
                "search.max_depth": 4,
            }
        )
        d = SearchDriver(tiny_transformers_backend, _scorer(), _verifier, cfg.search)
        out = {}
        jobs = [
            SearchJob(
                p["id"], p, (lambda t: lambda steps: build_prompt_ids(tok, t, steps, fam))(p["problem"])
            )
            for p in probs
        ]
        d.run(
            jobs,
            lambda r, out=out: out.__setitem__(
                r.job.job_id, (r.sol_max.steps, r.sol_max.correct, r.sol_min.steps, r.sol_min.correct)
            ),
        )
        res[dedup] = (out, d.stats)
    assert res[True][0] == res[False][0]
    assert res[True][1].merged == 4 * res[True][1].leaves  # E=5 greedy copies -> one child
    assert res[True][1].scored_items * 5 == res[False][1].scored_items


# ------------------------------------------------------------------------------------------ PRM batching
PRM_PROBLEM = "Ann has 12 coins. Ann gets 5, then gets 3. How many coins now?"
PRM_STEPS = ["First, 12 + 5 = 17.", "Then, 17 + 3 = 20.", "The answer is \\boxed{20}."]


def _prm_items():
    items = []
    for k in (1, 3, 2, 1, 3, 2, 1):  # repeats and mixed lengths, as siblings and cousins arrive in one call
        items.append((PRM_PROBLEM, PRM_STEPS[:k]))
    items.append((PRM_PROBLEM, ["First, 12 + 5 = 18.", "Then, 18 + 3 = 21."]))
    return items


def test_prm_scores_each_distinct_item_once_and_sorting_cuts_padding(tiny_prm_dir):
    from sphere.rewards.prm import PRMScorer

    items = _prm_items()
    lean = PRMScorer(None, tiny_prm_dir, engine="transformers", batch_size=2)
    plain = PRMScorer(  # separate scoring (shared_prefix off): the sorting below is that path's
        None, tiny_prm_dir, engine="transformers", batch_size=2, dedup_items=False, sort_by_length=False,
        shared_prefix="off",
    )
    a, b = lean.score(items), plain.score(items)
    assert [len(x) for x in a] == [len(s) for _, s in items]
    for x, y in zip(a, b):
        assert x == pytest.approx(y, abs=1e-5)  # same scores, whatever the batching
    sa, sb = lean.stats(), plain.stats()
    assert sa["items"] == sb["items"] == len(items)
    assert sa["items_scored"] == 4 and sb["items_scored"] == len(items)  # 4 distinct (problem, steps)
    assert sa["tokens_computed"] < sb["tokens_computed"]
    # sorted rows: no batch pads more than the difference to its own longest row
    only_sort = PRMScorer(None, tiny_prm_dir, engine="transformers", batch_size=2, dedup_items=False,
                          shared_prefix="off")
    only_sort.score(items)
    assert only_sort.stats()["tokens_computed"] < sb["tokens_computed"]
    assert only_sort.stats()["tokens"] == sb["tokens"]
