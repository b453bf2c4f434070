"""The multi-node commands of docs/scaling.md run as shell commands: `ray start --head`, `ray start --address`
twice (nodes B and C), `sphere generate ... runner=ray runner.address=...`, all on this machine. The block is
read from docs/scaling.md (the one after ``<!-- tests/test_ray_cli.py runs this block -->``), so the page and
the test cannot drift apart. What the test changes, and only that:

- ``A`` -> 127.0.0.1, port 6379 -> a free port, ``SECRET`` -> a fresh token, ``runs/...`` -> a temp dir;
- ``ray start`` gets a temp dir, ports and a 100 MB object store of its own (``ISOLATION``), so that it
  meets no other Ray cluster on a shared machine;
- ``ray stop`` (which stops every Ray process of the machine, other people's too) is replaced by ending the
  processes of this cluster alone: those whose command line names its temp dir or its port, and their
  children (``stop_cluster``).

Checked: the stage files equal, record for record, the one-process run (`runner=local`) of the same command;
both worker nodes ran actors. And `sphere run experiment=mini_planted runner=ray runner.address=...` on the
same cluster gives the pairs and accuracies of `runner=local` (greedy search).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from test_ray_cluster import records  # {stage: {problem_id: record}}, a problem written twice fails

pytestmark = [pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- tests/test_ray_cli.py runs this block -->"
WAIT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def doc_block() -> list[str]:
    """The shell lines of the marked block of docs/scaling.md (continuations joined, comments dropped)."""
    text = (ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
    assert MARK in text, f"docs/scaling.md lost its marker {MARK}"
    block = text.split(MARK, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    return [re.sub(r"\s+#.*$", "", x).strip() for x in lines if x.strip()]


def isolation(head: bool, tmp: str) -> list[str]:
    """Flags that keep this cluster apart from any other Ray on the machine (not needed on real nodes)."""
    own = ["--disable-usage-stats", f"--object-store-memory={100 * 2**20}",
           f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"]
    if head:
        own += [f"--temp-dir={tmp}", "--include-dashboard=false", f"--dashboard-port={free_port()}",
                f"--ray-client-server-port={free_port()}"]
    return own


def plan(tmp: str, out: Path) -> dict:
    """The doc block as this test runs it: env, the head's and a worker node's `ray start`, the `sphere`
    command."""
    port, token = free_port(), secrets.token_hex(32)

    def fill(line: str) -> str:
        return (line.replace("A:6379", f"127.0.0.1:{port}").replace("--port=6379", f"--port={port}")
                .replace("SECRET", token).replace("runs/mini-cluster", str(out)))

    lines = [fill(x) for x in doc_block()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "WANDB_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    p: dict = {"port": port, "env": env, "tmp": tmp}
    for line in lines:
        w = shlex.split(line)
        if w[0] == "export":
            env.update(dict(a.split("=", 1) for a in w[1:]))
        elif w[:2] == ["ray", "start"]:
            p["head" if "--head" in w else "node"] = w
        elif w[0] == "sphere":
            p["sphere"] = w
        elif w[:2] == ["ray", "stop"]:
            p["stop"] = w
        else:
            raise AssertionError(f"docs/scaling.md: a line this test does not know how to run: {line}")
    assert {"head", "node", "sphere", "stop"} <= set(p), f"docs/scaling.md's block lacks a command: {lines}"
    assert env.get("RAY_AUTH_MODE") == "token" and env.get("RAY_AUTH_TOKEN") == token, "the export line"
    return p


def ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def sh(argv: list[str], env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    """A documented command; `ray` and `sphere` as installed next to this interpreter."""
    argv = [ray_bin(), *argv[1:]] if argv[0] == "ray" else [sys.executable, "-m", "sphere.cli", *argv[1:]]
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{shlex.join(argv)} -> {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


def cluster_processes(tmp: str, port: int) -> list[psutil.Process]:
    """This cluster's processes: the command line names its temp dir or its GCS port, and their children."""
    me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    roots = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.pid not in me and (tmp in cmd or (f":{port}" in cmd and "ray" in cmd)):
            roots.append(p)
    procs: dict[int, psutil.Process] = {}
    for r in roots:
        try:
            for q in [r, *r.children(recursive=True)]:
                procs.setdefault(q.pid, q)
        except psutil.NoSuchProcess:
            pass
    return [q for q in procs.values() if q.pid not in me]


def stop_cluster(tmp: str, port: int) -> None:
    """`ray stop --force` for this cluster alone: SIGKILL to each of its processes."""
    procs = cluster_processes(tmp, port)
    for q in procs:
        try:
            q.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


@pytest.fixture(scope="module")
def cli_cluster(tmp_path_factory):
    """Node A (`ray start --head`, no CPUs) and nodes B and C (`ray start --address`, 1 CPU, 1 declared GPU
    each), started by the documented commands; stopped at the end whatever happened."""
    tmp = tempfile.mkdtemp(prefix="rcli-")  # short: Ray's unix socket paths live under it
    out = tmp_path_factory.mktemp("cli") / "ray"
    p = plan(tmp, out)
    t = time.monotonic()
    try:
        sh([*p["head"], *isolation(True, tmp)], p["env"])
        for _ in range(2):  # node B, and again on node C
            sh([*p["node"], *isolation(False, tmp)], p["env"])
        p["start_s"] = time.monotonic() - t
        yield p
    finally:
        stop_cluster(tmp, p["port"])
        left = cluster_processes(tmp, p["port"])
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"processes of the test's cluster still running: {[q.pid for q in left]}"


def local_argv(argv: list[str], out: Path) -> list[str]:
    """The same `sphere` command on one process: runner=local, no runner.* keys, another run directory."""
    keep = [a for a in argv if not a.startswith(("runner=", "runner.", "hydra.run.dir="))]
    return [*keep, "runner=local", f"hydra.run.dir={out}"]


def test_documented_commands_generate_as_one_process(cli_cluster, tmp_path):
    p = cli_cluster
    t = time.monotonic()
    r = sh(p["sphere"], p["env"], timeout=WAIT_S)
    ray_s = time.monotonic() - t
    out = Path(next(a.split("=", 1)[1] for a in p["sphere"] if a.startswith("hydra.run.dir=")))
    assert "model loads per worker" in r.stderr
    info = json.loads((out / "ray_runner.json").read_text())
    nodes = {d["node"] for d in info["model_loads"].values()}
    assert len(nodes) == 2, f"both worker nodes (B and C) ran actors: {info['model_loads']}"

    t = time.monotonic()
    sh(local_argv(p["sphere"], tmp_path / "local"), p["env"], timeout=WAIT_S)
    local_s = time.monotonic() - t
    a, b = records(tmp_path / "local"), records(out)
    assert len(a[1]) == 16
    for s in (1, 2, 3):
        assert set(b[s]) == set(a[s]), (s, sorted(set(a[s]) ^ set(b[s])))
        diff = [k for k in a[s] if a[s][k] != b[s][k]]
        assert not diff, f"stage {s}: records differ from the one-process run on {diff}"
    pairs = _lines(out / "pairs.jsonl")
    assert pairs == _lines(tmp_path / "local" / "pairs.jsonl")
    assert a[3] and pairs, "greedy, stage 3 on: some problems reach stage 3 and give pairs"
    print(f"records per stage {[len(a[s]) for s in (1, 2, 3)]}, pairs {len(pairs)}; cluster start "
          f"{p['start_s']:.0f} s, sphere generate on it {ray_s:.0f} s, runner=local {local_s:.0f} s")


def _lines(path: Path) -> list[str]:
    return sorted(path.read_text().splitlines())


RUN = ["run", "experiment=mini_planted", "search.temperature=0", "stages.stage3=true"]  # greedy, as tested
SIZES = {  # the CI variant: a round on fewer problems; nightly: the experiment's own sizes and two rounds
    "small": ["data.mini_n=16", "eval.limit=30", "rounds=1"],
    "experiment": [],
}


def _pairs(out: Path, rnd: int) -> list[tuple]:
    rows = [json.loads(x) for x in _lines(out / f"round_{rnd}" / "generate" / "pairs.jsonl")]
    return sorted((r["problem_id"], r["stage"], json.dumps(r["chosen"]), json.dumps(r["rejected"]))
                  for r in rows)


def _order(out: Path, rnd: int) -> list[tuple]:
    """(problem, stage) of each line of a round's pairs.jsonl, in file order (what DPO reads)."""
    return [(r["problem_id"], r["stage"]) for r in
            map(json.loads, (out / f"round_{rnd}" / "generate" / "pairs.jsonl").read_text().splitlines())]


NIGHTLY = [pytest.mark.nightly, pytest.mark.timeout(3600)]  # 30 min at load 7-10: 25 on the cluster, 4 local


@pytest.mark.parametrize("size", [pytest.param("small", marks=pytest.mark.slow),
                                  pytest.param("experiment", marks=NIGHTLY)])
def test_sphere_run_on_the_cluster_equals_local(cli_cluster, tmp_path, size):
    """`sphere run experiment=mini_planted ... runner=ray runner.address=A:6379` on the documented cluster:
    every round's generation and evaluation on the actors of nodes B and C, the same pairs and accuracies as
    `runner=local` (greedy search).

    pairs.jsonl lists the pairs in problem order whatever order the chunks came back in (the Ray driver
    appends stage records as chunks return), so DPO's batches, the trained policy and every later round are
    equal too."""
    p = cli_cluster
    address = next(a for a in p["sphere"] if a.startswith("runner.address="))
    ray_args = ["runner=ray", address, "runner.workers=2", "runner.gpus_per_worker=1"]
    t = time.monotonic()
    sh(["sphere", *RUN, *SIZES[size], *ray_args, f"hydra.run.dir={tmp_path / 'ray'}"], p["env"], timeout=3600)
    ray_s = time.monotonic() - t
    t = time.monotonic()
    sh(["sphere", *RUN, *SIZES[size], f"hydra.run.dir={tmp_path / 'local'}"], p["env"], timeout=3600)
    local_s = time.monotonic() - t
    ray, local = (json.loads((tmp_path / k / "summary.json").read_text()) for k in ("ray", "local"))
    rounds = len(local["rounds"]) - 1
    assert rounds == (1 if size == "small" else 2)
    for r in range(rounds + 1):  # every round's evaluation ran on the actors
        info = json.loads((tmp_path / "ray" / f"round_{r}" / "eval" / "ray_runner.json").read_text())
        assert info["workers"] == 2
        assert not (tmp_path / "local" / f"round_{r}" / "eval" / "ray_runner.json").exists()
    for r in range(1, rounds + 1):
        gen = json.loads((tmp_path / "ray" / f"round_{r}" / "generate" / "ray_runner.json").read_text())
        assert len({d["node"] for d in gen["model_loads"].values()}) == 2, gen["model_loads"]
        assert _pairs(tmp_path / "ray", r), f"round {r}: greedy, stage 3 on: there must still be pairs"
    acc = [[x["eval"]["mini"]["accuracy"] for x in s["rounds"]] for s in (ray, local)]
    pairs = [len(_pairs(tmp_path / "local", r)) for r in range(1, rounds + 1)]
    print(f"sphere run ({size}): runner=ray on the cluster {ray_s:.0f} s, runner=local {local_s:.0f} s; "
          f"accuracy per round: ray {acc[0]}, local {acc[1]}; pairs per round {pairs}")
    assert acc[0][0] == acc[1][0], "round 0: the start policy evaluated on the actors and in one process"
    for r in range(1, rounds + 1):
        assert _order(tmp_path / "ray", r) == _order(tmp_path / "local", r), f"round {r}: pairs.jsonl's order"
    assert acc[0] == acc[1], f"accuracies per round: ray {acc[0]}, local {acc[1]}"
    for r in range(1, rounds + 1):
        assert _pairs(tmp_path / "ray", r) == _pairs(tmp_path / "local", r), f"round {r}: pairs differ"
