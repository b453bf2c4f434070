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

import os
import platform
import time

import numpy as np

from sphere.bench import emit, metrics_table
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


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


def run_workload(backend: str, cfg: EngineConfig, trees: int, branching: int, k: int, rounds: int,
                 seed: int, p_terminal: float) -> dict:
    """Run `rounds` search rounds; returns per-round seconds of select/expand/backup on two clocks
    (wall: perf_counter; cpu: this thread's CPU time, which excludes time other processes hold the core)
    and the final forest."""
    rng = np.random.default_rng(seed)
    f = make_forest(cfg, backend=backend)
    roots = f.add_roots(np.arange(trees, dtype=np.int64))
    t = {f"{part}_{clock}": [] for part in ("select", "expand", "backup") for clock in ("wall", "cpu")}
    leaves_n, coll = [], []
    for _ in range(rounds):
        t0 = _now()
        _, leaves, collisions = f.select(roots, k)
        t1 = _now()
        inp = _round_inputs(rng, len(leaves), branching, p_terminal)
        t2 = _now()
        f.expand(leaves, inp["counts"], inp["priors"], inp["payloads"], inp["rewards"], inp["values"],
                 inp["terminal"])
        t3 = _now()
        f.backup(leaves, inp["leaf_values"])
        t4 = _now()
        for part, (a, b) in (("select", (t0, t1)), ("expand", (t2, t3)), ("backup", (t3, t4))):
            t[f"{part}_wall"].append(b[0] - a[0])
            t[f"{part}_cpu"].append(b[1] - a[1])
        leaves_n.append(len(leaves))
        coll.append(int(collisions.sum()))
    out = {key: np.array(v) for key, v in t.items()}
    out.update(forest=f, leaves=np.array(leaves_n), collisions=np.array(coll))
    return out


def _same_trees(a, b) -> bool:
    sa, sb = a.snapshot(), b.snapshot()
    return all(np.array_equal(sa[key], sb[key], equal_nan=sa[key].dtype.kind == "f") for key in sa)


def _runs(cfg) -> tuple[dict, dict, dict, bool]:
    """The timed C++ run, the Python run and a fresh C++ run over the same first `py_rounds` rounds, and
    whether the last two built the same trees."""
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
    del py["forest"], cpp_small["forest"]
    return cpp, py, cpp_small, parity


def _rates(run: dict, clk: str) -> dict:
    n = np.maximum(run["leaves"], 1).astype(float)
    sel = run[f"select_{clk}"]
    rnd = sel + run[f"expand_{clk}"] + run[f"backup_{clk}"]
    return {
        # medians over rounds: robust to the odd round where the machine was busy elsewhere
        "selects_per_s": float(np.median(n / np.maximum(sel, 1e-9))),
        "round_per_leaf_s": float(np.median(rnd / n)),
        "sims_per_s": float(np.median(n / np.maximum(rnd, 1e-9))),
        "select_ms": float(np.median(sel)) * 1e3,
        "expand_ms": float(np.median(run[f"expand_{clk}"])) * 1e3,
        "backup_ms": float(np.median(run[f"backup_{clk}"])) * 1e3,
        "round_ms": float(np.median(rnd)) * 1e3,
    }


def _result(cfg, clock: str, cpp: dict, py: dict, cpp_small: dict, parity: bool) -> dict:
    """The result object: the settings, the rates on `clock` (and on the wall clock), the forest's stats and
    the machine."""
    st = cpp["forest"].stats()
    main_, wall = _rates(cpp, clock), _rates(cpp, "wall")
    small, pyr = _rates(cpp_small, clock), _rates(py, clock)
    small_wall, py_wall = _rates(cpp_small, "wall"), _rates(py, "wall")
    return {
        "bench": "engine",
        "trees": int(cfg.trees), "branching": int(cfg.branching), "max_depth": int(cfg.max_depth),
        "k": int(cfg.k), "rounds": int(cfg.rounds), "py_rounds": int(cfg.py_rounds), "rule": cfg.rule,
        "pruning": cfg.pruning, "virtual_loss": float(cfg.virtual_loss),
        "timer": clock,  # cpu = thread CPU time (excludes time other processes hold the core); wall = perf_counter
        # selects = leaves returned by select() (virtual loss applied; collisions excluded), median round
        "cpp_selects_per_s": round(main_["selects_per_s"]),
        "py_selects_per_s": round(pyr["selects_per_s"]),
        # speedup on the same first py_rounds rounds (same trees, same inputs)
        "speedup": round(small["selects_per_s"] / pyr["selects_per_s"], 1),
        "round_speedup": round(small["sims_per_s"] / pyr["sims_per_s"], 1),
        # select + expand + backup, per leaf, scaled to 4,096 leaves (= trees*k at the defaults)
        "round_ms_4096_leaves": round(main_["round_per_leaf_s"] * 4096 * 1e3, 3),
        "round_ms_median": round(main_["round_ms"], 3),
        "leaves_per_round": round(float(cpp["leaves"].mean()), 1),
        "select_ms_median": round(main_["select_ms"], 3),
        "expand_ms_median": round(main_["expand_ms"], 3),
        "backup_ms_median": round(main_["backup_ms"], 3),
        "cpp_simulations_per_s": round(main_["sims_per_s"]),
        "wall_cpp_selects_per_s": round(wall["selects_per_s"]),
        "wall_round_ms_4096_leaves": round(wall["round_per_leaf_s"] * 4096 * 1e3, 3),
        "wall_speedup": round(small_wall["selects_per_s"] / py_wall["selects_per_s"], 1),
        "bytes_per_node": int(st["bytes_per_node"]),
        "nodes": int(st["nodes"]),
        "max_tree_depth": int(max(d for d, n in enumerate(st["depth_histogram"]) if n)),
        "collisions": int(st["collisions"]),
        "parity_cpp_py": bool(parity),
        "threads": int(cfg.threads),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def bench(cfg) -> dict:
    cpp, py, cpp_small, parity = _runs(cfg)
    clock = str(cfg.timer)
    if clock not in ("cpu", "wall"):
        raise ValueError(f"timer={clock!r}: allowed 'cpu', 'wall'")
    out = _result(cfg, clock, cpp, py, cpp_small, parity)
    out["targets_met"] = bool(out["cpp_selects_per_s"] >= 1_000_000 and out["speedup"] >= 50
                              and out["round_ms_4096_leaves"] <= 10)
    if cfg.peers:
        out.update(peers.run_peers(cfg, out["cpp_simulations_per_s"], clock))
    else:
        out["peers"] = "skipped (peers=false)"
    return out


def _table(res: dict) -> None:
    metrics_table(
        f"sphere bench engine: {res['trees']} trees, branching {res['branching']}, k={res['k']}", res,
        ("timer", "cpp_selects_per_s", "py_selects_per_s", "speedup", "round_speedup", "round_ms_4096_leaves",
         "wall_cpp_selects_per_s", "wall_round_ms_4096_leaves", "wall_speedup", "loadavg_1m",
         "select_ms_median", "expand_ms_median", "backup_ms_median", "cpp_simulations_per_s",
         "bytes_per_node", "nodes", "max_tree_depth", "parity_cpp_py", "vs_llm_reasoners", "vs_mctx"),
        fmt=lambda v: f"{v:,}" if isinstance(v, (int, float)) else str(v),
    )


def main(cfg) -> float:
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.threads))
    res = bench(cfg)
    _table(res)
    emit(res)
    return float(res["cpp_selects_per_s"])
