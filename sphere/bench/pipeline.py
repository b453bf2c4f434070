"""`sphere bench pipeline`: model work per preference pair, sphere's loop against the loops researchers write.

    sphere bench pipeline                                   # 64 mini problems, vllm(-cpu), symbolic scorer
    sphere bench pipeline problems=16 backend=transformers
    sphere bench pipeline model=/path/to/policy data.problems=math_train problems=32 scorer=prm
    sphere bench pipeline arms=[sphere,one_leaf] search.dedup_candidates=false   # the "before" row

Stage 1 (the paper's self-generation search: two chains per problem, E candidates per expansion, minmax) runs
three ways in one process, on the same problems, backend, scorer, verifier, base seed and search settings:

1. ``sphere``: the batched forest loop as ``sphere generate`` runs it (``SearchDriver``, ``batch_leaves``
   prompts per backend call, trees joining as others retire, one scorer call per backend call, duplicate
   candidates merged when ``search.dedup_candidates``);
2. ``per_problem``: one problem at a time, one expansion (E candidates) per backend call, the scorer called
   per candidate, the two final solutions checked per problem: the loop as the paper reads;
3. ``one_leaf``: every live tree (up to ``batch_leaves`` of them) contributes one leaf per backend call and
   the scorer runs once per call (the rStar style), with the backend's prefix caching off.

The two baselines are plain Python over the same backend API (``next_steps``), the same scorer object and
the same checker. Like sphere they expand a node once while both chains still share it (a chain pair that
coincides is one expansion), so the three arms run the same search; they sample with their own per-call
seeds (same base seed), so their samples, and the pairs, differ by chance. Pairs = stage-1 routes
``pair`` + ``inverted`` (swapped), before the pair filters.

Per arm: wall seconds (after a warm-up), backend calls, prompt tokens sent, prompt tokens computed (vLLM:
its ``prompt_tokens_by_source{local_compute}`` counter, i.e. after prefix-cache hits and counting each of
the n sequences a request fans out to; transformers: sent x n, every sequence prefills its prompt, padding
not counted), generated tokens (the backend's count), scorer items / tokens (a PRM: the tokens it ran,
padding included; the symbolic checker runs no model: the tokens of the text it read, under the policy
tokenizer), pairs, and per-pair ratios. The prefix cache is reset between arms. The last stdout line is one
JSON object (also ``result.json`` in the run directory) with ``speedup_vs_per_problem`` and
``speedup_vs_one_leaf`` (wall seconds per pair of the baseline over sphere's) and the per-pair figures.
"""

# The code lives in four modules (issue #18; this docstring stays as it was: it is `sphere bench pipeline
# --help`): this one keeps ``bench`` and ``main`` and keeps the other names importable;
# sphere.bench.pipeline_loops (the arms: ``PaperChains``, ``run_per_problem``, ``run_one_leaf``,
# ``run_sphere``), sphere.bench.pipeline_measure (counting wrappers, ``_run_arm``, ``_warm``) and
# sphere.bench.pipeline_report (aggregation over the repeats, speedups, the table).

from __future__ import annotations

import os
import platform
import time
from typing import Any

from omegaconf import OmegaConf

from sphere.backends import make_backend
from sphere.bench import emit
from sphere.bench.pipeline_loops import (  # moved out of this module (issue #18); importable here too
    ARMS,
    PaperChains,
    run_one_leaf,
    run_per_problem,
    run_sphere,
)
from sphere.bench.pipeline_measure import (  # moved out of this module (issue #18); importable here too
    _loadavg,
    _run_arm,
    _warm,
)
from sphere.bench.pipeline_report import _aggregate, _summary, _table
from sphere.data.problems import load_problems
from sphere.model_paths import resolve_model
from sphere.prompts import family_config
from sphere.rewards import make_scorer
from sphere.search.config import validate_search_config
from sphere.verify import check_answers


# ---------------------------------------------------------------------------------------------- main
def bench(cfg) -> dict:
    scfg = cfg.search
    arms, n, repeats = _check_settings(cfg)
    problems, warm_problems = _problems(cfg, n)
    model = resolve_model(str(cfg.model.policy), cfg)
    fam = family_config(cfg)
    name = str(cfg.backend.name)
    vllm_over = dict(OmegaConf.to_container(cfg.vllm_overrides, resolve=True) or {}) if name == "vllm" else {}
    verifier = check_answers
    res = _header(cfg, model, problems, repeats)
    if vllm_over:
        res["vllm_overrides"] = vllm_over
    # vLLM: one engine with prefix caching for sphere and the per-problem loop, one without for the one-leaf
    # loop, both open so the arms can be interleaved; transformers has no prefix cache: one backend.
    # Order matters: each new vLLM engine unregisters the Prometheus metrics of the engines before it
    # (vllm/v1/metrics/loggers.py, PrometheusStatLogger.__init__), so the scorer (a vLLM PRM) opens first, the
    # engine without prefix caching next (it needs no counters: it computes every sequence's prompt) and the
    # engine whose cache hits are counted last.
    apc_of = {a: (a != "one_leaf") if name == "vllm" else True for a in arms}
    backends: dict[bool, Any] = {}
    scorer = None
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    try:
        scorer = make_scorer(cfg)
        for apc in sorted(set(apc_of.values())):
            _open_backend(cfg, model, fam, verifier, scfg, vllm_over, apc, res, backends)
        if warm_problems:  # every arm once on problems outside the bench's: code paths, shapes, caches
            for arm in arms:
                b = backends[apc_of[arm]]
                _run_arm(arm, warm_problems, b, scorer, verifier, cfg, fam, b.tokenizer)
        for rep in range(repeats):
            for arm in arms:
                b = backends[apc_of[arm]]
                runs[arm].append(_timed_arm(cfg, arm, rep, problems, b, apc_of[arm], scorer, verifier, fam))
    finally:
        if scorer is not None and getattr(scorer, "close", None) is not None:
            scorer.close()
        for b in backends.values():
            b.close()
    for arm, rs in runs.items():
        res["arms"][arm] = _aggregate(rs)
    res["machine"]["loadavg_1m_end"] = _loadavg()
    _summary(res)
    return res


def _check_settings(cfg) -> tuple[list[str], int, int]:
    """(arms, problems, repeats), refused in one line where the bench cannot compare the loops."""
    validate_search_config(cfg.search)
    if str(cfg.search.mode) != "paper" or bool(cfg.search.outcome_in_reward):
        raise ValueError(
            "bench pipeline compares stage-1 loops of the paper mode: needs search.mode=paper and "
            "search.outcome_in_reward=false"
        )
    arms = [str(a) for a in cfg.arms]
    for a in arms:
        if a not in ARMS:
            raise ValueError(f"config arms: unknown arm {a!r}; allowed {', '.join(ARMS)}")
    n, repeats = int(cfg.problems), int(cfg.repeats)
    if n < 1:
        raise ValueError(f"config problems={n}: allowed an integer >= 1")
    if repeats < 1:
        raise ValueError(f"config repeats={repeats}: allowed an integer >= 1")
    return arms, n, repeats


def _problems(cfg, n: int) -> tuple[list[dict], list[dict]]:
    """The bench's ``n`` problems and the warm-up problems after them."""
    n_warm = int(cfg.warmup_problems)
    data = OmegaConf.merge(cfg.data, {"limit": n + n_warm})
    if str(cfg.data.problems) == "mini":
        data.mini_n = n + n_warm
    loaded = load_problems(data, int(cfg.seed))
    problems, warm_problems = loaded[:n], loaded[n:]
    if not problems:
        raise ValueError(f"data.problems={cfg.data.problems!r} gave no problems")
    return problems, warm_problems


def _header(cfg, model, problems: list[dict], repeats: int) -> dict[str, Any]:
    """The result's settings and machine; ``arms`` filled in by the runs."""
    scfg = cfg.search
    return {
        "bench": "pipeline",
        "model": str(model),
        "backend": str(cfg.backend.name),
        "scorer": str(cfg.scorer.name),
        "problems": len(problems),
        "data": str(cfg.data.problems),
        "repeats": repeats,
        "search": {
            k: OmegaConf.to_container(scfg, resolve=True)[k]
            for k in (
                "mode",
                "expansions",
                "temperature",
                "max_step_tokens",
                "max_depth",
                "batch_leaves",
                "reward",
                "dedup_candidates",
            )
            if k in scfg
        },
        "seed": int(cfg.seed),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE"),
            "transformers_offline": os.environ.get("TRANSFORMERS_OFFLINE"),
            "loadavg_1m_start": _loadavg(),
        },
        "arms": {},
    }


def _open_backend(cfg, model, fam, verifier, scfg, vllm_over: dict, apc: bool, res: dict,
                  backends: dict[bool, Any]) -> None:
    """One backend (vLLM: with or without prefix caching) into ``backends[apc]`` (before its warm-up, so the
    caller closes it whatever happens), warmed up; its start-up time goes in ``res``."""
    over = dict(vllm_over)
    if str(cfg.backend.name) == "vllm":
        over["enable_prefix_caching"] = apc
    t0 = time.perf_counter()
    b = make_backend(cfg, model, **over)
    backends[apc] = b
    _warm(b, b.tokenizer, fam, verifier, scfg, int(cfg.warmup_rounds))
    res["machine"][f"engine_startup_s_{'apc_on' if apc else 'apc_off'}"] = round(
        time.perf_counter() - t0, 1
    )


def _timed_arm(cfg, arm: str, rep: int, problems: list[dict], b: Any, apc: bool, scorer: Any, verifier: Any,
               fam: dict) -> dict:
    """One timed run of ``arm`` (repeat ``rep``), printed as a progress line."""
    name, repeats = str(cfg.backend.name), int(cfg.repeats)
    pp_limit = cfg.get("per_problem_limit")
    probs = (
        problems[: int(pp_limit)] if arm == "per_problem" and pp_limit is not None else problems
    )
    r = _run_arm(
        arm,
        probs,
        b,
        scorer,
        verifier,
        cfg,
        fam,
        b.tokenizer,
        counters=name == "vllm" and apc,
    )
    r["prefix_caching"] = bool(apc) if name == "vllm" else None
    print(
        f"bench pipeline: repeat {rep + 1}/{repeats} {arm}: {r['problems']} problems, "
        f"{r['pairs']} pairs, {r['wall_s']:.1f} s, {r['backend_calls']} calls "
        f"(load {r['loadavg_1m_start']})",
        flush=True,
    )
    return r


def main(cfg) -> dict:
    res = bench(cfg)
    _table(res)
    emit(res)
    return res


__all__ = ["ARMS", "PaperChains", "bench", "main", "run_one_leaf", "run_per_problem", "run_sphere"]
