"""Render a tree snapshot (``trees/<name>.npz``) to one self-contained HTML page.

The page (template ``tree.html`` beside this file) carries its data, CSS and JS inline and a
Content-Security-Policy that forbids every network fetch, so it opens offline and from an archive.
Step text is model output, hence untrusted: it travels inside a JSON data block in which ``<``, ``>``,
``&`` and U+2028/9 are ``\\uXXXX``-escaped (so no ``</script>`` can end the block early), and the script
puts it into the page with ``textContent`` only (never ``innerHTML``).
"""

from __future__ import annotations

import html
import json
import math
import os
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from sphere.engine._common import EXHAUSTED, EXPANDED, PRUNED, PRUNED_EXPAND, PRUNED_SUBTREE, TERMINAL
from sphere.io import atomic_write_text
from sphere.viz.snapshot import load_tree_snapshot, trajectory_nodes

FLAG_BITS = {"TERMINAL": TERMINAL, "EXPANDED": EXPANDED, "PRUNED_EXPAND": PRUNED_EXPAND,
             "PRUNED_SUBTREE": PRUNED_SUBTREE, "EXHAUSTED": EXHAUSTED}
FOLD_ABOVE = 400  # trees with more nodes open with their pruned branches folded


def _floats(a: np.ndarray) -> list[float | None]:
    return [None if not math.isfinite(x) else round(x, 5) for x in np.asarray(a, dtype=np.float64).tolist()]


def _sol(meta: dict, key: str, parent: np.ndarray, text: list[str], flags: np.ndarray) -> dict | None:
    traj = meta.get(key)
    nodes = meta.get(f"{key}_nodes")
    if traj is None and nodes is None:
        return None
    traj = traj if isinstance(traj, dict) else {}
    if nodes is None:
        nodes = trajectory_nodes(parent, text, flags, [str(s) for s in traj.get("steps") or []], PRUNED)
    correct = traj.get("correct")
    value = traj.get("value")
    return {"nodes": [int(i) for i in nodes], "correct": None if correct is None else bool(correct),
            "value": float(value) if isinstance(value, int | float) and math.isfinite(value) else None,
            "steps": len(traj.get("steps") or [])}


def tree_payload(arrays: dict[str, np.ndarray], meta: dict[str, Any], title: str) -> dict:
    """The JSON the page renders (column arrays, one entry per node)."""
    parent = np.asarray(arrays["parent"], dtype=np.int64)
    flags = np.asarray(arrays["flags"], dtype=np.int64)
    text = [str(t) for t in meta["text"]]
    out = {
        "title": title,
        "problem": str(meta.get("problem", "")),
        "answer": str(meta.get("answer", "")),
        "parent": parent.tolist(),
        "depth": np.asarray(arrays["depth"]).astype(np.int64).tolist(),
        "visits": np.asarray(arrays["visits"]).astype(np.int64).tolist(),
        "value": _floats(arrays["value"]),
        "reward": _floats(arrays["reward"]),
        "prior": _floats(arrays["prior"]) if "prior" in arrays else None,
        "node_id": np.asarray(arrays["node_id"]).astype(np.int64).tolist() if "node_id" in arrays else None,
        "flags": flags.tolist(),
        "text": text,
        "flag_bits": FLAG_BITS,
        "fold_above": FOLD_ABOVE,
        "counts": {"pruned": int(np.count_nonzero(flags & PRUNED)),
                   "terminal": int(np.count_nonzero(flags & TERMINAL)),
                   "max_depth": int(np.max(arrays["depth"])) if len(parent) else 0},
        "sol_max": _sol(meta, "sol_max", parent, text, flags),
        "sol_min": _sol(meta, "sol_min", parent, text, flags),
    }
    return out


def embed_json(obj: Any) -> str:
    """JSON safe to place between ``<script type="application/json">`` tags."""
    s = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return (s.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def render_tree_html(arrays: dict[str, np.ndarray], meta: dict[str, Any], title: str = "sphere tree") -> str:
    template = resources.files("sphere.viz").joinpath("tree.html").read_text(encoding="utf-8")
    data = embed_json(tree_payload(arrays, meta, title))
    head, sep, tail = template.partition("__DATA__")
    if not sep:  # pragma: no cover - packaging error
        raise RuntimeError("sphere/viz/tree.html: the template has no __DATA__ placeholder")
    # str.replace on the title first, then splice the data: data text is never scanned for placeholders
    return head.replace("__TITLE__", html.escape(title)) + data + tail


def write_tree_html(snapshot: str | Path, out: str | Path, title: str | None = None) -> Path:
    arrays, meta = load_tree_snapshot(snapshot)
    out = Path(out)
    page = render_tree_html(arrays, meta, title or f"sphere tree: {Path(snapshot).stem}")
    atomic_write_text(out, page)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out, 0o666 & ~umask)  # a page to share: the temp file behind the atomic write was 0600
    return out
