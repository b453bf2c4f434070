"""The ``search`` config node (moved out of sphere/search/driver.py, issue #18): ``validate_search_config``
(a ValueError naming the key and what is allowed), ``_engine_config`` (the node -> ``EngineConfig`` of the
forest) and ``estimate_backend_calls`` (the rough plan figures dry runs print)."""

from __future__ import annotations

import math
from typing import Any

from sphere.engine import EngineConfig


def _engine_config(scfg: Any) -> EngineConfig:
    e = scfg.engine
    return EngineConfig(
        rule=str(e.rule),
        c=float(e.c),
        virtual_loss=float(e.virtual_loss),
        fpu=str(e.fpu),
        fpu_reduction=float(e.fpu_reduction),
        q_norm=bool(e.q_norm),
        max_depth=int(scfg.max_depth),
        pruning=str(scfg.pruning.policy),
        prune_k=int(scfg.pruning.k),
        prune_tau=float(scfg.pruning.tau),
        prune_relative=bool(scfg.pruning.relative),
    )


def validate_search_config(scfg: Any) -> None:
    """Raise ValueError naming the key and what is allowed."""

    def need(cond: bool, key: str, allowed: str, val: Any) -> None:
        if not cond:
            raise ValueError(f"config search.{key}={val!r} is invalid: allowed {allowed}")

    need(scfg.mode in ("paper", "mcts"), "mode", "'paper' or 'mcts'", scfg.mode)
    need(int(scfg.expansions) >= 1, "expansions", "an integer >= 1 (E candidates per expansion)",
         scfg.expansions)
    need(int(scfg.max_depth) >= 1, "max_depth", "an integer >= 1", scfg.max_depth)
    need(int(scfg.batch_leaves) >= 1, "batch_leaves", "an integer >= 1", scfg.batch_leaves)
    need(int(scfg.max_step_tokens) >= 1, "max_step_tokens", "an integer >= 1 (token budget of one step)",
         scfg.max_step_tokens)
    need(int(scfg.k) >= 1, "k", "an integer >= 1 (leaves per tree per round)", scfg.k)
    need(int(scfg.simulations) >= 1, "simulations", "an integer >= 1", scfg.simulations)
    need(float(scfg.temperature) >= 0, "temperature", "a number >= 0", scfg.temperature)
    need(0 < float(scfg.top_p) <= 1, "top_p", "a number in (0, 1]", scfg.top_p)
    need(scfg.reward in ("raw", "advantage", "min"), "reward", "raw | advantage | min", scfg.reward)
    need(scfg.outcome in ("none", "replace", "mix", "add"), "outcome", "none | replace | mix | add",
         scfg.outcome)
    need(scfg.backup in ("mean", "max"), "backup", "mean | max", scfg.backup)
    dd = scfg.get("dedup_candidates", True)
    need(isinstance(dd, bool), "dedup_candidates", "true | false", dd)
    p = scfg.pruning
    need(p.policy in ("none", "minmax", "topk", "threshold"), "pruning.policy",
         "none | minmax | topk | threshold", p.policy)
    if p.policy == "topk":
        need(1 <= int(p.k) <= int(scfg.expansions), "pruning.k",
             f"1..search.expansions ({scfg.expansions})", p.k)
    if p.policy == "threshold":
        hi = 2.0 if p.relative else 1.0
        need(0.0 <= float(p.tau) <= hi, "pruning.tau",
             "[0, 1] (absolute) or [0, 2] (relative to the best sibling)", p.tau)
    e = scfg.engine
    need(e.rule in ("uct", "puct"), "engine.rule", "uct | puct", e.rule)
    need(float(e.c) >= 0, "engine.c", "a number >= 0", e.c)
    need(float(e.virtual_loss) >= 0, "engine.virtual_loss", "a number >= 0", e.virtual_loss)


def estimate_backend_calls(n_problems: int, scfg: Any) -> dict:
    """Rough plan figures for dry runs: expansions, candidates and backend calls."""
    if scfg.mode == "paper":
        exp_per_problem = 2 * int(scfg.max_depth)
    else:
        exp_per_problem = int(scfg.simulations)
    expansions = n_problems * exp_per_problem
    return {
        "expansions": expansions,
        "candidates": expansions * int(scfg.expansions),
        "backend_calls": math.ceil(expansions / max(1, int(scfg.batch_leaves))),
    }
