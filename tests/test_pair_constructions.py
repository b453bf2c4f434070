"""Pair constructions over one search's output (sphere/generate/constructions.py, issue 33): each tested on
hand-built trees for what it must produce, and ``sphere`` (the paper's) against the pairs the generator wrote
before constructions existed."""

from __future__ import annotations

import json

import pytest

from sphere.generate.constructions import (
    Construction,
    PairContext,
    best_worst_pair,
    build_pairs,
    first_wrong_step_pairs,
    siblings_pairs,
)
from sphere.io import read_jsonl_tolerant

D = "\n\n"


def _ctx(conversational: bool = False) -> PairContext:
    if conversational:
        return PairContext(delim=D, pair_prompt=lambda p, _a: [{"role": "user", "content": p["problem"]}],
                           conversational=True, response_prefix="<think>\n", policy_name="pol", config_hash="h")
    return PairContext(delim=D, pair_prompt=lambda p, _a: f"Problem: {p['problem']}\nSolution:\n",
                       conversational=False, response_prefix="", policy_name="pol", config_hash="h")


def _t(steps, scores, correct, finish="answer"):
    return {"steps": list(steps), "correct": correct, "value": scores[-1], "rewards": list(scores),
            "scores": list(scores), "finish": finish}


P = {"id": "p1", "problem": "Add: 1, 2, 3", "answer": "6"}
HEAD = "Problem: Add: 1, 2, 3\nSolution:\n"


def _rec(*terminals):
    return {"problem_id": "p1", "stage": 1, "route": "x", "answer": "6", "sol_max": None, "sol_min": None,
            "terminals": list(terminals), "pairs": []}


# ----------------------------------------------------------------------------------- first_wrong_step
def test_first_wrong_step_cuts_at_the_first_step_scored_wrong():
    right = _t(["a", "b", "c", "ans 6"], [0.9, 0.9, 0.9, 0.9], True)
    # parts from the right chain at step 2, which the scorer labels wrong; step 3 is wrong too (not the cut)
    wrong = _t(["a", "b", "c'", "ans 7"], [0.9, 0.9, 0.1, 0.2], False)
    [pair] = first_wrong_step_pairs(_rec(right, wrong), P, Construction(name="first_wrong_step"), _ctx())
    assert pair["first_wrong_step"] == 2 and pair["cut_step"] == 2
    assert pair["prompt"] == HEAD + "a" + D + "b" + D  # problem + the shared correct prefix
    assert pair["chosen"] == "c" + D + "ans 6" and pair["rejected"] == "c'" + D + "ans 7"  # the remainders
    assert pair["chosen_correct"] and not pair["rejected_correct"]
    [step] = first_wrong_step_pairs(_rec(right, wrong), P, Construction(name="first_wrong_step", cut="step"),
                                    _ctx())
    assert (step["prompt"], step["chosen"], step["rejected"]) == (HEAD + "a" + D + "b" + D, "c", "c'")


def test_first_wrong_step_without_a_flagged_step_is_the_last_one():
    right = _t(["a", "b", "ans 6"], [0.9, 0.9, 0.9], True)
    wrong = _t(["a", "b", "ans 7"], [0.9, 0.9, 0.8], False)  # the scores flag nothing; the answer is wrong
    [pair] = first_wrong_step_pairs(_rec(right, wrong), P, Construction(name="first_wrong_step", cut="step"),
                                    _ctx())
    assert pair["first_wrong_step"] == 2 and (pair["chosen"], pair["rejected"]) == ("ans 6", "ans 7")


def test_first_wrong_step_parting_before_the_error():
    right = _t(["a", "b", "ans 6"], [0.9, 0.9, 0.9], True)
    wrong = _t(["a", "x", "y", "ans 7"], [0.9, 0.8, 0.1, 0.1], False)  # parts at 1, first wrong step 2
    [rem] = first_wrong_step_pairs(_rec(right, wrong), P, Construction(name="first_wrong_step"), _ctx())
    assert (rem["cut_step"], rem["first_wrong_step"]) == (1, 2)
    assert rem["prompt"] == HEAD + "a" + D and rem["rejected"] == "x" + D + "y" + D + "ans 7"
    # a single-step pair needs the chains to part exactly at the first wrong step
    assert first_wrong_step_pairs(_rec(right, wrong), P, Construction(name="first_wrong_step", cut="step"),
                                  _ctx()) == []


def test_first_wrong_step_prefers_the_longest_shared_prefix_and_a_clean_chosen():
    near = _t(["a", "b", "c", "ans 6"], [0.9, 0.9, 0.9, 0.9], True)
    far = _t(["a", "z", "ans 6"], [0.9, 0.9, 0.9], True)
    dirty = _t(["a", "b", "q", "ans 6"], [0.9, 0.9, 0.2, 0.9], True)  # right answer through a flagged step
    wrong = _t(["a", "b", "c", "w", "ans 7"], [0.9, 0.9, 0.9, 0.1, 0.1], False)
    [pair] = first_wrong_step_pairs(_rec(far, dirty, near, wrong), P, Construction(name="first_wrong_step"),
                                    _ctx())
    assert pair["cut_step"] == 3 and pair["chosen"] == "ans 6" and pair["rejected"] == "w" + D + "ans 7"
    # the flagged chosen alone would not do
    assert first_wrong_step_pairs(_rec(dirty, _t(["a", "b", "q", "w"], [0.9, 0.9, 0.2, 0.1], False)), P,
                                  Construction(name="first_wrong_step"), _ctx()) == []


def test_first_wrong_step_conversational_prefix_starts_both_completions():
    right = _t(["a", "ans 6"], [0.9, 0.9], True)
    wrong = _t(["a", "ans 7"], [0.9, 0.1], False)
    [pair] = first_wrong_step_pairs(_rec(right, wrong), P, Construction(name="first_wrong_step"),
                                    _ctx(conversational=True))
    assert pair["prompt"] == [{"role": "user", "content": "Add: 1, 2, 3"}]
    assert pair["chosen"] == [{"role": "assistant", "content": "<think>\na" + D + "ans 6"}]
    assert pair["rejected"] == [{"role": "assistant", "content": "<think>\na" + D + "ans 7"}]


# ------------------------------------------------------------------------------------------ siblings
def _sibling_tree():
    # node "a": children s1 (0.9, a right chain below), s2 (0.75, wrong below), s3 (0.3, wrong below)
    return _rec(_t(["a", "s1", "ans 6"], [0.9, 0.9, 0.95], True),
                _t(["a", "s2", "ans 7"], [0.9, 0.75, 0.4], False),
                _t(["a", "s3", "ans 8"], [0.9, 0.3, 0.2], False))


def test_siblings_pair_the_best_right_and_worst_wrong_step_above_the_margin():
    [pair] = siblings_pairs(_sibling_tree(), P, Construction(name="siblings", margin=0.2, cut="step"), _ctx())
    assert pair["prompt"] == HEAD + "a" + D
    assert (pair["chosen"], pair["rejected"]) == ("s1", "s3")
    assert pair["margin"] == pytest.approx(0.6)
    [rem] = siblings_pairs(_sibling_tree(), P, Construction(name="siblings", margin=0.2), _ctx())
    assert (rem["chosen"], rem["rejected"]) == ("s1" + D + "ans 6", "s3" + D + "ans 8")


def test_siblings_only_above_the_margin():
    c = Construction(name="siblings", cut="step")
    assert len(siblings_pairs(_sibling_tree(), P, Construction(**{**c.__dict__, "margin": 0.6}), _ctx())) == 1
    assert siblings_pairs(_sibling_tree(), P, Construction(**{**c.__dict__, "margin": 0.61}), _ctx()) == []
    # a pair of siblings 0.05 apart is never a pair at margin 0.1
    near = _rec(_t(["a", "s1", "ans 6"], [0.9, 0.8, 0.9], True), _t(["a", "s2", "ans 7"], [0.9, 0.75, 0.4], False))
    assert siblings_pairs(near, P, Construction(**{**c.__dict__, "margin": 0.1}), _ctx()) == []
    assert len(siblings_pairs(near, P, Construction(**{**c.__dict__, "margin": 0.0}), _ctx())) == 1


def test_siblings_every_node_with_max_per_problem_zero():
    rec = _rec(_t(["a", "s1", "ans 6"], [0.9, 0.9, 0.95], True),
               _t(["a", "s3", "ans 8"], [0.9, 0.3, 0.2], False),
               _t(["b", "ans 6"], [0.9, 0.9], True),
               _t(["c", "ans 9"], [0.1, 0.1], False))
    pairs = siblings_pairs(rec, P, Construction(name="siblings", cut="step", max_per_problem=0), _ctx())
    assert {(p["prompt"], p["chosen"], p["rejected"]) for p in pairs} == {
        (HEAD + "a" + D, "s1", "s3"), (HEAD, "b", "c")}
    assert pairs[0]["margin"] >= pairs[1]["margin"]  # widest gap first
    assert len(siblings_pairs(rec, P, Construction(name="siblings", cut="step"), _ctx())) == 1


# ----------------------------------------------------------------- no pair from two right or two wrong
@pytest.mark.parametrize("correct", [True, False])
def test_no_pair_from_two_right_or_two_wrong_chains(correct):
    rec = _rec(_t(["a", "s1", "ans"], [0.9, 0.95, 0.9], correct), _t(["a", "s2", "ans"], [0.9, 0.05, 0.1], correct),
               _t(["b", "ans"], [0.1, 0.1], correct))
    for name in ("first_wrong_step", "siblings"):
        for cut in ("step", "remainder"):
            c = Construction(name=name, cut=cut, margin=0.0, max_per_problem=0)
            assert build_pairs(c, {1: [rec]}, {"p1": P}, _ctx()) == [], (name, cut)
    sample = {"id": "p1", "completions": ["x" + D + "ans 6", "y" + D + "ans 6"], "verdicts": [correct, correct],
              "scores": [[0.9, 0.9], [0.1, 0.1]]}
    assert best_worst_pair(sample, P, _ctx()) == []


def test_a_right_chain_under_a_sibling_is_not_a_rejected_one():
    # s2's subtree holds a right chain and a wrong one: s2 is neither rejected (not only wrong below) ...
    rec = _rec(_t(["a", "s1", "ans 6"], [0.9, 0.9, 0.9], True), _t(["a", "s2", "x", "ans 6"], [0.9, 0.2, 0.9, 0.9], True),
               _t(["a", "s2", "y", "ans 7"], [0.9, 0.2, 0.1, 0.1], False))
    pairs = siblings_pairs(rec, P, Construction(name="siblings", cut="step", max_per_problem=0), _ctx())
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [(HEAD + "a" + D + "s2" + D, "x", "y")]


def test_best_worst_of_n_pairs_the_best_right_over_the_worst_wrong():
    sample = {"id": "p1", "completions": ["r1" + D + "ans 6", "r2" + D + "ans 6", "w1" + D + "ans 7", "w2" + D + "ans 8"],
              "verdicts": [True, True, False, False],
              "scores": [[0.9, 0.6], [0.9, 0.8], [0.5, 0.5], [0.5, 0.2]]}
    [pair] = best_worst_pair(sample, P, _ctx())
    assert (pair["chosen"], pair["rejected"]) == ("r2" + D + "ans 6", "w2" + D + "ans 8")
    assert pair["prompt"] == HEAD and pair["construction"] == "best_worst_of_n"


# ------------------------------------------------------------------------------ over a real search
def test_sphere_construction_writes_the_pairs_the_stage_logs_carry(tmp_path):
    """`construction=sphere` (the default) writes exactly the pairs.jsonl the generator wrote before
    constructions existed: the stage records' pairs, stage by stage, filtered, one JSON line each."""
    from test_generate import FakeStepBackend, _cfg, _generate

    from sphere.generate.pairs import PairFilter, filter_pairs
    from sphere.generate.records import read_stage_logs

    cfg = _cfg()
    _generate(tmp_path, cfg, FakeStepBackend(None), small=FakeStepBackend(0.3))
    recs = read_stage_logs(tmp_path)
    before = [pr for s in (1, 2, 3) for r in recs[s].values() for pr in r["pairs"]]
    kept, _ = filter_pairs(before, PairFilter.from_cfg(cfg.filters))
    want = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in kept)
    assert len(kept) > 3 and {p["stage"] for p in kept} == {1, 2, 3}
    assert (tmp_path / "pairs.jsonl").read_text() == want


@pytest.mark.parametrize("name", ["first_wrong_step", "siblings"])
def test_constructions_over_one_search(tmp_path, name):
    """One search, then another construction over its stage logs (construction.search_from): no new search,
    every pair right over wrong, its prompt the problem and a prefix of a searched chain."""
    from test_generate import FakeStepBackend, _cfg, _generate

    src = tmp_path / "src"
    _generate(src, _cfg(), FakeStepBackend(0.6), small=FakeStepBackend(0.3))
    be = FakeStepBackend(0.6)
    stats = _generate(tmp_path / name, _cfg(**{"construction.name": name, "construction.search_from": str(src),
                                               "construction.max_per_problem": 0}), be)
    assert be.calls == 0  # the search was not run again
    assert stats["construction"] == name
    pairs = read_jsonl_tolerant(tmp_path / name / "pairs.jsonl")
    assert pairs and all(p["construction"] == name for p in pairs)
    chains = {D.join(t["steps"]) for r in read_jsonl_tolerant(src / "stages" / "stage1.jsonl")
              for t in r["terminals"]}
    for p in pairs:
        assert p["chosen_correct"] and not p["rejected_correct"]
        head, prefix = p["prompt"].split("Solution:\n", 1)
        assert prefix + p["chosen"] in chains and prefix + p["rejected"] in chains


def test_search_from_another_configuration_is_refused(tmp_path):
    from test_generate import FakeStepBackend, _cfg, _generate

    src = tmp_path / "src"
    _generate(src, _cfg(), FakeStepBackend(0.6))
    with pytest.raises(ValueError, match="construction.search_from=.*another configuration"):
        _generate(tmp_path / "b", _cfg(**{"construction.name": "siblings", "construction.search_from": str(src),
                                          "seed": 5}), FakeStepBackend(0.6))


def test_search_from_another_policy_is_refused(tmp_path):
    """A `sphere run` round records its generate signature (the policy's weights included): a later round's
    policy, or another model, never reuses that search; the same policy does."""
    from test_generate import FakeStepBackend, _cfg, _generate

    from sphere.generate.generator import Generator
    from sphere.rewards.symbolic import SymbolicStepScorer
    from sphere.rundir import check_generate
    from sphere.verify import check_answers

    src = tmp_path / "src"
    _generate(src, _cfg(), FakeStepBackend(0.6))
    check_generate(_cfg(), src, "round0-policy", "fake-small")
    cfg = _cfg(**{"construction.name": "siblings", "construction.search_from": str(src)})
    with pytest.raises(ValueError, match="search_from=.*other settings.*round0-policy"):
        Generator(cfg, tmp_path / "b", policy_name="round1-policy", small_name="fake-small").run(
            [], FakeStepBackend(0.6), SymbolicStepScorer(), check_answers)
    Generator(cfg, tmp_path / "c", policy_name="round0-policy", small_name="fake-small").run(
        [], FakeStepBackend(0.6), SymbolicStepScorer(), check_answers)
    assert (tmp_path / "c" / "stages" / "stage1.jsonl").read_text() == (src / "stages" / "stage1.jsonl").read_text()


@pytest.mark.parametrize("bad,msg", [
    ({"name": "step_dpo"}, r"construction.name='step_dpo': allowed sphere \| first_wrong_step"),
    ({"name": "siblings", "cut": "half"}, "construction.cut='half': allowed step | remainder"),
    ({"name": "siblings", "margin": -1}, "construction.margin=-1: allowed >= 0"),
    ({"name": "siblings", "margins": 1}, r"unknown key\(s\) \['margins'\]"),
    ({"name": "best_worst_of_n", "samples": 1}, "construction.samples=1: allowed an integer >= 2"),
])
def test_bad_construction_settings_name_the_key(bad, msg):
    with pytest.raises(ValueError, match=msg):
        Construction.from_cfg(bad)


def test_unknown_construction_on_the_command_line_is_one_line(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "sphere.cli", "generate", "construction=step_dpo",
                        f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert lines == ["sphere: construction=step_dpo: no such pair construction; allowed: best_worst_of_n | "
                     "first_wrong_step | siblings | sphere (conf/construction/)"]
