"""Checkpoints and published outputs of `sphere train` (sphere.train.dpo): the newest complete TRL
checkpoint to resume from (``last_checkpoint``), the ``merged/DONE`` marker, publishing a finished
directory into place, the policy's tokenizer files copied byte for byte, and the saved config cleaned of
training leftovers; ``writing``, which turns a full disk met while saving (safetensors' and torch's own errors,
which name no file) into one ``OSError`` naming the path and what was being written."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from sphere.io import atomic_write_text

log = logging.getLogger("sphere.train")

DONE = "DONE"

# How a failed write reads when the writer is not Python's own I/O: safetensors (Rust) says "No space left on
# device (os error 28)"; torch.save's zip writer only says "file write failed", "unexpected pos" or
# "basic_ios::clear: iostream error" (then the free space of the file system decides).
_NO_SPACE = ("No space left on device", "os error 28", "Errno 28", "Disk quota exceeded", "os error 122")
_WRITE_FAILED = ("file write failed", "unexpected pos", "PytorchStreamWriter failed", "iostream error")
LOW_FREE_BYTES = 64 << 20  # a write that failed with less free than this on its file system: a full disk


def _free_bytes(path: Path) -> int | None:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def disk_error(e: BaseException, path: Path, what: str) -> OSError | None:
    """``e``, raised while writing ``what`` to ``path``, as an ``OSError`` (ENOSPC/EDQUOT) naming the path and
    what was being written; None when it is not a full disk or quota."""
    if isinstance(e, OSError):
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            return None
        return OSError(e.errno, f"{e.strerror or os.strerror(e.errno)} while writing {what}",
                       str(e.filename or path))
    text = str(e)
    code = errno.EDQUOT if ("quota" in text.lower() or "os error 122" in text) else errno.ENOSPC
    full = any(m in text for m in _NO_SPACE)
    if not full and any(m in text for m in _WRITE_FAILED):
        free = _free_bytes(path)
        full = free is not None and free < LOW_FREE_BYTES
    if not full:
        return None
    return OSError(code, f"{os.strerror(code)} while writing {what}", str(path))


@contextlib.contextmanager
def writing(path: Path, what: str) -> Iterator[None]:
    """Around a save: a full disk becomes one ``OSError`` naming ``path`` and ``what`` (the CLI prints it as one
    line, sphere.rundir.cli_errors); any other error passes unchanged."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised unless it is a full disk
        err = disk_error(e, path, what)
        if err is None:
            raise
        raise err from None


def _clean_config(merged: Path, dtype: str) -> None:
    """Strip training leftovers from the saved config so vLLM/transformers load it as a plain model."""
    p = merged / "config.json"
    cfg = json.loads(p.read_text())
    for k in ("peft_config", "adapter_config", "_name_or_path", "quantization_config"):
        cfg.pop(k, None)
    cfg["use_cache"] = True
    cfg["dtype"] = dtype
    cfg.pop("torch_dtype", None)
    atomic_write_text(p, json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def last_checkpoint(trainer_dir: Path) -> Path | None:
    """The newest complete TRL checkpoint (``checkpoint-<step>`` holding ``trainer_state.json``, which the
    Trainer writes after the weights, optimizer and RNG states). Newer incomplete ones (a kill while
    saving) are removed, so the resumed run's checkpoint rotation starts clean."""
    if not trainer_dir.is_dir():
        return None
    found = []
    for p in trainer_dir.iterdir():
        name, _, step = p.name.rpartition("-")
        if p.is_dir() and name == "checkpoint" and step.isdigit():
            found.append((int(step), p))
    for _, p in sorted(found, reverse=True):
        if (p / "trainer_state.json").is_file():
            return p
        log.warning("train: removing incomplete checkpoint %s (killed while saving)", p)
        shutil.rmtree(p, ignore_errors=True)
    return None


def _is_done(out_dir: Path) -> bool:
    m = out_dir / "merged"
    return (m / DONE).is_file() and (m / "config.json").is_file()


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished directory into place (replacing a stale one)."""
    for f in tmp.iterdir():  # mkstemp-based writers leave 0600; checkpoints are meant to be shared
        if f.is_file():
            f.chmod(0o644)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")


def _copy_tokenizer(policy_path: Path, dst: Path, t: dict) -> None:
    """The policy's tokenizer files, byte for byte (a load/save round trip adds keys such as
    ``local_files_only``, and the trainer's copy may have gained a pad token)."""
    found = [f for f in TOKENIZER_FILES if (policy_path / f).is_file()]
    if "tokenizer_config.json" not in found:
        _load_tokenizer(policy_path, t).save_pretrained(dst)
        return
    for f in found:
        shutil.copyfile(policy_path / f, dst / f)


def _load_tokenizer(policy_path: Path, t: dict):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(policy_path, trust_remote_code=bool(t["trust_remote_code"]))
