"""The Ray plumbing of ``runner=ray`` (sphere.scale.ray_runner): the ``runner`` config check, the plain
config shipped to actors, the actors' runtime environment and resources, the cluster context manager, and
the actor pool that hands chunks to actors and replaces dead ones. It knows nothing of generate or eval:
the drivers (sphere.scale.generate_driver, sphere.scale.eval_driver) pass it worker classes and chunks."""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


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


def _remote(cls: type, rcfg: Any, cfg: Any):
    import ray

    res = actor_resources(rcfg, cfg)
    # max_concurrency=2: poll() answers while run_chunk works (run_chunk is never sent twice at once)
    return ray.remote(max_restarts=0, max_concurrency=2, **res)(cls)


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
