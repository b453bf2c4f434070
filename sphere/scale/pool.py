"""The actor pool of ``runner=ray`` (sphere.scale.ray_runner): it hands chunks to actors and replaces dead
ones. It knows nothing of generate or eval: the drivers (sphere.scale.generate_driver,
sphere.scale.eval_driver) pass it worker classes and chunks; the runner config and the cluster are
sphere.scale.cluster's."""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sphere.scale.cluster import actor_resources


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


@dataclass
class _Run:
    """The state of one ``ActorPool.run`` (one phase): its chunks, what finished, progress times."""

    queue: deque  # chunks waiting for an actor (a requeued chunk goes to the front)
    mine: set  # ids of this run's chunks (a late result of an earlier phase's chunk is not counted)
    alive: set  # slots not dead for good
    finished: set = field(default_factory=set)
    last_counts: dict = field(default_factory=dict)  # slot -> problems done at its last poll
    last_progress: float = field(default_factory=time.monotonic)
    last_poll: float = 0.0


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
        # the actors' state is kept across runs (the phases of a round): an actor still busy with a chunk
        # of the previous phase (its node lost, its restart pending) stays busy and unanswering
        st = _Run(queue=deque(chunks), mine={c.id for c in chunks},
                  alive=set(range(len(self.actors))) - self.dead)  # alive: not dead for good
        errors = _error_kinds()
        while self._pending(st):
            self._dispatch(st, submit, on_dispatch)
            if not st.alive:
                raise RuntimeError(
                    f"ray runner: all {len(self.actors)} actors died for good (Ray's restarts, "
                    f"runner.max_restarts, are spent or could not be placed); "
                    f"{sum(1 for c in st.queue if c.id not in st.finished)} chunks unfinished; rerun the "
                    "same command to resume"
                )
            self._collect(st, on_result, errors)
            now = time.monotonic()
            if now - st.last_poll >= self.poll_s:
                st.last_poll = now
                self._poll_phase(st, on_poll)
        return self.stats

    # ------------------------------------------------------------------ the phases of one pass of run()
    def _pending(self, st: _Run) -> bool:
        """Chunks of this run not finished anywhere (queued, or in flight on some actor)."""
        return any(c.id not in st.finished for c in st.queue) or any(
            c.id in st.mine and c.id not in st.finished for _, c in self.busy.values()
        )

    def _requeue(self, st: _Run, ch: Chunk, why: str) -> None:
        if ch.id not in st.mine or ch.id in st.finished or any(c.id == ch.id for c in st.queue):
            return
        if ch.attempts > self.max_chunk_retries:
            raise RuntimeError(
                f"ray runner: chunk {ch.id} ({ch.size} problems) was dispatched {ch.attempts} times, "
                f"more than 1 + runner.max_chunk_retries={self.max_chunk_retries}; last: {why}"
            )
        self.stats.retries += 1
        self.stats.retried_chunks.append(ch.id)
        st.queue.appendleft(ch)

    def _dispatch(self, st: _Run, submit: Callable, on_dispatch: Callable | None) -> None:
        """Give the next queued chunks to the actors that are alive, answering and idle."""
        while st.queue and st.queue[0].id in st.finished:
            st.queue.popleft()
        idle = [s for s in range(len(self.actors))
                if s in st.alive and s in self.answering and s not in self.busy]
        for slot in idle:
            if not st.queue:
                break
            ch = st.queue.popleft()
            ch.attempts += 1
            self.busy[slot] = (submit(self.actors[slot], ch), ch)
            if on_dispatch is not None:
                on_dispatch(self.actors[slot], ch)

    def _collect(self, st: _Run, on_result: Callable, errors: tuple) -> None:
        """Wait up to ``poll_s`` for a chunk in flight; take what came back."""
        import ray

        refs = {ref: slot for slot, (ref, _) in self.busy.items()}
        if not refs:
            time.sleep(self.poll_s)
            return
        ready, _ = ray.wait(list(refs), num_returns=1, timeout=self.poll_s)
        for ref in ready:
            self._take(st, refs[ref], ref, on_result, errors)

    def _take(self, st: _Run, slot: int, ref: Any, on_result: Callable, errors: tuple) -> None:
        """One finished call: its result goes to ``on_result``; a Ray error requeues its chunk."""
        import ray

        transient, permanent = errors
        n = len(self.actors)
        _, ch = self.busy.pop(slot)
        try:
            res = ray.get(ref)
        except transient as e:  # Ray: the actor may come back; keep it, give the chunk to anyone
            self.stats.unavailable += 1
            self.answering.discard(slot)
            self.log(f"actor {slot} unavailable ({type(e).__name__}, transient: kept, not killed); "
                     f"chunk {ch.id} goes back to the queue")
            self._requeue(st, ch, f"{type(e).__name__}: {e}")
            return
        except permanent as e:  # Ray spent max_restarts (or the actor was killed for good)
            self.stats.actor_deaths += 1
            st.alive.discard(slot)
            self.dead.add(slot)
            self.log(
                f"actor {slot} died for good ({type(e).__name__}); chunk {ch.id} goes to the "
                f"remaining actors; going on with {len(st.alive)} of {n} workers"
            )
            self._requeue(st, ch, f"{type(e).__name__}: {e}")
            return
        st.last_progress = time.monotonic()
        self.last_answer[slot] = st.last_progress
        if slot not in self.answering:
            self.answering.add(slot)
            self.log(f"actor {slot} answers again; it takes chunks again")
        if ch.id in st.finished or ch.id not in st.mine:  # a late copy (another actor finished it; or a
            # chunk of an earlier phase): its records are merged as no-ops by the driver
            on_result(ch, res)
            return
        st.finished.add(ch.id)
        self.stats.chunks += 1
        key = str(slot)
        self.stats.per_actor_chunks[key] = self.stats.per_actor_chunks.get(key, 0) + 1
        on_result(ch, res)

    def _poll_phase(self, st: _Run, on_poll: Callable[[dict], None] | None) -> None:
        """Poll the actors: note progress, take back the chunks of actors silent for ``unavailable_s``,
        report the running counts, and stop the run after ``stall_s`` without progress."""
        counts = self._poll(st.alive, self.poll_refs, self.last_answer)
        now = time.monotonic()
        for slot, c in counts.items():
            if slot in self.busy and c != st.last_counts.get(slot):
                st.last_progress = now
            st.last_counts[slot] = c
            if slot not in self.answering and slot in st.alive:
                self.answering.add(slot)
                self.log(f"actor {slot} answers again (restarted by Ray); it takes chunks again")
        self._take_back_silent(st, now)
        if on_poll is not None and self.busy:
            on_poll({self.busy[s][1].id: c for s, c in counts.items() if s in self.busy})
        if now - st.last_progress > self.stall_s:
            raise StallError(self._stall_message(now - st.last_progress, st))

    def _take_back_silent(self, st: _Run, now: float) -> None:
        """An actor that answered before and not for ``unavailable_s``: its chunk also goes to the others."""
        n = len(self.actors)
        for slot in list(self.answering):
            if slot in st.alive and slot in self._ever and now - self.last_answer[slot] > self.unavailable_s:
                self.answering.discard(slot)
                msg = f"actor {slot} has not answered for {now - self.last_answer[slot]:.0f} s " \
                      f"(runner.unavailable_s={self.unavailable_s:g}: restarting, or its node is gone)"
                if slot in self.busy:
                    ch = self.busy[slot][1]
                    self.stats.taken_back += 1
                    msg += f"; its chunk {ch.id} also goes to the actors that answer"
                    self._requeue(st, ch, msg)
                answering = len([s for s in st.alive if s in self.answering])
                self.log(f"{msg}; {answering} of {n} workers answering")

    def _stall_message(self, waited: float, st: _Run) -> str:
        import ray

        try:
            free = {k: v for k, v in ray.available_resources().items() if not k.startswith(("node:", "memory",
                                                                                             "object_store"))}
        except Exception:  # noqa: BLE001
            free = {}
        def state(s: int) -> str:
            if s not in self._ever:
                return "never answered: not placed yet (no node has its resources) or still loading"
            return "answering" if s in self.answering else "not answering"

        waits = [f"chunk {c.id} on actor {s} ({state(s)})" for s, (_, c) in self.busy.items()
                 if c.id not in st.finished]
        queued = [c.id for c in st.queue if c.id not in st.finished]
        n = len(self.actors)
        answering = len([s for s in st.alive if s in self.answering])
        return (
            f"ray runner: no progress for {waited:.0f} s (runner.stall_timeout_s={self.stall_s:g}); waiting "
            f"for {', '.join(waits) or 'no running chunk'}; queued chunks {queued}; "
            f"{len(st.alive)} of {n} actors alive, {answering} answering; "
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
