"""The decisions that decide which solution becomes "chosen", each pinned by a test that fails when the
decision is wrong (issue #30: every test here was checked by putting the named bug into the production code
once and watching the test go red).

1. a self-correcting solution is graded on its final stated answer (sphere/verify/extract.py);
2. the search stores shaped step rewards (search.reward), not raw scores (SearchDriver._shape);
3. ``stages.inverted: swap`` makes a swapped stage-1 pair, ``drop`` makes none (stage1_outcome);
4. stage 3 rejects the MOST plausible wrong solution (stage3_outcome, pick_solution(best=True));
5. MCTS Sol_max / Sol_min break outcome-replaced value ties by the step scorer's last score (value_rank);
6. the mean backup weights merged duplicates by their multiplicity (SearchDriver._expand_backup);
7. the summary's "95%" paired interval is a 95% interval (sphere.evaluation.paired.paired_changes ->
   paired_accuracy_change);
8. the stages' own pairs (before any filter) are chosen correct / rejected wrong.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from omegaconf import OmegaConf
from test_generate import FakeStepBackend, _cfg, _problems, _prompt_fn

from sphere.backends.base import Candidate
from sphere.generate.stages import StageContext, stage1_outcome, stage3_outcome
from sphere.io import read_jsonl_tolerant
from sphere.rewards.base import shape_rewards
from sphere.search.driver import SearchDriver
from sphere.search.policies import MCTS
from sphere.search.types import SearchJob, SearchResult, Trajectory

DELIM = "\n\n"


def _traj(steps, correct, *, value=0.0, scores=None, finish="answer"):
    scores = list(scores if scores is not None else [0.5] * len(steps))
    return Trajectory(list(steps), correct, value, shape_rewards(scores), scores, finish)


def _ctx(inverted: str = "swap") -> StageContext:
    return StageContext(delim=DELIM, inverted=inverted, stage2=True, stage3=True, plain_stage2_prompt=True,
                        drop_attempt_refs=True, rejected_needs_answer=True, policy_name="fake",
                        small_name="fake-small", config_hash="h", conversational=False, response_prefix="",
                        pair_prompt=lambda p, attempt: "Problem: " + p["problem"])


def _result(sol_max, sol_min, terminals=None) -> SearchResult:
    job = SearchJob("p0", {"id": "p0", "problem": "Add: 1, 2", "answer": "3"}, lambda steps: [])
    terms = terminals if terminals is not None else [t for t in (sol_max, sol_min) if t is not None]
    return SearchResult(job=job, sol_max=sol_max, sol_min=sol_min, terminals=terms, nodes=1, expansions=1)


# ------------------------------------------------------------------ 1. the final stated answer
@pytest.mark.parametrize("text", [
    "1 + 2 = 3, so the answer is 4. Checking again, 1 + 2 = 3, so the answer is 3.",
    "1 + 2 = 4, so the answer is \\boxed{4}. Checking again, 1 + 2 = 3: the answer is \\boxed{3}.",
    "1 + 2 = 4\n#### 4\nChecking again, 1 + 2 = 3\n#### 3",
    "Answer: 4. Wait, that is wrong. Answer: 3",
])
def test_self_correction_is_graded_on_its_final_answer(text, verifier):
    from sphere.verify import extract_answer

    assert extract_answer(text) == "3"
    assert verifier([(text, "3"), (text, "4")]) == [True, False]


# ------------------------------------------------------------------ 2. shaped rewards, not raw scores
@pytest.mark.parametrize("mode", ["advantage", "min"])
def test_search_stores_shaped_rewards(mode, scorer, verifier):
    cfg = _cfg(**{"search.reward": mode})
    be = FakeStepBackend(0.6)
    d = SearchDriver(be, scorer, verifier, cfg.search)
    res = []
    d.run([SearchJob(p["id"], p, _prompt_fn(be.tokenizer, p)) for p in _problems(8, seed=3)], res.append)
    checked = 0
    for r in res:
        for t in [r.sol_max, r.sol_min, *r.terminals]:
            assert t.rewards == pytest.approx(shape_rewards(t.scores, mode), abs=1e-6), (t.scores, t.rewards)
            checked += len(t.scores) > 1 and t.scores != shape_rewards(t.scores, mode)
    assert checked, "no path where shaping changes the scores: the test would not see raw scores"


def test_pairs_carry_shaped_rewards(tmp_path):
    from test_generate import _generate

    _generate(tmp_path, _cfg(), FakeStepBackend(None), small=FakeStepBackend(0.3), problems=_problems(10))
    pairs = [p for r in read_jsonl_tolerant(tmp_path / "stages" / "stage1.jsonl") for p in r["pairs"]]
    assert pairs
    for p in pairs:
        for side in ("chosen", "rejected"):
            scores = p[f"{side}_scores"]
            assert p[f"{side}_rewards"] == pytest.approx(shape_rewards(scores, "advantage"), abs=1e-6)
    assert any(p["chosen_scores"] != p["chosen_rewards"] for p in pairs)


# ------------------------------------------------------------------ 3. stages.inverted: swap | drop
def test_inverted_swap_pairs_sol_min_over_sol_max_and_drop_pairs_nothing():
    smax = _traj(["1 + 2 = 4", "The answer is \\boxed{4}."], False, value=0.0, scores=[0.2, 0.1])
    smin = _traj(["1 + 2 = 3", "The answer is \\boxed{3}."], True, value=1.0, scores=[0.9, 0.9])
    p = _result(smax, smin).job.problem
    rt, pairs, nxt = stage1_outcome(_result(smax, smin), p, _ctx("swap"))
    assert rt == "inverted" and nxt is None and len(pairs) == 1
    pr = pairs[0]
    assert pr["chosen"] == DELIM.join(smin.steps) and pr["rejected"] == DELIM.join(smax.steps)
    assert pr["chosen_correct"] and not pr["rejected_correct"] and pr["route"] == "inverted"
    rt, pairs, nxt = stage1_outcome(_result(smax, smin), p, _ctx("drop"))
    assert rt == "inverted" and pairs == [] and nxt is None


def test_stage1_pair_route_keeps_sol_max_chosen():
    smax = _traj(["1 + 2 = 3", "The answer is \\boxed{3}."], True, value=1.0)
    smin = _traj(["1 + 2 = 4", "The answer is \\boxed{4}."], False, value=0.0)
    for inv in ("swap", "drop"):
        rt, pairs, _ = stage1_outcome(_result(smax, smin), _result(smax, smin).job.problem, _ctx(inv))
        assert rt == "pair" and len(pairs) == 1
        assert pairs[0]["chosen"] == DELIM.join(smax.steps) and pairs[0]["rejected"] == DELIM.join(smin.steps)


# ------------------------------------------------------------------ 4. stage 3: the most plausible wrong
def test_stage3_rejects_the_most_plausible_wrong_solution():
    chosen = _traj(["1 + 2 = 3", "The answer is \\boxed{3}."], True, value=1.0)
    small_max = _traj(["1 + 2 = 3", "The answer is \\boxed{3}."], True, value=1.0, scores=[0.9, 0.9])
    low = _traj(["1 + 2 = 5", "The answer is \\boxed{5}."], False, scores=[0.3, 0.1])
    high = _traj(["1 + 2 = 4", "The answer is \\boxed{4}."], False, scores=[0.3, 0.8])
    mid = _traj(["1 + 2 = 6", "The answer is \\boxed{6}."], False, scores=[0.9, 0.4])
    no_answer = _traj(["1 + 2 = 7", "1 + 2 = 7"], False, scores=[0.99, 0.99], finish="depth")  # no \boxed
    for pool in ([low, high, mid, no_answer], [no_answer, mid, high, low]):  # not by position
        res = _result(small_max, None, [small_max, *pool])
        rt, pairs = stage3_outcome(res, res.job.problem, chosen, _ctx())
        assert rt == "contrast" and len(pairs) == 1
        assert pairs[0]["rejected"] == DELIM.join(high.steps), pairs[0]["rejected"]
        assert pairs[0]["chosen"] == DELIM.join(chosen.steps) and pairs[0]["rejected_model"] == "fake-small"


# ------------------------------------------------------------------ 5. MCTS extremes: ties by step score
def test_mcts_extremes_break_value_ties_by_last_step_score():
    # outcome: replace -> every terminal's value is 1 (right) or 0 (wrong); node order must not decide
    r_weak = _traj(["a"], True, value=1.0, scores=[0.2])
    r_strong = _traj(["b"], True, value=1.0, scores=[0.9])
    w_strong = _traj(["c"], False, value=0.0, scores=[0.8])
    w_weak = _traj(["d"], False, value=0.0, scores=[0.1])
    for terms in ([r_weak, r_strong, w_strong, w_weak], [w_strong, w_weak, r_weak, r_strong]):
        smax, smin = MCTS(None).extremes(None, terms)
        assert smax is r_strong and smin is w_weak


# ------------------------------------------------------------------ 6. the mean backup counts duplicates
class _DupBackend:
    """Test double: every prompt gets the same E=4 step candidates, three of them one text ("good"), one
    another ("bad"), so one expansion merges them into two children with multiplicities 3 and 1."""

    name = "dup"

    def __init__(self):
        self.tokenizer = FakeStepBackend().tokenizer

    def next_steps(self, prompts, params):
        def c(t):
            return Candidate(t, [ord(x) for x in t], -1.0, -0.5, "step", stop_hit=True)

        return [[c("good step"), c("bad step"), c("good step"), c("good step")][: params.n] for _ in prompts]

    def stats(self):
        return {}

    def close(self):
        pass


class _TextScorer:
    """Test double step scorer: 0.9 for a step that says "good", 0.1 otherwise."""

    def score(self, items):
        return [[0.9 if "good" in s else 0.1 for s in steps] for _, steps in items]


@pytest.mark.parametrize("engine", ["cpp", "py"])
def test_mean_backup_weights_merged_duplicates(engine):
    cfg = _cfg()
    cfg.search = OmegaConf.merge(cfg.search, {"mode": "mcts", "expansions": 4, "k": 1, "simulations": 1,
                                              "backup": "mean", "pruning": {"policy": "none"},
                                              "dedup_candidates": True})
    be = _DupBackend()
    d = SearchDriver(be, _TextScorer(), lambda pairs: [False] * len(pairs), cfg.search, engine_backend=engine)
    p = _problems(1)[0]
    res = []
    d.run([SearchJob(p["id"], p, _prompt_fn(be.tokenizer, p))], res.append)
    assert len(res) == 1 and res[0].expansions == 1 and d.stats.merged == 2
    root = np.asarray([0], dtype=np.int32)
    assert int(d.forest.visits(root)[0]) == 1
    # (3 * 0.9 + 1 * 0.1) / 4 = 0.7; the unweighted mean of the two children would be 0.5
    assert float(d.forest.value(root)[0]) == pytest.approx(0.7, abs=1e-6)


# ------------------------------------------------------------------ 7. the "95%" interval is at 95%
def test_summary_paired_interval_is_at_95_percent(tmp_path):
    from sphere.evaluation.paired import paired_changes

    # 400 problems: 80 gained, 40 lost, 280 unchanged -> delta 0.1, per-problem sd sqrt(0.3 - 0.01)
    n, gained, lost = 400, 80, 40
    before = [False] * gained + [True] * lost + [True] * 140 + [False] * 140
    after = [True] * gained + [False] * lost + [True] * 140 + [False] * 140
    for r, verdicts in ((0, before), (1, after)):
        d = tmp_path / f"round_{r}" / "eval"
        d.mkdir(parents=True)
        (d / "b.jsonl").write_text("".join(json.dumps({"id": f"q{i}", "verdicts": [v]}) + "\n"
                                           for i, v in enumerate(verdicts)))
    c = paired_changes(tmp_path, 1, ["b"])["b"]["vs_r0"]
    delta = (gained - lost) / n
    se = math.sqrt(((gained + lost) / n - delta**2) / n)
    assert c["delta"] == pytest.approx(delta) and c["level"] == pytest.approx(0.95)
    # normal approximation: half-widths 1.960 se (95%) = 0.0528 vs 1.645 se (90%) = 0.0443; the tolerance
    # (0.003: bootstrap noise and the 1/400 grid) is well under their 0.0085 difference
    for got, want in ((delta - c["ci_low"], 1.959964 * se), (c["ci_high"] - delta, 1.959964 * se)):
        assert got == pytest.approx(want, abs=0.003), (c, want)


# ------------------------------------------------------------------ 8. the stages' own pairs, unfiltered
def test_stage_records_pair_correct_over_wrong_before_filters(tmp_path, verifier):
    from test_generate import _generate

    cfg = _cfg(**{"stages.inverted": "swap"})
    probs = _problems(24)
    _generate(tmp_path, cfg, FakeStepBackend(None), small=FakeStepBackend(0.3), problems=probs)
    gold = {p["id"]: p["answer"] for p in probs}
    seen = set()
    for stage in (1, 2, 3):
        for rec in read_jsonl_tolerant(tmp_path / "stages" / f"stage{stage}.jsonl"):
            for pr in rec["pairs"]:
                seen.add(stage)
                assert pr["chosen_correct"] and not pr["rejected_correct"], (stage, pr)
                # graded again from the texts, not from the flags the stage copied
                assert verifier([(pr["chosen"], gold[pr["problem_id"]]),
                                 (pr["rejected"], gold[pr["problem_id"]])]) == [True, False], (stage, pr)
                if stage == 1:
                    chosen = rec["sol_max"] if rec["route"] == "pair" else rec["sol_min"]
                    assert pr["chosen"] == DELIM.join(chosen["steps"])
    assert seen == {1, 2, 3}
