"""The one-writer lock of a run directory (sphere.rundir) and the CLI's error text: the ``fcntl.flock`` on
``<run dir>/.lock`` (``acquire`` / ``release`` / ``locked``, re-entrant within a process), the Hydra
callback ``RunDirLock`` that takes it before Hydra writes, ``cli_errors`` / ``describe_os_error``,
which turn a full disk, an unwritable path, a busy directory or a signature mismatch into one line, and
``undo_failed_start``, which removes what a failed start left behind."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig

from sphere.io import atomic_write_text
from sphere.rundir.resume import (
    LOCK_NAME,
    SignatureMismatch,
    _key,
    _outputs_present,
    remember_prior_hydra,
    set_default_mode,
)
from sphere.schema import ConfigTypeError, check_config


class RunDirInUse(RuntimeError):
    """Another live process holds the run directory's lock."""


# ============================================================================================ the lock
_held: dict[str, list] = {}  # realpath -> [fd, depth]


def holder(run_dir: str | os.PathLike) -> dict | None:
    """What the last (or current) holder wrote into ``<run_dir>/.lock``: pid, started, command, host."""
    try:
        return json.loads(Path(run_dir, LOCK_NAME).read_text(encoding="utf-8") or "null")
    except (OSError, ValueError):
        return None


def is_held(run_dir: str | os.PathLike) -> bool:
    """True when this process holds the lock on ``run_dir``."""
    return _key(run_dir) in _held


def acquire(run_dir: str | os.PathLike, command: str = "") -> Path:
    """Take the exclusive lock of ``run_dir`` (created if missing); re-entrant within a process.

    Raises ``RunDirInUse`` when another process holds it, ``OSError`` when the directory cannot be
    created or written (``describe_os_error`` words it)."""
    d = Path(os.path.abspath(os.fspath(run_dir)))
    d.mkdir(parents=True, exist_ok=True)
    key = _key(d)
    if key in _held:
        _held[key][1] += 1
        return d
    path = d / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        info = None
        for _ in range(20):  # the holder writes its details right after locking
            info = holder(d)
            if info:
                break
            time.sleep(0.05)
        info = info or {}
        what = f", `sphere {info['command']}`" if info.get("command") else ""
        where = f" on {info['host']}" if info.get("host") and info.get("host") != socket.gethostname() else ""
        raise RunDirInUse(
            f"run directory {d} is in use by PID {info.get('pid', '?')}{where} (started "
            f"{info.get('started', '?')}{what}). Two writers would interleave their outputs: wait for it to "
            "finish (or stop it), or choose another hydra.run.dir."
        ) from None
    except BaseException:
        os.close(fd)
        raise
    info = {"pid": os.getpid(), "started": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
            "command": command, "host": socket.gethostname()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    _held[key] = [fd, 1]
    return d


def release(run_dir: str | os.PathLike) -> None:
    """Drop one level of this process's lock on ``run_dir`` (the OS drops it anyway at exit)."""
    key = _key(run_dir)
    ent = _held.get(key)
    if ent is None:
        return
    ent[1] -= 1
    if ent[1] <= 0:
        del _held[key]
        with contextlib.suppress(OSError):
            fcntl.flock(ent[0], fcntl.LOCK_UN)
        with contextlib.suppress(OSError):
            os.close(ent[0])


@contextlib.contextmanager
def locked(run_dir: str | os.PathLike, command: str = "") -> Iterator[Path]:
    d = acquire(run_dir, command)
    try:
        yield d
    finally:
        release(d)


def describe_os_error(e: OSError, where: str | os.PathLike | None = None, command: str = "") -> str:
    """One line that names the file and what to do, for the errors a run directory meets."""
    path = e.filename or where or "?"
    who = f"sphere {command}: " if command else "sphere: "
    reason = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"{who}no space left writing {path} ({reason}, errno {e.errno}). Free space on that file "
                "system (or point hydra.run.dir / paths.cache_dir elsewhere) and rerun the same command: "
                "finished work is kept and resumed.")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (f"{who}cannot write {path} ({reason}, errno {e.errno}): the run directory must be writable. "
                "Fix its permissions or mount, or choose another hydra.run.dir.")
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return (f"{who}cannot create the run directory at {path} ({reason}): a file is in the way. "
                "Choose another hydra.run.dir.")
    return f"{who}{reason} (errno {e.errno}): {path}"


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}


@contextlib.contextmanager
def cli_errors(command: str, run_dir: str | os.PathLike | None = None) -> Iterator[None]:
    """At the CLI boundary: a full disk, a read-only or unwritable path, a run directory in use or a
    signature mismatch become one ``SystemExit`` line naming the path and what to do. A command that
    fails leaves no trace it did not need to (``undo_failed_start``)."""
    try:
        yield
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        with contextlib.suppress(Exception):
            undo_failed_start(run_dir, e)
        if isinstance(e, (RunDirInUse, SignatureMismatch)):
            raise SystemExit(f"sphere {command}: {e}") from None
        if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
            raise SystemExit(describe_os_error(e, run_dir, command)) from None
        raise


# Optional packages and the extra of pyproject.toml that installs each (named when one is missing).
EXTRAS = {"matplotlib": "report", "ray": "scale", "vllm": "gpu (or cpu)", "llm_reasoners": "bench", "mctx": "bench",
          "submitit": "scale", "hydra_plugins": "scale"}


@contextlib.contextmanager
def command_errors(command: str, out_key: str = "out=") -> Iterator[None]:
    """At the boundary of a plain (non-Hydra) command (`sphere report`, `sphere viz tree`, `sphere sweep`): a
    full disk, a read-only or unwritable output path or a missing optional package become one ``SystemExit``
    line naming the path or the package's extra; the command reports its own bad input (a truncated file)."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except OSError as e:
        if e.errno not in _WRITE_ERRNOS:
            raise  # a missing input file and the like: the command's own message names it
        path = e.filename or "?"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            msg = (f"no space left writing {path} ({e.strerror}, errno {e.errno}). Free space on that file "
                   f"system or choose another {out_key}")
        else:
            msg = f"cannot write {path} ({e.strerror}, errno {e.errno}): choose a writable {out_key}"
        raise SystemExit(f"sphere {command}: error: {msg}") from None
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        extra = EXTRAS.get(top)
        how = f"pip install 'sphere[{extra}]'" if extra else f"pip install {top}"
        raise SystemExit(f"sphere {command}: error: needs the Python package {top!r}, which is not installed: "
                         f"{how}") from None


_start_state: dict[str, dict] = {}  # realpath -> {"existed": bool, "hydra": {file name: bytes}}


def note_start(run_dir: str | os.PathLike) -> None:
    """Remember, before Hydra writes anything, whether ``run_dir`` existed and its ``.hydra/`` record."""
    d = Path(os.path.abspath(os.fspath(run_dir)))
    hydra = {}
    if (d / ".hydra").is_dir():
        for f in (d / ".hydra").iterdir():
            if f.is_file():
                with contextlib.suppress(OSError):
                    hydra[f.name] = f.read_bytes()
    _start_state[_key(d)] = {"existed": d.exists(), "hydra": hydra}
    remember_prior_hydra(d, hydra)  # resume=fresh moves it aside with the outputs it describes


def undo_failed_start(run_dir: str | os.PathLike | None, exc: BaseException | None = None) -> str | None:
    """After a failed command: a run directory it created and wrote no output to is removed (no stray
    directories holding only ``.hydra/`` and an empty log); in an existing directory whose outputs it
    refused to resume (``SignatureMismatch``), ``.hydra/`` is put back as it was, so it still describes
    the outputs there. Returns "removed", "restored" or None."""
    if run_dir is None:
        try:
            run_dir = HydraConfig.get().runtime.output_dir
        except Exception:  # noqa: BLE001 - not under Hydra: nothing recorded
            return None
    d = Path(os.path.abspath(os.fspath(run_dir)))
    st = _start_state.get(_key(d))
    if st is None or not d.is_dir():
        return None
    if not st["existed"] and not _outputs_present(d, None):
        shutil.rmtree(d, ignore_errors=True)
        return "removed"
    if isinstance(exc, SignatureMismatch) and (d / ".hydra").is_dir():
        for f in (d / ".hydra").iterdir():
            if f.is_file() and f.name not in st["hydra"]:
                f.unlink()
        for name, data in st["hydra"].items():
            atomic_write_text(d / ".hydra" / name, data.decode("utf-8", "replace"))
        return "restored"
    return None


def _command_of(config: Any) -> str:
    try:  # the primary config's name: generate, train, eval, run, bench_engine, ...
        return {"pretrain_mini": "pretrain-mini"}.get(str(config.hydra.job.config_name),
                                                      str(config.hydra.job.config_name).replace("_", " "))
    except Exception:  # noqa: BLE001 - best effort, only used in messages
        return ""


def _hydra_callback_base() -> type:
    try:
        from hydra.experimental.callback import Callback

        return Callback
    except ImportError:  # pragma: no cover - hydra is a hard dependency of the CLI
        return object


class RunDirLock(_hydra_callback_base()):
    """Hydra callback (conf/config.yaml ``hydra.callbacks.rundir_lock``): one writer per run directory, and
    the process-wide ``resume`` mode. Failures end the command with one line (``SystemExit``): Hydra turns
    other exceptions raised by callbacks into warnings."""

    def __init__(self) -> None:
        self._run_dir: str | None = None
        self._job_dirs: list[str] = []

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        command = _command_of(config)
        try:
            HydraConfig.instance().set_config(config)  # hydra.run.dir may use ${hydra:job.name}
            d = str(config.hydra.run.dir)  # ${now:} is cached on the config: run_job gets the same dir
        except Exception:  # noqa: BLE001 - resolved again (and locked) in on_job_start
            return
        self._check_types(config)  # a mistyped value or a budget out of range: nothing is written
        note_start(d)
        self._run_dir = str(self._take(d, command))

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        command = _command_of(config)
        if self._run_dir is None:  # multirun: each job's values (run mode checked them in on_run_start)
            self._check_types(config)
        set_default_mode(config.get("resume", "auto") if hasattr(config, "get") else "auto",
                         strict=False)
        try:
            d = str(config.hydra.runtime.output_dir)
        except Exception:  # noqa: BLE001
            return
        self._job_dirs.append(str(self._take(d, command)))

    def on_job_end(self, config: Any, **kwargs: Any) -> None:
        if self._job_dirs:
            release(self._job_dirs.pop())

    def on_run_end(self, config: Any, **kwargs: Any) -> None:
        if self._run_dir is not None:
            release(self._run_dir)
            self._run_dir = None

    @staticmethod
    def _check_types(config: Any) -> None:
        """The typed schemas of sphere/schema.py (issue #17 G): full key, expected type, range."""
        try:
            name = str(config.hydra.job.config_name)
        except Exception:  # noqa: BLE001
            name = None
        try:
            check_config(config, name)
        except ConfigTypeError as e:
            raise SystemExit(f"sphere {_command_of(config)}: {e}") from None

    @staticmethod
    def _take(d: str, command: str) -> Path:
        try:
            return acquire(d, command)
        except RunDirInUse as e:
            raise SystemExit(f"sphere {command}: {e}") from None
        except OSError as e:
            raise SystemExit(describe_os_error(e, d, command)) from None
