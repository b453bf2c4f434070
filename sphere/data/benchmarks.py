"""Registered benchmarks and strict loaders for problem files.

Files live under ``data_dir`` (config ``paths.data_dir``; the project ships copies in ``data/benchmarks``,
see its SOURCES.md for provenance and licences) with the layout ``<benchmark>/<split>.jsonl``.
Every record must have non-empty string fields ``id``, ``problem`` and ``answer``; ids must be unique.
Errors name the file and line (``sphere.io.iter_jsonl_strict``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from sphere.io import iter_jsonl_strict
from sphere.mini.world import load_mini_benchmark
from sphere.resources import resource_path

REQUIRED_FIELDS = ("id", "problem", "answer")


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str  # registry key, also the output file stem (eval/<name>.jsonl)
    relpath: str  # file under data_dir; "" for generated benchmarks (mini)
    title: str  # human-readable name for tables
    has_solutions: bool  # records carry a reference `solution` (replay.references can grade them)


# The evaluation benchmarks of the SPHERE paper (arXiv 2503.04813, Table 1) plus the training pools.
BENCHMARKS: dict[str, BenchmarkSpec] = {
    s.name: s
    for s in (
        BenchmarkSpec("math500", "math500/test.jsonl", "MATH-500", True),
        BenchmarkSpec("gsm8k", "gsm8k/test.jsonl", "GSM8K (test)", True),
        BenchmarkSpec("aime24", "aime24/test.jsonl", "AIME 2024", True),
        BenchmarkSpec("aime25", "aime25/test.jsonl", "AIME 2025", False),
        BenchmarkSpec("amc23", "amc23/test.jsonl", "AMC 2023", False),
        # Solutions exist but state the final answer in prose only (no \boxed{}, no marker); see README.
        BenchmarkSpec("olympiadbench", "olympiadbench/test.jsonl", "OlympiadBench", True),
        BenchmarkSpec("gsm8k_train", "gsm8k/train.jsonl", "GSM8K (train)", True),
        BenchmarkSpec("math_train", "math/train.jsonl", "MATH (PRM800K 12k train)", True),
        BenchmarkSpec("mini", "", "mini world (test)", True),
    )
}

# The six benchmarks `sphere eval benchmarks=[all]` expands to.
PAPER_BENCHMARKS = ("math500", "gsm8k", "aime24", "aime25", "amc23", "olympiadbench")


def default_data_dir() -> Path:
    """``$SPHERE_DATA_DIR`` if set, else the shipped copies (``data/benchmarks`` of the checkout or of the
    installed package, ``sphere.resources``)."""
    env = os.environ.get("SPHERE_DATA_DIR")
    if env:
        return Path(env)
    return resource_path("data/benchmarks", must_exist=False)


def _is_path(name: str) -> bool:
    return name.endswith(".jsonl") or os.sep in name or "/" in name


def benchmark_key(name: str) -> str:
    """The output name of a benchmark: the registry key, or for a local file a safe stem
    (``/x/my_set.jsonl`` -> ``my_set``; ``/x/foo/test.jsonl`` -> ``foo_test``)."""
    if name in BENCHMARKS:
        return name
    if not _is_path(name):
        raise KeyError(_unknown(name))
    p = Path(name)
    stem = p.stem
    if stem in ("test", "train", "dev", "val", "validation") and p.parent.name:
        stem = f"{p.parent.name}_{stem}"
    key = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._") or "local"
    if key == "meta":  # reserved key of eval/results.json
        key = "local_meta"
    return key


def _unknown(name: str) -> str:
    return (
        f"benchmarks: unknown benchmark {name!r}; allowed: {', '.join(BENCHMARKS)}, 'all' "
        f"(= {', '.join(PAPER_BENCHMARKS)}), or a path to a local .jsonl file with id, problem, answer"
    )


def load_problems_jsonl(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """Problem records of a local JSONL file (strict: every record needs non-empty string ``id``,
    ``problem``, ``answer``; ids unique). ``limit``: the first N records."""
    path = Path(path)
    out: list[dict] = []
    seen: dict[str, tuple[int, int]] = {}
    for k, (line, rec) in enumerate(iter_jsonl_strict(path, required=REQUIRED_FIELDS, with_lineno=True), 1):
        rid = rec["id"]
        if rid in seen:
            j, jline = seen[rid]
            raise ValueError(
                f"{path}:{line}: record {k} repeats id {rid!r} of record {j} (line {jline}); "
                "ids must be unique"
            )
        seen[rid] = (k, line)
        sol = rec.get("solution")
        if sol is not None and not isinstance(sol, str):
            raise ValueError(f"{path}:{line}: record {k} (id {rid!r}): field 'solution' must be a string "
                             "or absent")
        out.append(rec)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"{path}: no problem records (the file is empty); expected one JSON object per line "
                         "with id, problem, answer")
    return out


def load_benchmark(
    name: str, data_dir: str | os.PathLike | None = None, limit: int | None = None
) -> list[dict]:
    """Problem records of benchmark ``name`` (a registry key or a local .jsonl path).

    ``data_dir``: the directory holding ``<benchmark>/<split>.jsonl`` (config ``paths.data_dir``); None ->
    ``default_data_dir()``. ``limit``: the first N problems (file order), None -> all.
    """
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit: must be a positive integer or null, got {limit!r}")
    if name == "mini":
        recs = list(load_mini_benchmark(split="test", n=limit if limit is not None else 500))
        for i, r in enumerate(recs):
            for k in REQUIRED_FIELDS:
                if not isinstance(r.get(k), str) or not r[k]:
                    raise ValueError(f"sphere.mini.load_mini_benchmark: record {i} lacks string field {k!r}")
        return recs[:limit] if limit is not None else recs
    if name in BENCHMARKS:
        base = Path(data_dir) if data_dir is not None else default_data_dir()
        path = base / BENCHMARKS[name].relpath
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: benchmark file for {name!r} not found. Set paths.data_dir (or $SPHERE_DATA_DIR) "
                f"to a directory with {BENCHMARKS[name].relpath} (the repository ships data/benchmarks)."
            )
        return load_problems_jsonl(path, limit)
    if _is_path(name):
        return load_problems_jsonl(Path(name).expanduser(), limit)
    raise KeyError(_unknown(name))
