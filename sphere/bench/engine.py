"""`sphere bench engine`: one synthetic search workload on the C++ and the pure-Python engine.

    sphere bench engine                       # 1,024 trees, branching 5, depth <= 12, k=4 (conf/bench_engine.yaml)
    sphere bench engine trees=256 rounds=32
    sphere bench engine -m trees=128,256      # Hydra multirun

A round is: select k leaves in every tree (virtual loss on), expand every leaf with `branching` children
(random priors, rewards, initial values; a few terminal), back up a random value per leaf. Random inputs
are drawn outside the timed sections. The Python engine runs the same first `py_rounds` rounds on the same
inputs (its trees are checked equal to the C++ ones) and the speedup compares the two on those rounds.
With the `bench` extra installed, the same workload runs on llm-reasoners' MCTS and on mctx (JAX, CPU).
Prints a table, writes result.json under the Hydra run dir, and prints one JSON object as the last line.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from sphere.engine import EngineConfig, make_forest

from . import engine_peers as peers


def _round_inputs(rng: np.random.Generator, m: int, branching: int, p_terminal: float) -> dict:
    c = m * branching
    u = rng.random((m, branching), dtype=np.float32) + np.float32(1e-3)
    return {
        "counts": np.full(m, branching, np.int32),
        "priors": (u / u.sum(axis=1, keepdims=True)).reshape(-1).astype(np.float32),
        "payloads": np.arange(c, dtype=np.int64),
        "rewards": rng.random(c, dtype=np.float32),
        "values": rng.random(c, dtype=np.float32),
        "terminal": (rng.random(c) < p_terminal).astype(np.uint8),
        "leaf_values": rng.random(m, dtype=np.float32),
    }


def run_workload(backend: str, cfg: EngineConfig, trees: int, branching: int, k: int, rounds: int,
                 seed: int, p_terminal: float) -> dict:
    """Run `rounds` search rounds; returns timings (seconds per round) and the final forest."""
    rng = np.random.default_rng(seed)
    f = make_forest(cfg, backend=backend)
    roots = f.add_roots(np.arange(trees, dtype=np.int64))
    sel, exp, bkp, leaves_n, coll = [], [], [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        _, leaves, collisions = f.select(roots, k)
        t1 = time.perf_counter()
        inp = _round_inputs(rng, len(leaves), branching, p_terminal)
        t2 = time.perf_counter()
        f.expand(leaves, inp["counts"], inp["priors"], inp["payloads"], inp["rewards"], inp["values"],
                 inp["terminal"])
        t3 = time.perf_counter()
        f.backup(leaves, inp["leaf_values"])
        t4 = time.perf_counter()
        sel.append(t1 - t0)
        exp.append(t3 - t2)
        bkp.append(t4 - t3)
        leaves_n.append(len(leaves))
        coll.append(int(collisions.sum()))
    return {"forest": f, "select_s": np.array(sel), "expand_s": np.array(exp), "backup_s": np.array(bkp),
            "leaves": np.array(leaves_n), "collisions": np.array(coll)}


def _same_trees(a, b) -> bool:
    sa, sb = a.snapshot(), b.snapshot()
    return all(np.array_equal(sa[key], sb[key], equal_nan=sa[key].dtype.kind == "f") for key in sa)


def bench(cfg) -> dict:
    ecfg = EngineConfig(rule=cfg.rule, c=float(cfg.c), virtual_loss=float(cfg.virtual_loss),
                        max_depth=int(cfg.max_depth), pruning=cfg.pruning)
    common = dict(cfg=ecfg, trees=int(cfg.trees), branching=int(cfg.branching), k=int(cfg.k),
                  seed=int(cfg.seed), p_terminal=float(cfg.p_terminal))
    rounds, py_rounds = int(cfg.rounds), int(cfg.py_rounds)
    if rounds < 1 or py_rounds < 1 or py_rounds > rounds:
        raise ValueError(f"rounds={rounds}, py_rounds={py_rounds}: need 1 <= py_rounds <= rounds")
    # Warm-up (page faults, allocator), then the timed C++ run.
    run_workload("cpp", **{**common, "trees": min(common["trees"], 64)}, rounds=4)
    cpp = run_workload("cpp", **common, rounds=rounds)
    py = run_workload("py", **common, rounds=py_rounds)
    cpp_small = run_workload("cpp", **common, rounds=py_rounds)  # same rounds as Python, fresh forest
    parity = _same_trees(cpp_small["forest"], py["forest"])

    f = cpp["forest"]
    st = f.stats()
    leaves_total = int(cpp["leaves"].sum())
    round_s = cpp["select_s"] + cpp["expand_s"] + cpp["backup_s"]
    per_leaf = round_s / np.maximum(cpp["leaves"], 1)
    small_sel = float(cpp_small["leaves"].sum() / cpp_small["select_s"].sum())
    py_sel = float(py["leaves"].sum() / py["select_s"].sum())
    small_round = float(cpp_small["leaves"].sum() / (cpp_small["select_s"] + cpp_small["expand_s"]
                                                      + cpp_small["backup_s"]).sum())
    py_round = float(py["leaves"].sum() / (py["select_s"] + py["expand_s"] + py["backup_s"]).sum())
    cpp_sims = leaves_total / float(round_s.sum())
    out = {
        "bench": "engine",
        "trees": int(cfg.trees), "branching": int(cfg.branching), "max_depth": int(cfg.max_depth),
        "k": int(cfg.k), "rounds": rounds, "py_rounds": py_rounds, "rule": cfg.rule, "pruning": cfg.pruning,
        "virtual_loss": float(cfg.virtual_loss),
        # selects = leaves returned by select() (virtual loss applied; collisions excluded)
        "cpp_selects_per_s": round(leaves_total / float(cpp["select_s"].sum())),
        "py_selects_per_s": round(py_sel),
        # speedup on the same first py_rounds rounds (same trees, same inputs)
        "speedup": round(small_sel / py_sel, 1),
        "round_speedup": round(small_round / py_round, 1),
        "round_ms_4096_leaves": round(float(np.median(per_leaf)) * 4096 * 1e3, 3),
        "round_ms_median": round(float(np.median(round_s)) * 1e3, 3),
        "leaves_per_round": round(float(cpp["leaves"].mean()), 1),
        "select_ms_median": round(float(np.median(cpp["select_s"])) * 1e3, 3),
        "expand_ms_median": round(float(np.median(cpp["expand_s"])) * 1e3, 3),
        "backup_ms_median": round(float(np.median(cpp["backup_s"])) * 1e3, 3),
        "cpp_simulations_per_s": round(cpp_sims),
        "bytes_per_node": int(st["bytes_per_node"]),
        "nodes": int(st["nodes"]),
        "max_tree_depth": int(max(d for d, n in enumerate(st["depth_histogram"]) if n)),
        "collisions": int(st["collisions"]),
        "parity_cpp_py": bool(parity),
        "threads": int(cfg.threads),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }
    out["targets_met"] = bool(out["cpp_selects_per_s"] >= 1_000_000 and out["speedup"] >= 50
                              and out["round_ms_4096_leaves"] <= 10)
    if cfg.peers:
        out.update(peers.run_peers(cfg, cpp_sims))
    else:
        out["peers"] = "skipped (peers=false)"
    return out


def _table(res: dict) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        return
    t = Table(title=f"sphere bench engine: {res['trees']} trees, branching {res['branching']}, k={res['k']}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for key in ("cpp_selects_per_s", "py_selects_per_s", "speedup", "round_speedup", "round_ms_4096_leaves",
                "select_ms_median", "expand_ms_median", "backup_ms_median", "cpp_simulations_per_s",
                "bytes_per_node", "nodes", "max_tree_depth", "parity_cpp_py", "vs_llm_reasoners", "vs_mctx"):
        if key in res:
            t.add_row(key, f"{res[key]:,}" if isinstance(res[key], (int, float)) else str(res[key]))
    Console(stderr=True).print(t)


def main(cfg) -> float:
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.threads))
    res = bench(cfg)
    try:
        from hydra.core.hydra_config import HydraConfig

        outdir = Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # called outside Hydra (tests)
        outdir = None
    if outdir is not None:
        outdir.mkdir(parents=True, exist_ok=True)
        (outdir / "result.json").write_text(json.dumps(res, indent=2) + "\n")
    _table(res)
    print(json.dumps(res), flush=True)
    return float(res["cpp_selects_per_s"])
