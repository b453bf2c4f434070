"""Reading an offline W&B run back (``logger.mode=offline``, sphere.loggers): ``read_offline_run`` parses the
run directory's transaction log and files (the tests use it to check what was recorded)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any


def _wandb_log_records(path: Path):
    """Raw record payloads of a ``run-<id>.wandb`` transaction log (LevelDB log format: 32 KiB blocks of
    7-byte-headed chunks FULL/FIRST/MIDDLE/LAST, after a 7-byte ``:W&B`` file header)."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B transaction log (no ':W&B' header)")
    block, pos, buf = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack_from("<IHB", data, pos)
        pos += 7
        chunk = data[pos:pos + length]
        pos += length
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += block - pos % block if pos % block else 0
            continue
        if kind == 1:
            yield chunk
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            yield buf + chunk
            buf = b""
        else:
            raise ValueError(f"{path}: unknown chunk type {kind} at byte {pos - length - 7}")


def read_offline_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """What an offline W&B run recorded: ``{"dir", "run" (name/group/notes/project), "config" (key -> value),
    "history" (list of step dicts), "summary", "artifacts" (list of {name, type, files}), "tables"
    (key -> {"columns", "data"})}``. ``run_dir`` is a job directory (holding ``wandb/``) or an
    ``offline-run-*`` directory; the latest run is read."""
    from wandb.proto import wandb_internal_pb2 as pb

    d = Path(run_dir)
    if not d.name.startswith("offline-run-"):
        base = d / "wandb" if (d / "wandb").is_dir() else d
        runs = sorted(base.glob("offline-run-*"))
        if not runs:
            raise FileNotFoundError(f"{run_dir}: no wandb/offline-run-* directory")
        d = runs[-1]
    logs = sorted(d.glob("run-*.wandb"))
    if not logs:
        raise FileNotFoundError(f"{d}: no run-*.wandb transaction log")
    out: dict[str, Any] = {"dir": str(d), "run": {}, "config": {}, "history": [], "summary": {},
                           "artifacts": [], "tables": {}}

    def put(dst: dict, item) -> None:  # nested_key = path into nested dicts (tables are logged as dicts)
        keys = list(item.nested_key) or [item.key]
        for k in keys[:-1]:
            dst = dst.setdefault(k, {})
        dst[keys[-1]] = json.loads(item.value_json)

    def items(its) -> dict:
        d: dict = {}
        for it in its:
            put(d, it)
        return d

    for raw in _wandb_log_records(logs[0]):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out["run"] = {"name": r.display_name, "group": r.run_group, "notes": r.notes,
                          "project": r.project,
                          "id": r.run_id}
            out["config"].update(items(r.config.update))
        elif kind == "config":
            out["config"].update(items(rec.config.update))
        elif kind == "history":
            out["history"].append(items(rec.history.item))
        elif kind == "summary":
            out["summary"].update(items(rec.summary.update))
        elif kind == "artifact":
            a = rec.artifact
            out["artifacts"].append({"name": a.name, "type": a.type,
                                     "files": [e.path for e in a.manifest.contents]})
    for row in out["history"]:
        for k, v in row.items():
            if isinstance(v, dict) and v.get("_type") == "table-file" and v.get("path"):
                p = d / "files" / v["path"]
                if p.is_file():
                    out["tables"][k] = json.loads(p.read_text())
    return out
