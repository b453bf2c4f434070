"""Issue "The paper's path at the paper's lengths": chains longer than the step scorer's window end that chain,
not the generation (item 1); a chain cut at the depth limit or a window is wrong, never chosen (item 4); a
search that reaches no terminal at all is recorded and counted, not routed to self-correction without an
attempt (item 9). Every search mode x stage runs with budgets too small to finish a chain.

Driven by the named test doubles of tests/test_generate.py (FakeStepBackend) and ``WindowedScorer`` below,
with the real symbolic scorer and the real checker; the real PRM's ``fits`` on the stand-in PRM at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_generate import FakeStepBackend, _cfg, _problems, _prompt_fn

from sphere.generate.generator import Generator
from sphere.io import read_jsonl_tolerant
from sphere.search.driver import SearchDriver
from sphere.search.types import SearchJob

ROOT = Path(__file__).resolve().parents[1]


class WindowedScorer:
    """Scorer double with a window, as a PRM has: an item fits while its steps hold at most ``window``
    characters; ``score`` on an item over the window raises (as PRMScorer does)."""

    def __init__(self, inner, window: int):
        self.inner, self.window = inner, window
        self.asked = 0

    def _len(self, item):
        return sum(len(s) for s in item[1])

    def fits(self, items):
        self.asked += len(items)
        return [self._len(x) <= self.window for x in items]

    def score(self, items):
        for x in items:
            if self._len(x) > self.window:
                raise ValueError(f"WindowedScorer: item of {self._len(x)} characters > window {self.window}")
        return self.inner.score(items)


def _short_problems(n: int) -> list[dict]:
    """'Add:' problems of 2 numbers (one addition and an answer step), ids s0, s1, ..."""
    return [{**p, "id": f"s{i}"} for i, p in enumerate(
        [p for p in _problems(8 * n, seed=5) if p["problem"].count(",") == 1][:n])]


def _long_problems(n: int) -> list[dict]:
    """'Add:' problems of 4 numbers (3 additions and an answer step: ~50 characters of steps)."""
    return [p for p in _problems(4 * n, seed=11) if p["problem"].count(",") == 3][:n]


# ---------------------------------------------------------------------------- 1. the scorer's window
@pytest.mark.parametrize("mode", ["paper", "mcts"])
def test_a_chain_over_the_scorer_window_ends_the_chain_not_the_generation(tmp_path, mode, scorer, verifier):
    cfg = _cfg(**{"search.mode": mode, "search.simulations": 24})
    probs = _long_problems(10)
    ws = WindowedScorer(scorer, window=25)  # room for about two steps, never a whole solution
    stats = Generator(cfg, tmp_path).run(probs, FakeStepBackend(p_right=0.7), ws, verifier,
                                         small_backend_factory=lambda: FakeStepBackend(p_right=0.3))
    recs = read_jsonl_tolerant(tmp_path / "stages" / "stage1.jsonl")
    assert sorted(r["problem_id"] for r in recs) == sorted(p["id"] for p in probs)  # every problem recorded
    ends = stats["chain_ends"]
    assert stats["window_ends"] > 0 and ends["window"] > 0 and ends["share"]["window"] > 0, ends
    assert ends["terminals"] == sum(ends[f] for f in ("answer", "eos", "depth", "length", "window"))
    cut = [t for s in (1, 2, 3) for r in read_jsonl_tolerant(tmp_path / "stages" / f"stage{s}.jsonl")
           for t in r["terminals"] if t["finish"] == "window"]
    assert cut and all(not t["correct"] for t in cut)
    assert all(all(st for st in t["steps"]) for t in cut)  # the unscorable step is not part of the chain
    assert all(sum(len(st) for st in t["steps"]) <= 25 for t in cut)
    assert json.loads((tmp_path / "generate_stats.json").read_text())["chain_ends"] == ends


def test_the_scorer_is_asked_before_it_scores(scorer, verifier):
    cfg = _cfg()
    ws = WindowedScorer(scorer, window=25)
    d = SearchDriver(FakeStepBackend(), ws, verifier, cfg.search)
    probs = _long_problems(4)
    out = []
    d.run([SearchJob(p["id"], p, _prompt_fn(d.backend.tokenizer, p)) for p in probs], out.append)
    assert len(out) == 4 and ws.asked > 0 and d.stats.window_ends > 0


def test_scorer_without_a_window_is_not_asked(scorer, verifier):
    cfg = _cfg()
    d = SearchDriver(FakeStepBackend(), scorer, verifier, cfg.search)
    probs = _long_problems(4)
    out = []
    d.run([SearchJob(p["id"], p, _prompt_fn(d.backend.tokenizer, p)) for p in probs], out.append)
    assert d.stats.window_ends == 0 and all(r.sol_max.finish == "answer" for r in out)


# ---------------------------------------------------------------------------- 4. cut chains are wrong
@pytest.mark.parametrize("mode", ["paper", "mcts"])
def test_a_chain_cut_at_the_depth_limit_is_wrong_even_when_its_last_number_is_the_answer(mode, scorer,
                                                                                         verifier):
    """4 numbers need 3 additions and an answer step; at max_depth 3 every chain is cut after the last
    addition, whose result is the gold answer. The checker's fallback (the last number) would call it right;
    the search must not."""
    cfg = _cfg(**{"search.mode": mode, "search.max_depth": 3, "search.simulations": 12})
    probs = _long_problems(6)
    d = SearchDriver(FakeStepBackend(p_right=1.0), scorer, verifier, cfg.search)
    out = []
    d.run([SearchJob(p["id"], p, _prompt_fn(d.backend.tokenizer, p)) for p in probs], out.append)
    cut = [(t, r.job.problem["answer"]) for r in out for t in r.terminals if t.finish == "depth"]
    assert cut, "the budget must cut chains"
    # the guard can fail: graded as before, these cut chains would count as right
    assert any(verifier([("\n\n".join(t.steps), gold)])[0] for t, gold in cut)
    assert all(not t.correct for t, _ in cut)
    assert all(r.sol_max is None or not r.sol_max.correct for r in out)


def test_no_pair_chooses_a_cut_chain(tmp_path, scorer, verifier):
    cfg = _cfg(**{"search.max_depth": 3})
    probs = _long_problems(8) + _short_problems(4)
    Generator(cfg, tmp_path).run(probs, FakeStepBackend(p_right=0.7), scorer, verifier,
                                 small_backend_factory=lambda: FakeStepBackend(p_right=0.3))
    pairs = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines() if x.strip()]
    assert pairs, "the short problems finish and make pairs"
    for p in pairs:
        chosen = p["chosen"] if isinstance(p["chosen"], str) else p["chosen"][-1]["content"]
        assert "boxed" in chosen.rsplit("\n\n", 1)[-1], chosen
    stats = json.loads((tmp_path / "generate_stats.json").read_text())
    assert stats["chain_ends"]["depth"] > 0 and stats["chain_ends"]["share"]["depth"] > 0


# ---------------------------------------------------------------------------- 9. no terminal at all
@pytest.mark.parametrize("mode,over", [
    ("mcts", {"search.simulations": 2}),  # two expansions: no chain of 4 steps can finish
    ("mcts", {"search.simulations": 1, "search.max_depth": 2}),
    ("paper", {"search.max_depth": 1}),  # every chain cut at its first step: both wrong, stage 2 cut too
    ("paper", {"search.max_depth": 2}),
])
def test_every_mode_and_stage_with_budgets_too_small_to_finish_a_chain(tmp_path, mode, over, scorer, verifier):
    cfg = _cfg(**{"search.mode": mode, **over})
    probs = _long_problems(6) + _short_problems(3)
    stats = Generator(cfg, tmp_path).run(probs, FakeStepBackend(p_right=None), scorer, verifier,
                                         small_backend_factory=lambda: FakeStepBackend(p_right=0.3))
    recs = read_jsonl_tolerant(tmp_path / "stages" / "stage1.jsonl")
    assert sorted(r["problem_id"] for r in recs) == sorted(p["id"] for p in probs)
    routes = stats["routes"]
    assert sum(routes.values()) == len(probs)
    no_chain = [r for r in recs if r["route"] == "no_chain"]
    assert all(r["sol_max"] is None and r["sol_min"] is None and not r["pairs"] for r in no_chain)
    if mode == "mcts" and over["search.simulations"] == 1:
        assert routes.get("no_chain", 0) > 0, routes
    # stage-2 searches ran on an attempt every time
    for r in read_jsonl_tolerant(tmp_path / "stages" / "stage2.jsonl"):
        assert r["route"] in ("corrected", "uncorrected")


# ---------------------------------------------------------------------------- the real PRM's window
def test_prm_fits_on_the_standin_prm(tmp_path):
    from omegaconf import OmegaConf

    from sphere.rewards.prm import PRMScorer

    prm_dir = ROOT / "assets" / "standin" / "standin-qwen2_5-prm"
    cfg = OmegaConf.create({"scorer": {"engine": "transformers", "dtype": "float32", "device": "cpu",
                                       "max_length": 96}})
    s = PRMScorer(cfg, prm_dir)
    short = ("What is 1 + 2?", ["1 + 2 = 3", "The answer is \\boxed{3}."])
    long = ("What is 1 + 2?", ["1 + 2 = 3 " * 40, "The answer is \\boxed{3}."])
    assert s.fits([short, long]) == [True, False]
    with pytest.raises(ValueError, match="scorer.max_length"):
        s.score([long])
    assert len(s.score([short])[0]) == 2
    # fits() keeps the ids for the next score(): the scores equal a fresh scorer's
    s.fits([short])
    fresh = PRMScorer(cfg, prm_dir)
    assert s.score([short]) == fresh.score([short])


def test_prm_long_chains_recent_scores_the_newest_steps_that_fit():
    from omegaconf import OmegaConf

    from sphere.rewards.prm import PRMScorer

    prm_dir = ROOT / "assets" / "standin" / "standin-qwen2_5-prm"
    base = {"engine": "transformers", "dtype": "float32", "device": "cpu", "max_length": 96}
    end = PRMScorer(OmegaConf.create({"scorer": base}), prm_dir)
    recent = PRMScorer(OmegaConf.create({"scorer": {**base, "long_chains": "recent"}}), prm_dir)
    problem = "What is 1 + 2 + 3 + 4?"
    steps = [f"{i} + {i + 1} = {2 * i + 1} and so on" for i in range(1, 9)] + ["The answer is \\boxed{10}."]
    item = (problem, steps)
    assert end.fits([item]) == [False]
    assert recent.fits([item]) == [True]
    got = recent.score([item])[0]
    assert len(got) == len(steps)
    # the newest step's score is the PRM's on the problem and the newest steps that fit the window
    k = next(k for k in range(len(steps)) if len(recent.build_ids(problem, steps[k:])) <= 96)
    assert 0 < k < len(steps) - 1
    assert got[-1] == pytest.approx(end.score([(problem, steps[k:])])[0][-1], abs=1e-6)
    assert recent.stats()["items_truncated"] == 1
    # an item whose newest step alone cannot fit is not scorable even so
    assert recent.fits([(problem, ["x " * 400])]) == [False]
    with pytest.raises(ValueError, match="long_chains"):
        PRMScorer(OmegaConf.create({"scorer": {**base, "long_chains": "cut"}}), prm_dir)
