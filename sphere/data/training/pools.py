"""The two training pools' schemas and files (moved out of sphere/data/training/, issue #18): ``PoolSchema``
and ``POOLS`` (NuminaMath-CoT, MetaMathQA: which column holds the problem, the gold text, the provenance),
the gold answer extractors (``numina_gold``: the last box; ``metamath_gold``: after the last ``The answer
is:``), ``resolve_pool_path`` / ``pool_available`` (a file, a directory of them or ``hf:`` from the local
cache; never a download) and ``read_pool`` (parquet, JSONL or a JSON list as columns)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sphere.verify.extract import last_boxed

# Longest gold answer kept (characters), as in sphere.verify.extract.MAX_ANSWER_CHARS.
MAX_GOLD_CHARS = 1000
SUPPORTED_SUFFIXES = (".parquet", ".jsonl", ".json")
ANSWER_MARKER = "The answer is:"


@dataclass(frozen=True)
class PoolSchema:
    name: str  # pool key: data.training.<name>, data.training.mix.<name>, source "<name>:PATH"
    title: str  # dataset name for messages and the problem's "source" field
    hub: str  # hub repository, for the "how to provide it" message
    problem: str  # column with the problem text
    text: str  # column the gold answer is read from (also kept as the problem's "solution")
    origin: str  # provenance column kept as "origin" (NuminaMath source, MetaMathQA type)
    extra: tuple[str, ...] = field(default=())  # further provenance columns kept verbatim when present
    example_file: str = ""


POOLS: dict[str, PoolSchema] = {
    "numina": PoolSchema("numina", "NuminaMath-CoT", "AI-MO/NuminaMath-CoT", "problem", "solution", "source",
                         example_file="data/train-0000*-of-00005.parquet"),
    "metamath": PoolSchema("metamath", "MetaMathQA", "meta-math/MetaMathQA", "query", "response", "type",
                           extra=("original_question",), example_file="MetaMathQA-395K.json"),
}


# ---------------------------------------------------------------------------------------------- gold answers
def numina_gold(solution: Any) -> str | None:
    """Content of the LAST ``\\boxed{...}``/``\\fbox{...}`` of a NuminaMath solution (nested braces kept),
    or None when there is none, it is unbalanced, empty or longer than ``MAX_GOLD_CHARS``."""
    if not isinstance(solution, str):
        return None
    pos = max(solution.rfind("\\boxed"), solution.rfind("\\fbox"))
    if pos < 0:
        return None
    # only the last command: last_boxed on the suffix cannot fall back to an earlier box
    ans = last_boxed(solution[pos:])
    if ans is None:
        return None
    ans = ans.strip()
    return ans if 0 < len(ans) <= MAX_GOLD_CHARS else None


def metamath_gold(response: Any) -> str | None:
    """Text after the last ``The answer is:`` of a MetaMathQA response (to the end of that line, math
    delimiters and a final full stop removed), or None."""
    if not isinstance(response, str):
        return None
    pos = response.rfind(ANSWER_MARKER)
    if pos < 0:
        return None
    ans = response[pos + len(ANSWER_MARKER):].strip().split("\n", 1)[0].strip()
    for a, b in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if ans.startswith(a) and ans.endswith(b) and len(ans) >= len(a) + len(b):
            ans = ans[len(a):len(ans) - len(b)].strip()
    if ans.endswith(".") and not ans.endswith(".."):
        ans = ans[:-1].rstrip()
    return ans if 0 < len(ans) <= MAX_GOLD_CHARS else None


GOLD = {"numina": numina_gold, "metamath": metamath_gold}


def count_boxed(text: str) -> int:
    return text.count("\\boxed") + text.count("\\fbox") if isinstance(text, str) else 0


# ---------------------------------------------------------------------------------------------- files
def _how_to_provide(schema: PoolSchema, key: str) -> str:
    return (f"sphere never downloads data at run time. Provide {schema.title} locally: on a machine with hub "
            f"access run `huggingface-cli download --repo-type dataset {schema.hub} --local-dir DIR` "
            f"(or copy "
            f"{schema.example_file}), then point {key} at DIR or the file (parquet, JSONL or a JSON list)")


def resolve_pool_path(spec: str, schema: PoolSchema, key: str) -> list[Path]:
    """The data files of a pool: a file, a directory of parquet/JSONL/JSON files (those with ``train`` in
    the name when there are any; hidden folders skipped), or ``hf:OWNER/NAME`` from the local hub cache."""
    spec = str(spec)
    if spec.startswith("hf:"):
        repo = spec[3:]
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(repo_id=repo, repo_type="dataset", local_files_only=True))
        except Exception as e:  # noqa: BLE001 - any failure means "not in the local cache"
            raise FileNotFoundError(
                f"{schema.title} ({key}={spec}): {repo!r} is not in the local hub cache "
                f"({type(e).__name__}). {_how_to_provide(schema, key)}") from None
    else:
        path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUPPORTED_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        train = [p for p in files if "train" in p.name]
        if train or files:
            return train or files
        raise FileNotFoundError(f"{schema.title} ({key}={spec}): the directory {path} holds no "
                                f"{'/'.join(SUPPORTED_SUFFIXES)} files. {_how_to_provide(schema, key)}")
    raise FileNotFoundError(
        f"{schema.title} ({key}={spec}): {path} not found. {_how_to_provide(schema, key)}")


def pool_available(spec: str | None, schema: PoolSchema) -> tuple[bool, str]:
    """(True, "") when ``resolve_pool_path`` would find files, else (False, the reason)."""
    if spec is None or str(spec) in ("", "None", "null"):
        return False, f"no path configured for {schema.title}"
    try:
        resolve_pool_path(str(spec), schema, f"data.training.{schema.name}")
    except FileNotFoundError as e:
        return False, str(e).split(". sphere never downloads")[0]
    return True, ""


def _read_file(path: Path, cols: Sequence[str], required: Sequence[str], title: str) -> dict[str, list]:
    """Columns ``cols`` of one file as lists (absent optional columns: None)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        missing = [c for c in required if c not in names]
        if missing:
            raise ValueError(f"{path}: not a {title} file: columns {missing} missing (found {names})")
        table = pq.read_table(path, columns=[c for c in cols if c in names])
        n = table.num_rows
        return {c: table.column(c).to_pylist() if c in names else [None] * n for c in cols}
    rows: list
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            if "Extra data" not in str(e):
                raise ValueError(f"{path}: not valid JSON ({e})") from None
            rows = None  # JSON lines in a .json file
        if rows is not None and not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of {title} records, got {type(rows).__name__}")
    else:
        rows = None
    if rows is None:
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
    first = next((r for r in rows if isinstance(r, dict)), None)
    if rows and first is None:
        raise ValueError(f"{path}: expected {title} records (JSON objects)")
    if first is not None:
        missing = [c for c in required if c not in first]
        if missing:
            raise ValueError(f"{path}: not a {title} file: fields {missing} missing in the first record "
                             f"(found {sorted(first)})")
    return {c: [r.get(c) if isinstance(r, dict) else None for r in rows] for c in cols}


def read_pool(spec: str, pool: str, key: str | None = None) -> tuple[dict[str, list], list[Path]]:
    """All rows of a pool as columns ``problem, text, origin, <extra>`` plus the files read."""
    schema = POOLS[pool]
    key = key or f"data.training.{pool}"
    files = resolve_pool_path(spec, schema, key)
    src_cols = (schema.problem, schema.text, schema.origin, *schema.extra)
    out: dict[str, list] = {k: [] for k in ("problem", "text", "origin", *schema.extra)}
    for f in files:
        got = _read_file(f, src_cols, (schema.problem, schema.text), schema.title)
        out["problem"] += got[schema.problem]
        out["text"] += got[schema.text]
        out["origin"] += got[schema.origin]
        for c in schema.extra:
            out[c] += got[c]
    return out, files
