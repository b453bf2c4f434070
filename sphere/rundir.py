"""Run directories you can trust (issue #17): one writer at a time, and resume only what matches.

**One writer.** Every command that writes a run directory holds an exclusive ``fcntl.flock`` on
``<run dir>/.lock`` for as long as it runs (``RunDirLock``, a Hydra callback registered in conf/config.yaml:
taken in ``on_run_start``, before Hydra creates the directory, writes ``.hydra/`` or opens the job log; in a
multirun each job locks its own job directory in ``on_job_start``). A second process on the same directory
fails at once: ``run directory D is in use by PID N (started ...)``. The OS drops the lock when its process
dies, so a SIGKILLed run never leaves a stale lock; the ``.lock`` file itself stays (it only says who held
it last). The lock is taken by the driver process only: Ray actors, checker workers and vLLM engines never
write the run directory (they return their results to the driver).

**Resume only what matches.** A run directory records in ``signature.json`` everything that determines a
command's outputs (``generate_signature``, ``train_signature``, ``sphere.evaluation.harness.eval_signature``):
model names and content hashes of their weights, the data's hash, the search / scorer / stage / filter /
prompt settings, the seed, the DPO recipe. ``check_or_record(run_dir, command, sig)`` runs before any work;
when the recorded signature differs it raises ``SignatureMismatch`` naming every differing key (old -> new)
and the override, the config key ``resume``:

- ``auto`` (default): continue a matching run, refuse a different one;
- ``fresh``: move the command's old outputs aside to ``<run dir>/previous/<command>-<UTC time>/`` and
  start over in the same directory (always, even when the settings match);
- ``force``: continue with the old outputs anyway (deliberately mixing settings); the new signature is
  recorded, the old one kept under ``forced_over``.

A directory whose recorded signature has no outputs yet (a run that failed before writing any) is simply
re-signed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

LOCK_NAME = ".lock"
SIGNATURE_NAME = "signature.json"
PREVIOUS_DIR = "previous"
# entries of a run directory that are not a command's outputs (never moved aside by resume=fresh)
BOOKKEEPING = frozenset({".hydra", LOCK_NAME, SIGNATURE_NAME, PREVIOUS_DIR})
RESUME_MODES = ("auto", "fresh", "force")


class RunDirInUse(RuntimeError):
    """Another live process holds the run directory's lock."""


class SignatureMismatch(RuntimeError):
    """The run directory's outputs were written with different settings."""


# ============================================================================================ the lock
_held: dict[str, list] = {}  # realpath -> [fd, depth]


def _key(run_dir: str | os.PathLike) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(run_dir)))


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


def undo_failed_start(run_dir: str | os.PathLike | None, exc: BaseException | None = None) -> str | None:
    """After a failed command: a run directory it created and wrote no output to is removed (no stray
    directories holding only ``.hydra/`` and an empty log); in an existing directory whose outputs it
    refused to resume (``SignatureMismatch``), ``.hydra/`` is put back as it was, so it still describes
    the outputs there. Returns "removed", "restored" or None."""
    if run_dir is None:
        try:
            from hydra.core.hydra_config import HydraConfig

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
            from sphere.io import atomic_write_text

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
        from hydra.core.hydra_config import HydraConfig

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
        from sphere.schema import ConfigTypeError, check_config

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


# ========================================================================================= signatures
_default_mode = "auto"
_checked: dict[tuple[str, str], str] = {}  # (realpath, command) -> the signature this process checked


def resume_mode(value: Any) -> str:
    """``resume`` -> auto | fresh | force. ``true``/null mean auto and ``false`` fresh (eval's older
    boolean ``resume``)."""
    if value is None or value is True:
        return "auto"
    if value is False:
        return "fresh"
    s = str(value).strip().lower()
    if s in ("true", "1", "yes"):
        return "auto"
    if s in ("false", "0", "no"):
        return "fresh"
    if s not in RESUME_MODES:
        raise ValueError(f"config resume={value!r}: allowed auto | fresh | force (conf/config.yaml)")
    return s


def set_default_mode(value: Any, strict: bool = True) -> str:
    """The process-wide ``resume`` mode (set by the CLI from ``cfg.resume``) that ``check_or_record``
    uses when its caller gives none."""
    global _default_mode
    try:
        _default_mode = resume_mode(value)
    except ValueError:
        if strict:
            raise
        _default_mode = "auto"  # the command itself validates cfg.resume and names the key
    return _default_mode


def default_mode() -> str:
    return _default_mode


def _plain(v: Any) -> Any:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(v):
            return OmegaConf.to_container(v, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def flatten(sig: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> dotted keys (lists stay values)."""
    out: dict[str, Any] = {}
    for k, v in sig.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = _plain(v)
    return out


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


ABSENT = _Absent()


def differences(old: Mapping, new: Mapping) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for every key whose value differs (a missing key reads as ``ABSENT``)."""
    return [(k, old.get(k, ABSENT), new.get(k, ABSENT)) for k in sorted(set(old) | set(new))
            if old.get(k, ABSENT) != new.get(k, ABSENT)]


def mismatch_message(where: str | os.PathLike, command: str, diffs: list[tuple[str, Any, Any]],
                     max_shown: int = 12) -> str:
    shown = "; ".join(f"{k}: {_short(o)} -> {_short(n)}" for k, o, n in diffs[:max_shown])
    more = f"; and {len(diffs) - max_shown} more" if len(diffs) > max_shown else ""
    return (f"{where}: the {command} outputs here were written with different settings ({shown}{more}). "
            f"Rerun with resume=fresh to move them aside (to {PREVIOUS_DIR}/) and start over in this "
            "directory, resume=force to continue with them deliberately, or use another hydra.run.dir.")


def _short(v: Any, n: int = 80) -> str:
    if v is ABSENT:
        return "<absent>"
    s = json.dumps(v, sort_keys=True, default=str) if not isinstance(v, str) else repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def _outputs_present(d: Path, outputs: Iterable[str] | None) -> list[Path]:
    """The command's existing output entries in ``d`` that hold data (a non-empty file somewhere)."""
    if not d.is_dir():
        return []
    if outputs is None:
        cands = [p for p in d.iterdir() if p.name not in BOOKKEEPING and not p.name.endswith(".log")]
    else:
        cands = [d / o for o in outputs if (d / o).exists() or (d / o).is_symlink()]

    def has_data(p: Path) -> bool:
        if p.is_symlink() or p.is_file():
            try:
                return p.stat().st_size > 0
            except OSError:
                return False
        if p.is_dir():
            return any(has_data(q) for q in p.iterdir())
        return False

    return [p for p in cands if has_data(p)]


def _read_signatures(d: Path) -> dict:
    p = d / SIGNATURE_NAME
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_or_record(run_dir: str | os.PathLike, command: str, sig: Mapping, *, mode: str | None = None,
                    outputs: Iterable[str] | None = None) -> str:
    """Compare ``sig`` with the signature ``run_dir/signature.json`` holds for ``command``; record it.

    ``outputs``: the entries of ``run_dir`` that are this command's outputs (moved aside by
    ``resume=fresh``); None = every entry but Hydra's record, logs and this module's bookkeeping.
    ``mode``: auto | fresh | force (None or auto = the process default, ``set_default_mode``).
    Returns "new" (nothing recorded before), "match", "fresh" (old outputs moved aside) or "forced".
    Raises ``SignatureMismatch`` (auto, settings differ, outputs exist) before anything is changed."""
    d = Path(os.path.abspath(os.fspath(run_dir)))
    m = resume_mode(mode) if mode is not None else "auto"
    if m == "auto":
        m = _default_mode
    outputs = list(outputs) if outputs is not None else None
    flat = flatten(sig)
    blob = json.dumps(flat, sort_keys=True, default=str)
    memo = (_key(d), command)
    if _checked.get(memo) == blob:  # this process already checked (and, for fresh, cleared) it
        return "match"
    data = _read_signatures(d)
    entry = data.get(command) if isinstance(data.get(command), dict) else None
    old = entry.get("signature") if entry else None
    present = _outputs_present(d, outputs)
    status = "new" if old is None else "match"
    diffs = differences(old, flat) if old is not None else []
    if m == "fresh" and present:
        _move_aside(d, command, present)
        status = "fresh"
    elif diffs and present:
        if m == "force":
            status = "forced"
        else:
            raise SignatureMismatch(mismatch_message(d, command, diffs))
    elif diffs:  # recorded by a run that wrote no output (failed early): re-signed
        status = "new"
    if status != "match" or old != flat:
        rec = {"signature": flat, "recorded_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if status == "forced":
            rec["forced_over"] = [*(entry.get("forced_over") or []), old]
        data[command] = rec
        from sphere.io import atomic_write_json

        atomic_write_json(d / SIGNATURE_NAME, data)
    _checked[memo] = blob
    return status


def _move_aside(d: Path, command: str, entries: list[Path]) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    dest = d / PREVIOUS_DIR / f"{command.replace(' ', '-')}-{stamp}"
    dest.mkdir(parents=True, exist_ok=False)
    for p in entries:
        os.replace(p, dest / p.name)
    print(f"sphere {command}: resume=fresh: moved the previous outputs of {d} to {dest}", file=sys.stderr)
    return dest


def forget_checks() -> None:
    """Clear this process's memo of checked signatures (tests)."""
    _checked.clear()


# ===================================================================================== fingerprints
_HASH_CACHE_MIN = 16 * 1024 * 1024  # files at least this big are cached by (path, size, mtime, inode)
_mem_hashes: dict[tuple, str] = {}
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".model", ".tiktoken")
MODEL_FILE_NAMES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                    "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
                    "model.safetensors.index.json", "pytorch_model.bin.index.json")


def _cache_file() -> Path:
    root = os.environ.get("SPHERE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sphere")
    return Path(root) / "file_sha256.json"


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes; big files are cached by (real path, size, mtime, inode)."""
    p = Path(path)
    st = p.stat()
    ident = (os.path.realpath(p), st.st_size, st.st_mtime_ns, st.st_ino)
    if ident in _mem_hashes:
        return _mem_hashes[ident]
    disk: dict = {}
    cache = _cache_file()
    if st.st_size >= _HASH_CACHE_MIN:
        with contextlib.suppress(OSError, ValueError):
            disk = json.loads(cache.read_text())
        hit = disk.get(ident[0])
        if isinstance(hit, dict) and [hit.get("size"), hit.get("mtime_ns"), hit.get("ino")] == list(ident[1:]):
            _mem_hashes[ident] = str(hit["sha256"])
            return _mem_hashes[ident]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    _mem_hashes[ident] = digest
    if st.st_size >= _HASH_CACHE_MIN:
        disk[ident[0]] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "sha256": digest}
        with contextlib.suppress(OSError):
            from sphere.io import atomic_write_json

            atomic_write_json(cache, disk)
    return digest


def model_dir_sha256(path: str | os.PathLike) -> str:
    """One sha256 over a model directory's weights, config and tokenizer files (names and contents)."""
    d = Path(path)
    h = hashlib.sha256()
    for f in sorted(d.iterdir(), key=lambda q: q.name):
        if f.is_file() and (f.name in MODEL_FILE_NAMES or f.suffix in MODEL_FILE_SUFFIXES):
            h.update(f"{f.name}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def _is_pathlike(s: str) -> bool:  # the rule of sphere.models.resolve_model
    return s.startswith(("/", ".", "~")) or s.count("/") > 1 or Path(s).expanduser().exists()


def model_fingerprint(name_or_path: Any, cfg: Any = None) -> dict:
    """``{"name": ..., "sha256": ...}`` of a model: local directories by content only (a moved checkpoint
    is the same model), ``mini``/``mini-small`` by name and content, hub names by name (not downloaded)."""
    s = str(name_or_path).strip()
    import sphere.models as models

    if s in ("mini", "mini-small") or s in getattr(models, "STANDIN_NAMES", ()):  # shipped, resolved locally
        try:
            from sphere.models import resolve_model

            return {"name": s, "sha256": model_dir_sha256(resolve_model(s, cfg))}
        except Exception:  # noqa: BLE001 - the command's own model loading reports it
            return {"name": s}
    if _is_pathlike(s):
        p = Path(s).expanduser()
        if (p / "config.json").is_file():
            return {"sha256": model_dir_sha256(p)}
        return {"name": s}  # resolve_model names what is missing when the command loads it
    return {"name": s}


# -------------------------------------------------------------------------------- per-command signatures
def _node(cfg: Any, key: str) -> Any:
    try:
        from omegaconf import OmegaConf

        return _plain(OmegaConf.select(cfg, key, default=None))
    except ImportError:  # pragma: no cover
        return _plain(cfg.get(key))


def data_signature(dcfg: Any) -> dict:
    """What ``load_problems`` reads: the ``data`` settings (but its ``data_dir`` path) and the sha256 of
    every local file among the sources (shipped sets and JSONL paths); ``mini`` and ``hf:`` sources are
    named by their settings."""
    from sphere.data.problems import NAMED as _NAMED
    from sphere.data.problems import sources as _sources

    conf = {k: v for k, v in (_plain(dcfg) or {}).items() if k != "data_dir"}
    files = {}
    for src in _sources(dcfg):
        path = Path(str(dcfg.data_dir)) / _NAMED[src] if src in _NAMED else Path(src)
        if src in _NAMED or (src != "mini" and not src.startswith("hf:") and path.is_file()):
            files[src if src in _NAMED else path.name] = file_sha256(path) if path.is_file() else "<missing>"
    return {"config": conf, "files_sha256": files}


GENERATE_IGNORED = {"stages": ("close_policy_before_small",)}  # memory management, not outputs


def generate_signature(cfg: Any, policy: Any = None, small: Any = None) -> dict:
    """Everything that determines `sphere generate`'s outputs (pairs, stage logs): the models (names and
    weight hashes; ``policy``/``small`` override ``model.policy``/``model.small``, as in `sphere run`), the
    data, search, scorer (and its PRM's hash), stages, filters, prompt, sampling, backend kind and seed.
    Paths, logging, workers and the engine implementation (C++ and Python build identical trees) are
    not part of it."""
    stages = dict(_node(cfg, "stages") or {})
    for k in GENERATE_IGNORED["stages"]:
        stages.pop(k, None)
    models = {"policy": model_fingerprint(policy if policy is not None else cfg.model.policy, cfg)}
    if stages.get("stage3", True):
        models["small"] = model_fingerprint(small if small is not None else cfg.model.small, cfg)
    scorer = dict(_node(cfg, "scorer") or {})
    if scorer.get("name") == "prm" and scorer.get("model"):
        models["prm"] = model_fingerprint(scorer["model"], cfg)
    return {
        "model": models,
        "data": data_signature(cfg.data),
        "search": _node(cfg, "search"),
        "scorer": scorer,
        "stages": stages,
        "filters": _node(cfg, "filters"),
        "prompt": _node(cfg, "prompt"),
        "sampling": _node(cfg, "sampling"),
        "backend": {"name": _node(cfg, "backend.name"), "dtype": _node(cfg, "backend.dtype")},
        "seed": _node(cfg, "seed"),
    }


def check_generate(cfg: Any, out: str | os.PathLike, policy: Any = None, small: Any = None) -> str:
    """``check_or_record`` for a generate directory (call before any model loads)."""
    return check_or_record(out, "generate", generate_signature(cfg, policy, small))


# DPO recipe keys that change how training runs or reports, not what it produces
TRAIN_IGNORED = ("threads", "progress", "logging_steps", "save_steps", "save_total_limit")


def train_signature(t: Mapping, policy_path: str | os.PathLike, pairs_path: str | os.PathLike) -> dict:
    """`sphere train`'s outputs are determined by the resolved DPO recipe, the base model's content and the
    pairs file's content."""
    recipe = {k: v for k, v in _plain(dict(t)).items() if k not in TRAIN_IGNORED}
    return {"train": recipe, "base_model": model_fingerprint(policy_path),
            "pairs_sha256": file_sha256(pairs_path)}


__all__ = [
    "RunDirInUse", "SignatureMismatch", "RunDirLock", "acquire", "release", "locked", "holder", "is_held",
    "check_or_record", "check_generate", "generate_signature", "train_signature", "model_fingerprint",
    "file_sha256", "resume_mode", "set_default_mode", "cli_errors", "describe_os_error",
]
