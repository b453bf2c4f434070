"""The jobs of `sphere report` (sphere.runreport): ``find_jobs`` walks a run or multirun directory for
``sphere run`` (summary.json), ``sphere generate`` (generate_stats.json) and ``sphere eval``
(eval/results.json) jobs, reads the overrides Hydra recorded for each, labels the jobs by the settings that
differ between them, and ``numeric_axis`` picks the swept setting that goes on the x axis."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

STAGES = ("1", "2", "3")
_SKIP_DIRS = {"wandb", "trees", "stages", "checkpoints", "__pycache__", "ckpt", "model", "merged"}


# ------------------------------------------------------------------------------------------------- data
@dataclass
class Job:
    path: Path                      # the job directory
    rel: str                        # path relative to the report root ("." for the root itself)
    kind: str                       # run | generate | eval
    overrides: dict[str, str]       # from .hydra/overrides.yaml (hydra.* dropped)
    data: dict[str, Any]            # summary.json | generate_stats.json | eval/results.json
    label: str = ""
    swept: dict[str, str] = field(default_factory=dict)

    # -- figures a job contributes
    def final_accuracy(self) -> dict[str, dict]:
        if self.kind == "run":
            rounds = self.data.get("rounds") or []
            return dict(rounds[-1].get("eval") or {}) if rounds else {}
        if self.kind == "eval":
            return {k: v for k, v in self.data.items() if isinstance(v, dict) and "accuracy" in v}
        return {}

    def pairs_per_stage(self) -> dict[str, int] | None:
        if self.kind == "generate":
            return {s: int((self.data.get("pairs_per_stage") or {}).get(s, 0)) for s in STAGES}
        if self.kind == "run":
            tot = {s: 0 for s in STAGES}
            seen = False
            for r in self.data.get("rounds") or []:
                for key in ("pairs_per_stage", "next_round_pairs_per_stage"):
                    for s, v in (r.get(key) or {}).items():
                        if s in tot:
                            tot[s] += int(v)
                            seen = True
            return tot if seen else None
        return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def _read_overrides(job_dir: Path) -> dict[str, str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}

    try:
        items = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a list of `key=value` overrides")
    out: dict[str, str] = {}
    for it in items:
        key, eq, val = str(it).partition("=")
        key = key.lstrip("+~")
        if eq and not key.startswith("hydra."):
            out[key] = val
    return out


def _natural(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def find_jobs(root: str | os.PathLike) -> list[Job]:
    """Every run / generate / eval job at or under ``root`` (a job's own subdirectories are not searched)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    jobs: list[Job] = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        kind = data = None
        if "summary.json" in filenames:
            kind, data = "run", _read_json(d / "summary.json")
            if not isinstance(data, dict) or not isinstance(data.get("rounds"), list):
                raise ValueError(f"{d / 'summary.json'}: expected {{\"rounds\": [...]}} (sphere run summary)")
        elif "generate_stats.json" in filenames:
            kind, data = "generate", _read_json(d / "generate_stats.json")
            if not isinstance(data, dict) or "pairs_per_stage" not in data:
                raise ValueError(f"{d / 'generate_stats.json'}: missing key 'pairs_per_stage'")
        elif (d / "eval" / "results.json").is_file():
            kind, data = "eval", _read_json(d / "eval" / "results.json")
            if not isinstance(data, dict):
                raise ValueError(f"{d / 'eval' / 'results.json'}: expected a JSON object of benchmarks")
        if kind is not None:
            rel = str(d.relative_to(root)) if d != root else "."
            jobs.append(Job(d, rel, kind, _read_overrides(d), data))
            dirnames[:] = []
            continue
        keep = (n for n in dirnames if not n.startswith(".") and n not in _SKIP_DIRS)
        dirnames[:] = sorted(keep, key=_natural)
    jobs.sort(key=lambda j: _natural(j.rel))
    _label_jobs(jobs)
    return jobs


def _short_names(keys: list[str]) -> dict[str, str]:
    """Shortest unique dotted suffixes: search.pruning.tau -> tau."""
    out = {}
    for k in keys:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            cand = ".".join(parts[-n:])
            if sum(1 for o in keys if o == cand or o.endswith("." + cand)) == 1:
                out[k] = cand
                break
        else:
            out[k] = k
    return out


def _label_jobs(jobs: list[Job]) -> None:
    keys = sorted({k for j in jobs for k in j.overrides})
    swept = [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]
    short = _short_names(swept)
    for j in jobs:
        j.swept = {short[k]: j.overrides[k] for k in swept if k in j.overrides}
        j.label = ", ".join(f"{k}={v}" for k, v in j.swept.items()) or (j.rel if j.rel != "." else j.kind)


def _as_float(v: str | None) -> float | None:
    if v is None or v.strip().lower() in ("true", "false", "null", "none", "nan", "inf", "-inf"):
        return None
    try:
        x = float(v)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def numeric_axis(jobs: list[Job]) -> str | None:
    """The swept setting to put on the x axis: numeric in every job that sets it, most distinct values."""
    best, best_n = None, 1
    for k in sorted({k for j in jobs for k in j.swept}):
        vals = [j.swept[k] for j in jobs if k in j.swept]
        if all(_as_float(v) is not None for v in vals):
            n = len({_as_float(v) for v in vals})
            if n > best_n:
                best, best_n = k, n
    return best
