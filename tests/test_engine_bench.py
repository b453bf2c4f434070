"""`sphere bench engine` on a tiny workload: the JSON has the documented keys; Hydra overrides and
multirun work through the CLI. (Speed targets are printed by the benchmark, never asserted here.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

os.environ.setdefault("OMP_NUM_THREADS", "1")

from sphere.engine import core_available

pytestmark = pytest.mark.skipif(not core_available(), reason="sphere._core not built")

KEYS = {"cpp_selects_per_s", "py_selects_per_s", "speedup", "round_ms_4096_leaves", "bytes_per_node",
        "parity_cpp_py", "targets_met"}


def _cfg(**kw):
    base = dict(trees=16, branching=3, max_depth=6, k=2, rounds=4, py_rounds=2, p_terminal=0.1, rule="puct",
                c=1.25, virtual_loss=1.0, pruning="none", peers=False, peer_simulations=8,
                peer_trees_llm_reasoners=2, threads=1, seed=0, timer="cpu")
    base.update(kw)
    return OmegaConf.create(base)


def test_bench_function_reports_parity_and_keys(capsys):
    from sphere.bench.engine import main

    main(_cfg())
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert KEYS <= res.keys()
    assert res["parity_cpp_py"] is True and res["bytes_per_node"] <= 64
    assert res["trees"] == 16 and res["peers"].startswith("skipped")


def test_bench_rejects_bad_rounds():
    from sphere.bench.engine import bench

    with pytest.raises(ValueError, match="py_rounds"):
        bench(_cfg(rounds=2, py_rounds=3))


def _sphere(args, tmp_path):
    # cwd = tmp_path and no sweep-dir override: the multirun uses conf/config.yaml's own hydra.sweep.dir
    cmd = [sys.executable, "-m", "sphere.cli", "bench", "engine", *args, "trees=8", "rounds=3", "py_rounds=1",
           "peers=false", f"hydra.run.dir={tmp_path}/run"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_override_and_multirun(tmp_path):
    p = _sphere(["branching=3"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["trees"] == 8 and res["branching"] == 3
    assert json.loads((tmp_path / "run" / "result.json").read_text())["trees"] == 8
    p = _sphere(["-m", "k=1,2"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    assert [r["k"] for r in lines] == [1, 2]
    assert len(list((tmp_path / "multirun").glob("*/*/1/result.json"))) == 1
