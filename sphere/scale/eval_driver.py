"""The `sphere eval` driver of ``runner=ray`` (sphere.scale.ray_runner): checks the run directory's eval
signature, chunks each benchmark's unfinished records over ``EvalWorker`` actors, appends what they return,
then runs the harness's own summary (results.json/md) and writes eval/ray_runner.json."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sphere.data import benchmark_key, load_benchmark
from sphere.evaluation.harness import evaluate as evaluate_local
from sphere.evaluation.harness import run_eval
from sphere.evaluation.settings import expand_benchmarks, settings_from_config
from sphere.evaluation.signatures import checker_info, eval_signature, prompt_info, reuse_records
from sphere.io import JsonlAppender, atomic_write_json
from sphere.progress import StageProgress
from sphere.prompts import family_config
from sphere.rundir import check_or_record, default_mode, resume_mode
from sphere.scale.cluster import RayCluster, plain_config, validate_runner_config
from sphere.scale.pool import ActorPool, Chunk, PoolStats, _worker_pool, chunked
from sphere.scale.workers import EvalWorker


def _model_name(cfg: DictConfig) -> str:
    return str(OmegaConf.select(cfg, "model.policy", default=""))


def _check_signature(cfg: DictConfig, out_dir: Path, settings: Any, sig: dict) -> str:
    """The run directory's signature.json, as run_eval checks it (sphere/rundir/): refuse, or with
    resume=fresh move eval/ aside, before any chunk is dispatched. Returns the resume mode."""
    parts = {"model": _model_name(cfg), "backend": sig["backend_name"],
             "prompt": prompt_info(family_config(cfg)), "checker": checker_info()}
    mode = resume_mode(settings.resume)
    check_or_record(out_dir, "eval", eval_signature(parts, settings), mode=mode, outputs=["eval"])
    return default_mode() if mode == "auto" else mode


def _plan_chunks(loaded: list, out_dir: Path, mode: str, sig: str, size: int) -> tuple[dict, list[Chunk]]:
    """``({benchmark key: ids already written}, chunks of the records still to do)``."""
    present: dict[str, set] = {}
    chunks: list[Chunk] = []
    for n, recs in loaded:
        key = benchmark_key(n)
        path = out_dir / "eval" / f"{key}.jsonl"
        if mode == "fresh":
            path.unlink(missing_ok=True)
        present[key] = set(reuse_records(path, recs, sig, mode))
        todo = [r for r in recs if r["id"] not in present[key]]
        for part in chunked(todo, size):
            chunks.append(Chunk(len(chunks), "eval", {"name": n, "records": part}, len(part)))
    return present, chunks


def _run_chunks(pool: ActorPool, chunks: list[Chunk], loaded: list, present: dict, out_dir: Path,
                on_dispatch: Callable | None) -> PoolStats:
    """The chunks on the actors; each chunk's new records appended to eval/<benchmark>.jsonl."""
    writers = {
        benchmark_key(n): JsonlAppender(out_dir / "eval" / f"{benchmark_key(n)}.jsonl") for n, _ in loaded
    }
    total = sum(len(recs) for _, recs in loaded)
    done = {"done": sum(len(v) for v in present.values())}

    def on_result(ch: Chunk, res: dict) -> None:
        key = benchmark_key(ch.payload["name"])
        new = [r for r in res["records"] if r["id"] not in present[key]]
        writers[key].write_many(new)
        present[key].update(r["id"] for r in new)
        done["done"] = sum(len(v) for v in present.values())
        prog.update(done)

    try:
        with StageProgress(total, "eval[ray]") as prog:
            return pool.run(
                chunks,
                lambda a, ch: a.run_chunk.remote(ch.id, **ch.payload),
                on_result,
                on_poll=lambda running: prog.update(
                    {"done": min(total, done["done"] + sum(running.values()))}
                ),
                on_dispatch=on_dispatch,
            )
    finally:
        for w in writers.values():
            w.close()


def _backend_stats(pool: ActorPool, timeout: float) -> dict:
    """The live actors' backend counters, summed."""
    import ray

    out: dict = {}
    live = [a for i, a in enumerate(pool.actors) if i not in pool.dead]
    for st in ray.get([a.stats.remote() for a in live], timeout=timeout):
        for k, v in (st or {}).items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
    return out


def evaluate(
    cfg: DictConfig, out_dir: str | Path, *, on_dispatch: Callable[[Any, Chunk], None] | None = None
) -> dict:
    """`sphere eval` over Ray; writes eval/<benchmark>.jsonl, results.json, results.md like ``evaluate``."""
    import ray

    out_dir = Path(out_dir)
    rcfg = cfg.runner
    validate_runner_config(rcfg)
    if OmegaConf.select(cfg, "backend.name", default=None) == "replay":  # grading stored text: no model
        return evaluate_local(cfg, out_dir)
    settings = settings_from_config(cfg)
    data_dir = OmegaConf.select(cfg, "paths.data_dir", default=None)
    limit = cfg.get("limit")
    loaded = [(n, load_benchmark(n, data_dir, limit)) for n in expand_benchmarks(cfg.benchmarks)]
    t0 = time.perf_counter()
    info: dict[str, Any] = {
        "runner": "ray",
        "workers": int(rcfg.workers),
        "chunk_size": int(rcfg.eval_chunk_size),
    }
    with RayCluster(rcfg):
        pool = _worker_pool(EvalWorker, rcfg, cfg, plain_config(cfg))
        try:
            sig = ray.get(pool.actors[0].signature.remote())
            mode = _check_signature(cfg, out_dir, settings, sig)
            present, chunks = _plan_chunks(loaded, out_dir, mode, sig["sig"], int(rcfg.eval_chunk_size))
            pst = _run_chunks(pool, chunks, loaded, present, out_dir, on_dispatch)
            backend_stats = _backend_stats(pool, float(rcfg.unavailable_s))
        finally:
            pool.close()
    info.update({"chunks": len(chunks), "retries": pst.retries, "actor_deaths": pst.actor_deaths,
                 "actors_started": pst.actors_started, "unavailable": pst.unavailable,
                 "taken_back": pst.taken_back, "events": pst.events, "retried_chunks": pst.retried_chunks,
                 "per_actor_chunks": pst.per_actor_chunks, "wall_s": time.perf_counter() - t0})
    results = run_eval(  # the harness's own summary and writers over the records the actors wrote
        None,
        expand_benchmarks(cfg.benchmarks),
        out_dir,
        data_dir=data_dir,
        limit=limit,
        settings=replace(settings, resume="force"),  # the records are this run's, checked above
        family_cfg=family_config(cfg),
        model_name=_model_name(cfg),
        reference_path=cfg.get("reference_results"),
        progress=False,
        extra_meta={"runner": info},
        backend_name=sig["backend_name"],
        backend_stats=backend_stats,
    )
    atomic_write_json(out_dir / "eval" / "ray_runner.json", info)
    return results
