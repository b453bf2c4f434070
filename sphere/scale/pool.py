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

    for k in ("workers", "eval_chunk_size", "cpus_per_worker"):
        pos_int(k)
    if rcfg.get("chunk_size") != "auto":
        pos_int("chunk_size")
    for k in ("max_chunk_retries", "max_restarts", "max_task_retries"):
        pos_int(k, 0)
    for k in ("unavailable_s", "stall_timeout_s"):
        v = rcfg.get(k)
        if not isinstance(v, int | float) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"config runner.{k}={v!r}: allowed a number of seconds > 0")
    g = rcfg.get("gpus_per_worker")
    if not (g == "auto" or (isinstance(g, int | float) and not isinstance(g, bool) and g >= 0)):
        raise ValueError(f"config runner.gpus_per_worker={g!r}: allowed auto or a number >= 0")
    pos_int("nodes")
    if rcfg.get("gpus_per_node") is not None:
        pos_int("gpus_per_node")
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


def _error_kinds() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(transient, permanent) actor errors. ``ActorUnavailableError`` is transient (Ray: the actor may be
    restarting or briefly unreachable; it is NOT dead, so it is not killed and its engine not reloaded);
    ``ActorDiedError`` / ``RayActorError`` are raised only once Ray has spent ``max_restarts``."""
    import ray.exceptions as rex

    transient = tuple(getattr(rex, n) for n in ("ActorUnavailableError",) if hasattr(rex, n))
    permanent = tuple(
        getattr(rex, n)
        for n in ("ActorDiedError", "RayActorError", "WorkerCrashedError", "NodeDiedError")
        if hasattr(rex, n)
    )
    return transient, permanent


# ---------------------------------------------------------------------------------------------- pool
@dataclass
class Chunk:
    id: int
    kind: str  # "generate" | "eval"
    payload: dict  # method arguments (problems, prior records / benchmark name and records)
    size: int  # problems in the chunk (progress)
    attempts: int = 0  # times dispatched (a retry inside Ray on a restarted actor is not counted here)


@dataclass
class PoolStats:
    chunks: int = 0
    retries: int = 0  # chunks the driver dispatched again (their actor died for good or stopped answering)
    actor_deaths: int = 0  # actors that died for good (Ray's max_restarts spent, or killed with no restart)
    actors_started: int = 0
    unavailable: int = 0  # ActorUnavailableError answers (transient: the actor was kept)
    taken_back: int = 0  # chunks given to other actors because theirs stopped answering polls
    per_actor_chunks: dict = field(default_factory=dict)
    retried_chunks: list = field(default_factory=list)
    events: list = field(default_factory=list)  # one line per death / take-back / revival (ray_runner.json)


class StallError(RuntimeError):
    """No chunk finished and no actor reported progress for ``runner.stall_timeout_s`` seconds."""


class ActorPool:
    """Hands chunks to ``n`` actors, one chunk per actor at a time.

    What Ray does (``ray.remote(max_restarts=..., max_task_retries=...)``): restart an actor that died (its
    process, or its node) and rerun the method call that was in flight on the restarted actor; raise
    ``ActorDiedError`` once the restarts are spent. The pool does NOT kill or replace actors.

    What the pool adds, because Ray cannot: (1) an actor whose restart cannot be placed (its node is gone and
    no other node has the resources) keeps its call pending forever in Ray; the pool sees that the actor has
    not answered ``poll()`` for ``unavailable_s`` and gives its chunk to the actors that remain (the late
    result, if it ever comes, is merged without duplicates by the driver, which keys records by problem id);
    (2) an actor dead for good leaves the pool and the run goes on with fewer workers, saying so; (3) a
    chunk dispatched more than ``max_chunk_retries`` extra times stops the run (it kills every actor it
    touches); (4) no wait is unbounded: no progress for ``stall_s`` raises ``StallError`` naming what the
    run waits for. A revived actor (restarted on a node added meanwhile) answers its polls again and is
    given chunks.

    ``make_actor(slot) -> handle``; ``submit(handle, chunk) -> ObjectRef``; ``on_result(chunk, result)`` runs
    in the driver for each finished chunk (in completion order; a chunk given to two actors may come back
    twice); ``on_poll(inflight_counts)`` gets ``{chunk_id: problems done so far}`` every ``poll_s`` seconds;
    ``on_dispatch(handle, chunk)`` is a hook for tests and logs."""

    def __init__(
        self,
        make_actor: Callable[[int], Any],
        n: int,
        *,
        max_chunk_retries: int,
        poll_s: float = 2.0,
        unavailable_s: float = 60.0,
        stall_s: float = 1800.0,
        log: Callable[[str], None] | None = None,
    ):
        self.make_actor = make_actor
        self.actors = [make_actor(i) for i in range(n)]
        self.max_chunk_retries = max_chunk_retries
        self.poll_s = poll_s
        self.unavailable_s = unavailable_s
        self.stall_s = stall_s
        self.stats = PoolStats(actors_started=n)
        self.dead: set[int] = set()
        self.answering: set[int] = set(range(n))  # answered a poll within unavailable_s (or not yet started)
        self._ever: set[int] = set()  # answered once: a first start still loading is not "unavailable"
        self.busy: dict[int, tuple[Any, Chunk]] = {}  # slot -> (ref, chunk) in flight
        now = time.monotonic()
        self.last_answer: dict[int, float] = {s: now for s in range(n)}
        self.poll_refs: dict[int, Any] = {}  # slot -> its outstanding poll ref
        self._log = log or (lambda m: print(f"[ray runner] {m}", file=sys.stderr, flush=True))

    def log(self, msg: str) -> None:
        self.stats.events.append(msg)
        self._log(msg)

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

        transient, permanent = _error_kinds()
        n = len(self.actors)
        queue: deque[Chunk] = deque(chunks)
        finished: set[int] = set()
        # the actors' state is kept across runs (the phases of a round): an actor still busy with a chunk
        # of the previous phase (its node lost, its restart pending) stays busy and unanswering
        alive = set(range(n)) - self.dead  # not dead for good
        answering, busy, last_answer, poll_refs = self.answering, self.busy, self.last_answer, self.poll_refs
        mine = {c.id for c in chunks}
        last_counts: dict[int, int] = {}
        now = time.monotonic()
        last_progress = now
        last_poll = 0.0

        def dispatchable() -> list[int]:
            return [s for s in range(n) if s in alive and s in answering and s not in busy]

        def pending() -> bool:  # chunks of this run not finished anywhere
            return any(c.id not in finished for c in queue) or any(
                c.id in mine and c.id not in finished for _, c in busy.values()
            )

        def requeue(ch: Chunk, why: str) -> None:
            if ch.id not in mine or ch.id in finished or any(c.id == ch.id for c in queue):
                return
            if ch.attempts > self.max_chunk_retries:
                raise RuntimeError(
                    f"ray runner: chunk {ch.id} ({ch.size} problems) was dispatched {ch.attempts} times, "
                    f"more than 1 + runner.max_chunk_retries={self.max_chunk_retries}; last: {why}"
                )
            self.stats.retries += 1
            self.stats.retried_chunks.append(ch.id)
            queue.appendleft(ch)

        while pending():
            while queue and queue[0].id in finished:
                queue.popleft()
            for slot in dispatchable():
                if not queue:
                    break
                ch = queue.popleft()
                ch.attempts += 1
                busy[slot] = (submit(self.actors[slot], ch), ch)
                if on_dispatch is not None:
                    on_dispatch(self.actors[slot], ch)
            if not alive:
                raise RuntimeError(
                    f"ray runner: all {n} actors died for good (Ray's restarts, runner.max_restarts, are "
                    f"spent or could not be placed); {sum(1 for c in queue if c.id not in finished)} chunks "
                    "unfinished; rerun the same command to resume"
                )
            refs = {ref: slot for slot, (ref, _) in busy.items()}
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=self.poll_s) if refs else ([], [])
            if not refs:
                time.sleep(self.poll_s)
            for ref in ready:
                slot = refs[ref]
                _, ch = busy.pop(slot)
                try:
                    res = ray.get(ref)
                except transient as e:  # Ray: the actor may come back; keep it, give the chunk to anyone
                    self.stats.unavailable += 1
                    answering.discard(slot)
                    self.log(f"actor {slot} unavailable ({type(e).__name__}, transient: kept, not killed); "
                             f"chunk {ch.id} goes back to the queue")
                    requeue(ch, f"{type(e).__name__}: {e}")
                    continue
                except permanent as e:  # Ray spent max_restarts (or the actor was killed for good)
                    self.stats.actor_deaths += 1
                    alive.discard(slot)
                    self.dead.add(slot)
                    self.log(
                        f"actor {slot} died for good ({type(e).__name__}); chunk {ch.id} goes to the "
                        f"remaining actors; going on with {len(alive)} of {n} workers"
                    )
                    requeue(ch, f"{type(e).__name__}: {e}")
                    continue
                last_progress = time.monotonic()
                last_answer[slot] = last_progress
                if slot not in answering:
                    answering.add(slot)
                    self.log(f"actor {slot} answers again; it takes chunks again")
                if ch.id in finished or ch.id not in mine:  # a late copy (another actor finished it; or a
                    # chunk of an earlier phase): its records are merged as no-ops by the driver
                    on_result(ch, res)
                    continue
                finished.add(ch.id)
                self.stats.chunks += 1
                key = str(slot)
                self.stats.per_actor_chunks[key] = self.stats.per_actor_chunks.get(key, 0) + 1
                on_result(ch, res)
            now = time.monotonic()
            if now - last_poll >= self.poll_s:
                last_poll = now
                counts = self._poll(alive, poll_refs, last_answer)
                now = time.monotonic()
                for slot, c in counts.items():
                    if slot in busy and c != last_counts.get(slot):
                        last_progress = now
                    last_counts[slot] = c
                    if slot not in answering and slot in alive:
                        answering.add(slot)
                        self.log(f"actor {slot} answers again (restarted by Ray); it takes chunks again")
                for slot in list(answering):
                    if slot in alive and slot in self._ever and now - last_answer[slot] > self.unavailable_s:
                        answering.discard(slot)
                        msg = f"actor {slot} has not answered for {now - last_answer[slot]:.0f} s " \
                              f"(runner.unavailable_s={self.unavailable_s:g}: restarting, or its node is gone)"
                        if slot in busy:
                            ch = busy[slot][1]
                            self.stats.taken_back += 1
                            msg += f"; its chunk {ch.id} also goes to the actors that answer"
                            requeue(ch, msg)
                        self.log(f"{msg}; {len([s for s in alive if s in answering])} of {n} workers answering")
                if on_poll is not None and busy:
                    on_poll({busy[s][1].id: c for s, c in counts.items() if s in busy})
                if now - last_progress > self.stall_s:
                    raise StallError(self._stall_message(now - last_progress, queue, busy, finished,
                                                         alive, answering, n))
        return self.stats

    def _stall_message(self, waited, queue, busy, finished, alive, answering, n) -> str:
        import ray

        try:
            free = {k: v for k, v in ray.available_resources().items() if not k.startswith(("node:", "memory",
                                                                                             "object_store"))}
        except Exception:  # noqa: BLE001
            free = {}
        def state(s: int) -> str:
            if s not in self._ever:
                return "never answered: not placed yet (no node has its resources) or still loading"
            return "answering" if s in answering else "not answering"

        waits = [f"chunk {c.id} on actor {s} ({state(s)})" for s, (_, c) in busy.items() if c.id not in finished]
        queued = [c.id for c in queue if c.id not in finished]
        return (
            f"ray runner: no progress for {waited:.0f} s (runner.stall_timeout_s={self.stall_s:g}); waiting "
            f"for {', '.join(waits) or 'no running chunk'}; queued chunks {queued}; "
            f"{len(alive)} of {n} actors alive, {len([s for s in alive if s in answering])} answering; "
            f"free cluster resources {free}. Finished chunks are saved: rerun the same command to resume"
        )

    def _poll(self, alive: set, poll_refs: dict, last_answer: dict) -> dict:
        """``{slot: problems done in its current chunk}`` of the actors that answered; at most one poll
        outstanding per actor (a restarting actor's poll waits in Ray until it is back)."""
        import ray

        for slot in alive:
            if slot not in poll_refs:
                poll_refs[slot] = self.actors[slot].poll.remote()
        by_ref = {ref: slot for slot, ref in poll_refs.items()}
        out: dict = {}
        try:
            ready, _ = ray.wait(list(by_ref), num_returns=len(by_ref), timeout=min(1.0, self.poll_s))
        except Exception:  # noqa: BLE001
            return out
        for r in ready:
            slot = by_ref[r]
            poll_refs.pop(slot, None)
            try:
                out[slot] = int(ray.get(r))
                last_answer[slot] = time.monotonic()
                self._ever.add(slot)
            except Exception:  # noqa: BLE001 - a dead actor: its chunk's own ref reports it
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
    """The actor class with Ray's own fault tolerance: ``max_restarts`` (Ray restarts a dead actor, on any
    node that has its resources) and ``max_task_retries`` (Ray reruns the in-flight chunk on the restarted
    actor; chunks are safe to rerun: the driver keys records by problem id)."""
    import ray

    res = actor_resources(rcfg, cfg)
    # max_concurrency=2: poll() answers while run_chunk works (the pool never sends run_chunk twice at once)
    return ray.remote(
        max_restarts=int(rcfg.max_restarts),
        max_task_retries=int(rcfg.max_task_retries),
        max_concurrency=2,
        **res,
    )(cls)


def _worker_pool(worker_cls: Any, rcfg: Any, cfg: Any, plain: dict) -> ActorPool:
    """``runner.workers`` actors of ``worker_cls`` (each built from the plain config), with the runner's
    restart, retry, polling and stall settings."""
    cls = _remote(worker_cls, rcfg, cfg)
    return ActorPool(
        lambda slot: cls.remote(plain, slot),
        int(rcfg.workers),
        max_chunk_retries=int(rcfg.max_chunk_retries),
        poll_s=float(rcfg.progress_poll_s),
        unavailable_s=float(rcfg.unavailable_s),
        stall_s=float(rcfg.stall_timeout_s),
    )
