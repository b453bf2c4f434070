"""`sphere bench pipeline` (issue #19): the two baseline loops run the same search as sphere's driver, and the
bench runs end to end and prints its documented JSON as the last line.

The baselines are checked against the driver with FakeStepBackend (tests/test_generate.py), whose samples
depend only on the prompt (not on the seed or the batch), so all three loops must reach the same Sol_max /
Sol_min on every problem. End to end: the mini world on transformers (quick) and on vLLM (slow, two engines).
"""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from test_generate import FakeStepBackend, _cfg, _problems, _prompt_fn

from sphere.bench.pipeline_loops import run_one_leaf, run_per_problem, run_sphere
from sphere.bench.pipeline_measure import CountingBackend, CountingScorer
from sphere.cli import DESCRIPTIONS, HYDRA_COMMANDS, conf_dir

PER_ARM_KEYS = {
    "problems",
    "wall_s",
    "wall_s_runs",
    "wall_s_spread",
    "cpu_s",
    "backend_s",
    "scorer_s",
    "backend_calls",
    "prompts",
    "prompts_per_call",
    "candidates",
    "prompt_tokens_sent",
    "prompt_tokens_prefilled",
    "prompt_tokens_computed",
    "generated_tokens",
    "scorer_calls",
    "scorer_items",
    "scorer_items_run",
    "scorer_tokens",
    "scorer_tokens_computed",
    "routes",
    "pairs",
    "per_pair",
    "per_problem",
    "prefix_caching",
}
PER_PAIR_KEYS = {
    "wall_s",
    "cpu_s",
    "backend_calls",
    "prompt_tokens_sent",
    "prompt_tokens_computed",
    "generated_tokens",
    "scorer_tokens",
    "scorer_tokens_computed",
}
TOP_KEYS = {
    "bench",
    "model",
    "backend",
    "scorer",
    "problems",
    "search",
    "machine",
    "arms",
    "per_pair",
    "pairs",
    "speedup_vs_per_problem",
    "speedup_vs_one_leaf",
    "waste",
}


def _scorer():
    from sphere.rewards.symbolic import SymbolicStepScorer

    return SymbolicStepScorer()


def _verifier(pairs):
    from sphere.verify import check_answers

    return check_answers(pairs)


def test_registered_with_a_description():
    assert HYDRA_COMMANDS[("bench", "pipeline")] == ("bench_pipeline", "sphere.bench.pipeline:main")
    assert DESCRIPTIONS[("bench", "pipeline")]


@pytest.mark.parametrize("dedup", [True, False])
def test_baselines_run_the_same_search_as_the_driver(dedup):
    """Deterministic samples per prompt: the per-problem and one-leaf loops find the driver's Sol_max and
    Sol_min on every problem; only the batching differs (calls, prompts per call, scorer calls)."""
    cfg = _cfg(**{"search.dedup_candidates": dedup})
    scfg = cfg.search
    probs = _problems(20, seed=1)
    out = {}
    for arm, fn in (("sphere", None), ("per_problem", run_per_problem), ("one_leaf", run_one_leaf)):
        be = CountingBackend(FakeStepBackend(None))
        sc = CountingScorer(_scorer())
        jobs = [_prompt_fn(be.tokenizer, p) for p in probs]
        if fn is None:
            recs, stats = run_sphere(probs, jobs, be, sc, _verifier, scfg, "\n\n", 0, "cpp")
        else:
            recs = fn(probs, jobs, be, sc, _verifier, scfg, "\n\n", 0)
        out[arm] = (recs, be, sc)
    ref = out["sphere"][0]
    assert set(ref) == {p["id"] for p in probs}
    assert {r[0] for r in ref.values()} >= {"pair", "both_right", "both_wrong"}  # every route is exercised
    for arm in ("per_problem", "one_leaf"):
        assert out[arm][0] == ref, arm
    s, pp, ol = (out[a][1] for a in ("sphere", "per_problem", "one_leaf"))
    assert pp.calls == pp.prompts  # one expansion per call
    assert ol.prompts <= ol.calls * int(
        scfg.batch_leaves
    )  # one leaf per live tree, at most batch_leaves trees
    assert s.prompts == pp.prompts == ol.prompts  # the same expansions, batched differently
    assert out["per_problem"][2].calls == out["per_problem"][2].items == pp.candidates  # scorer per candidate
    if dedup:
        assert out["sphere"][2].items < out["one_leaf"][2].items  # distinct steps only
    else:
        assert out["sphere"][2].items == out["one_leaf"][2].items


def _compose(overrides):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="bench_pipeline", overrides=overrides)


def _check_result(res: dict, out: str, arms: list[str]) -> None:
    last = out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(res))
    assert TOP_KEYS <= set(res), TOP_KEYS - set(res)
    assert list(res["arms"]) == arms
    for arm, r in res["arms"].items():
        assert PER_ARM_KEYS <= set(r), (arm, PER_ARM_KEYS - set(r))
        assert set(r["per_pair"]) == PER_PAIR_KEYS
        assert r["problems"] == res["problems"] and r["backend_calls"] > 0 and r["wall_s"] > 0
        assert r["generated_tokens"] > 0 and r["prompt_tokens_sent"] > 0 and r["scorer_tokens"] > 0
        assert r["pairs"] == r["routes"]["pair"] + r["routes"]["inverted"]
        if r["pairs"]:
            assert r["per_pair"]["wall_s"] == pytest.approx(r["wall_s"] / r["pairs"], abs=1e-3)  # both rounded
    pp, s = res["arms"]["per_problem"], res["arms"]["sphere"]
    assert pp["prompts_per_call"] == 1.0 and s["prompts_per_call"] > 1.0
    assert s["scorer_items_run"] < pp["scorer_items_run"]  # sphere scores each distinct step once
    assert res["machine"]["omp_num_threads"] == "1"


@pytest.mark.slow
def test_bench_pipeline_end_to_end_transformers(capsys):
    cfg = _compose(
        [
            "backend=transformers",
            "problems=4",
            "warmup_problems=1",
            "warmup_rounds=1",
            "search.max_depth=4",
            "search.max_step_tokens=32",
            "repeats=2",
        ]
    )
    from sphere.bench.pipeline import main

    res = main(cfg)
    _check_result(res, capsys.readouterr().out, ["sphere", "per_problem", "one_leaf"])
    assert len(res["arms"]["sphere"]["wall_s_runs"]) == 2
    assert res["arms"]["sphere"]["prompt_tokens_computed_source"].startswith("sent x n")


@pytest.mark.slow
@pytest.mark.vllm
def test_bench_pipeline_end_to_end_vllm(capsys):
    from conftest import require_vllm

    require_vllm()
    cfg = _compose(
        [
            "problems=6",
            "warmup_problems=1",
            "warmup_rounds=1",
            "search.max_depth=4",
            "search.max_step_tokens=32",
        ]
    )
    from sphere.bench.pipeline import main

    res = main(cfg)
    _check_result(res, capsys.readouterr().out, ["sphere", "per_problem", "one_leaf"])
    s, ol = res["arms"]["sphere"], res["arms"]["one_leaf"]
    assert s["prefix_caching"] is True and ol["prefix_caching"] is False
    assert s["prompt_tokens_computed_source"].startswith("vllm")
    assert (
        s["vllm_counters_consistent"] is True
        and res["arms"]["per_problem"]["vllm_counters_consistent"] is True
    )
    # prefix caching: sphere computes fewer prompt tokens than it prefills; the one-leaf loop computes all
    assert s["prompt_tokens_computed"] < s["prompt_tokens_prefilled"]
    assert ol["prompt_tokens_computed"] == ol["prompt_tokens_prefilled"]


# ------------------------------------------------------------------ `sphere bench generate`: apc measurement
class FakeVLLMEngine:
    """Stands in for VLLMBackend in the apc measurement: a sleep per call (longer without prefix caching)."""

    log: list[str] = []

    def __init__(self, model, enable_prefix_caching=True, **kw):
        from types import SimpleNamespace

        from test_generate import FakeTokenizer

        self.apc = bool(enable_prefix_caching)
        self.tokenizer = FakeTokenizer()
        self.llm = SimpleNamespace(reset_prefix_cache=lambda: self.log.append(f"reset:{self.apc}"))
        self.closed = False

    def next_steps(self, prompts, params):
        import time

        from sphere.backends.base import Candidate

        if len(prompts) > 1:  # the timed calls (the warm-up sends one prompt)
            self.log.append(f"run:{self.apc}")
            time.sleep(0.02 if self.apc else 0.05)
        return [[Candidate("1 + 1 = 2.", [1], -1.0, -1.0, "step")] * params.n for _ in prompts]

    def stats(self):
        return {"prefix_cache_hit_rate": 0.5, "prefix_cache_queries": 10.0}

    def close(self):
        self.closed = True


def test_bench_generate_apc_interleaves_trials_and_reports_the_median(monkeypatch):
    import sphere.backends.vllm_backend as vb
    from sphere.bench.generate import _run_vllm_apc
    from sphere.prompts import load_family

    FakeVLLMEngine.log = []
    monkeypatch.setattr(vb, "VLLMBackend", FakeVLLMEngine)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(
            config_name="bench_generate",
            overrides=["problems=2", "branches=2", "rounds=2", "shots=1", "apc_trials=4"],
        )
    out = _run_vllm_apc(cfg, "unused", load_family("mini"))
    runs = [e for e in FakeVLLMEngine.log if e.startswith("run:")]
    # 4 trials x 2 engines x 2 rounds, the order alternating trial by trial: on/off, off/on, ...
    on, off = ["run:True"] * 2, ["run:False"] * 2
    assert runs == on + off + off + on + on + off + off + on
    # the prefix cache is reset before every timed run
    resets = [e for e in FakeVLLMEngine.log if e.startswith("reset:")]
    assert resets == ["reset:True", "reset:False", "reset:False", "reset:True"] * 2
    assert out["apc_trials"] == 4 and len(out["apc_speedup_trials"]) == 4
    assert 1.5 < out["apc_speedup"] < 4  # 0.05 s / 0.02 s per call, whatever the machine does
    assert out["apc_speedup_min"] <= out["apc_speedup"] <= out["apc_speedup_max"]
    assert out["apc_speedup_spread"] >= 0 and out["prefix_cache_hit_rate"] == 0.5
