"""Search driver + three-stage generation, driven by a named test double backend (FakeStepBackend).

The real backends, the real step scorer and the real checker are used elsewhere and in the mini-world
end-to-end tests; here the backend is a deterministic stand-in so routing, resume and pair building can be
checked exactly and quickly.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sphere.backends.base import Candidate, SamplingParams
from sphere.generate.generator import Generator
from sphere.generate.stages import route
from sphere.io import read_jsonl_tolerant
from sphere.search.config import validate_search_config
from sphere.search.driver import SearchDriver
from sphere.search.types import SearchJob, Trajectory

CONF = Path(__file__).resolve().parents[1] / "conf"


class FakeTokenizer:
    """Character-level stand-in for a HF tokenizer (no chat template)."""

    chat_template = None
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


class FakeStepBackend:
    """Test double: writes 'a + b = s' steps for 'Add: x1, x2, ...' problems; each step's result is right
    with probability `p_right`, otherwise off by one. The last step states the running total as the answer.
    p_right=None: per problem, by its number count (2 -> 0.6, 3 -> 1.0, 4 -> 0.0; 0.8 after a reflection
    prompt), so one problem set exercises all three stages."""

    name = "fake"

    def __init__(self, p_right: float | None = 0.6, fail_after: int | None = None):
        self.tokenizer = FakeTokenizer()
        self.p_right = p_right
        self.calls = 0
        self.batch_sizes: list[int] = []  # prompts per next_steps call
        self.prompts_seen: list[str] = []
        self.fail_after = fail_after

    def next_steps(self, prompts, params: SamplingParams):
        self.calls += 1
        self.batch_sizes.append(len(prompts))
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("FakeStepBackend: simulated backend failure")
        out = []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            self.prompts_seen.append(text)
            nums = [int(x) for x in re.search(r"Add: ([\d, ]+)", text).group(1).split(",")]
            body = text.split("Solution:\n", 1)[1] if "Solution:\n" in text else text.rsplit("solution:\n", 1)[-1]
            steps = [s for s in body.split("\n\n") if s.strip()]
            total = nums[0]
            for s in steps:
                m = re.search(r"= (-?\d+)", s)
                if m:
                    total = int(m.group(1))
            k = len(steps)
            p_right = self.p_right
            if p_right is None:
                p_right = 0.8 if "Attempt:" in text else {2: 0.6, 3: 1.0, 4: 0.0}[len(nums)]
            cands = []
            for j in range(params.n):
                rng = random.Random(f"{text}|{j}")  # per prompt, not per batch: resumable
                if k + 1 < len(nums):
                    b = nums[k + 1]
                    res = total + b if rng.random() < p_right else total + b + 1
                    t, fin = f"{total} + {b} = {res}", "step"
                else:
                    t, fin = f"The answer is \\boxed{{{total}}}.", "answer"
                toks = [ord(c) for c in t]
                cands.append(Candidate(t, toks, -float(len(toks)) * rng.random(), -rng.random(), fin))
            out.append(cands)
        return out

    def stats(self):
        return {"calls": self.calls}

    def close(self):
        pass


def _problems(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        nums = [rng.randint(1, 50) for _ in range(rng.randint(2, 4))]
        out.append({"id": f"p{i}", "problem": "Add: " + ", ".join(map(str, nums)), "answer": str(sum(nums))})
    return out


def _cfg(**over) -> OmegaConf:
    from sphere.prompts import load_family
    from sphere.schema import DataSettings, FiltersSettings, SearchSettings, StagesSettings, defaults

    search = OmegaConf.create(defaults(SearchSettings))  # conf/search/paper.yaml: the SearchSettings defaults
    gen = OmegaConf.load(CONF / "generate.yaml")
    gen.pop("defaults")
    gen = OmegaConf.merge({"data": defaults(DataSettings), "stages": defaults(StagesSettings),
                           "filters": defaults(FiltersSettings)}, gen)  # what generate.yaml composes over
    prompt = OmegaConf.create(load_family("mini"))  # conf/prompt/mini.yaml over the PromptSettings defaults
    # a reflection prompt that shows the attempt (the chat families' shape), so stage 2 is recognisable
    prompt.reflection = "Problem: {problem}\n\nAttempt:\n{attempt}\n\nThe attempt has a mistake. Corrected solution:\n"
    cfg = OmegaConf.create({"seed": 0, "model": {"policy": "fake", "small": "fake-small", "prm": "symbolic"},
                            "paths": {"data_dir": "data/benchmarks"}, "engine_backend": "cpp"})
    cfg = OmegaConf.merge(cfg, gen, {"search": search, "prompt": prompt,
                                     "scorer": {"name": "symbolic"}})
    cfg.search.batch_leaves = 8
    cfg.search.max_depth = 6
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in over.items()]))


def _prompt_fn(tok, problem):
    from sphere.prompts import build_prompt_ids, load_family

    fam = load_family("mini")
    return lambda steps: build_prompt_ids(tok, problem["problem"], steps, fam)


@pytest.mark.parametrize("engine", ["cpp", "py"])
def test_paper_search_chains_are_max_and_min(engine, scorer, verifier):
    cfg = _cfg()
    be = FakeStepBackend()
    d = SearchDriver(be, scorer, verifier, cfg.search, engine_backend=engine)
    probs = _problems(12)
    results = []
    d.run([SearchJob(p["id"], p, _prompt_fn(be.tokenizer, p)) for p in probs], results.append)
    assert sorted(r.job.job_id for r in results) == sorted(p["id"] for p in probs)
    for r in results:
        nums = r.job.problem["problem"].count(",") + 1
        assert r.sol_max is not None and r.sol_min is not None
        # every chain ends with the boxed answer step after nums-1 additions
        assert len(r.sol_max.steps) == nums and len(r.sol_min.steps) == nums
        assert "boxed" in r.sol_max.steps[-1]
        # Sol_max's step rewards dominate Sol_min's at every depth where they branch (minmax keeps both)
        assert sum(r.sol_max.rewards[:-1]) >= sum(r.sol_min.rewards[:-1])
        gold = r.job.problem["answer"]
        assert r.sol_max.correct == (f"\\boxed{{{gold}}}" in r.sol_max.steps[-1])
    # batching: the calls made while problems were still waiting carried (close to) a full batch, as the
    # driver reports it and as the backend saw it
    full = be.batch_sizes[:d.stats.full_calls]
    assert len(be.batch_sizes) == d.stats.backend_calls and full
    assert sum(full) / len(full) >= 0.9 * int(cfg.search.batch_leaves), be.batch_sizes
    assert d.stats.as_dict(int(cfg.search.batch_leaves))["leaves_per_call_frac"] >= 0.9


def test_cpp_and_py_engines_give_identical_results(scorer, verifier):
    cfg = _cfg()
    outs = {}
    for engine in ("cpp", "py"):
        be = FakeStepBackend()
        d = SearchDriver(be, scorer, verifier, cfg.search, engine_backend=engine)
        res = []
        d.run([SearchJob(p["id"], p, _prompt_fn(be.tokenizer, p)) for p in _problems(8)], res.append)
        outs[engine] = sorted((r.job.job_id, tuple(r.sol_max.steps), tuple(r.sol_min.steps)) for r in res)
    assert outs["cpp"] == outs["py"]


def test_mcts_mode_runs_with_pruning_and_budget(scorer, verifier):
    cfg = _cfg()
    # dedup off: the fake backend repeats texts; merged expansions (<= 2 distinct) leave topk(3) nothing to prune
    cfg.search = OmegaConf.merge(cfg.search, {"mode": "mcts", "k": 2, "simulations": 16, "backup": "max",
                                              "pruning": {"policy": "topk", "k": 3}, "dedup_candidates": False})
    be = FakeStepBackend()
    d = SearchDriver(be, scorer, verifier, cfg.search)
    res = []
    d.run([SearchJob(p["id"], p, _prompt_fn(be.tokenizer, p)) for p in _problems(6)], res.append)
    assert len(res) == 6
    for r in res:
        assert r.expansions <= 16  # the simulation budget holds even with k=2 leaves per round
        assert r.terminals, "a 16-simulation search over 2-4 step problems reaches answers"
        assert r.sol_max.value >= r.sol_min.value
    assert d.stats.pruned > 0  # topk(3) of 5 prunes 2 per expansion


@pytest.mark.parametrize("bad,msg", [
    ({"mode": "beam"}, "search.mode"),
    ({"expansions": 0}, "search.expansions"),
    ({"pruning": {"policy": "topk", "k": 9}}, "search.pruning.k"),
    ({"pruning": {"policy": "threshold", "tau": 1.5}}, "search.pruning.tau"),
    ({"pruning": {"policy": "best"}}, "search.pruning.policy"),
    ({"k": -1}, "search.k"),
])
def test_bad_search_config_names_key(bad, msg):
    cfg = _cfg()
    with pytest.raises(ValueError, match=msg.replace(".", r"\.")):
        validate_search_config(OmegaConf.merge(cfg.search, bad))


def test_route():
    T = lambda ok: Trajectory(["x"], ok, 0.0, [0.0], [0.0], "answer")  # noqa: E731
    assert route(T(True), T(False)) == "pair"
    assert route(T(True), T(True)) == "both_right"
    assert route(T(False), T(False)) == "both_wrong"
    assert route(T(False), T(True)) == "inverted"


def _generate(tmp: Path, cfg, be, small=None, problems=None):
    from sphere.rewards.symbolic import SymbolicStepScorer
    from sphere.verify import check_answers

    gen = Generator(cfg, tmp)
    return gen.run(problems or _problems(24), be, SymbolicStepScorer(), check_answers,
                   small_backend_factory=(lambda: small) if small else None)


def test_three_stages_produce_pairs(tmp_path):
    cfg = _cfg()
    # per-problem p_right: some chains both right (stage 3), some both wrong (stage 2), some split (stage 1)
    stats = _generate(tmp_path, cfg, FakeStepBackend(None), small=FakeStepBackend(0.3))
    pairs = read_jsonl_tolerant(tmp_path / "pairs.jsonl")
    assert stats["pairs_total"] == len(pairs) > 0
    stages = {int(p["stage"]) for p in pairs}
    assert stages == {1, 2, 3}, stats
    for p in pairs:
        assert p["chosen_correct"] and not p["rejected_correct"]
        assert isinstance(p["prompt"], str) and p["prompt"].startswith("Problem: Add:")
        assert p["chosen"] != p["rejected"]
        for k in ("problem_id", "margin", "config_hash", "chosen_model", "rejected_model"):
            assert k in p
    s3 = [p for p in pairs if p["stage"] == 3]
    assert all(p["rejected_model"] == "fake-small" for p in s3)
    st = json.loads((tmp_path / "generate_stats.json").read_text())
    assert set(st["pairs_per_stage"]) == {"1", "2", "3"}
    for k in ("engine_time_frac", "leaves_per_call_frac", "wall_s", "yield", "backend_calls"):
        assert k in st
    traj = read_jsonl_tolerant(tmp_path / "trajectories.jsonl")
    assert traj and all("correct" in t for t in traj)


def test_stage_switches(tmp_path):
    cfg = _cfg(**{"stages.stage2": False, "stages.stage3": False})
    _generate(tmp_path, cfg, FakeStepBackend(0.6), small=FakeStepBackend(0.3))
    pairs = read_jsonl_tolerant(tmp_path / "pairs.jsonl")
    assert pairs and {p["stage"] for p in pairs} == {1}


def test_resume_after_failure_skips_finished_and_duplicates_nothing(tmp_path):
    cfg = _cfg()
    clean = tmp_path / "clean"
    _generate(clean, cfg, FakeStepBackend(None), small=FakeStepBackend(0.3))
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated"):
        _generate(crashed, cfg, FakeStepBackend(None, fail_after=6), small=FakeStepBackend(0.3))
    done_before = {r["problem_id"] for r in read_jsonl_tolerant(crashed / "stages" / "stage1.jsonl")}
    assert 0 < len(done_before) < 24
    be = FakeStepBackend(None)
    _generate(crashed, cfg, be, small=FakeStepBackend(0.3))
    # finished problems were not searched again: every prompt names its problem ("Add: ..."; exact match, as
    # "Add: 1, 2" is a prefix of "Add: 1, 2, 3"), and a finished one is seen only in a stage-2 reflection
    by_text = {p["problem"]: p["id"] for p in _problems(24)}
    assert len(by_text) == 24 and be.prompts_seen
    for text in be.prompts_seen:
        m = re.search(r"Add: [\d, ]*\d", text)
        assert m is not None and m.group(0) in by_text, f"prompt names no known problem: {text[:80]!r}"
        assert by_text[m.group(0)] not in done_before or "Attempt:" in text
    for s in (1, 2, 3):
        ids = [r["problem_id"] for r in read_jsonl_tolerant(crashed / "stages" / f"stage{s}.jsonl")]
        assert len(ids) == len(set(ids)), f"stage {s} has duplicates"
    a = {r["problem_id"] for r in read_jsonl_tolerant(clean / "stages" / "stage1.jsonl")}
    b = {r["problem_id"] for r in read_jsonl_tolerant(crashed / "stages" / "stage1.jsonl")}
    assert a == b
    # deterministic backend: the final pairs equal the uninterrupted run's
    key = lambda p: (p["problem_id"], p["stage"], p["chosen"], p["rejected"])  # noqa: E731
    assert sorted(map(key, read_jsonl_tolerant(clean / "pairs.jsonl"))) == sorted(
        map(key, read_jsonl_tolerant(crashed / "pairs.jsonl")))


def test_pairs_are_written_in_problem_order_whatever_the_stage_logs_order(tmp_path):
    """The stage logs are in completion order, which differs between runners (the Ray driver appends whole
    chunks as they come back); DPO's batches follow pairs.jsonl's order, so it must not. Reversing each stage
    log and rebuilding the outputs must give the same bytes, listed stage by stage in problem order."""
    probs = _problems(24)
    _generate(tmp_path, _cfg(), FakeStepBackend(None), small=FakeStepBackend(0.3))
    first = {f: (tmp_path / f).read_bytes() for f in ("pairs.jsonl", "trajectories.jsonl")}
    pairs = read_jsonl_tolerant(tmp_path / "pairs.jsonl")
    pos = {p["id"]: i for i, p in enumerate(probs)}
    order = [(int(p["stage"]), pos[p["problem_id"]]) for p in pairs]
    assert len({s for s, _ in order}) == 3 and order == sorted(order)
    for s in (1, 2, 3):
        log = tmp_path / "stages" / f"stage{s}.jsonl"
        lines = log.read_text().splitlines(keepends=True)
        assert len(lines) > 1
        log.write_text("".join(reversed(lines)))
    Generator(_cfg(), tmp_path).finalize(probs, {"search": {}}, 0.0)
    for f, data in first.items():
        assert (tmp_path / f).read_bytes() == data, f


def test_bad_generate_config(tmp_path):
    with pytest.raises(ValueError, match=r"stages\.inverted"):
        Generator(_cfg(**{"stages.inverted": "keep"}), tmp_path)
    with pytest.raises(ValueError, match=r"filters\.min_edit_distance"):
        _generate(tmp_path, _cfg(**{"filters.min_edit_distance": 2.0}), FakeStepBackend())


def test_progress_counts_searches_per_stage_and_resumes_at_the_right_count(tmp_path, capsys):
    """Stage 2 and 3 searches are queued only as stage 1 routes problems there; the progress counts say how
    many of each are done and queued, and a resumed run starts at the count it stopped at."""
    from sphere.progress import StageProgress
    from sphere.rewards.symbolic import SymbolicStepScorer
    from sphere.verify import check_answers

    seen: list[dict] = []

    def prog(c):
        seen.append(json.loads(json.dumps(c)))

    def run(out, be, progress):
        return Generator(_cfg(), out).run(_problems(24), be, SymbolicStepScorer(), check_answers,
                                          small_backend_factory=lambda: FakeStepBackend(0.3),
                                          progress=progress)

    run(tmp_path / "a", FakeStepBackend(None), prog)
    last = seen[-1]
    routes = [r["route"] for r in read_jsonl_tolerant(tmp_path / "a" / "stages" / "stage1.jsonl")]
    assert last["done"] == 24 and last["searched"]["1"] == 24
    assert last["queued"]["2"] == last["searched"]["2"] == routes.count("both_wrong") > 0
    assert last["queued"]["3"] == last["searched"]["3"] == routes.count("both_right") > 0
    assert [c["done"] for c in seen] == sorted(c["done"] for c in seen)  # never goes back
    # a crash part-way, then a resume: the first report already counts what was finished
    with pytest.raises(RuntimeError, match="simulated"):
        run(tmp_path / "b", FakeStepBackend(None, fail_after=6), None)
    finished1 = len(read_jsonl_tolerant(tmp_path / "b" / "stages" / "stage1.jsonl"))
    seen.clear()
    run(tmp_path / "b", FakeStepBackend(None), prog)
    assert seen[0]["searched"]["1"] == finished1 > 0 and seen[-1]["done"] == 24
    assert seen[-1]["searched"]["1"] == 24
    # the plain (non-terminal) progress line names both numbers
    with StageProgress(24, "gen", every_s=0.0) as p:
        p.update({"done": 5, "pairs": {1: 3, 2: 1, 3: 0}, "searched": {1: 20, 2: 4, 3: 0},
                  "queued": {2: 9, 3: 0}})
    line = capsys.readouterr().err.strip().splitlines()[-1]
    want = "[gen] 5/24 done; searched stage 1 20/24, stage 2 4/9; pairs before filters s1:3 s2:1 s3:0"
    assert line.startswith(want)
