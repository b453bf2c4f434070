"""Process pool that checks answers with hard per-item timeouts; safe to call from many threads.

Why processes: sympy can hang or eat memory on hostile model text (``10^{10^{10^{10}}}``) in C code that no
signal interrupts, and math-verify's own timeout uses ``signal.alarm`` which only works in a main thread.
Workers are fresh interpreters (``subprocess``, never ``fork``, which is unsafe once torch / vLLM threads
exist) speaking JSON lines, so nothing is pickled and the caller's ``__main__`` is never re-imported.

Flow of ``Verifier.check_many(pairs)``:
1. In the caller: ``extract_answer`` + ``fast_verdict`` decide the obvious cases (no IPC, no sympy;
   ``fast_verdict`` never returns a wrong True, see ``sphere.verify.extract``); an LRU cache of earlier
   worker verdicts per (answer, gold) answers repeats (a search's candidates converge on few answers).
2. The rest is cut into chunks (amortising IPC) and run by an internal thread per worker process. The
   worker answers per item; if an item takes longer than ``timeout_s`` the worker is killed and replaced,
   the item's verdict is False, the timeout is counted, and the rest of the chunk is resent.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import queue
import select
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from sphere.verify.extract import extract_answer, fast_verdict

log = logging.getLogger(__name__)

# The directory holding the ``sphere`` package, put on the workers' PYTHONPATH.
_PKG_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Seconds a fresh worker may take to import sympy / math-verify before it counts as failed.
_STARTUP_TIMEOUT_S = 120.0


class _Proc:
    """One worker process (``python -m sphere.verify._worker``) and the parent's ends of its pipes."""

    def __init__(self, memory_limit_mb: int, module: str = "sphere.verify._worker"):
        env = dict(os.environ)
        env["OMP_NUM_THREADS"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(x for x in (_PKG_ROOT, env.get("PYTHONPATH", "")) if x)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--memory-limit-mb", str(int(memory_limit_mb))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
        )
        self._fd = self.proc.stdout.fileno()
        self._buf = b""
        self.ready = False

    def readline(self, timeout_s: float) -> bytes | None:
        """One line from the worker, or None if none arrives within ``timeout_s``; EOFError if it died."""
        deadline = time.monotonic() + timeout_s
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line, self._buf = self._buf[:nl], self._buf[nl + 1 :]
                return line
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([self._fd], [], [], left)
            if r:
                chunk = os.read(self._fd, 65536)
                if not chunk:
                    raise EOFError("verifier worker exited")
                self._buf += chunk

    def send(self, soft_s: float, items: list[tuple[str, str]]) -> None:
        self.proc.stdin.write((json.dumps({"soft": soft_s, "items": items}) + "\n").encode("ascii"))
        self.proc.stdin.flush()

    def wait_ready(self) -> None:
        if self.ready:
            return
        line = self.readline(_STARTUP_TIMEOUT_S)
        if line is None:
            raise RuntimeError(
                f"sphere.verify: a verifier worker did not start within {_STARTUP_TIMEOUT_S:.0f} s "
                "(is the machine overloaded? does `python -m sphere.verify._worker` run in a shell?)"
            )
        if line.strip() != b'"ready"':
            raise RuntimeError(f"sphere.verify: unexpected first line from a worker: {line[:80]!r}")
        self.ready = True

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        self._close_pipes()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL not delivered in 5 s
            pass

    def _close_pipes(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass

    def stop(self) -> None:
        """Close stdin (the worker exits on EOF); kill it if it has not exited after 2 s."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=2)
            self._close_pipes()
        except subprocess.TimeoutExpired:
            self.kill()


class Verifier:
    """A pool of ``workers`` checker processes with a hard per-item timeout of ``timeout_s`` seconds.

    ``check_many`` is thread-safe. ``stats()`` -> dict: checks, fast_decided, cache_hits, worker_checks,
    timeouts (soft + hard), hard_kills, restarts, crashes. ``close()`` stops the workers (also at exit)."""

    def __init__(
        self,
        workers: int = 2,
        timeout_s: float = 5.0,
        chunk_size: int = 32,
        memory_limit_mb: int = 3072,
        fast_path: bool = True,
        worker_module: str = "sphere.verify._worker",
        cache_size: int = 65536,
    ):
        if workers < 1:
            raise ValueError(f"verify.workers must be >= 1 (got {workers})")
        if not timeout_s or timeout_s <= 0:
            raise ValueError(f"verify.timeout_s must be > 0 seconds (got {timeout_s})")
        self.workers = int(workers)
        self.timeout_s = float(timeout_s)
        self.chunk_size = max(1, int(chunk_size))
        self.memory_limit_mb = int(memory_limit_mb)
        self.fast_path = bool(fast_path)
        self.worker_module = worker_module  # tests swap in a Fake worker speaking the same protocol
        self._idle: queue.Queue[_Proc] = queue.Queue()
        self._all: list[_Proc] = []
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()  # a forked child inherits this object but not its threads (see get_verifier)
        self._stats = dict.fromkeys(
            ("checks", "fast_decided", "cache_hits", "worker_checks", "timeouts", "hard_kills", "restarts",
             "crashes"), 0
        )
        # (extracted answer, gold) -> worker verdict. A search sends the same answer for the same problem
        # many times (candidates converge); verdicts are deterministic, timed-out ones are never cached.
        self._cache: OrderedDict[tuple[str, str], bool] = OrderedDict()
        self.cache_size = max(0, int(cache_size))
        for _ in range(self.workers):
            self._add_proc()
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sphere-verify")
        atexit.register(self.close)

    # -- bookkeeping -------------------------------------------------------------------------------
    def _add_proc(self) -> _Proc:
        p = _Proc(self.memory_limit_mb, self.worker_module)
        with self._lock:
            self._all.append(p)
        self._idle.put(p)
        return p

    def _replace(self, p: _Proc) -> _Proc:
        p.kill()
        q = _Proc(self.memory_limit_mb, self.worker_module)
        with self._lock:
            self._all = [x for x in self._all if x is not p] + [q]
            self._stats["restarts"] += 1
        return q

    def _count(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                self._stats[k] += v

    def worker_pids(self) -> list[int]:
        with self._lock:
            return [p.proc.pid for p in self._all]

    def stats(self) -> dict:
        with self._lock:
            return dict(self._stats, workers=self.workers, timeout_s=self.timeout_s)

    # -- work ----------------------------------------------------------------------------------------
    def _run_chunk(self, items: list[tuple[str, str]], timeout_s: float) -> list[tuple[bool, bool]]:
        """Run one chunk on an idle worker; per-item hard timeout; ``(verdict, timed_out)`` in order."""
        out: list[tuple[bool, bool]] = []
        send_failures = 0
        p = self._idle.get()
        try:
            while len(out) < len(items):
                rest = items[len(out) :]
                p.wait_ready()
                try:
                    p.send(0.9 * timeout_s, rest)
                except (BrokenPipeError, OSError):  # died while idle: replace it and resend
                    send_failures += 1
                    if send_failures > 3:
                        raise RuntimeError("sphere.verify: verifier workers keep dying on start") from None
                    self._count(crashes=1)
                    p = self._replace(p)
                    continue
                for _ in rest:
                    try:
                        line = p.readline(timeout_s)
                        died = False
                    except (EOFError, OSError):
                        line, died = None, True  # the worker died (crash / out of memory)
                    if line is None:
                        out.append((False, True))
                        if died:
                            self._count(crashes=1)
                        else:
                            self._count(timeouts=1, hard_kills=1)
                            log.warning("sphere.verify: a check exceeded %.1f s; worker killed and replaced",
                                        timeout_s)
                        p = self._replace(p)
                        break
                    verdict, soft_to = json.loads(line)
                    out.append((bool(verdict), bool(soft_to)))
                    if soft_to:
                        self._count(timeouts=1)
        except BaseException:
            # An interrupted exchange leaves unread replies in the pipe: never reuse that worker.
            p = self._replace(p)
            raise
        finally:
            self._idle.put(p)
        return out

    def check_many(
        self, pairs: list[tuple[str, str]], timeout_s: float | None = None, fast_path: bool | None = None
    ) -> list[bool]:
        """Verdicts for ``(completion, gold)`` pairs. ``timeout_s`` overrides the per-item hard timeout;
        ``fast_path=False`` sends every extracted answer to math-verify (for validation; no cache either)."""
        if self._closed:
            raise RuntimeError("sphere.verify: Verifier is closed")
        timeout_s = self.timeout_s if timeout_s is None else float(timeout_s)
        fast = self.fast_path if fast_path is None else fast_path
        n = len(pairs)
        res: list[bool] = [False] * n
        todo: list[int] = []
        items: list[tuple[str, str]] = []
        n_fast = n_hit = 0
        for i, (completion, gold) in enumerate(pairs):
            pred = extract_answer(completion) if isinstance(completion, str) else None
            if pred is None or not isinstance(gold, str) or not gold.strip():
                res[i] = False
                n_fast += 1
                continue
            try:
                v = fast_verdict(pred, gold) if fast else None
            except Exception:  # noqa: BLE001  (defence in depth: an unforeseen case goes to the workers)
                log.exception("sphere.verify: fast path failed on %r vs %r", pred[:80], gold[:80])
                v = None
            if v is not None:
                res[i] = v
                n_fast += 1
                continue
            if fast and self.cache_size:
                with self._lock:
                    hit = self._cache.get((pred, gold))
                    if hit is not None:
                        self._cache.move_to_end((pred, gold))  # least recently used goes first
                if hit is not None:
                    res[i] = hit
                    n_hit += 1
                    continue
            todo.append(i)
            items.append((pred, gold))
        self._count(checks=n, fast_decided=n_fast, cache_hits=n_hit, worker_checks=len(items))
        if items:
            # ~4 chunks per worker (at most chunk_size long): a free worker takes the next chunk, so one slow
            # item holds up only its own small chunk, while IPC is still amortised over several items.
            k = max(1, min(self.chunk_size, math.ceil(len(items) / (4 * self.workers))))
            chunks = [items[j : j + k] for j in range(0, len(items), k)]
            futs = [self._pool.submit(self._run_chunk, c, timeout_s) for c in chunks]
            verdicts = [v for f in futs for v in f.result()]
            for i, (v, _) in zip(todo, verdicts, strict=True):
                res[i] = v
            if fast and self.cache_size:
                with self._lock:
                    for key, (v, timed_out) in zip(items, verdicts, strict=True):
                        if not timed_out:
                            self._cache[key] = v
                            self._cache.move_to_end(key)
                    while len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
        return res

    def check(self, completion: str, gold: str, timeout_s: float | None = None) -> bool:
        return self.check_many([(completion, gold)], timeout_s)[0]

    def close(self) -> None:
        """Stop the workers. Idempotent; registered with ``atexit``."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            procs = list(self._all)
            self._all = []
        for p in procs:
            p.stop()
        try:
            atexit.unregister(self.close)
        except Exception:  # noqa: BLE001
            pass

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_SINGLETON: Verifier | None = None
_SINGLETON_LOCK = threading.Lock()


def get_verifier(workers: int = 2, timeout_s: float = 5.0, **kw) -> Verifier:
    """The process-wide Verifier, created on first use with these settings (later calls reuse it;
    ``reset_verifier()`` closes it so the next call builds a new one)."""
    global _SINGLETON
    with _SINGLETON_LOCK:
        # a forked child (a multiprocessing "fork" worker, mutmut's workers) inherits the parent's singleton
        # without its executor threads and shares its workers' pipes: work submitted there would never run.
        # The child gets its own; the parent's is left alone (closing it here would stop the parent's workers).
        if _SINGLETON is None or _SINGLETON._closed or _SINGLETON._pid != os.getpid():
            _SINGLETON = Verifier(workers=workers, timeout_s=timeout_s, **kw)
        elif (_SINGLETON.workers, _SINGLETON.timeout_s) != (workers, float(timeout_s)):
            log.debug("sphere.verify: get_verifier settings ignored; the singleton already exists")
        return _SINGLETON


def reset_verifier() -> None:
    global _SINGLETON
    with _SINGLETON_LOCK:
        if _SINGLETON is not None:
            _SINGLETON.close()
        _SINGLETON = None


def check_answers(pairs: list[tuple[str, str]], timeout_s: float | None = None) -> list[bool]:
    """Batch verdicts for ``(completion, gold)`` pairs on the process-wide Verifier."""
    return get_verifier().check_many(list(pairs), timeout_s=timeout_s)


def check_answer(completion: str, gold: str, timeout_s: float | None = None) -> bool:
    """True iff the final answer of ``completion`` equals ``gold`` (math-verify + normalised strings)."""
    return get_verifier().check_many([(completion, gold)], timeout_s=timeout_s)[0]

