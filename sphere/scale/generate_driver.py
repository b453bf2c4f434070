"""The `sphere generate` driver of ``runner=ray`` (sphere.scale.ray_runner): reads the run directory's
stage logs, chunks the unfinished problems over ``GenerateWorker`` actors, appends the returned records
durably (a problem never written twice), then calls ``Generator.finalize`` and writes ray_runner.json."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from sphere.data.problems import load_problems
from sphere.generate.generator import Generator
from sphere.generate.local import log_generate_stats
from sphere.generate.records import STAGE_FILES, read_stage_logs
from sphere.generate.records import is_finished as _is_finished
from sphere.generate.settings import validate_generate_config
from sphere.io import JsonlAppender, atomic_write_json
from sphere.loggers import make_logger
from sphere.progress import StageProgress
from sphere.scale.cluster import RayCluster, plain_config, validate_runner_config
from sphere.scale.pool import ActorPool, Chunk, _worker_pool, chunked
from sphere.scale.workers import GenerateWorker
from sphere.search.types import call_fill

STAGES = (1, 2, 3)
_SHOWN = ("pairs_per_stage", "yield", "engine_time_frac", "leaves_per_call_frac", "wall_s")


def stage_state(out: Path) -> dict[int, dict[str, dict]]:
    """``{stage: {problem_id: first record}}`` of the run directory's stage logs (sphere.generate.records)."""
    return read_stage_logs(out)


def is_finished(pid: str, state: dict[int, dict[str, dict]], st_cfg: Any) -> bool:
    """The resume rule of ``Generator.run`` (sphere.generate.records.is_finished)."""
    return _is_finished(pid, state, st_cfg)


def _sum_search(acc: dict, add: dict, batch_leaves: int) -> None:
    """Sum the per-chunk search statistics (``SearchStats.as_dict``) and recompute the ratios."""
    for role, d in add.items():
        a = acc.setdefault(role, {})
        for k, v in d.items():
            if k in ("mean_leaves_per_call", "leaves_per_call_frac"):
                continue
            if isinstance(v, int | float) and not isinstance(v, bool):
                a[k] = a.get(k, 0) + v
        a.update(call_fill(a, batch_leaves))


def chunk_size(cfg: DictConfig, todo: int) -> int:
    """``runner.chunk_size``, or ``auto``: enough problems to fill one backend call of
    ``search.batch_leaves`` prompts (paper mode: 2 chains, so 2 leaves per problem; mcts: 1), but no more
    than an even share of the unfinished problems per worker (so every worker has work)."""
    v = cfg.runner.chunk_size
    if v != "auto":
        return int(v)
    per = 2 if str(cfg.search.get("mode", "paper")) == "paper" else 1
    fill = -(-int(cfg.search.batch_leaves) // per)
    share = -(-max(1, todo) // int(cfg.runner.workers))
    return max(1, min(fill, share))


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _problems(cfg: DictConfig) -> list[dict]:
    """The configs checked, then the problems (unique ids)."""
    validate_runner_config(cfg.runner)
    validate_generate_config(cfg)
    problems = load_problems(cfg.data, int(cfg.seed))
    if not problems:
        raise SystemExit(f"sphere generate: data.problems={cfg.data.problems!r} gave no problems")
    if len({p["id"] for p in problems}) != len(problems):
        raise ValueError("data.problems: duplicate problem ids; ids must be unique")
    return problems


class _RayRound:
    """One `sphere generate` over the actors: the driver's side of the chunks (what is finished, the
    counts, the search statistics, ray_runner.json's ``info``)."""

    def __init__(self, cfg: DictConfig, out: Path, problems: list[dict]):
        self.cfg, self.out, self.problems = cfg, out, problems
        self.state = stage_state(out)
        self.todo = [p for p in problems if not is_finished(p["id"], self.state, cfg.stages)]
        self.size = chunk_size(cfg, len(self.todo))
        self.search: dict = {}
        self.counts = {"done": len(problems) - len(self.todo), "pairs": {1: 0, 2: 0, 3: 0}}
        self.info: dict[str, Any] = {
            "runner": "ray",
            "workers": int(cfg.runner.workers),
            "chunk_size": self.size,
            "problems": len(problems),
            "skipped_finished": len(problems) - len(self.todo),
            "chunks": 0,
            "phases": {},
            "workers_seen": {},
            "model_loads": {},
        }
        self.writers: dict[int, JsonlAppender] = {}
        self.prog: Any = None

    def run(self, on_dispatch: Callable[[Any, Chunk], None] | None) -> None:
        """The chunks of ``todo`` on ``runner.workers`` actors; records appended as chunks return."""
        cfg = self.cfg
        self.writers = {s: JsonlAppender(self.out / "stages" / STAGE_FILES[s]) for s in STAGES}
        try:
            with RayCluster(cfg.runner), StageProgress(len(self.problems), "generate[ray]") as self.prog:
                pool = _worker_pool(GenerateWorker, cfg.runner, cfg, plain_config(cfg))
                try:
                    self._phases(pool, on_dispatch)
                finally:
                    pool.close()
                    self._pool_info(pool)
                    atomic_write_json(self.out / "ray_runner.json", self.info)
        finally:
            for w in self.writers.values():
                w.close()

    def _phases(self, pool: ActorPool, on_dispatch: Callable | None) -> None:
        """Stage 3 runs in a phase of its own after every stage-1/2 chunk: each worker keeps its policy for
        the whole policy phase and its small model for the whole stage-3 phase (1 load each per round)."""
        defer3 = bool(self.cfg.stages.stage3)
        n = len(self._phase(pool, "policy" if defer3 else "all", self.todo, 0, on_dispatch))
        if defer3:
            st3 = [p for p in self.todo if not is_finished(p["id"], self.state, self.cfg.stages)]
            n += len(self._phase(pool, "small", st3, n, on_dispatch)) if st3 else 0
        self.info["chunks"] = n

    def _phase(self, pool: ActorPool, phase: str, ps: list[dict], first_id: int,
               on_dispatch: Callable | None) -> list[Chunk]:
        state = self.state
        chunks = [
            Chunk(
                first_id + i,
                "generate",
                {
                    "problems": part,
                    "prior": {s: [state[s][p["id"]] for p in part if p["id"] in state[s]] for s in STAGES},
                    "phase": phase,
                },
                len(part),
            )
            for i, part in enumerate(chunked(ps, self.size))
        ]
        t = time.perf_counter()
        pool.run(
            chunks,
            lambda a, ch: a.run_chunk.remote(ch.id, **ch.payload),
            self._on_result,
            on_poll=self._on_poll,
            on_dispatch=on_dispatch,
        )
        self.info["phases"][phase] = {"chunks": len(chunks), "problems": len(ps),
                                      "wall_s": time.perf_counter() - t}
        return chunks

    def _on_result(self, ch: Chunk, res: dict) -> None:
        """A chunk's records: new ones appended (a problem never twice), trees saved, counts updated."""
        state, out = self.state, self.out
        for s in STAGES:
            new = [r for r in res["records"][s] if r["problem_id"] not in state[s]]
            if new:
                self.writers[s].write_many(new)
            for r in new:
                state[s][r["problem_id"]] = r
                self.counts["pairs"][s] += len(r.get("pairs", []))
        for name, data in res["trees"].items():
            if not (out / "trees" / name).exists():
                _write_bytes_atomic(out / "trees" / name, data)
        _sum_search(self.search, res["search"], int(self.cfg.search.batch_leaves))
        w = res["worker"]
        key = f"{w['host']}:{w['pid']}"
        self.info["workers_seen"][key] = self.info["workers_seen"].get(key, 0) + 1
        self.info["model_loads"][key] = {**res["loads"], "node": w["node"], "slot": w["slot"]}
        self.counts["done"] = sum(1 for p in self.problems if is_finished(p["id"], state, self.cfg.stages))
        self.prog.update(self.counts)

    def _on_poll(self, running: dict) -> None:
        done = min(len(self.problems), self.counts["done"] + sum(running.values()))
        self.prog.update({**self.counts, "done": done})

    def _pool_info(self, pool: ActorPool) -> None:
        pst = pool.stats
        self.info.update(
            {
                "retries": pst.retries,
                "actor_deaths": pst.actor_deaths,
                "unavailable": pst.unavailable,
                "taken_back": pst.taken_back,
                "retried_chunks": pst.retried_chunks,
                "per_actor_chunks": pst.per_actor_chunks,
                "events": pst.events,
            }
        )


def _check_all_finished(problems: list[dict], out: Path, cfg: DictConfig) -> None:
    missing = [p["id"] for p in problems if not is_finished(p["id"], stage_state(out), cfg.stages)]
    if missing:
        raise RuntimeError(
            f"ray runner: {len(missing)} problems unfinished after all chunks returned "
            f"(first: {missing[:5]}); rerun the same command to resume"
        )


def _report_loads(loads: dict) -> None:
    def roles(d: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in d.items() if k not in ("node", "slot"))

    print("[ray runner] model loads per worker: "
          + "; ".join(f"{w} (node {d['node'][:8]}): {roles(d)}" for w, d in loads.items()),
          file=sys.stderr, flush=True)


def generate(
    cfg: DictConfig, out: str | Path, *, on_dispatch: Callable[[Any, Chunk], None] | None = None
) -> dict:
    """`sphere generate` over Ray; writes the same files as ``Generator.run`` in ``out`` and returns the
    stats dict (generate_stats.json). ``on_dispatch(actor, chunk)``: hook called after each dispatch."""
    out = Path(out)
    problems = _problems(cfg)
    gen = Generator(cfg, out)
    rnd = _RayRound(cfg, out, problems)
    t0 = time.perf_counter()
    if rnd.todo:
        rnd.run(on_dispatch)
    _check_all_finished(problems, out, cfg)
    wall = time.perf_counter() - t0
    stats = gen.finalize(problems, {"search": rnd.search}, wall)
    info = rnd.info
    info["wall_s"] = wall
    atomic_write_json(out / "ray_runner.json", info)
    if info["model_loads"]:  # the run's stats say what each worker loaded this round (policy, small, scorer)
        stats["model_loads_per_worker"] = info["model_loads"]
        atomic_write_json(out / "generate_stats.json", stats)
        _report_loads(info["model_loads"])
    return stats


def main_generate(cfg: DictConfig, out: Path) -> float:
    """The `sphere generate` entry for ``runner=ray`` (called from sphere.generate.generator.main)."""
    logger = make_logger(cfg, out, "generate")
    try:
        stats = generate(cfg, out)
        log_generate_stats(logger, stats, out)
        print(json.dumps({k: stats[k] for k in _SHOWN}))
        return float(stats["pairs_total"])
    finally:
        logger.finish()
