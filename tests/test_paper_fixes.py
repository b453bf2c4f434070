"""Issue #16, "what the code reading found": context overflow ends a chain instead of the run; stage 2/3
solutions are picked by the searches' own extremes and the step scorer, never by node order; the reflection
prompt does not leak the label; chosen texts that refer to an unseen attempt are filtered.

Driven by the named test double of tests/test_generate.py (FakeStepBackend), with the real symbolic scorer
and the real checker.
"""

from __future__ import annotations

import pytest
from test_generate import FakeStepBackend, _cfg, _problems, _prompt_fn

from sphere.backends.base import ContextOverflowError, check_context
from sphere.generate.generator import Generator
from sphere.generate.pairs import has_final_answer, mentions_attempt, pick_solution, prm_rank
from sphere.io import read_jsonl_tolerant
from sphere.search.driver import SearchDriver
from sphere.search.types import SearchJob, Trajectory


class WindowedFakeBackend(FakeStepBackend):
    """FakeStepBackend with a context window, enforced as the real backends do (ContextOverflowError)."""

    def __init__(self, max_model_len: int, **kw):
        super().__init__(**kw)
        self.max_model_len = max_model_len

    def next_steps(self, prompts, params):
        check_context(prompts, params.max_tokens, self.max_model_len, "WindowedFakeBackend")
        return super().next_steps(prompts, params)


class WordyBackend(FakeStepBackend):
    """FakeStepBackend whose steps come in several wordings, so correct solutions differ in text."""

    def next_steps(self, prompts, params):
        import random

        out = super().next_steps(prompts, params)
        for i, cl in enumerate(out):
            for j, c in enumerate(cl):
                pre = random.Random(f"{i}|{j}|{c.text}|{len(self.batch_sizes)}").choice(["", "So ", "Next, "])
                c.text = pre + c.text
        return out


class LengthPenaltyScorer:
    """Scorer double: the symbolic scores minus 0.01 per character of the step, so wordings rank apart."""

    def __init__(self, inner):
        self.inner = inner

    def score(self, items):
        return [[s - 0.01 * len(st) for s, st in zip(row, steps)]
                for row, (_, steps) in zip(self.inner.score(items), items)]


# ---------------------------------------------------------------------------------- 1. context overflow
@pytest.mark.parametrize("mode", ["paper", "mcts"])
def test_context_overflow_ends_the_chain_not_the_run(mode, scorer, verifier):
    cfg = _cfg()
    cfg.search.mode = mode
    probs = _problems(10)
    be = WindowedFakeBackend(max_model_len=0)
    # a window that admits the problem prompt and about one step, never a whole solution
    header = len(_prompt_fn(be.tokenizer, probs[0])([]))
    be.max_model_len = header + 24
    d = SearchDriver(be, scorer, verifier, cfg.search)
    results = []
    d.run([SearchJob(p["id"], p, _prompt_fn(be.tokenizer, p)) for p in probs], results.append)
    assert sorted(r.job.job_id for r in results) == sorted(p["id"] for p in probs)  # every problem finished
    assert d.stats.context_ends > 0
    ended = [t for r in results for t in r.terminals if t.finish == "length"]
    assert ended, "some chains must end at the window"
    for t in ended:
        assert all(s for s in t.steps)  # the window end adds no (empty) step to the solution
        assert t.steps and "boxed" not in t.steps[-1]  # graded as it is, mid-solution


def test_context_overflow_in_generate_records_every_problem(tmp_path, scorer, verifier):
    cfg = _cfg()
    probs = _problems(8)
    be = WindowedFakeBackend(max_model_len=0, p_right=None)
    be.max_model_len = len(_prompt_fn(be.tokenizer, probs[0])([])) + 24
    g = Generator(cfg, tmp_path)
    stats = g.run(probs, be, scorer, verifier)
    recs = read_jsonl_tolerant(tmp_path / "stages" / "stage1.jsonl")
    assert sorted(r["problem_id"] for r in recs) == sorted(p["id"] for p in probs)
    assert stats["search"]["policy"]["context_ends"] > 0


def test_backends_still_refuse_an_overflowing_prompt_directly():
    with pytest.raises(ContextOverflowError):
        check_context([[1] * 10], 4, 10, "x")


# ---------------------------------------------------------------------------------- 3. picking by PRM
def _t(correct, value, scores, last="step"):
    steps = [f"s{i}" for i in range(len(scores) - 1)] + [last]
    return Trajectory(steps, correct, value, list(scores), list(scores), "answer")


def test_pick_solution_prefers_the_search_extreme_then_prm_rank_not_node_order():
    a = _t(True, 1.0, [0.2, 0.3], "\\boxed{1}")  # first by node id, weakest by the PRM
    b = _t(True, 1.0, [0.9, 0.95], "\\boxed{1}")
    c = _t(False, 0.0, [0.99, 0.99], "\\boxed{2}")
    assert pick_solution(None, [a, b, c], lambda t: t.correct) is b  # max(value) would give a
    assert pick_solution(a, [a, b, c], lambda t: t.correct) is a  # the search's own Sol_max when it qualifies
    assert pick_solution(c, [a, b, c], lambda t: t.correct) is b
    assert pick_solution(None, [c], lambda t: t.correct) is None
    assert prm_rank(b) > prm_rank(a)


def test_stage3_rejected_needs_a_final_answer():
    no_ans = _t(False, 0.0, [0.99, 0.99], "so the total is")
    with_ans = _t(False, 0.0, [0.5, 0.6], "\\boxed{7}")
    assert not has_final_answer(no_ans) and has_final_answer(with_ans)
    ok = lambda t: not t.correct and has_final_answer(t)  # noqa: E731
    assert pick_solution(no_ans, [no_ans, with_ans], ok) is with_ans


def test_stage2_chosen_is_the_best_correct_solution_by_the_scorer(tmp_path, scorer, verifier):
    """MCTS with outcome=replace: every terminal's value is 1/0, so max(value) returns the first correct
    terminal by node id. The stage-2 chosen must be the correction search's Sol_max when correct, else the
    correct terminal the step scorer ranks highest."""
    cfg = _cfg(**{"search.mode": "mcts", "search.simulations": 16, "search.outcome": "replace"})
    probs = _problems(40, seed=3)
    Generator(cfg, tmp_path).run(probs, WordyBackend(p_right=None), LengthPenaltyScorer(scorer), verifier)
    recs2 = read_jsonl_tolerant(tmp_path / "stages" / "stage2.jsonl")
    seen = 0
    for rec in recs2:
        for pr in rec["pairs"]:
            chosen = pr["chosen"] if isinstance(pr["chosen"], str) else pr["chosen"][0]["content"]
            correct = [t for t in rec["terminals"] if t["correct"]]
            sm = rec["sol_max"]
            if sm and sm["correct"]:
                want = sm
            else:
                want = max(correct, key=lambda t: (t["scores"][-1], min(t["scores"])))
            assert chosen == "\n\n".join(want["steps"])
            seen += 1
    assert seen > 0, "the fixture must produce stage-2 pairs"


# ---------------------------------------------------------------------------------- 4. the label leak
@pytest.mark.parametrize("family", ["qwen2_5", "qwen2_5_math", "phi4", "deepseek_r1"])
def test_reflection_prompt_is_neutral(family):
    from sphere.prompts import load_family

    text = load_family(family)["reflection"].lower()
    for leak in ("contains a mistake", "incorrect step", "is wrong.", "has an error", "has a mistake"):
        assert leak not in text, (family, leak)
    assert "{attempt}" in text and "review" in text


@pytest.mark.parametrize("text,refers", [
    ("The attempt made an error in step 2. 3 + 4 = 7.", True),
    ("Looking at the previous solution, the sum is wrong.", True),
    ("The first incorrect step is the second one.", True),
    ("Here is the corrected solution: 3 + 4 = 7.", True),
    ("First, 3 + 4 = 7.\n\nThe answer is \\boxed{7}.", False),
    ("We attempt to factor the polynomial.", False),
])
def test_mentions_attempt(text, refers):
    assert mentions_attempt(text) is refers


def test_paper_config_states_the_stage2_pairing_choice():
    from pathlib import Path

    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf"
    exp = OmegaConf.load(conf / "experiment" / "paper_qwen2_5_7b.yaml")
    assert exp.stages.stage2_prompt_with_attempt is False
    from sphere.schema import FiltersSettings  # the filters' defaults (conf/generate.yaml composes over them)

    gen = FiltersSettings()
    assert gen.stage2_drop_attempt_refs is True and gen.stage3_rejected_needs_answer is True


class ThinkingFakeBackend(FakeStepBackend):
    """Test double in the R1 format: the additions, then 'The answer is \\boxed{s}.\\n</think>' (a step: it
    ends at the delimiter), then the answer again after the thinking block (it ends at EOS). With
    ``eos_inside=True`` the boxed step inside the block ends at EOS instead (the model stopped there)."""

    def __init__(self, eos_inside: bool = False, **kw):
        super().__init__(p_right=1.0, **kw)
        self.eos_inside = eos_inside

    def next_steps(self, prompts, params):
        from sphere.backends.base import Candidate

        out = []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            body = text.split("Solution:\n", 1)[1]
            steps = [s for s in body.split("\n\n") if s.strip()]
            nums = [int(x) for x in text.split("Add: ", 1)[1].split("\n", 1)[0].split(",")]
            if len(steps) < len(nums) - 1:
                total = sum(nums[: len(steps) + 1])
                t, fin, stop = f"{total} + {nums[len(steps) + 1]} = {total + nums[len(steps) + 1]}", "step", True
            elif not any("</think>" in s for s in steps):
                t, fin, stop = f"The answer is \\boxed{{{sum(nums)}}}.\n</think>", "answer", not self.eos_inside
            else:
                t, fin, stop = f"The answer is \\boxed{{{sum(nums)}}}.", "answer", False
            out.append([Candidate(t, [ord(c) for c in t], -1.0, -0.1, fin, stop_hit=stop)
                        for _ in range(params.n)])
        return out


@pytest.mark.parametrize("answer_after,eos_inside,extra", [("</think>", False, 1), ("", False, 0),
                                                           ("</think>", True, 0)])
def test_boxed_answer_inside_the_thinking_block_does_not_end_the_solution(scorer, verifier, answer_after,
                                                                         eos_inside, extra):
    """R1 distills think first: a boxed answer inside <think> ends nothing (answer_after: "</think>"), the
    answer after the block does. Before, the chain ended at the first boxed step, so every R1 solution the
    search produced stopped at '</think>' and DPO taught the policy to end there."""
    cfg = _cfg()
    be = ThinkingFakeBackend(eos_inside=eos_inside)
    d = SearchDriver(be, scorer, verifier, cfg.search, answer_after=answer_after)
    probs = _problems(6)
    results = []
    d.run([SearchJob(p["id"], p, _prompt_fn(be.tokenizer, p)) for p in probs], results.append)
    assert len(results) == 6
    for r in results:
        nums = r.job.problem["problem"].count(",") + 1
        assert len(r.sol_max.steps) == nums + extra, r.sol_max.steps
        assert r.sol_max.correct and r.sol_max.finish == "answer"
        assert r.sol_max.steps[-1].endswith("</think>") == (extra == 0)
