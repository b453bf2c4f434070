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
