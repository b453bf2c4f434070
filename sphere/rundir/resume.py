"""``signature.json`` and the resume rule of a run directory (sphere.rundir): the file and directory names
a run directory keeps for itself, the process-wide ``resume`` mode (auto | fresh | force), flattening and
comparing signatures, the mismatch message, and ``check_or_record``, which compares a command's signature
with the recorded one, moves old outputs aside for ``resume=fresh`` and records the new signature."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sphere.io import atomic_write_json

LOCK_NAME = ".lock"
SIGNATURE_NAME = "signature.json"
PREVIOUS_DIR = "previous"
# entries of a run directory that are not a command's outputs (never moved aside by resume=fresh)
BOOKKEEPING = frozenset({".hydra", LOCK_NAME, SIGNATURE_NAME, PREVIOUS_DIR})
RESUME_MODES = ("auto", "fresh", "force")


class SignatureMismatch(RuntimeError):
    """The run directory's outputs were written with different settings."""


def _key(run_dir: str | os.PathLike) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(run_dir)))


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
    if OmegaConf.is_config(v):
        return OmegaConf.to_container(v, resolve=True)
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


# Signature keys added after run directories were written without them, each with the value that does what
# the code did before the key existed: a record without the key matches that value, so upgrading sphere does
# not refuse a resume that gives the same outputs (any other value is a difference, named as usual).
ADDED_KEYS: dict[str, Any] = {
    "train.loss.weights": None,          # loss mixtures (one loss before)
    "train.loss.ld_alpha": None,         # LD-DPO (off before)
    "train.loss.use_weighting": False,   # WPO (off before)
    "train.loss.discopop_tau": 0.05,     # read by the discopop loss only, which did not exist before
    "scorer.shared_prefix": "off",       # each PRM row scored whole, as before
    "scorer.shared_prefix_min": 16,      # read only when shared_prefix is on
}


# Signature keys removed after run directories were recorded with them, each with why it no longer determines
# the outputs (a dead setting nothing read, or one the command never used): a record that has the key matches
# whatever value it holds, so upgrading sphere does not refuse a resume over a setting that changed nothing.
# The symmetric of ADDED_KEYS; a key that is in the new signature is compared as usual.
REMOVED_KEYS: dict[str, str] = {
    "sampling.n": "candidates per step came from search.expansions; sampling.n was read by nothing `sphere "
                  "generate` runs (removed from conf/config.yaml; `sphere eval` keeps its own)",
    "sampling.max_step_tokens": "the step budget is search.max_step_tokens; nothing read this one (removed)",
    "sampling.temperature": "the search samples at search.temperature; generate never read it",
    "sampling.top_p": "the search samples with search.top_p; generate never read it",
    "sampling.seed": "the search's per-call seeds derive from `seed` (in the signature); generate never read it",
}


def differences(old: Mapping, new: Mapping) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for every key whose value differs (a missing key reads as ``ABSENT``; a key of
    ``ADDED_KEYS`` missing from ``old`` reads as its value from before it existed; a key of ``REMOVED_KEYS``
    present in ``old`` and missing from ``new`` is no difference)."""
    def before(k: str) -> Any:
        return old.get(k, ADDED_KEYS.get(k, ABSENT))

    return [(k, old.get(k, ABSENT), new.get(k, ABSENT)) for k in sorted(set(old) | set(new))
            if before(k) != new.get(k, ABSENT) and not (k in REMOVED_KEYS and k in old and k not in new)]


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
        _move_aside(d, command, present, entry)
        status = "fresh"
    elif diffs and present:
        if m == "force":
            status = "forced"
        else:
            raise SignatureMismatch(mismatch_message(d, command, diffs))
    elif diffs:  # recorded by a run that wrote no output (failed early): re-signed
        status = "new"
    keep_command_record(d, command)
    if status != "match" or old != flat:
        rec = {"signature": flat, "recorded_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if status == "forced":
            rec["forced_over"] = [*(entry.get("forced_over") or []), old]
        data[command] = rec

        atomic_write_json(d / SIGNATURE_NAME, data)
    _checked[memo] = blob
    return status


# run dir (realpath) -> its ``.hydra/`` files as they were before this command's Hydra rewrote them
# (``sphere.rundir.lock.note_start`` fills it): the record of the outputs ``resume=fresh`` moves aside.
_prior_hydra: dict[str, dict[str, bytes]] = {}


def remember_prior_hydra(run_dir: str | os.PathLike, files: dict[str, bytes]) -> None:
    _prior_hydra[_key(run_dir)] = dict(files)


def _record_command(hydra_yaml: bytes | None) -> str:
    """The command (run, generate, eval, train, ...) whose ``.hydra/hydra.yaml`` this is (its primary config)."""
    import yaml

    try:
        data = yaml.safe_load(hydra_yaml or b"") or {}
        name = str(((data.get("hydra") or {}).get("job") or {}).get("config_name") or "")
    except (yaml.YAMLError, AttributeError):
        return ""
    return {"pretrain_mini": "pretrain-mini"}.get(name, name.replace("_", " "))


def keep_command_record(d: Path, command: str) -> None:
    """Each command's record stays with its outputs. Hydra rewrites ``<run dir>/.hydra/*.yaml`` for every
    command, so a second, different command into a run directory (``sphere eval`` after ``sphere generate``)
    erased the first one's: once a command's settings are accepted here, its (redacted) record is also kept
    in ``.hydra/<command>/``, and the record of another command found at the top before this one started
    is kept in ``.hydra/<that command>/`` (unless already there)."""
    h = d / ".hydra"
    if not h.is_dir():
        return
    prior = _prior_hydra.get(_key(d)) or {}
    old = _record_command(prior.get("hydra.yaml"))
    if old and old != command and not (h / old.replace(" ", "-")).exists():
        (h / old.replace(" ", "-")).mkdir()
        for name, data in prior.items():
            (h / old.replace(" ", "-") / name).write_bytes(data)
    now = {f.name: f.read_bytes() for f in h.iterdir() if f.is_file()}
    if _record_command(now.get("hydra.yaml")) != command:
        return  # the top record is another command's (a phase called inside `sphere run`)
    mine = h / command.replace(" ", "-")
    mine.mkdir(exist_ok=True)
    for name, data in now.items():
        (mine / name).write_bytes(data)


def _move_aside(d: Path, command: str, entries: list[Path], entry: Mapping | None = None) -> Path:
    """Move ``entries`` to ``previous/<command>-<UTC stamp>/`` with their record: the command's
    ``signature.json`` entry and the ``.hydra/`` that described them (as it was before this command)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    dest = d / PREVIOUS_DIR / f"{command.replace(' ', '-')}-{stamp}"
    dest.mkdir(parents=True, exist_ok=False)
    for p in entries:
        os.replace(p, dest / p.name)

    if entry is not None:
        atomic_write_json(dest / SIGNATURE_NAME, {command: entry})
    hydra = _prior_hydra.get(_key(d))
    if hydra is None and (d / ".hydra").is_dir():  # not started through the CLI: the record as it is now
        hydra = {f.name: f.read_bytes() for f in (d / ".hydra").iterdir() if f.is_file()}
    if hydra:
        (dest / ".hydra").mkdir()
        for name, data in hydra.items():
            (dest / ".hydra" / name).write_bytes(data)
    print(f"sphere {command}: resume=fresh: moved the previous outputs of {d} to {dest}", file=sys.stderr)
    return dest


def forget_checks() -> None:
    """Clear this process's memo of checked signatures (tests)."""
    _checked.clear()
