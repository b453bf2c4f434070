"""`runner=ray`: `sphere generate` and `sphere eval` sharded over Ray actors, same outputs as one process.

    sphere generate runner=ray runner.workers=2 hydra.run.dir=DIR          # local cluster, started here
    sphere generate runner=ray runner.workers=8 runner.address=auto backend=vllm model=qwen2_5_7b ...
    sphere eval runner=ray runner.workers=8 model=/ckpt backend=vllm benchmarks=[all]

Design (conf/runner/ray.yaml documents every knob):

- The driver (this process) loads the problems, reads the run directory's resume logs and keeps only the
  unfinished problems, cuts them into chunks of ``runner.chunk_size`` and hands chunks to
  ``runner.workers`` actors. Each actor builds ONE backend (``sphere.backends.make_backend``; a vLLM engine
  of ``backend.tensor_parallel_size`` GPUs, ``runner.gpus_per_worker``) and one scorer, once, and runs
  each chunk with the single-process code (``Generator.run`` / ``evaluate_benchmark``) in a scratch
  directory of its own, so every actor has its own search forest.
- A chunk's records come back to the driver, which appends them durably to the run directory's
  ``stages/stage{1,2,3}.jsonl`` (``eval/<benchmark>.jsonl``), skipping problem ids already there: a chunk
  that is retried, or a run that is resumed, never writes a problem twice.
- An actor that dies (``RayActorError``: killed, OOM, node lost) is replaced by a fresh one and its chunk
  goes back to the front of the queue, to the next free actor (``runner.max_chunk_retries``,
  ``runner.max_actor_restarts``). An exception raised by our own code in a chunk is not retried: it would
  fail again; the run stops with the actor's traceback.
- At the end the driver calls the single-process output code: ``Generator.finalize`` (pairs.jsonl,
  trajectories.jsonl, generate_stats.json) or ``run_eval`` over the finished records (results.json/md).
  ``ray_runner.json`` adds what only a distributed run has (workers, chunks, retries, deaths).

Known limits: chunk granularity is the unit of durability (a driver crash loses the chunks in flight, not
the finished ones); the actors need the model paths and the Python environment on every node (a shared
filesystem or the same image), the problems themselves travel from the driver.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sphere.io import JsonlAppender, atomic_write_json, read_jsonl_tolerant

STAGES = (1, 2, 3)


# ---------------------------------------------------------------------------------------------- config
def validate_runner_config(rcfg: Any) -> None:
    def pos_int(key: str, minimum: int = 1) -> None:
        v = rcfg.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise ValueError(f"config runner.{key}={v!r}: allowed an integer >= {minimum}")

    for k in ("workers", "chunk_size", "eval_chunk_size", "cpus_per_worker"):
        pos_int(k)
    for k in ("max_chunk_retries", "max_actor_restarts"):
        pos_int(k, 0)
    g = rcfg.get("gpus_per_worker")
    if not (g == "auto" or (isinstance(g, int | float) and not isinstance(g, bool) and g >= 0)):
        raise ValueError(f"config runner.gpus_per_worker={g!r}: allowed auto or a number >= 0")
    if rcfg.get("num_cpus") is not None:
        pos_int("num_cpus")
    if not isinstance(rcfg.get("object_store_mb"), int) or rcfg.get("object_store_mb") < 64:
        raise ValueError(
            f"config runner.object_store_mb={rcfg.get('object_store_mb')!r}: allowed an integer >= 64"
        )
    if float(rcfg.get("progress_poll_s", 1.0)) <= 0:
        raise ValueError(
            f"config runner.progress_poll_s={rcfg.get('progress_poll_s')!r}: allowed a number > 0"
        )


def plain_config(cfg: Any) -> dict:
    """The composed config as a resolved plain dict (no ``hydra`` node) to ship to the actors: Hydra
    resolvers such as ``${hydra:runtime.cwd}`` only resolve in the driver."""
    return {
        str(k): (OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k])
        for k in cfg
        if k != "hydra"
    }


# ---------------------------------------------------------------------------------------------- cluster
def runtime_env(rcfg: Any) -> dict:
    """Environment of the actors: thread caps, offline flags, the sphere caches and the repository on
    PYTHONPATH (so a node without the editable install still imports this checkout)."""
    repo = str(Path(__file__).resolve().parents[2])
    threads = str(int(rcfg.cpus_per_worker))
    env = {
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([repo, *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    for k, v in os.environ.items():
        if k.startswith(("SPHERE_", "HF_", "TRANSFORMERS_", "VLLM_", "WANDB_")):
            env[k] = v
    env.update({str(k): str(v) for k, v in (rcfg.get("env") or {}).items()})
    return {"env_vars": env}


class RayCluster:
    """Context manager: join ``runner.address``, reuse an already initialised Ray (tests, notebooks), or
    start a local cluster sized for ``runner.workers`` and shut it down on exit."""

    def __init__(self, rcfg: Any):
        self.rcfg = rcfg
        self.started = False

    def __enter__(self) -> RayCluster:
        import ray

        r = self.rcfg
        if ray.is_initialized():
            return self
        kw: dict[str, Any] = {
            "runtime_env": runtime_env(r),
            "log_to_driver": bool(r.get("log_to_driver", True)),
            "include_dashboard": False,
        }
        if r.get("address"):
            kw.pop("include_dashboard")
            ray.init(address=str(r.address), **kw)
        else:
            n_cpu = int(r.num_cpus) if r.get("num_cpus") else int(r.workers) * int(r.cpus_per_worker)
            ray.init(
                address="local", num_cpus=n_cpu, object_store_memory=int(r.object_store_mb) * 2**20, **kw
            )
        self.started = True
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            import ray

            ray.shutdown()


def actor_resources(rcfg: Any, cfg: Any) -> dict:
    """``num_cpus`` / ``num_gpus`` of one actor (``gpus_per_worker: auto``: the backend's tensor-parallel
    size when the cluster has GPUs)."""
    import ray

    g = rcfg.gpus_per_worker
    if g == "auto":
        has_gpu = ray.cluster_resources().get("GPU", 0) > 0
        g = int(OmegaConf.select(cfg, "backend.tensor_parallel_size", default=1) or 1) if has_gpu else 0
    return {"num_cpus": int(rcfg.cpus_per_worker), "num_gpus": float(g)}


def _actor_death_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rex

    names = (
        "RayActorError",
        "ActorDiedError",
        "ActorUnavailableError",
        "WorkerCrashedError",
        "NodeDiedError",
    )
    return tuple(getattr(rex, n) for n in names if hasattr(rex, n))


# ---------------------------------------------------------------------------------------------- pool
@dataclass
class Chunk:
    id: int
    kind: str  # "generate" | "eval"
    payload: dict  # method arguments (problems, prior records / benchmark name and records)
    size: int  # problems in the chunk (progress)
    attempts: int = 0


@dataclass
class PoolStats:
    chunks: int = 0
    retries: int = 0
    actor_deaths: int = 0
    actors_started: int = 0
    per_actor_chunks: dict = field(default_factory=dict)
    retried_chunks: list = field(default_factory=list)


class ActorPool:
    """Hands chunks to ``n`` actors, one chunk per actor at a time; replaces dead actors and requeues their
    chunks at the front, so the next free actor (possibly the replacement) retries them.

    ``make_actor(slot) -> handle``; ``submit(handle, chunk) -> ObjectRef``; ``on_result(chunk, result)`` runs
    in the driver for each finished chunk (in completion order); ``on_poll(inflight_counts)`` gets
    ``{chunk_id: problems done so far}`` from the actors' ``poll()`` every ``poll_s`` seconds;
    ``on_dispatch(handle, chunk)`` is a hook for tests and logs."""

    def __init__(
        self,
        make_actor: Callable[[int], Any],
        n: int,
        *,
        max_chunk_retries: int,
        max_actor_restarts: int,
        poll_s: float = 2.0,
    ):
        self.make_actor = make_actor
        self.actors = [make_actor(i) for i in range(n)]
        self.gen = [0] * n  # generation of each slot (bumped when its actor is replaced)
        self.max_chunk_retries = max_chunk_retries
        self.max_actor_restarts = max_actor_restarts
        self.poll_s = poll_s
        self.stats = PoolStats(actors_started=n)

    def _replace(self, slot: int, err: BaseException) -> None:
        import ray

        try:
            ray.kill(self.actors[slot], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        if self.stats.actor_deaths > self.max_actor_restarts:
            raise RuntimeError(
                f"ray runner: {self.stats.actor_deaths} actors died, more than "
                f"runner.max_actor_restarts={self.max_actor_restarts}; giving up. Last error: "
                f"{type(err).__name__}: {err}"
            ) from err
        self.actors[slot] = self.make_actor(slot)
        self.gen[slot] += 1
        self.stats.actors_started += 1

    def run(
        self,
        chunks: Sequence[Chunk],
        submit: Callable[[Any, Chunk], Any],
        on_result: Callable[[Chunk, Any], None],
        *,
        on_poll: Callable[[dict], None] | None = None,
        on_dispatch: Callable[[Any, Chunk], None] | None = None,
    ) -> PoolStats:
        import ray

        deaths = _actor_death_errors()
        queue: deque[Chunk] = deque(chunks)
        idle: deque[int] = deque(range(len(self.actors)))
        inflight: dict[Any, tuple[int, Chunk]] = {}
        last_poll = time.monotonic()
        while queue or inflight:
            while queue and idle:
                slot, ch = idle.popleft(), queue.popleft()
                ch.attempts += 1
                ref = submit(self.actors[slot], ch)
                inflight[ref] = (slot, ch)
                if on_dispatch is not None:
                    on_dispatch(self.actors[slot], ch)
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=self.poll_s)
            for ref in ready:
                slot, ch = inflight.pop(ref)
                try:
                    res = ray.get(ref)
                except deaths as e:
                    self.stats.actor_deaths += 1
                    if ch.attempts > self.max_chunk_retries:
                        raise RuntimeError(
                            f"ray runner: chunk {ch.id} ({ch.size} problems) lost its actor {ch.attempts} "
                            f"times, more than runner.max_chunk_retries={self.max_chunk_retries}: "
                            f"{type(e).__name__}: {e}"
                        ) from e
                    print(
                        f"[ray runner] actor {slot} died ({type(e).__name__}); chunk {ch.id} goes back to "
                        f"the queue (attempt {ch.attempts + 1})",
                        file=sys.stderr,
                        flush=True,
                    )
                    self.stats.retries += 1
                    self.stats.retried_chunks.append(ch.id)
                    self._replace(slot, e)
                    queue.appendleft(ch)
                    idle.append(slot)
                    continue
                self.stats.chunks += 1
                key = f"{slot}.{self.gen[slot]}"
                self.stats.per_actor_chunks[key] = self.stats.per_actor_chunks.get(key, 0) + 1
                on_result(ch, res)
                idle.append(slot)
            if on_poll is not None and inflight and time.monotonic() - last_poll >= self.poll_s:
                last_poll = time.monotonic()
                on_poll(self._poll(inflight))
        return self.stats

    def _poll(self, inflight: dict) -> dict:
        import ray

        refs = {self.actors[slot].poll.remote(): ch.id for slot, ch in inflight.values()}
        out: dict = {}
        try:
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=min(1.0, self.poll_s))
            for r in ready:
                try:
                    out[refs[r]] = int(ray.get(r))
                except Exception:  # noqa: BLE001 - a dying actor: the chunk's own ref reports it
                    pass
        except Exception:  # noqa: BLE001
            pass
        return out

    def close(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001
                pass


def chunked(items: Sequence, size: int) -> list[list]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


# ---------------------------------------------------------------------------------------------- actors
def _set_threads(cfg: DictConfig) -> None:
    try:
        import torch

        torch.set_num_threads(int(OmegaConf.select(cfg, "runner.cpus_per_worker", default=1)))
    except ImportError:  # pragma: no cover
        pass


class GenerateWorker:
    """Ray actor body for `sphere generate`: one policy backend (and the small model's, when it differs),
    one scorer, built once; ``run_chunk`` runs ``Generator.run`` on a chunk in a fresh scratch directory."""

    def __init__(self, cfg_plain: dict, slot: int):
        self.cfg = OmegaConf.create(cfg_plain)
        self.slot = slot
        _set_threads(self.cfg)
        root = OmegaConf.select(self.cfg, "runner.scratch_dir", default=None)
        if root:
            Path(str(root)).mkdir(parents=True, exist_ok=True)
        self.scratch = Path(tempfile.mkdtemp(prefix=f"sphere-ray-gen{slot}-", dir=root or None))
        from sphere.lifecycle import Models

        self.models = Models(self.cfg)  # the one owner of policy / small / scorer, as in a local run
        self.done_in_chunk = 0

    def info(self) -> dict:
        import socket

        return {
            "slot": self.slot,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "scratch": str(self.scratch),
        }

    def poll(self) -> int:
        return self.done_in_chunk

    def run_chunk(self, chunk_id: int, problems: list[dict], prior: dict) -> dict:
        """Run the three stages on ``problems``; ``prior[stage]`` holds the run directory's records of
        these problems (a partly finished problem resumes at its next stage). Returns the new records per
        stage, the search statistics and the tree snapshots (file name -> npz bytes)."""
        from sphere.generate.run import STAGE_FILES, Generator
        from sphere.verify import check_answers

        work = self.scratch / f"chunk-{chunk_id}"
        shutil.rmtree(work, ignore_errors=True)
        (work / "stages").mkdir(parents=True)
        for s, recs in prior.items():
            if recs:
                with JsonlAppender(work / "stages" / STAGE_FILES[int(s)], fsync=False) as w:
                    w.write_many(recs)
        self.done_in_chunk = 0

        def progress(counts: dict) -> None:
            self.done_in_chunk = int(counts.get("done", 0))

        t0 = time.perf_counter()
        try:
            m = self.models
            stats = Generator(self.cfg, work).run(
                problems,
                m.policy(),
                m.scorer(),
                check_answers,
                small_backend_factory=m.small if self.cfg.stages.stage3 else None,
                progress=progress,
            )
            had = {int(s): {r["problem_id"] for r in recs} for s, recs in prior.items()}
            from sphere.generate.records import read_stage_logs

            records = {s: [r for r in d.values() if r["problem_id"] not in had.get(s, set())]
                       for s, d in read_stage_logs(work).items()}
            trees = {p.name: p.read_bytes() for p in sorted((work / "trees").glob("*.npz"))}
        finally:
            shutil.rmtree(work, ignore_errors=True)
            if self.cfg.stages.close_policy_before_small:  # the policy reopens for the next chunk
                self.models.close_small()
        return {
            "records": records,
            "search": stats.get("search", {}),
            "trees": trees,
            "wall_s": time.perf_counter() - t0,
            "worker": self.info(),
        }

    def close(self) -> None:
        self.models.close_all()
        shutil.rmtree(self.scratch, ignore_errors=True)


class EvalWorker:
    """Ray actor body for `sphere eval`: one backend; ``run_chunk`` runs the harness's
    ``evaluate_benchmark`` on a chunk of one benchmark in a scratch directory and returns its records."""

    def __init__(self, cfg_plain: dict, slot: int):
        from sphere.backends import make_backend
        from sphere.evaluation.harness import checker_info, prompt_info
        from sphere.models import resolve_model
        from sphere.prompts import family_config

        self.cfg = OmegaConf.create(cfg_plain)
        self.slot = slot
        _set_threads(self.cfg)
        root = OmegaConf.select(self.cfg, "runner.scratch_dir", default=None)
        self.scratch = Path(tempfile.mkdtemp(prefix=f"sphere-ray-eval{slot}-", dir=root or None))
        self.model_name = str(OmegaConf.select(self.cfg, "model.policy", default=""))
        self.backend = make_backend(self.cfg, resolve_model(self.model_name, self.cfg))
        self.family_cfg = family_config(self.cfg)
        # the same signature parts as run_eval (sphere.evaluation.harness), so records merge and resume
        self.sig_parts = {
            "model": self.model_name,
            "backend": getattr(self.backend, "name", type(self.backend).__name__),
            "prompt": prompt_info(self.family_cfg),
            "checker": checker_info(),
        }
        self.done_in_chunk = 0

    def signature(self) -> dict:
        return {"backend_name": self.sig_parts["backend"], "sig": _eval_sig(self.sig_parts, self.cfg)}

    def poll(self) -> int:
        return self.done_in_chunk

    def stats(self) -> dict:
        return self.backend.stats() if hasattr(self.backend, "stats") else {}

    def run_chunk(self, chunk_id: int, name: str, records: list[dict]) -> dict:
        from dataclasses import replace

        from sphere.data import benchmark_key
        from sphere.evaluation.harness import evaluate_benchmark, settings_from_config

        settings = replace(settings_from_config(self.cfg), resume=True)
        work = self.scratch / f"chunk-{chunk_id}"
        shutil.rmtree(work, ignore_errors=True)
        self.done_in_chunk = 0
        worker = self

        class Counter:  # the two calls evaluate_benchmark makes on its rich progress bar
            def add_task(self, *a, **k):
                return 0

            def advance(self, task, n):
                worker.done_in_chunk += int(n)

        t0 = time.perf_counter()
        try:
            evaluate_benchmark(
                self.backend,
                name,
                records,
                work,
                settings,
                family_cfg=self.family_cfg,
                sig_parts=self.sig_parts,
                progress=Counter(),
            )
            out = read_jsonl_tolerant(work / "eval" / f"{benchmark_key(name)}.jsonl")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return {"records": out, "wall_s": time.perf_counter() - t0}

    def close(self) -> None:
        self.backend.close()
        shutil.rmtree(self.scratch, ignore_errors=True)


def _eval_sig(sig_parts: dict, cfg: Any) -> str:
    """The record signature ``evaluate_benchmark`` writes (sphere.evaluation.harness)."""

    from sphere.evaluation.harness import record_signature, settings_from_config

    return record_signature(sig_parts, settings_from_config(cfg))


def _remote(cls: type, rcfg: Any, cfg: Any):
    import ray

    res = actor_resources(rcfg, cfg)
    # max_concurrency=2: poll() answers while run_chunk works (run_chunk is never sent twice at once)
    return ray.remote(max_restarts=0, max_concurrency=2, **res)(cls)


# ---------------------------------------------------------------------------------------------- generate
def stage_state(out: Path) -> dict[int, dict[str, dict]]:
    """``{stage: {problem_id: first record}}`` of the run directory's stage logs (sphere.generate.records)."""
    from sphere.generate.records import read_stage_logs

    return read_stage_logs(out)


def is_finished(pid: str, state: dict[int, dict[str, dict]], st_cfg: Any) -> bool:
    """The resume rule of ``Generator.run`` (sphere.generate.records.is_finished)."""
    from sphere.generate.records import is_finished as _is_finished

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
        from sphere.search.driver import call_fill

        a.update(call_fill(a, batch_leaves))


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)



def _worker_pool(worker_cls: Any, rcfg: Any, cfg: Any, plain: dict) -> ActorPool:
    """``runner.workers`` actors of ``worker_cls`` (each built from the plain config), with the runner's
    retry, restart and polling settings."""
    cls = _remote(worker_cls, rcfg, cfg)
    return ActorPool(
        lambda slot: cls.remote(plain, slot),
        int(rcfg.workers),
        max_chunk_retries=int(rcfg.max_chunk_retries),
        max_actor_restarts=int(rcfg.max_actor_restarts),
        poll_s=float(rcfg.progress_poll_s),
    )

def generate(
    cfg: DictConfig, out: str | Path, *, on_dispatch: Callable[[Any, Chunk], None] | None = None
) -> dict:
    """`sphere generate` over Ray; writes the same files as ``Generator.run`` in ``out`` and returns the
    stats dict (generate_stats.json). ``on_dispatch(actor, chunk)``: hook called after each dispatch."""
    from sphere.generate.run import STAGE_FILES, Generator, load_problems, validate_generate_config
    from sphere.progress import StageProgress

    out = Path(out)
    rcfg = cfg.runner
    validate_runner_config(rcfg)
    validate_generate_config(cfg)
    problems = load_problems(cfg.data, int(cfg.seed))
    if not problems:
        raise SystemExit(f"sphere generate: data.problems={cfg.data.problems!r} gave no problems")
    if len({p["id"] for p in problems}) != len(problems):
        raise ValueError("data.problems: duplicate problem ids; ids must be unique")
    gen = Generator(cfg, out)
    state = stage_state(out)
    todo = [p for p in problems if not is_finished(p["id"], state, cfg.stages)]
    chunks = [
        Chunk(
            i,
            "generate",
            {
                "problems": ps,
                "prior": {s: [state[s][p["id"]] for p in ps if p["id"] in state[s]] for s in STAGES},
            },
            len(ps),
        )
        for i, ps in enumerate(chunked(todo, int(rcfg.chunk_size)))
    ]
    t0 = time.perf_counter()
    search: dict = {}
    counts = {"done": len(problems) - len(todo), "pairs": {1: 0, 2: 0, 3: 0}}
    info: dict[str, Any] = {
        "runner": "ray",
        "workers": int(rcfg.workers),
        "chunk_size": int(rcfg.chunk_size),
        "problems": len(problems),
        "skipped_finished": len(problems) - len(todo),
        "chunks": len(chunks),
        "workers_seen": {},
    }
    if chunks:
        plain = plain_config(cfg)
        writers = {s: JsonlAppender(out / "stages" / STAGE_FILES[s]) for s in STAGES}
        try:
            with RayCluster(rcfg), StageProgress(len(problems), "generate[ray]") as prog:
                pool = _worker_pool(GenerateWorker, rcfg, cfg, plain)

                def on_result(ch: Chunk, res: dict) -> None:
                    for s in STAGES:
                        new = [r for r in res["records"][s] if r["problem_id"] not in state[s]]
                        if new:
                            writers[s].write_many(new)
                        for r in new:
                            state[s][r["problem_id"]] = r
                            counts["pairs"][s] += len(r.get("pairs", []))
                    for name, data in res["trees"].items():
                        if not (out / "trees" / name).exists():
                            _write_bytes_atomic(out / "trees" / name, data)
                    _sum_search(search, res["search"], int(cfg.search.batch_leaves))
                    w = res["worker"]
                    info["workers_seen"][f"{w['host']}:{w['pid']}"] = (
                        info["workers_seen"].get(f"{w['host']}:{w['pid']}", 0) + 1
                    )
                    counts["done"] = sum(1 for p in problems if is_finished(p["id"], state, cfg.stages))
                    prog.update(counts)

                def on_poll(running: dict) -> None:
                    prog.update(
                        {**counts, "done": min(len(problems), counts["done"] + sum(running.values()))}
                    )

                try:
                    pst = pool.run(
                        chunks,
                        lambda a, ch: a.run_chunk.remote(ch.id, **ch.payload),
                        on_result,
                        on_poll=on_poll,
                        on_dispatch=on_dispatch,
                    )
                finally:
                    pool.close()
        finally:
            for w_ in writers.values():
                w_.close()
        info.update(
            {
                "retries": pst.retries,
                "actor_deaths": pst.actor_deaths,
                "actors_started": pst.actors_started,
                "retried_chunks": pst.retried_chunks,
                "per_actor_chunks": pst.per_actor_chunks,
            }
        )
    missing = [p["id"] for p in problems if not is_finished(p["id"], stage_state(out), cfg.stages)]
    if missing:
        raise RuntimeError(
            f"ray runner: {len(missing)} problems unfinished after all chunks returned "
            f"(first: {missing[:5]}); rerun the same command to resume"
        )
    wall = time.perf_counter() - t0
    stats = gen.finalize(problems, {"search": search}, wall)
    info["wall_s"] = wall
    atomic_write_json(out / "ray_runner.json", info)
    return stats


def main_generate(cfg: DictConfig, out: Path) -> float:
    """The `sphere generate` entry for ``runner=ray`` (called from sphere.generate.run.main)."""
    from sphere.generate.run import log_generate_stats
    from sphere.loggers import make_logger

    logger = make_logger(cfg, out, "generate")
    try:
        stats = generate(cfg, out)
        log_generate_stats(logger, stats, out)
        print(
            json.dumps(
                {
                    k: stats[k]
                    for k in (
                        "pairs_per_stage",
                        "yield",
                        "engine_time_frac",
                        "leaves_per_call_frac",
                        "wall_s",
                    )
                }
            )
        )
        return float(stats["pairs_total"])
    finally:
        logger.finish()


# ---------------------------------------------------------------------------------------------- eval
def evaluate(
    cfg: DictConfig, out_dir: str | Path, *, on_dispatch: Callable[[Any, Chunk], None] | None = None
) -> dict:
    """`sphere eval` over Ray; writes eval/<benchmark>.jsonl, results.json, results.md like ``evaluate``."""
    from dataclasses import replace

    from sphere.data import benchmark_key, load_benchmark
    from sphere.evaluation.harness import evaluate as evaluate_local
    from sphere.evaluation.harness import expand_benchmarks, run_eval, settings_from_config
    from sphere.progress import StageProgress
    from sphere.prompts import family_config

    out_dir = Path(out_dir)
    rcfg = cfg.runner
    validate_runner_config(rcfg)
    if OmegaConf.select(cfg, "backend.name", default=None) == "replay":  # grading stored text: no model
        return evaluate_local(cfg, out_dir)
    settings = settings_from_config(cfg)
    names = expand_benchmarks(cfg.benchmarks)
    data_dir = OmegaConf.select(cfg, "paths.data_dir", default=None)
    limit = cfg.get("limit")
    loaded = [(n, load_benchmark(n, data_dir, limit)) for n in names]
    t0 = time.perf_counter()
    info: dict[str, Any] = {
        "runner": "ray",
        "workers": int(rcfg.workers),
        "chunk_size": int(rcfg.eval_chunk_size),
    }
    plain = plain_config(cfg)
    backend_stats: dict = {}
    with RayCluster(rcfg):
        pool = _worker_pool(EvalWorker, rcfg, cfg, plain)
        try:
            import ray

            sig = ray.get(pool.actors[0].signature.remote())
            # the run directory's signature.json, as run_eval checks it (sphere/rundir.py): refuse, or
            # with resume=fresh move eval/ aside, before any chunk is dispatched
            from sphere.evaluation.harness import checker_info, eval_signature, prompt_info, reuse_records
            from sphere.rundir import check_or_record, default_mode, resume_mode

            model_name = str(OmegaConf.select(cfg, "model.policy", default=""))
            parts = {"model": model_name, "backend": sig["backend_name"],
                     "prompt": prompt_info(family_config(cfg)), "checker": checker_info()}
            mode = resume_mode(settings.resume)
            check_or_record(out_dir, "eval", eval_signature(parts, settings), mode=mode, outputs=["eval"])
            mode = default_mode() if mode == "auto" else mode
            present: dict[str, set] = {}
            chunks: list[Chunk] = []
            for n, recs in loaded:
                key = benchmark_key(n)
                path = out_dir / "eval" / f"{key}.jsonl"
                if mode == "fresh":
                    path.unlink(missing_ok=True)
                present[key] = set(reuse_records(path, recs, sig["sig"], mode))
                todo = [r for r in recs if r["id"] not in present[key]]
                for part in chunked(todo, int(rcfg.eval_chunk_size)):
                    chunks.append(Chunk(len(chunks), "eval", {"name": n, "records": part}, len(part)))
            writers = {
                benchmark_key(n): JsonlAppender(out_dir / "eval" / f"{benchmark_key(n)}.jsonl")
                for n, _ in loaded
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
                    pst = pool.run(
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
            for st in ray.get([a.stats.remote() for a in pool.actors]):
                for k, v in (st or {}).items():
                    if isinstance(v, int | float) and not isinstance(v, bool):
                        backend_stats[k] = backend_stats.get(k, 0) + v
        finally:
            pool.close()
    info.update(
        {
            "chunks": len(chunks),
            "retries": pst.retries,
            "actor_deaths": pst.actor_deaths,
            "actors_started": pst.actors_started,
            "retried_chunks": pst.retried_chunks,
            "per_actor_chunks": pst.per_actor_chunks,
            "wall_s": time.perf_counter() - t0,
        }
    )
    results = run_eval(  # the harness's own summary and writers over the records the actors wrote
        None,
        expand_benchmarks(cfg.benchmarks),
        out_dir,
        data_dir=data_dir,
        limit=limit,
        settings=replace(settings, resume="force"),  # the records are this run's, checked above
        family_cfg=family_config(cfg),
        model_name=str(OmegaConf.select(cfg, "model.policy", default="")),
        reference_path=cfg.get("reference_results"),
        progress=False,
        extra_meta={"runner": info},
        backend_name=sig["backend_name"],
        backend_stats=backend_stats,
    )
    atomic_write_json(out_dir / "eval" / "ray_runner.json", info)
    return results
