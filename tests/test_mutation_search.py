"""sphere/search/ (config, candidates, driver, phases): the search's settings checks and its candidate handling
asserted value by value (the mutation run, scripts/mutation.sh / docs/mutation.md; each test fails on a mutant
the rest of the suite let through)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from sphere.backends.base import Candidate
from sphere.schema import SearchSettings, defaults
from sphere.search.candidates import CUT_ENDS, _context_end, _window_end, answer_closed, merge_duplicates
from sphere.search.config import _engine_config, estimate_backend_calls, validate_search_config


def _scfg(**over):
    cfg = OmegaConf.create(defaults(SearchSettings))
    for k, v in over.items():
        OmegaConf.update(cfg, k, v, merge=False)
    return cfg


def test_the_default_search_is_valid_and_maps_to_the_engine():
    validate_search_config(_scfg())
    e = _engine_config(_scfg(**{"engine.rule": "uct", "engine.c": 1.5, "engine.virtual_loss": 2.0,
                                "engine.fpu": "parent", "engine.fpu_reduction": 0.25, "engine.q_norm": True,
                                "max_depth": 7, "pruning.policy": "threshold", "pruning.k": 3,
                                "pruning.tau": 0.4, "pruning.relative": True}))
    assert (e.rule, e.c, e.virtual_loss, e.fpu, e.fpu_reduction, e.q_norm, e.max_depth, e.pruning, e.prune_k,
            e.prune_tau, e.prune_relative) == ("uct", 1.5, 2.0, "parent", 0.25, True, 7, "threshold", 3, 0.4,
                                                True)


@pytest.mark.parametrize("key, bad, good, allowed", [
    ("mode", "beam", "mcts", "'paper' or 'mcts'"),
    ("expansions", 0, 1, "an integer >= 1 (E candidates per expansion)"),
    ("max_depth", 0, 1, "an integer >= 1"),
    ("batch_leaves", 0, 1, "an integer >= 1"),
    ("max_step_tokens", 0, 1, "an integer >= 1 (token budget of one step)"),
    ("k", 0, 1, "an integer >= 1 (leaves per tree per round)"),
    ("simulations", 0, 1, "an integer >= 1"),
    ("temperature", -0.1, 0.0, "a number >= 0"),
    ("top_p", 0.0, 1.0, "a number in (0, 1]"),
    ("top_p", 1.01, 0.01, "a number in (0, 1]"),
    ("reward", "gain", "min", "raw | advantage | min"),
    ("reward", "gain", "raw", "raw | advantage | min"),
    ("outcome", "sum", "add", "none | replace | mix | add"),
    ("outcome", "sum", "none", "none | replace | mix | add"),
    ("outcome", "sum", "mix", "none | replace | mix | add"),
    ("backup", "sum", "max", "mean | max"),
    ("dedup_candidates", "yes", False, "true | false"),
    ("pruning.policy", "best", "none", "none | minmax | topk | threshold"),
    ("pruning.policy", "best", "topk", "none | minmax | topk | threshold"),
    ("engine.rule", "alphazero", "uct", "uct | puct"),
    ("engine.c", -1.0, 0.0, "a number >= 0"),
    ("engine.virtual_loss", -1.0, 0.0, "a number >= 0"),
])
def test_each_setting_is_refused_outside_what_is_allowed(key, bad, good, allowed):
    validate_search_config(_scfg(**{key: good}))
    with pytest.raises(ValueError) as e:
        validate_search_config(_scfg(**{key: bad}))
    assert str(e.value) == f"config search.{key}={bad!r} is invalid: allowed {allowed}"


def test_pruning_bounds_depend_on_the_policy():
    validate_search_config(_scfg(**{"pruning.policy": "minmax", "pruning.k": 99, "pruning.tau": 9.0}))
    for k, ok in [(0, False), (1, True), (5, True), (6, False)]:
        cfg = _scfg(**{"pruning.policy": "topk", "pruning.k": k, "expansions": 5})
        if ok:
            validate_search_config(cfg)
        else:
            with pytest.raises(ValueError, match=r"search\.pruning\.k=.*allowed 1\.\.search\.expansions \(5\)"):
                validate_search_config(cfg)
    for tau, rel, ok in [(0.0, False, True), (1.0, False, True), (1.01, False, False), (-0.01, False, False),
                         (2.0, True, True), (2.01, True, False), (1.5, True, True)]:
        cfg = _scfg(**{"pruning.policy": "threshold", "pruning.tau": tau, "pruning.relative": rel})
        if ok:
            validate_search_config(cfg)
        else:
            with pytest.raises(ValueError, match=r"search\.pruning\.tau=.*allowed \[0, 1\] \(absolute\) or \[0, 2\]"):
                validate_search_config(cfg)


def test_plan_figures():
    assert estimate_backend_calls(10, _scfg(mode="paper", max_depth=4, expansions=5, batch_leaves=3)) == {
        "expansions": 80, "candidates": 400, "backend_calls": 27}
    assert estimate_backend_calls(3, _scfg(mode="mcts", simulations=7, expansions=2, batch_leaves=1)) == {
        "expansions": 21, "candidates": 42, "backend_calls": 21}


def _c(text, finish="stop"):
    return Candidate(text=text, token_ids=[1], logprob_sum=-1.0, logprob_mean=-1.0, finish=finish,
                     token_logprobs=[-1.0])


def test_duplicates_merge_into_their_first_occurrence_per_leaf():
    a, b, a2, a_len = _c("a"), _c("b"), _c("a"), _c("a", "length")
    rows, mults = merge_duplicates([[a, b, a2, a_len, b, a2], [], [b]])
    assert rows == [[a, b, a_len], [], [b]] and rows[0][0] is a
    assert mults == [[3, 2, 1], [], [1]]


def test_placeholders_and_closed_answers():
    ce, we = _context_end(), _window_end()
    assert (ce.text, ce.token_ids, ce.finish, ce.token_logprobs, ce.logprob_sum, ce.logprob_mean) == (
        "", [], "context_end", [], 0.0, 0.0)
    assert we.finish == "window_end" and CUT_ENDS == ("context_end", "window_end")
    assert answer_closed("think</think> so \\boxed{3}", "</think>")
    assert not answer_closed("\\boxed{3} </think> so", "</think>")
    assert not answer_closed("no marker \\boxed{3}", "</think>")
    assert answer_closed("</think>\\boxed{3}", "</think>")


# ================================================================== the driver and its round phases
# A scripted search: ScriptedBackend answers each prompt (the steps so far) with the candidates the script
# gives for those steps, ScriptedScorer scores a step by its text, and the verifier accepts "\boxed{gold}".
# Scores are multiples of 1/8 so every reward and value is exact in float32.
import math  # noqa: E402

import numpy as np  # noqa: E402

from sphere.search.driver import SearchDriver  # noqa: E402
from sphere.search.types import Round, SearchJob, SearchStats, call_fill  # noqa: E402

_SEP = "\x1f"  # joins problem and steps in the fake prompt ids


def _prompt_fn(problem):
    return lambda steps: [ord(ch) for ch in _SEP.join([problem, *steps])]


class ScriptedBackend:
    """Test double for a backend: ``script[(problem, *steps)]`` lists the candidates of that prompt as
    (text, finish) or (text, finish, logprob_mean) or (text, finish, logprob_mean, stop_hit)."""

    name = "scripted"

    def __init__(self, script, max_model_len=None, fail=False):
        self.script = script
        self.calls: list[list[tuple[str, ...]]] = []
        self.params = []
        self.fail = fail
        if max_model_len is not None:
            self.max_model_len = max_model_len

    def next_steps(self, prompts, params):
        self.params.append((params.n, params.temperature, params.top_p, params.max_tokens, params.seed,
                            params.stop, params.logprobs))
        keys = [tuple("".join(chr(i) for i in p).split(_SEP)) for p in prompts]
        self.calls.append(keys)
        if self.fail:
            raise RuntimeError("backend down")
        out = []
        for k in keys:
            row = []
            for spec in self.script[k]:
                text, finish, lp, hit = (*spec, -1.0, False)[:4] if len(spec) == 2 else (
                    (*spec, False) if len(spec) == 3 else spec)
                row.append(Candidate(text=text, token_ids=[ord(ch) for ch in text], logprob_sum=lp * len(text),
                                     logprob_mean=lp, finish=finish, token_logprobs=[lp] * len(text),
                                     stop_hit=hit))
            out.append(row)
        return out


class ScriptedScorer:
    """Test double for a step scorer: a step's score is ``scores[text]``; records each call's items."""

    def __init__(self, scores):
        self.scores = scores
        self.calls: list[list[tuple[str, tuple[str, ...]]]] = []

    def score(self, items):
        self.calls.append([(p, tuple(s)) for p, s in items])
        return [[self.scores[x] for x in s] for _, s in items]


class WindowScorer(ScriptedScorer):
    """A scorer with a window: an item whose steps hold more than ``limit`` characters does not fit."""

    def __init__(self, scores, limit):
        super().__init__(scores)
        self.limit = limit
        self.fit_calls = []

    def fits(self, items):
        self.fit_calls.append([(p, tuple(s)) for p, s in items])
        return [sum(len(x) for x in s) <= self.limit for _, s in items]


class BoxedVerifier:
    def __init__(self):
        self.calls = []

    def __call__(self, pairs):
        self.calls.append(list(pairs))
        return [f"\\boxed{{{g}}}" in t for t, g in pairs]


def _search(script, scores, *, jobs=(("P", "7"),), seed=5, scorer=None, backend=None, answer_after="",
             meta=None, progress=None, **over):
    cfg = _scfg(**{"expansions": 4, "max_depth": 3, "batch_leaves": 8, "temperature": 0.7, "top_p": 0.9,
                   "max_step_tokens": 17, **over})
    be = backend or ScriptedBackend(script)
    sc = scorer or ScriptedScorer(scores)
    ver = BoxedVerifier()
    d = SearchDriver(be, sc, ver, cfg, delimiter="\n\n", answer_after=answer_after, seed=seed)
    results = []
    stats = d.run([SearchJob(f"j{i}", {"problem": p, "answer": a}, _prompt_fn(p), dict(meta or {}))
                   for i, (p, a) in enumerate(jobs)], results.append, progress=progress)
    return d, results, stats, be, sc, ver


def _t(tr):
    """A trajectory as a comparable tuple (nodes left out)."""
    return (tr.steps, tr.correct, tr.value, tr.rewards, tr.scores, tr.finish)


# the paper search of one problem (E=4, minmax, max_depth=3, advantage rewards, outcome replace):
# root -> a a b c (a merged, pruned: b is the best, c the worst); the max chain goes to b, the min chain to c;
# b -> b1 b2 b3 b3 (b2 states the right answer, best; b1 worst); c -> c1 c2 c1 c1 (c1 worst);
# c1 -> d e f d at max depth (terminal; e and f are graded wrong, d is cut at the depth)
_PAPER = {
    ("P",): [("a", "step"), ("b", "step"), ("a", "step"), ("c", "step")],
    ("P", "b"): [("b1", "step"), ("b2 \\boxed{7}", "answer"), ("b3", "step"), ("b3", "step")],
    ("P", "c"): [("c1", "step", -0.5), ("c2", "step", -0.5 - math.log(3.0)), ("c1", "step", -0.5),
                 ("c1", "step", -0.5)],
    ("P", "c", "c1"): [("d", "step", -400.0), ("e \\boxed{8}", "answer", -400.0), ("f", "eos", -400.0),
                       ("d", "step", -400.0)],
}
_PAPER_SCORES = {"a": 0.5, "b": 0.875, "c": 0.25, "b1": 0.625, "b2 \\boxed{7}": 1.0, "b3": 0.75, "c1": 0.125,
                 "c2": 0.375, "d": 0.0, "e \\boxed{8}": 0.5, "f": 0.375}


def test_paper_search_chains_rewards_counts_and_calls_exactly():
    progress = []
    d, results, stats, be, sc, ver = _search(_PAPER, _PAPER_SCORES, meta={"snapshot": True},
                                             progress=progress.append, **{"pruning.policy": "minmax"})
    (r,) = results
    assert r.job.job_id == "j0" and r.nodes == 12 and r.expansions == 4
    assert _t(r.sol_max) == (["b", "b2 \\boxed{7}"], True, 1.0, [0.875, 0.125], [0.875, 1.0], "answer")
    assert _t(r.sol_min) == (["c", "c1", "d"], False, 0.0, [0.25, -0.125, -0.125], [0.25, 0.125, 0.0], "depth")
    assert r.sol_max.nodes == [0, 2, 5] and r.sol_min.nodes == [0, 3, 7, 9]
    assert [_t(t) for t in r.terminals] == [
        _t(r.sol_max), _t(r.sol_min),
        (["c", "c1", "e \\boxed{8}"], False, 0.0, [0.25, -0.125, 0.375], [0.25, 0.125, 0.5], "answer")]
    assert [t.nodes[-1] for t in r.terminals] == [5, 9, 10]
    # calls: the max chain's head first; the seed moves with the round
    assert be.calls == [[("P",)], [("P", "b"), ("P", "c")], [("P", "c", "c1")]]
    assert be.params == [(4, 0.7, 0.9, 17, 5 * 1_000_003 + i, ["\n\n"], False) for i in range(3)]
    assert sc.calls == [
        [("P", ("a",)), ("P", ("b",)), ("P", ("c",))],
        [("P", ("b", "b1")), ("P", ("b", "b2 \\boxed{7}")), ("P", ("b", "b3")), ("P", ("c", "c1")),
         ("P", ("c", "c2"))],
        [("P", ("c", "c1", "d")), ("P", ("c", "c1", "e \\boxed{8}")), ("P", ("c", "c1", "f"))]]
    assert ver.calls == [[("b\n\nb2 \\boxed{7}", "7")], [("c\n\nc1\n\ne \\boxed{8}", "7"), ("c\n\nc1\n\nf", "7")]]
    assert stats is d.stats
    assert (stats.rounds, stats.backend_calls, stats.leaves, stats.full_calls, stats.full_call_leaves,
            stats.candidates, stats.tokens, stats.collisions, stats.pruned, stats.context_ends,
            stats.window_ends, stats.merged, stats.scored_items) == (
        3, 3, 4, 0, 0, 16, sum(len(t) for k in _PAPER for t, *_ in _PAPER[k]), 0, 3, 0, 0, 5, 11)
    assert min(stats.engine_s, stats.backend_s, stats.scorer_s, stats.verify_s) >= 0.0
    # the step store: every candidate (duplicates merged), its raw score, how it ended, its verdict, its count
    assert d.steps == ["", "a", "b", "c", "b1", "b2 \\boxed{7}", "b3", "c1", "c2", "d", "e \\boxed{8}", "f"]
    assert d.step_score == [0.0, 0.5, 0.875, 0.25, 0.625, 1.0, 0.75, 0.125, 0.375, 0.0, 0.5, 0.375]
    assert d.step_finish == ["", "step", "step", "step", "step", "answer", "step", "step", "step", "depth",
                             "answer", "eos"]
    assert d.step_correct == [False] * 5 + [True] + [False] * 6
    assert d.step_mult == [1, 2, 1, 1, 1, 1, 2, 3, 1, 2, 1, 1]
    snap = r.snapshot
    assert snap["text"] == d.steps
    assert snap["node_id"].tolist() == list(range(12))
    assert snap["parent"].tolist() == [-1, 0, 0, 0, 2, 2, 2, 3, 3, 7, 7, 7]
    assert snap["reward"].tolist() == [0.0, 0.5, 0.875, 0.25, -0.25, 0.125, -0.125, -0.125, 0.125, -0.125,
                                       0.375, 0.25]
    # initial values: the step score, at terminals the outcome (replace: 1 right, 0 wrong)
    assert snap["init_value"].tolist()[1:] == [0.5, 0.875, 0.25, 0.625, 1.0, 0.75, 0.125, 0.375, 0.0, 0.0, 0.0]
    # priors: multiplicity x softmax of the mean logprob per expansion (c1: 3 x e^-0.5 vs c2: e^-0.5 / 3)
    assert snap["prior"].tolist()[1:] == pytest.approx(
        [0.5, 0.25, 0.25, 0.25, 0.25, 0.5, 0.9, 0.1, 0.5, 0.25, 0.25], abs=1e-6)
    assert snap["visits"].tolist() == [0] * 12  # paper chains back nothing up
    assert d.forest.is_pruned(np.arange(12, dtype=np.int32)).tolist() == [
        False, True, False, False, False, False, True, False, False, False, False, True]
    # one progress record per round: the counters so far and how full the calls were
    assert [(p["live"], p["queued"], p["rounds"], p["backend_calls"], p["leaves"], p["candidates"], p["merged"],
             p["scored_items"], p["pruned"], p["mean_leaves_per_call"], p["leaves_per_call_frac"]) for p in progress] == [
        (1, 0, 1, 1, 1, 4, 1, 3, 1, 1.0, None), (1, 0, 2, 2, 3, 12, 4, 8, 2, 1.5, None),
        (0, 0, 3, 3, 4, 16, 5, 11, 3, 4 / 3, None)]


def test_paper_search_without_merging_scores_and_keeps_every_copy():
    d, (r,), stats, be, sc, ver = _search(_PAPER, _PAPER_SCORES, dedup_candidates=False)
    assert _t(r.sol_max) == (["b", "b2 \\boxed{7}"], True, 1.0, [0.875, 0.125], [0.875, 1.0], "answer")
    assert _t(r.sol_min) == (["c", "c1", "d"], False, 0.0, [0.25, -0.125, -0.125], [0.25, 0.125, 0.0], "depth")
    assert r.nodes == 17 and r.expansions == 4
    assert (stats.merged, stats.scored_items, stats.candidates, stats.pruned) == (0, 16, 16, 8)
    assert d.step_mult == [1] * 17
    assert [len(c) for c in sc.calls] == [4, 8, 4]
    assert sc.calls[0] == [("P", ("a",)), ("P", ("b",)), ("P", ("a",)), ("P", ("c",))]
    assert ver.calls == [[("b\n\nb2 \\boxed{7}", "7")], [("c\n\nc1\n\ne \\boxed{8}", "7"), ("c\n\nc1\n\nf", "7")]]


_ONE_STEP = {("Q",): [("q1", "eos"), ("q2 \\boxed{3}", "answer")]}


def test_jobs_join_while_the_batch_has_room_and_calls_count_towards_the_fill_while_jobs_wait():
    progress = []
    d, results, stats, be, _, _ = _search({**_PAPER, **_ONE_STEP}, {**_PAPER_SCORES, "q1": 0.25,
                                                                       "q2 \\boxed{3}": 0.75},
                                          jobs=(("P", "7"), ("Q", "3")), batch_leaves=1, progress=progress.append)
    # one leaf per call: the min chain's head waits a round; Q joins when P is done
    assert be.calls == [[("P",)], [("P", "b")], [("P", "c")], [("P", "c", "c1")], [("Q",)]]
    assert [r.job.job_id for r in results] == ["j0", "j1"]
    assert _t(results[0].sol_min)[0] == ["c", "c1", "d"]
    q = results[1]
    assert _t(q.sol_max) == (["q2 \\boxed{3}"], True, 1.0, [0.75], [0.75], "answer")
    assert _t(q.sol_min) == (["q1"], False, 0.0, [0.25], [0.25], "eos")
    assert (q.nodes, q.expansions) == (3, 1)
    assert (stats.rounds, stats.backend_calls, stats.leaves, stats.full_calls, stats.full_call_leaves) == (
        5, 5, 5, 4, 4)
    assert [(p["live"], p["queued"], p["leaves_per_call_frac"]) for p in progress] == [
        (1, 1, 1.0), (1, 1, 1.0), (1, 1, 1.0), (0, 1, 1.0), (0, 0, 1.0)]
    assert be.params[4][4] == 5 * 1_000_003 + 4


def test_with_room_in_the_batch_both_jobs_start_together():
    _, results, stats, be, _, _ = _search({**_PAPER, **_ONE_STEP}, {**_PAPER_SCORES, "q1": 0.25,
                                                                     "q2 \\boxed{3}": 0.75},
                                          jobs=(("P", "7"), ("Q", "3")), batch_leaves=2)
    assert be.calls == [[("P",), ("Q",)], [("P", "b"), ("P", "c")], [("P", "c", "c1")]]
    assert [r.job.job_id for r in results] == ["j1", "j0"]  # Q retires after its first round
    assert (stats.full_calls, stats.full_call_leaves, stats.leaves) == (0, 0, 5)
    assert stats.as_dict(2)["mean_leaves_per_call"] == 5 / 3


def test_a_job_submitted_while_running_is_searched_too():
    cfg = _scfg(expansions=2, max_depth=1, batch_leaves=4)
    be = ScriptedBackend(_ONE_STEP)
    d = SearchDriver(be, ScriptedScorer({"q1": 0.25, "q2 \\boxed{3}": 0.75}), BoxedVerifier(), cfg)
    seen = []

    def on_result(r):
        seen.append(r.job.job_id)
        if len(seen) == 1:
            d.submit(SearchJob("again", {"problem": "Q", "answer": "3"}, _prompt_fn("Q")))

    stats = d.run([SearchJob("first", {"problem": "Q", "answer": "3"}, _prompt_fn("Q"))], on_result)
    assert seen == ["first", "again"] and stats.rounds == 2 and be.calls == [[("Q",)], [("Q",)]]
    assert be.params[1][4] == 1  # seed 0: the round index


def test_a_prompt_that_fills_the_context_window_ends_its_chain():
    # the prompt of c1's expansion is 6 ids: 6 + 1 > 6, so the chain ends there without a backend call
    be = ScriptedBackend(_PAPER, max_model_len=6)
    d, (r,), stats, _, sc, ver = _search(_PAPER, _PAPER_SCORES, backend=be)
    assert be.calls == [[("P",)], [("P", "b"), ("P", "c")]]
    assert _t(r.sol_min) == (["c", "c1"], False, 0.0, [0.25, -0.125], [0.25, 0.125], "length")
    assert r.sol_min.nodes == [0, 3, 7, 9]
    assert (stats.context_ends, stats.backend_calls, stats.leaves, stats.candidates, stats.rounds) == (1, 3, 4, 13, 3)
    assert d.steps[9] == "" and d.step_finish[9] == "length" and d.step_score[9] == 0.125
    assert d.step_mult[9] == 1 and r.nodes == 10
    assert [t.finish for t in r.terminals] == ["answer", "length"]
    assert len(ver.calls) == 1
    # a window one id larger takes it
    be = ScriptedBackend(_PAPER, max_model_len=7)
    _, (r,), stats, _, _, _ = _search(_PAPER, _PAPER_SCORES, backend=be)
    assert stats.context_ends == 0 and r.sol_min.finish == "depth" and len(be.calls) == 3


def test_no_context_limit_when_the_backend_states_none():
    be = ScriptedBackend(_PAPER, max_model_len=0)
    _, (r,), stats, _, _, _ = _search(_PAPER, _PAPER_SCORES, backend=be)
    assert stats.context_ends == 0 and r.sol_min.steps == ["c", "c1", "d"]


def test_a_step_the_scorers_window_cannot_take_ends_its_chain():
    sc = WindowScorer(_PAPER_SCORES, limit=4)
    d, (r,), stats, be, _, ver = _search(_PAPER, _PAPER_SCORES, scorer=sc)
    # b2 (14 characters after b) and e do not fit: placeholders with the parent's score, graded wrong
    assert _t(r.sol_max) == (["b"], False, 0.0, [0.875], [0.875], "window")
    assert r.sol_max.nodes == [0, 2, 5]
    assert _t(r.sol_min) == (["c", "c1", "d"], False, 0.0, [0.25, -0.125, -0.125], [0.25, 0.125, 0.0], "depth")
    assert stats.window_ends == 2 and stats.context_ends == 0
    assert sc.fit_calls[1] == [("P", ("b", "b1")), ("P", ("b", "b2 \\boxed{7}")), ("P", ("b", "b3")),
                               ("P", ("b", "b3")), ("P", ("c", "c1")), ("P", ("c", "c2")), ("P", ("c", "c1")),
                               ("P", ("c", "c1"))]
    assert sc.calls[1] == [("P", ("b", "b1")), ("P", ("b", "b3")), ("P", ("c", "c1")), ("P", ("c", "c2"))]
    assert ver.calls == [[("c\n\nc1\n\nf", "7")]]
    assert d.steps[5] == "" and d.step_finish[5] == "window" and d.step_score[5] == 0.875
    assert d.steps[9:] == ["d", "", "f"] and d.step_finish[9:] == ["depth", "window", "eos"]
    assert d.step_score[9:] == [0.0, 0.125, 0.375]


_THINK = {
    ("P",): [("t \\boxed{7}", "answer", -1.0, True), ("</think> \\boxed{7}", "answer", -1.0, True),
             ("u \\boxed{7}", "answer", -1.0, False)],
    ("P", "t \\boxed{7}"): [("</think> \\boxed{7}", "answer", -1.0, True), ("v", "step")],
}
_THINK_SCORES = {"t \\boxed{7}": 0.75, "</think> \\boxed{7}": 0.5, "u \\boxed{7}": 0.25, "v": 0.125}


def test_a_boxed_answer_inside_the_thinking_block_does_not_end_the_solution():
    d, (r,), stats, be, _, ver = _search(_THINK, _THINK_SCORES, answer_after="</think>", expansions=3,
                                         **{"pruning.policy": "none"})
    # "t \boxed{7}" stopped at the delimiter before </think>: a step; the unstopped "u \boxed{7}" ends
    assert d.step_finish[1:4] == ["step", "answer", "answer"]
    assert be.calls == [[("P",)], [("P", "t \\boxed{7}")]]
    assert ver.calls == [[("</think> \\boxed{7}", "7"), ("u \\boxed{7}", "7")],
                         [("t \\boxed{7}\n\n</think> \\boxed{7}", "7")]]
    assert _t(r.sol_max) == (["t \\boxed{7}", "</think> \\boxed{7}"], True, 1.0, [0.75, -0.25], [0.75, 0.5],
                             "answer")
    assert _t(r.sol_min) == (["u \\boxed{7}"], True, 1.0, [0.25], [0.25], "answer")
    # without the family's marker every stated answer ends the solution
    d, (r,), _, be, _, ver = _search(_THINK, _THINK_SCORES, expansions=3, **{"pruning.policy": "none"})
    assert d.step_finish[1:4] == ["answer", "answer", "answer"] and be.calls == [[("P",)]]
    assert _t(r.sol_max) == (["t \\boxed{7}"], True, 1.0, [0.75], [0.75], "answer")


def test_the_marker_is_looked_for_in_the_steps_joined_by_the_delimiter():
    script = {("P",): [("work", "step")], ("P", "work"): [("</think> \\boxed{7}", "answer", -1.0, True)]}
    d, (r,), _, _, _, _ = _search(script, {"work": 0.5, "</think> \\boxed{7}": 0.625}, expansions=1,
                                  answer_after="\n\n</think>", **{"pruning.policy": "none"})
    assert _t(r.sol_max) == (["work", "</think> \\boxed{7}"], True, 1.0, [0.5, 0.125], [0.5, 0.625], "answer")


@pytest.mark.parametrize("over, rewards, value", [
    ({}, [0.875, -0.25], 1.0),
    ({"reward": "raw"}, [0.875, 0.625], 1.0),
    ({"reward": "min", "outcome": "none"}, [0.875, 0.625], 0.625),
    ({"outcome_in_reward": True, "outcome_weight": 0.5}, [0.875, 0.25], 1.0),
    ({"outcome": "mix", "outcome_weight": 0.5}, [0.875, -0.25], 0.8125),
    ({"outcome": "add", "outcome_weight": 0.25}, [0.875, -0.25], 0.875),
])
def test_reward_shaping_and_the_outcome_follow_the_settings(over, rewards, value):
    script = {("P",): [("b", "step")], ("P", "b"): [("b1", "step"), ("b2 \\boxed{7}", "answer")]}
    scores = {"b": 0.875, "b1": 0.625, "b2 \\boxed{7}": 0.625}
    d, (r,), _, _, _, _ = _search(script, scores, expansions=2, **{"pruning.policy": "none", "max_depth": 2,
                                                                     **over})
    # b2 and b1 tie on the step score; b2 states the answer
    term = [t for t in r.terminals if t.finish == "answer"][0]
    assert term.steps == ["b", "b2 \\boxed{7}"] and term.rewards == rewards and term.value == value
    assert term.correct is True


def test_a_wrong_answer_loses_the_outcome_weight_in_its_reward():
    script = {("P",): [("b \\boxed{6}", "answer"), ("c", "eos")]}
    d, (r,), _, _, _, ver = _search(script, {"b \\boxed{6}": 0.75, "c": 0.5}, expansions=2,
                                    outcome_in_reward=True, outcome_weight=0.5, **{"pruning.policy": "none"})
    assert [(t.steps, t.rewards, t.value, t.correct) for t in r.terminals] == [
        (["b \\boxed{6}"], [0.25], 0.0, False), (["c"], [0.0], 0.0, False)]
    assert ver.calls == [[("b \\boxed{6}", "7"), ("c", "7")]]


def test_a_bare_root_path_is_an_empty_trajectory():
    d = SearchDriver(ScriptedBackend({}), ScriptedScorer({}), BoxedVerifier(), _scfg())
    root = int(d.forest.add_roots(np.array([0], dtype=np.int64))[0])
    tr = d.trajectory(np.asarray([root], dtype=np.int32))
    assert (tr.steps, tr.correct, tr.value, tr.rewards, tr.scores, tr.finish, tr.nodes) == (
        [], False, 0.0, [], [], "", [root])
    assert d.steps == [""] and d.step_score == [0.0] and d.step_finish == [""] and d.step_correct == [False]
    assert d.step_mult == [1] and d.dedup is True and (d.E, d.k, d.batch, d.seed) == (5, 1, 64, 0)
    assert d.mode == "paper" and d.delim == "\n\n" and d.answer_after == ""
    assert d.run([], lambda r: None) is d.stats and d.stats.rounds == 0


_ROOT4 = {("P",): [("a", "step", -1.0), ("b", "step", -2.0), ("a", "step", -1.0), ("c", "step", -1.0)]}
_ROOT4_SCORES = {"a": 0.5, "b": 0.875, "c": 0.25}


def _tree_values(d, n):
    ids = np.arange(n, dtype=np.int32)
    return d.forest.value(ids).tolist(), d.forest.visits(ids).tolist()


@pytest.mark.parametrize("over, root_value, pruned, nodes", [
    ({}, 0.53125, 0, 4),  # mean over the 4 samples: a counts twice
    ({"dedup_candidates": False}, 0.53125, 0, 5),
    ({"backup": "max"}, 0.875, 0, 4),
    ({"pruning.policy": "topk", "pruning.k": 2}, 0.625, 1, 4),  # kept b and a (twice): 1.875 / 3
    ({"pruning.policy": "topk", "pruning.k": 2, "backup": "max"}, 0.875, 1, 4),
    ({"pruning.policy": "topk", "pruning.k": 1}, 0.875, 2, 4),
    ({"pruning.policy": "threshold", "pruning.tau": 1.0}, 0.53125, 3, 4),  # all pruned: all count
])
def test_mcts_backs_up_the_mean_over_the_kept_samples_or_the_max(over, root_value, pruned, nodes):
    d, (r,), stats, be, _, _ = _search(_ROOT4, _ROOT4_SCORES, mode="mcts", simulations=1, max_depth=2,
                                       **{"engine.rule": "puct", "pruning.policy": "none", **over})
    vals, visits = _tree_values(d, nodes)
    assert vals[0] == root_value and visits == [1] + [0] * (nodes - 1)
    assert stats.pruned == pruned and r.nodes == nodes and r.expansions == 1
    assert (r.sol_max, r.sol_min, r.terminals) == (None, None, [])
    assert be.params == [(4, 0.7, 0.9, 17, 5_000_015, ["\n\n"], True)]  # PUCT asks for logprobs
    # priors: multiplicity x softmax of the mean logprob (b: -2, the others -1)
    w = 1.0 / (3.0 + math.exp(-1.0))
    want = [w, w * math.exp(-1.0), w, w] if nodes == 5 else [2 * w, w * math.exp(-1.0), w]
    assert d.forest.prior(np.arange(1, nodes, dtype=np.int32)).tolist() == pytest.approx(want, abs=1e-6)


_MCTS = {**_ROOT4,
         ("P", "a"): [("a1 \\boxed{7}", "answer"), ("a2", "eos")],
         ("P", "b"): [("b1 \\boxed{7}", "answer"), ("b2 \\boxed{5}", "answer")],
         ("P", "c"): [("c1", "step"), ("c2", "step")]}
_MCTS_SCORES = {**_ROOT4_SCORES, "a1 \\boxed{7}": 0.75, "a2": 0.125, "b1 \\boxed{7}": 0.625,
                "b2 \\boxed{5}": 0.375, "c1": 0.5, "c2": 0.0}


@pytest.mark.parametrize("over, calls, root_value, collisions", [
    ({}, [("P",), ("P", "a"), ("P", "b"), ("P", "c")], 0.3828125, 0),
    ({"k": 2}, [("P",), ("P", "a"), ("P", "b"), ("P", "c")], 0.3828125, 3),
    ({"backup": "max"}, [("P",), ("P", "a"), ("P", "b"), ("P", "c")], 0.71875, 0),
    ({"engine.rule": "puct"}, [("P",), ("P", "a"), ("P", "c"), ("P", "b")], 0.3828125, 0),
])
def test_mcts_search_values_and_extremes(over, calls, root_value, collisions):
    d, (r,), stats, be, _, ver = _search(_MCTS, _MCTS_SCORES, mode="mcts", simulations=4, max_depth=2,
                                         **{"engine.rule": "uct", "pruning.policy": "none", **over})
    assert [c for (c,) in be.calls] == calls
    assert [p[6] for p in be.params] == [over.get("engine.rule") == "puct"] * 4
    assert (stats.rounds, stats.collisions, stats.merged, stats.scored_items, stats.candidates) == (
        4, collisions, 1, 9, 10)
    assert (r.nodes, r.expansions) == (10, 4)
    vals, visits = _tree_values(d, 4)
    assert vals[0] == root_value and visits == [4, 1, 1, 1]
    # Sol_max / Sol_min: the highest / lowest value, ties broken by the last step score
    assert _t(r.sol_max) == (["a", "a1 \\boxed{7}"], True, 1.0, [0.5, 0.25], [0.5, 0.75], "answer")
    assert _t(r.sol_min) == (["c", "c2"], False, 0.0, [0.25, -0.25], [0.25, 0.0], "depth")
    assert sorted((t.steps[-1], t.value, t.correct, t.finish) for t in r.terminals) == [
        ("a1 \\boxed{7}", 1.0, True, "answer"), ("a2", 0.0, False, "eos"), ("b1 \\boxed{7}", 1.0, True, "answer"),
        ("b2 \\boxed{5}", 0.0, False, "answer"), ("c1", 0.0, False, "depth"), ("c2", 0.0, False, "depth")]
    assert sorted(x for call in ver.calls for x in call) == [
        ("a\n\na1 \\boxed{7}", "7"), ("a\n\na2", "7"), ("b\n\nb1 \\boxed{7}", "7"), ("b\n\nb2 \\boxed{5}", "7")]


def test_mcts_stops_at_max_terminals():
    d, (r,), stats, be, _, _ = _search(_MCTS, _MCTS_SCORES, mode="mcts", simulations=4, max_depth=2,
                                       max_terminals=2, **{"engine.rule": "uct", "pruning.policy": "none"})
    assert stats.rounds == 2 and len(r.terminals) == 2 and r.expansions == 2


def test_a_failed_backend_call_cancels_the_virtual_loss_and_raises():
    be = ScriptedBackend(_MCTS, fail=True)
    cfg = _scfg(mode="mcts", simulations=2, max_depth=2, **{"engine.rule": "uct"})
    d = SearchDriver(be, ScriptedScorer(_MCTS_SCORES), BoxedVerifier(), cfg)
    with pytest.raises(RuntimeError, match="^backend down$"):
        d.run([SearchJob("j", {"problem": "P", "answer": "7"}, _prompt_fn("P"))], lambda r: None)
    assert d.forest.stats()["inflight_roots"] == 0
    assert d.stats.backend_calls == 0 and d.stats.rounds == 0
    # paper chains hold no virtual loss: nothing to cancel, the error still comes through
    be = ScriptedBackend(_PAPER, fail=True)
    d = SearchDriver(be, ScriptedScorer(_PAPER_SCORES), BoxedVerifier(), _scfg())
    with pytest.raises(RuntimeError, match="^backend down$"):
        d.run([SearchJob("j", {"problem": "P", "answer": "7"}, _prompt_fn("P"))], lambda r: None)


def test_no_snapshot_unless_the_job_asks_for_one():
    _, (r,), _, _, _, _ = _search(_PAPER, _PAPER_SCORES)
    assert r.snapshot is None
    _, (r,), _, _, _, _ = _search(_PAPER, _PAPER_SCORES, meta={"snapshot": False})
    assert r.snapshot is None


def test_round_spans_stats_dict_and_call_fill():
    rd = Round(cands=[[1, 2], [], [3], [4, 5, 6]])
    assert rd.spans() == [(0, 2), (2, 2), (2, 3), (3, 6)]
    assert Round().spans() == []
    st = SearchStats(backend_calls=4, leaves=10, full_calls=2, full_call_leaves=6)
    d = st.as_dict(4)
    assert d["mean_leaves_per_call"] == 2.5 and d["leaves_per_call_frac"] == 0.75
    assert set(d) == set(st.__dict__) | {"mean_leaves_per_call", "leaves_per_call_frac"}
    assert d["leaves"] == 10 and d["rounds"] == 0
    assert call_fill({}, 8) == {"mean_leaves_per_call": 0.0, "leaves_per_call_frac": None}
    assert call_fill({"leaves": 3, "backend_calls": 0, "full_calls": 0, "full_call_leaves": 5}, 8) == {
        "mean_leaves_per_call": 3.0, "leaves_per_call_frac": None}
    assert call_fill({"leaves": 6, "backend_calls": 3, "full_calls": 1, "full_call_leaves": 4}, 0) == {
        "mean_leaves_per_call": 2.0, "leaves_per_call_frac": 4.0}
    assert call_fill({"full_calls": 2, "full_call_leaves": 3}, 3) == {
        "mean_leaves_per_call": 0.0, "leaves_per_call_frac": 0.5}


class ProblemScorer(ScriptedScorer):
    """Scores a step by (problem, text): the same step scores differently under different problems."""

    def score(self, items):
        self.calls.append([(p, tuple(s)) for p, s in items])
        return [[self.scores[(p, x)] for x in s] for p, s in items]


def test_merging_scores_each_problem_and_steps_once_per_call():
    script = {("P",): [("x", "eos"), ("x", "eos"), ("y", "eos")], ("Q",): [("x", "eos"), ("y", "eos")]}
    sc = ProblemScorer({("P", "x"): 0.75, ("Q", "x"): 0.25, ("P", "y"): 0.5, ("Q", "y"): 0.5})
    d, results, stats, _, _, _ = _search(script, {}, scorer=sc, jobs=(("P", "7"), ("Q", "7")), expansions=3,
                                         dedup_candidates=True, **{"pruning.policy": "none"})
    assert sc.calls == [[("P", ("x",)), ("P", ("y",)), ("Q", ("x",)), ("Q", ("y",))]]
    assert stats.scored_items == 4 and stats.merged == 1
    assert {r.job.job_id: (r.sol_max.steps, r.sol_max.scores, r.sol_min.steps, r.sol_min.scores)
            for r in results} == {"j0": (["x"], [0.75], ["y"], [0.5]), "j1": (["y"], [0.5], ["x"], [0.25])}
    assert d.step_score == [0.0, 0.75, 0.5, 0.25, 0.5]


def test_a_config_without_the_dedup_key_merges_and_an_empty_path_is_an_empty_trajectory():
    cfg = _scfg()
    del cfg["dedup_candidates"]
    d = SearchDriver(ScriptedBackend({}), ScriptedScorer({}), BoxedVerifier(), cfg, delimiter="||",
                     answer_after=None, seed=3)
    assert d.dedup is True and d.delim == "||" and d.answer_after == "" and d.seed == 3
    tr = d.trajectory(np.asarray([], dtype=np.int32))
    assert (tr.steps, tr.correct, tr.value, tr.rewards, tr.scores, tr.finish, tr.nodes) == (
        [], False, 0.0, [], [], "", [])


def test_jobs_join_until_the_batch_is_full_counting_every_joined_leaf():
    script = {(p,): [("x", "eos"), ("y \\boxed{7}", "answer")] for p in "ABCD"}
    _, results, stats, be, _, _ = _search(script, {"x": 0.25, "y \\boxed{7}": 0.75},
                                          jobs=tuple((p, "7") for p in "ABCD"), batch_leaves=3, expansions=2)
    assert be.calls == [[("A",), ("B",), ("C",)], [("D",)]]
    assert [r.job.job_id for r in results] == ["j0", "j1", "j2", "j3"]
    assert (stats.full_calls, stats.full_call_leaves, stats.leaves, stats.backend_calls) == (1, 3, 4, 2)


class _Clock:
    """A clock that advances one second per reading: each timed phase adds exactly 1.0."""

    def __init__(self):
        self.t = 100.0

    def perf_counter(self):
        self.t += 1.0
        return self.t


def test_phase_timings_add_up_round_by_round(monkeypatch):
    import sphere.search.driver as driver_mod
    import sphere.search.phases as phases_mod

    monkeypatch.setattr(phases_mod, "time", _Clock())
    monkeypatch.setattr(driver_mod, "time", _Clock())
    _, _, stats, _, _, _ = _search(_PAPER, _PAPER_SCORES)
    # per round: select, prompts, expand/backup and retire are engine time; one backend, scorer, verify reading
    assert (stats.engine_s, stats.backend_s, stats.scorer_s, stats.verify_s) == (12.0, 3.0, 3.0, 3.0)


def test_context_ends_add_up_over_rounds_and_a_root_that_does_not_fit_gives_an_empty_chain():
    be = ScriptedBackend(_PAPER, max_model_len=6)
    d, results, stats, _, _, _ = _search(_PAPER, _PAPER_SCORES, backend=be, jobs=(("P", "7"), ("QQQQQQ", "1")))
    assert be.calls == [[("P",)], [("P", "b"), ("P", "c")]]
    q = {r.job.job_id: r for r in results}["j1"]
    assert _t(q.sol_max) == ([], False, 0.0, [], [], "length") and _t(q.sol_min) == _t(q.sol_max)
    assert (q.nodes, q.expansions, len(q.sol_max.nodes)) == (2, 1, 2)
    assert stats.context_ends == 2 and stats.candidates == 14
    # the placeholder under a root keeps the root's score 0: reward and value 0
    assert (d.steps[4], d.step_score[4], d.step_finish[4], d.step_mult[4]) == ("", 0.0, "length", 1)
    node = np.asarray(q.sol_max.nodes[1:], dtype=np.int32)
    assert d.forest.reward(node).tolist() == [0.0] and d.forest.value(node).tolist() == [0.0]


def test_a_windowed_scorer_is_not_asked_about_placeholders():
    sc = WindowScorer(_PAPER_SCORES, limit=100)
    _, (r,), stats, _, _, _ = _search(_PAPER, _PAPER_SCORES, backend=ScriptedBackend(_PAPER, max_model_len=6),
                                      scorer=sc)
    assert (stats.window_ends, stats.context_ends) == (0, 1) and len(sc.fit_calls) == 2
    assert r.sol_min.finish == "length"


class _ShortFitsScorer(WindowScorer):
    def fits(self, items):
        return super().fits(items)[:-1]


def test_a_scorer_or_verifier_answering_for_fewer_items_is_an_error():
    with pytest.raises(ValueError, match="zip"):
        _search(_PAPER, _PAPER_SCORES, scorer=_ShortFitsScorer(_PAPER_SCORES, limit=100))
    cfg = _scfg(expansions=2, max_depth=1)
    d = SearchDriver(ScriptedBackend(_ONE_STEP), ScriptedScorer({"q1": 0.25, "q2 \\boxed{3}": 0.75}),
                     lambda pairs: [True] * (len(pairs) - 1), cfg)
    with pytest.raises(ValueError, match="zip"):
        d.run([SearchJob("q", {"problem": "Q", "answer": "3"}, _prompt_fn("Q"))], lambda r: None)


def test_every_candidate_past_the_scorers_window_is_cut_and_counted():
    sc = WindowScorer(_PAPER_SCORES, limit=3)
    d, (r,), stats, _, _, ver = _search(_PAPER, _PAPER_SCORES, scorer=sc)
    # round 3: all four candidates after c, c1 are past the window; they merge into one placeholder
    assert stats.window_ends == 5 and stats.merged == 1 + 3 + 3
    assert _t(r.sol_min) == (["c", "c1"], False, 0.0, [0.25, -0.125], [0.25, 0.125], "window")
    assert d.steps[-1] == "" and d.step_mult[-1] == 4 and d.step_finish[-1] == "window"
    assert ver.calls == [] and len(sc.calls) == 3 and sc.calls[2] == []


def test_a_leaf_without_candidates_ends_both_chains_and_asks_no_scorer():
    d, (r,), stats, be, sc, ver = _search({("P",): []}, {})
    assert (r.sol_max, r.sol_min, r.terminals, r.nodes, r.expansions) == (None, None, [], 1, 1)
    assert sc.calls == [] and ver.calls == [] and be.calls == [[("P",)]]
    assert (stats.rounds, stats.candidates, stats.scored_items, stats.pruned) == (1, 0, 0, 0)
    # MCTS: the expanded leaf without children backs up 0 and the tree is exhausted
    d, (r,), stats, be, sc, _ = _search({("P",): []}, {}, mode="mcts", simulations=3, **{"engine.rule": "uct"})
    assert (r.sol_max, r.sol_min, r.expansions, stats.rounds) == (None, None, 1, 1)
    assert _tree_values(d, 1) == ([0.0], [1])


class _SilentScorer(ScriptedScorer):
    """A scorer that gives no score for a step it does not know (an empty list)."""

    def score(self, items):
        self.calls.append([(p, tuple(s)) for p, s in items])
        return [[self.scores.get(x, 0.0) for x in s] if s[-1] in self.scores else [] for _, s in items]


def test_a_step_without_a_score_counts_as_zero():
    script = {("P",): [("a", "step"), ("z", "step")], ("P", "a"): [("a1", "eos")], ("P", "z"): [("z1", "eos")]}
    d, (r,), _, _, _, _ = _search(script, {}, scorer=_SilentScorer({"a": 0.5, "a1": 0.25, "z1": 0.125}),
                                  expansions=2, **{"pruning.policy": "none"})
    assert d.steps[:3] == ["", "a", "z"] and d.step_score[:3] == [0.0, 0.5, 0.0]
    assert _t(r.sol_min) == (["z", "z1"], False, 0.0, [0.0, 0.125], [0.0, 0.125], "eos")


def test_an_exhausted_tree_retires_in_the_round_it_runs_out(monkeypatch):
    import sphere.search.driver as driver_mod
    import sphere.search.phases as phases_mod

    monkeypatch.setattr(phases_mod, "time", _Clock())
    monkeypatch.setattr(driver_mod, "time", _Clock())
    progress = []
    _, (r,), stats, be, _, _ = _search(_ONE_STEP, {"q1": 0.25, "q2 \\boxed{3}": 0.75}, jobs=(("Q", "3"),),
                                       mode="mcts", simulations=5, max_depth=1, expansions=2,
                                       progress=progress.append, **{"engine.rule": "uct"})
    # every child is terminal: the root is exhausted after one of its 5 simulations; no empty round follows
    assert (stats.rounds, r.expansions, len(be.calls), len(progress)) == (1, 1, 1, 1)
    assert stats.engine_s == 4.0
    assert _t(r.sol_max) == (["q2 \\boxed{3}"], True, 1.0, [0.75], [0.75], "answer")


def test_the_answer_counts_after_the_first_marker():
    # R1 may repeat the end-of-thinking marker: the answer after the first one closes the chain
    assert answer_closed("a</think>\\boxed{1}</think>", "</think>")
