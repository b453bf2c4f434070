"""`runner=ray` on a multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``): a head with no
CPUs (only the driver attaches there) and two worker nodes with 1 CPU and 1 declared GPU each (``num_gpus``
on a node without a GPU: Ray's own GPU accounting, standing in for GPUs; the models run on CPU). One cluster
serves the module. The mini world's policy and small model (transformers, CPU), greedy search, the symbolic
scorer and the reference tree engine keep a run to tens of seconds.

What is checked against a one-process run of the same config: a worker NODE removed mid-round (its raylet
and every process on it, not one actor) and a node added afterwards: the lost chunk finishes elsewhere, the
added node is used, the stage files hold the same records as the one-process run, none lost or duplicated;
and each worker loads the policy once and the small model once per round.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import ray

from sphere.io import read_jsonl_tolerant
from sphere.scale import ray_runner
from test_ray_runner import compose, ray_runner_config  # the composed config with Hydra's runtime set

pytestmark = [pytest.mark.ray]

CONF = Path(__file__).resolve().parents[1] / "conf"
N = 56  # mini problems (14 chunks of 4 in the policy phase)
WAIT_S = 300  # every wait in this module gives up after this long, saying what it waited for


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    rcfg = ray_runner_config()
    # shutdown_at_exit=False: Ray's node would install a SIGTERM handler, which only the main thread may, and
    # the test adds a node from a second thread while the run goes on (the fixture shuts the cluster down)
    c = Cluster(
        initialize_head=True,
        shutdown_at_exit=False,
        head_node_args={
            "num_cpus": 0,
            "object_store_memory": 100 * 2**20,
            # a removed node is declared dead after ~3 s instead of ~15 s
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
        },
    )
    nodes = [c.add_node(num_cpus=1, num_gpus=1, object_store_memory=100 * 2**20) for _ in range(2)]
    c.wait_for_nodes(timeout=60)
    ray.init(address=c.address, runtime_env=ray_runner.runtime_env(rcfg), log_to_driver=False)
    try:
        yield c, nodes
    finally:
        ray.shutdown()
        c.shutdown()


GEN = [
    "engine_backend=py",
    "data.problems=mini",
    f"data.mini_n={N}",
    "model.policy=mini",
    "model.small=mini-small",
    "stages.stage3=true",
    "stages.close_policy_before_small=true",  # the policy closes before the small model opens
    "search.temperature=0",  # greedy: a record does not depend on which problems share a backend call
    "search.expansions=2",
    "search.max_depth=6",
    "search.batch_leaves=8",
    "output.snapshot_every=0",
    "logger=none",
]


def ray_ov(**kw) -> list[str]:
    d = {
        "workers": 2,
        "chunk_size": 4,
        "gpus_per_worker": 1,
        "progress_poll_s": 0.5,
        "unavailable_s": 4,
        "stall_timeout_s": 240,
        "log_to_driver": "false",
        **kw,
    }
    return ["runner=ray", *(f"runner.{k}={v}" for k, v in d.items())]


def records(out: Path) -> dict[int, dict[str, dict]]:
    """``{stage: {problem_id: record}}``; fails on a problem written twice."""
    got = {}
    for s in (1, 2, 3):
        recs = read_jsonl_tolerant(out / "stages" / f"stage{s}.jsonl")
        dup = [k for k, c in Counter(r["problem_id"] for r in recs).items() if c > 1]
        assert not dup, f"stage {s}: problems written twice {dup}"
        got[s] = {r["problem_id"]: r for r in recs}
    return got


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process run of the same config (runner=local)."""
    from sphere.runners import generate_main

    out = tmp_path_factory.mktemp("single")
    generate_main(compose("generate", out, GEN))
    return out


def _wait(pred, what: str, timeout: float = WAIT_S) -> None:
    t = time.monotonic()
    while not pred():
        if time.monotonic() - t > timeout:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.2)


def test_node_removed_mid_round_then_node_added(cluster, single, tmp_path):
    c, nodes = cluster
    out = tmp_path / "ray"
    events: dict = {}

    def chaos():
        """Once 4 problems are written: kill worker node 0 (raylet and all), wait until the driver has
        taken its chunk back, then add a fresh node (the restart Ray could not place lands there)."""
        try:
            stage1 = out / "stages" / "stage1.jsonl"
            _wait(lambda: stage1.exists() and len(read_jsonl_tolerant(stage1)) >= 4, "4 stage-1 records")
            events["removed"] = nodes[0].node_id
            c.remove_node(nodes[0], allow_graceful=False)
            time.sleep(6)  # > runner.unavailable_s: the chunk goes to the surviving worker first
            events["added"] = c.add_node(num_cpus=1, num_gpus=1, object_store_memory=100 * 2**20).node_id
        except Exception as e:  # noqa: BLE001 - reported by the test below
            events["error"] = repr(e)

    th = threading.Thread(target=chaos, daemon=True)
    th.start()
    ray_runner.generate(compose("generate", out, GEN + ray_ov()), out)
    th.join(timeout=60)
    assert "error" not in events, events
    assert "added" in events, f"the run ended before the node was added: {events}"

    info = json.loads((out / "ray_runner.json").read_text())
    # nothing lost, nothing duplicated, and the same records as one process
    a, b = records(single), records(out)
    for s in (1, 2, 3):
        assert set(b[s]) == set(a[s]), (s, sorted(set(a[s]) ^ set(b[s])))
        diff = [k for k in a[s] if a[s][k] != b[s][k]]
        assert not diff, f"stage {s}: records differ from the one-process run on {diff}"
    assert len(a[1]) == N
    assert (out / "pairs.jsonl").read_text() != "" or not any(r.get("pairs") for r in a[1].values())
    # the lost chunk was not waited for: either the driver gave it to the remaining worker once its actor
    # stopped answering (taken_back), or Ray reported the actor unavailable first (ActorUnavailableError, on a
    # loaded machine) and the chunk went back to the queue; the added node did chunks
    ev = info["events"]
    taken = info["taken_back"] >= 1 and any("not answered" in e for e in ev)
    requeued = info["unavailable"] >= 1 and any("goes back to the queue" in e for e in ev)
    assert taken or requeued, ev
    nodes_used = {v["node"] for v in info["model_loads"].values()}
    assert events["added"] in nodes_used, (events, info["model_loads"])
    # the restarted actor on the new node loaded its models once, as every worker: 1 policy, 1 small model
    for w, d in info["model_loads"].items():
        assert d.get("policy") == 1 and d.get("small", 0) <= 1, (w, d)


def test_one_policy_and_one_small_load_per_worker(cluster, single, tmp_path):
    """Several chunks per worker in each phase; each worker opens the policy once and the small model once
    (stage 3 of all its chunks runs after the policy's stages, with stages.close_policy_before_small)."""
    out = tmp_path / "loads"
    ray_runner.generate(compose("generate", out, GEN + ray_ov()), out)
    info = json.loads((out / "ray_runner.json").read_text())
    loads = info["model_loads"]
    assert len(loads) == 2, loads
    for w, d in loads.items():
        assert d.get("policy") == 1 and d.get("small") == 1, (w, loads, info["per_actor_chunks"])
    assert info["phases"]["policy"]["chunks"] == N // 4
    assert info["phases"]["small"]["chunks"] >= 2, info["phases"]
    assert records(out) == records(single)


def test_cli_generate_joins_the_cluster_by_address(cluster, single, tmp_path):
    """The documented multi-node command: `sphere generate ... runner=ray runner.address=<head>` from a fresh
    process joins the running cluster (it does not start its own), spreads the chunks over both worker
    nodes, and writes the one-process run's records (same routes per problem) for the first 16 problems."""
    import os
    import subprocess
    import sys

    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "sphere.cli", "generate", *GEN, "data.limit=16",
           *ray_ov(address=c_address(cluster)), f"hydra.run.dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    r = subprocess.run(cmd, cwd=CONF.parent, env=env, capture_output=True, text=True, timeout=WAIT_S)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "model loads per worker" in r.stderr
    info = json.loads((out / "ray_runner.json").read_text())
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")}
    assert {d["node"] for d in info["model_loads"].values()} == alive  # both worker nodes did chunks
    a, b = records(single), records(out)
    assert len(b[1]) == 16
    assert {k: v["route"] for k, v in b[1].items()} == {k: a[1][k]["route"] for k in b[1]}
    stats = json.loads((out / "generate_stats.json").read_text())
    assert stats["model_loads_per_worker"] == info["model_loads"]


def c_address(cluster) -> str:
    return cluster[0].address


def test_a_worker_no_node_can_hold_is_reported_not_waited_for(cluster, tmp_path):
    """runner.gpus_per_worker=2 on nodes of 1 GPU: Ray can never place the actor. The run does not wait
    forever: after runner.stall_timeout_s it stops, naming the chunk, the actor and the free resources."""
    from sphere.scale.pool import StallError

    out = tmp_path / "stall"
    cfg = compose("generate", out, [*GEN, "data.limit=4", *ray_ov(workers=1, gpus_per_worker=2,
                                                                    stall_timeout_s=6)])
    t = time.monotonic()
    with pytest.raises(StallError) as e:
        ray_runner.generate(cfg, out)
    msg = str(e.value)
    assert "no progress for" in msg and "runner.stall_timeout_s=6" in msg
    assert "chunk 0 on actor 0 (never answered: not placed yet" in msg
    assert "free cluster resources" in msg and "GPU" in msg
    assert time.monotonic() - t < 120
