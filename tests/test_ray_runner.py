"""`runner=ray`: generation and evaluation on a local 2-CPU Ray cluster against the single-process path.

One Ray cluster (2 CPUs, 200 MB object store, no dashboard) serves the whole module; the tiny test model
(sphere/standins/tiny.py, transformers backend), the symbolic scorer and the reference tree engine keep each
run to seconds.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import ray  # the `scale` extra (scripts/setup.sh installs it): a missing ray fails here, never skips
from omegaconf import OmegaConf

from sphere.io import read_jsonl_tolerant
from sphere.scale import ray_runner

pytestmark = [pytest.mark.ray]

CONF = Path(__file__).resolve().parents[1] / "conf"
N_PROBLEMS = 16


def ray_runner_config():
    """The ``runner`` node conf/runner/ray.yaml composes to: RayRunnerSettings' defaults
    (sphere/schema_groups.py) under the file's own values."""
    from sphere.schema import defaults
    from sphere.schema_groups import RayRunnerSettings

    own = OmegaConf.to_container(OmegaConf.load(CONF / "runner" / "ray.yaml"))
    own.pop("defaults", None)
    return OmegaConf.create({**defaults(RayRunnerSettings, alone=True), **own})


@pytest.fixture(scope="module")
def tiny():
    from sphere.standins.tiny import tiny_model_path

    return str(tiny_model_path())


@pytest.fixture(scope="module")
def problems_file(tmp_path_factory):
    """Problems of the tiny model's own arithmetic world, so every route (pair / both right / both wrong)
    occurs."""
    from sphere.standins.tiny import arithmetic_problem

    rng = random.Random(11)
    path = tmp_path_factory.mktemp("data") / "problems.jsonl"
    with open(path, "w") as f:
        for i in range(N_PROBLEMS):
            problem, _, answer, _ = arithmetic_problem(rng)
            f.write(json.dumps({"id": f"t{i:02d}", "problem": problem, "answer": answer}) + "\n")
    return path


@pytest.fixture(scope="module")
def cluster():
    """A local cluster shared by the module; ``RayCluster`` reuses it (and does not shut it down)."""
    rcfg = ray_runner_config()
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=200 * 2**20,
        include_dashboard=False,
        runtime_env=ray_runner.runtime_env(rcfg),
        log_to_driver=False,
    )
    yield
    ray.shutdown()


def compose(name: str, out: Path, overrides: list[str]):
    """The config ``sphere <name> hydra.run.dir=out overrides`` composes, with Hydra's runtime set so
    ``${hydra:...}`` resolves and ``main(cfg)`` finds its output directory."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hcompose(name, overrides=[*overrides, f"hydra.run.dir={out}"], return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(out)
    cfg.hydra.runtime.cwd = str(Path.cwd())
    HydraConfig.instance().set_config(cfg)
    return cfg


def gen_overrides(tiny: str, problems_file: Path, *extra: str) -> list[str]:
    # engine_backend=py: the reference forest (same API as the C++ one, which has its own tests); the trees
    # here are tiny, so the engine's speed does not matter and these tests do not depend on the C++ build
    return [
        "engine_backend=py",
        f"model.policy={tiny}",
        f"model.small={tiny}",
        "backend=transformers",
        "backend.device=cpu",
        "backend.batch_size=32",
        "prompt=mini",
        "scorer=symbolic",
        f"data.problems={problems_file}",
        "search.expansions=3",
        "search.max_depth=4",
        "search.max_step_tokens=24",
        "search.batch_leaves=16",
        "output.snapshot_every=8",
        "logger=none",
        *extra,
    ]


def ray_overrides(workers: int = 2, chunk: int = 4) -> list[str]:
    return [
        "runner=ray",
        f"runner.workers={workers}",
        f"runner.chunk_size={chunk}",
        "runner.eval_chunk_size=4",
        "runner.progress_poll_s=0.5",
        "runner.log_to_driver=false",
    ]


def stage_ids(out: Path) -> dict[int, list[str]]:
    return {
        s: [r["problem_id"] for r in read_jsonl_tolerant(out / "stages" / f"stage{s}.jsonl")]
        for s in (1, 2, 3)
    }


def assert_complete(out: Path, want: set[str], stage2: bool = True, stage3: bool = True) -> None:
    """Every problem has its stage-1 record and the record of the stage it was routed to; no problem
    appears twice in any stage log."""
    ids = stage_ids(out)
    for s, lst in ids.items():
        dup = [k for k, c in Counter(lst).items() if c > 1]
        assert not dup, f"stage {s}: duplicate problem ids {dup}"
    assert set(ids[1]) == want
    r1 = {r["problem_id"]: r for r in read_jsonl_tolerant(out / "stages" / "stage1.jsonl")}
    # a disabled stage has no records at all (parenthesised: `assert A == B if c else set()` would parse as
    # `assert (A == B) if c else set()`)
    assert set(ids[2]) == ({p for p, r in r1.items() if r["route"] == "both_wrong"} if stage2 else set())
    assert set(ids[3]) == ({p for p, r in r1.items() if r["route"] == "both_right"} if stage3 else set())


def test_assert_complete_checks_disabled_stages_too(tmp_path):
    """The helper itself: with a stage off, any record in that stage's log is an error; with it on, the
    stage holds exactly the problems routed to it."""
    st = tmp_path / "stages"
    st.mkdir()
    routes = {"a": "pair", "b": "both_wrong", "c": "both_right"}
    (st / "stage1.jsonl").write_text("".join(json.dumps({"problem_id": k, "route": r}) + "\n"
                                             for k, r in routes.items()))
    (st / "stage2.jsonl").write_text(json.dumps({"problem_id": "b"}) + "\n")
    (st / "stage3.jsonl").write_text("")
    assert_complete(tmp_path, set(routes), stage2=True, stage3=False)
    with pytest.raises(AssertionError):
        assert_complete(tmp_path, set(routes), stage2=False, stage3=False)  # stage 2 off, yet a record
    with pytest.raises(AssertionError):
        assert_complete(tmp_path, set(routes), stage2=True, stage3=True)  # c was routed to stage 3: missing
    (st / "stage2.jsonl").write_text("")
    assert_complete(tmp_path, set(routes), stage2=False, stage3=False)


def noise_tol(a: int, b: int, n: int) -> float:
    """Three standard deviations of the difference of two independent binomial counts over ``n`` problems
    with the pooled rate, at least 1: the sampling noise of a per-stage count between two runs."""
    p = (a + b) / (2 * n)
    return max(1.0, 3.0 * math.sqrt(2 * n * p * (1 - p)))


def test_runner_config_errors_name_the_key():
    rcfg = ray_runner_config()
    ray_runner.validate_runner_config(rcfg)
    bad = {
        "workers": 0,
        "chunk_size": "8",
        "cpus_per_worker": 0,
        "gpus_per_worker": -1,
        "max_chunk_retries": -1,
        "object_store_mb": 10,
        "num_cpus": 0,
        "progress_poll_s": 0,
    }
    for key, value in bad.items():
        c = rcfg.copy()
        c[key] = value
        with pytest.raises(ValueError, match=f"runner.{key}="):
            ray_runner.validate_runner_config(c)
    from sphere.runners import runner_name

    assert runner_name(OmegaConf.create({})) == "local"
    with pytest.raises(ValueError, match=re.escape("runner.name='slurm': allowed local | ray")):
        runner_name(OmegaConf.create({"runner": {"name": "slurm"}}))


def test_finished_rule_follows_the_routes():
    """A problem counts as finished only when the stage it was routed to (if enabled) has its record."""
    st = OmegaConf.create({"stage2": True, "stage3": False})
    state = {
        1: {
            "a": {"route": "pair"},
            "b": {"route": "both_wrong"},
            "c": {"route": "both_right"},
            "d": {"route": "both_wrong"},
        },
        2: {"d": {}},
        3: {},
    }
    got = {p: ray_runner.is_finished(p, state, st) for p in "abcde"}
    assert got == {"a": True, "b": False, "c": True, "d": True, "e": False}
    assert ray_runner.chunked(list(range(5)), 2) == [[0, 1], [2, 3], [4]]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, tiny, problems_file):
    from sphere.runners import generate_main as main

    out = tmp_path_factory.mktemp("single")
    main(compose("generate", out, gen_overrides(tiny, problems_file)))
    return out


def test_ray_generate_matches_single_process(cluster, single_run, tiny, problems_file, tmp_path):
    from sphere.runners import generate_main as main

    out = tmp_path / "ray"
    main(compose("generate", out, gen_overrides(tiny, problems_file, *ray_overrides())))
    want = {f"t{i:02d}" for i in range(N_PROBLEMS)}
    assert_complete(single_run, want)
    assert_complete(out, want)
    info = json.loads((out / "ray_runner.json").read_text())
    # stages 1-2 in chunks of 4, then the stage-3 (both right) problems in a phase of their own
    assert info["phases"]["policy"]["chunks"] == N_PROBLEMS // 4 and info["retries"] == 0
    assert info["chunks"] == N_PROBLEMS // 4 + info["phases"].get("small", {}).get("chunks", 0)
    assert sum(info["per_actor_chunks"].values()) == info["chunks"]
    assert len(info["workers_seen"]) == 2, info["workers_seen"]  # both actors did work
    a = json.loads((single_run / "generate_stats.json").read_text())
    b = json.loads((out / "generate_stats.json").read_text())
    assert set(a) <= set(b)
    assert b["problems"] == a["problems"] == N_PROBLEMS
    assert b["problems_done_stage1"] == N_PROBLEMS
    for s in ("1", "2", "3"):
        tol = noise_tol(a["pairs_per_stage"][s], b["pairs_per_stage"][s], N_PROBLEMS)
        assert abs(a["pairs_per_stage"][s] - b["pairs_per_stage"][s]) <= tol, (
            s,
            a["pairs_per_stage"],
            b["pairs_per_stage"],
        )
    for rt in set(a["routes"]) | set(b["routes"]):
        x, y = a["routes"].get(rt, 0), b["routes"].get(rt, 0)
        assert abs(x - y) <= noise_tol(x, y, N_PROBLEMS), (rt, a["routes"], b["routes"])
    # the outputs are rebuilt by the single-process code: pairs.jsonl agrees with the stats
    pairs = read_jsonl_tolerant(out / "pairs.jsonl")
    assert len(pairs) == b["pairs_total"]
    assert Counter(str(p["stage"]) for p in pairs) == Counter(
        {k: v for k, v in b["pairs_per_stage"].items() if v}
    )
    assert b["backend_calls"] > 0 and b["search"]["policy"]["backend_calls"] > 0
    assert len(read_jsonl_tolerant(out / "trajectories.jsonl")) > 0
    assert sorted(p.name for p in (out / "trees").glob("*.npz"))  # snapshots came back from the actors

    # a rerun in the same directory finds everything finished: no chunk, identical logs
    before = stage_ids(out)
    main(compose("generate", out, gen_overrides(tiny, problems_file, *ray_overrides())))
    assert stage_ids(out) == before
    assert json.loads((out / "ray_runner.json").read_text())["chunks"] == 0


def test_ray_generate_actor_killed_mid_run_is_retried(cluster, tiny, problems_file, tmp_path):
    """ray.kill one actor right after it received chunk 1: the chunk goes to another (fresh) actor; the
    finished ids are complete and unique. Then a partial run directory resumes without duplicates."""
    out = tmp_path / "fault"
    killed = []

    def on_dispatch(actor, chunk):
        if chunk.id == 1 and chunk.attempts == 1:
            killed.append(chunk.id)
            ray.kill(actor, no_restart=True)

    cfg = compose(
        "generate", out, gen_overrides(tiny, problems_file, "data.limit=8", *ray_overrides(chunk=2))
    )
    ray_runner.generate(cfg, out, on_dispatch=on_dispatch)
    want = {f"t{i:02d}" for i in range(8)}
    assert killed == [1]
    assert_complete(out, want)
    info = json.loads((out / "ray_runner.json").read_text())
    assert info["actor_deaths"] == 1 and info["retries"] == 1 and info["retried_chunks"] == [1]
    # no replacement by hand: the actor killed for good leaves, the run goes on with one worker and says so
    assert any("going on with 1 of 2 workers" in e for e in info["events"]), info["events"]
    stats = json.loads((out / "generate_stats.json").read_text())
    assert stats["problems_done_stage1"] == 8

    # resume: drop two problems from every stage log (as if their chunk never came back)
    drop = {"t02", "t05"}
    for s in (1, 2, 3):
        p = out / "stages" / f"stage{s}.jsonl"
        keep = [r for r in read_jsonl_tolerant(p) if r["problem_id"] not in drop]
        p.write_text("".join(json.dumps(r) + "\n" for r in keep))
    ray_runner.generate(cfg, out)
    assert_complete(out, want)
    info = json.loads((out / "ray_runner.json").read_text())
    assert info["skipped_finished"] == 6 and info["phases"]["policy"]["chunks"] == 1


def test_ray_generate_gives_up_when_every_actor_died(cluster, tiny, problems_file, tmp_path):
    """Every actor killed for good (no restart left): the run stops with one error naming the config key
    instead of waiting, and nothing of the lost chunk reaches the stage logs."""
    out = tmp_path / "doomed"

    def kill_always(actor, chunk):
        ray.kill(actor, no_restart=True)

    ov = gen_overrides(tiny, problems_file, "data.limit=2", *ray_overrides(workers=1, chunk=2))
    cfg = compose("generate", out, [*ov, "runner.max_chunk_retries=1"])
    with pytest.raises(RuntimeError, match=r"all 1 actors died for good .*runner.max_restarts"):
        ray_runner.generate(cfg, out, on_dispatch=kill_always)
    assert stage_ids(out) == {1: [], 2: [], 3: []}


def test_ray_eval_matches_single_process(cluster, tiny, problems_file, tmp_path):
    from sphere.evaluation.harness import evaluate
    from sphere.runners import eval_main as main

    ov = [
        f"model.policy={tiny}",
        "backend=transformers",
        "backend.device=cpu",
        "prompt=mini",
        f"benchmarks=[{problems_file}]",
        "limit=10",
        "sampling.max_solution_tokens=48",
        "progress=false",
    ]
    single = tmp_path / "single"
    evaluate(compose("eval", single, ov), single)
    out = tmp_path / "ray"
    main(compose("eval", out, [*ov, *ray_overrides()]))
    a = {r["id"]: r for r in read_jsonl_tolerant(single / "eval" / "problems.jsonl")}
    recs = read_jsonl_tolerant(out / "eval" / "problems.jsonl")
    assert len(recs) == len({r["id"] for r in recs}) == 10
    b = {r["id"]: r for r in recs}
    assert set(a) == set(b)
    # same settings -> the same record signature, so single-process and Ray records resume each other
    assert {r["sig"] for r in recs} == {r["sig"] for r in a.values()}
    # greedy decoding of the same prompts: the same answers up to batching effects on float ties
    same = sum(a[k]["extracted"] == b[k]["extracted"] for k in a)
    assert same >= 8, f"greedy answers differ on {10 - same}/10 problems"
    ra = json.loads((single / "eval" / "results.json").read_text())
    rb = json.loads((out / "eval" / "results.json").read_text())
    assert ra["problems"]["correct"] > 0  # the tiny model solves some of its own problems
    assert rb["problems"]["n"] == ra["problems"]["n"] == 10
    assert abs(rb["problems"]["correct"] - ra["problems"]["correct"]) <= 2
    assert rb["meta"]["runner"]["chunks"] == 3 and rb["meta"]["runner"]["workers"] == 2
    assert rb["meta"]["backend"]["stats"]  # the actors' backend statistics, summed
    assert (out / "eval" / "results.md").is_file()


@pytest.mark.slow  # a fresh process and Ray cluster: ~50 s on 2 busy cores
def test_cli_generate_runner_ray_starts_its_own_cluster(tiny, problems_file, tmp_path):
    """The command-line contract: `sphere generate runner=ray runner.workers=2 hydra.run.dir=DIR` starts a
    local cluster (none is running in that process), writes the single-process files and shuts it down."""
    import os
    import subprocess
    import sys

    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "sphere.cli",
        "generate",
        *gen_overrides(tiny, problems_file, "data.limit=4"),
        *ray_overrides(chunk=2),
        f"hydra.run.dir={out}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    r = subprocess.run(cmd, cwd=CONF.parent, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for f in ("pairs.jsonl", "trajectories.jsonl", "generate_stats.json", "ray_runner.json"):
        assert (out / f).is_file(), f
    assert_complete(out, {f"t{i:02d}" for i in range(4)})
    assert json.loads(r.stdout.strip().splitlines()[-1])["pairs_per_stage"]
