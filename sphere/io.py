"""Crash-safe file helpers shared by every command.

- ``atomic_write_text/json``: write to a temp file in the same directory, fsync, ``os.replace``: a reader
  sees the old file or the new one, never half of one.
- ``JsonlAppender``: one JSON object per line, flushed and fsynced per record; ``read_jsonl_tolerant``
  drops a torn last line (the only damage a kill -9 can do to an append-only file), so resuming loses
  at most the record that was being written and never duplicates one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process umask, read without changing it (Linux: /proc; elsewhere the set-and-restore idiom)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically. The file gets the mode a plain ``open(path, "w")`` would give
    (0666 minus the umask), not mkstemp's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and not e.filename:  # ENOSPC from write/flush names no file: name it
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=_default) + "\n")


def _default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_jsonl_tolerant(path: str | os.PathLike) -> list[dict]:
    """Records of an append-only JSONL file; a torn (unterminated, unparsable) last line is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    out: list[dict] = []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            out.append(json.loads(raw))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # torn tail from a crash: the record was never committed
                break
            raise ValueError(f"{path}:{i + 1}: not valid JSON (file corrupted?)") from None
    return out


def repair_jsonl_tail(path: str | os.PathLike) -> int:
    """Truncate a torn last line (no trailing newline) so appends start on a clean line.

    Returns the number of bytes removed."""
    path = Path(path)
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return 0
        data = path.read_bytes()
        cut = data.rfind(b"\n") + 1
        f.truncate(cut)
        return size - cut


class JsonlAppender:
    """Append records durably: ``with JsonlAppender(p) as w: w.write(rec)``."""

    def __init__(self, path: str | os.PathLike, fsync: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_jsonl_tail(self.path)
        self._f = open(self.path, "a", encoding="utf-8")
        self._fsync = fsync

    def write(self, rec: dict) -> None:
        self.write_many([rec])

    def write_many(self, recs: Iterable[dict]) -> None:
        try:
            for r in recs:
                self._f.write(json.dumps(r, ensure_ascii=False, default=_default) + "\n")
            self._f.flush()
            if self._fsync:
                os.fsync(self._f.fileno())
        except OSError as e:  # a full disk (ENOSPC) names no file: name it
            raise OSError(e.errno, e.strerror, str(self.path)) from e

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:  # the flush of a failed write (full disk): the write already raised, naming the file
            pass

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# A data record (a problem, a preference pair, stored completions) larger than this is rejected: no math
# problem is 16 MiB, and a runaway line (a concatenated dump, a binary file) would otherwise reach the model.
MAX_RECORD_BYTES = 16 * 1024 * 1024


def iter_jsonl_strict(path: str | os.PathLike, required: tuple[str, ...] = (),
                      with_lineno: bool = False) -> Iterator[Any]:
    """Parse a user-supplied JSONL data file; errors name the file, the line and what is wrong.
    Yields records, or ``(line number, record)`` with ``with_lineno=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if len(raw) > MAX_RECORD_BYTES:
                raise ValueError(f"{path}:{lineno}: line is {len(raw)} bytes; a data record may be at most "
                                 f"{MAX_RECORD_BYTES} bytes (sphere.io.MAX_RECORD_BYTES)")
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start})") from None
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            for k in required:
                v = rec.get(k)
                if not isinstance(v, str) or not v.strip():
                    raise ValueError(
                        f"{path}:{lineno}: field {k!r} must be a non-empty string (got {v!r:.60})"
                    )
            yield (lineno, rec) if with_lineno else rec
