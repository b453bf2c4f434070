"""Tree snapshot files: ``trees/<name>.npz`` written by `sphere generate`, read by `sphere viz tree`.

One ``.npz`` (numpy's zip of ``.npy`` arrays, never pickle) per searched tree:

- the arrays of ``Forest.tree_snapshot(root)`` (ids remapped to 0..n-1, root = 0, parents before
  children): ``parent`` int32[n] (-1 for the root), ``depth`` int32[n], ``visits`` int32[n],
  ``value``/``reward``/``prior`` f32[n], ``flags`` uint8[n] (engine flag bits), and optionally
  ``node_id`` int32[n], ``payload`` int64[n], ``init_value`` f32[n];
- ``meta_json`` uint8[bytes]: UTF-8 JSON ``{"problem", "answer", "text": [step text per node],
  "sol_max", "sol_min"}`` where ``sol_max``/``sol_min`` are trajectory dicts (``steps``, ``correct``,
  ``value``, ...) or null, and optionally ``sol_max_nodes``/``sol_min_nodes`` (node indices, root first).

Loading checks every array it needs (names, dtypes kinds, lengths, parent order) and names the file and
the key that is wrong.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

# name -> (numpy kind codes allowed, required)
FIELDS: dict[str, tuple[str, bool]] = {
    "parent": ("iu", True),
    "depth": ("iu", True),
    "visits": ("iu", True),
    "value": ("fiu", True),
    "reward": ("fiu", True),
    "flags": ("iu", True),
    "prior": ("fiu", False),
    "init_value": ("fiu", False),
    "node_id": ("iu", False),
    "payload": ("iu", False),
}
META_KEY = "meta_json"


def save_tree_snapshot(path: str | os.PathLike, arrays: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write ``arrays`` (name -> 1-D array) and ``meta`` (JSON-able dict) to ``path`` atomically.

    ``arrays`` must not contain ``meta_json`` nor ``text`` (step texts belong in ``meta["text"]``)."""
    path = Path(path)
    for bad in (META_KEY, "text"):
        if bad in arrays:
            raise ValueError(f"save_tree_snapshot({path}): array name {bad!r} is reserved; put step texts "
                             "in meta['text']")
    blob = np.frombuffer(json.dumps(meta, ensure_ascii=False).encode("utf-8"), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, **{META_KEY: blob}, **{k: np.asarray(v) for k, v in arrays.items()})
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_tree_snapshot(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, meta) of a snapshot file, validated. Raises ValueError naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: tree snapshot not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: np.array(z[k]) for k in z.files}
    except ValueError as e:  # object arrays need pickle, which we refuse
        raise ValueError(f"{path}: not a valid tree snapshot ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # truncated / corrupt (a cut copy)
        raise ValueError(f"{path}: not a readable .npz file, truncated or corrupt ({e}); save or copy the "
                         "snapshot again") from None
    if META_KEY not in data:
        raise ValueError(f"{path}: missing array {META_KEY!r} (uint8 UTF-8 JSON with problem/answer/text)")
    raw = data.pop(META_KEY)
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise ValueError(f"{path}: {META_KEY!r} must be a 1-D uint8 array, got {raw.dtype}{list(raw.shape)}")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: {META_KEY!r} is not UTF-8 JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: {META_KEY!r} must hold a JSON object, got {type(meta).__name__}")

    n = None
    for name, (kinds, required) in FIELDS.items():
        if name not in data:
            if required:
                raise ValueError(f"{path}: missing array {name!r}; a snapshot needs "
                                 f"{[k for k, (_, r) in FIELDS.items() if r]}")
            continue
        a = data[name]
        if a.ndim != 1 or a.dtype.kind not in kinds:
            raise ValueError(f"{path}: array {name!r} must be 1-D of kind {kinds!r}, "
                             f"got {a.dtype}{list(a.shape)}")
        if n is None:
            n = len(a)
        elif len(a) != n:
            raise ValueError(f"{path}: array {name!r} has {len(a)} entries, 'parent' has {n}")
    parent = data["parent"].astype(np.int64)
    if n == 0:
        raise ValueError(f"{path}: the snapshot has no nodes (array 'parent' is empty)")
    if parent[0] != -1 or (n > 1 and (np.any(parent[1:] < 0) or np.any(parent[1:] >= np.arange(1, n)))):
        raise ValueError(f"{path}: array 'parent' must be -1 for node 0 and < the node's index for the rest "
                         "(parents before children)")
    text = meta.get("text")
    if text is None:
        meta["text"] = [""] * n
    elif not isinstance(text, list) or len(text) != n or not all(isinstance(t, str) for t in text):
        got = len(text) if isinstance(text, list) else type(text).__name__
        raise ValueError(f"{path}: meta 'text' must be a list of {n} strings (one per node), got {got}")
    for k in ("sol_max_nodes", "sol_min_nodes"):
        v = meta.get(k)
        ok = isinstance(v, list) and all(isinstance(i, int) and 0 <= i < n for i in v)
        if v is not None and not ok:
            raise ValueError(f"{path}: meta {k!r} must be a list of node indices in 0..{n - 1}")
    return data, meta


def trajectory_nodes(parent: np.ndarray, text: list[str], flags: np.ndarray, steps: list[str],
                     pruned_mask: int) -> list[int]:
    """Node indices (root first) of the path whose step texts are ``steps``.

    Used when a snapshot has no ``sol_*_nodes``: children are matched by text at each depth, preferring a
    child that is not pruned (the search only continues through kept children). Stops where no child
    matches, so a partial path is returned rather than a wrong one."""
    children: dict[int, list[int]] = {}
    for i, p in enumerate(parent.tolist()):
        if p >= 0:
            children.setdefault(p, []).append(i)
    path = [0]
    for s in steps:
        cands = [c for c in children.get(path[-1], []) if text[c] == s]
        if not cands:
            break
        kept = [c for c in cands if not int(flags[c]) & pruned_mask]
        path.append((kept or cands)[0])
    return path
