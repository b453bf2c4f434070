"""`sphere viz tree SNAPSHOT_FILE [out=PAGE.html] [title=TEXT]`: a saved search tree as one HTML page.

    sphere viz tree outputs/generate/DATE/trees/stage1-mini-3.npz out=tree.html

The page is self-contained (no network at view time): nodes with visits, value, reward, prior and step
text; pruned nodes and branches greyed and marked; Sol_max / Sol_min paths highlighted; zoom
(buttons or Ctrl+wheel), collapse per node, collapse all / pruned / everything off the Sol paths; a
click shows the node's full path from the root.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sphere.rundir import command_errors
from sphere.viz.snapshot import load_tree_snapshot, save_tree_snapshot
from sphere.viz.tree import render_tree_html, write_tree_html

__all__ = ["main", "load_tree_snapshot", "save_tree_snapshot", "render_tree_html", "write_tree_html"]

_KEYS = ("out", "title")


def main(argv: list[str]) -> int:
    """argv after ``sphere viz tree``; returns the exit code."""
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    snap, opts = None, {}
    for a in argv:
        key, eq, val = a.partition("=")
        if eq and key in _KEYS:
            opts[key] = val
        elif eq and not Path(a).exists():
            print(f"sphere viz tree: unknown option {key!r}; allowed: {', '.join(k + '=' for k in _KEYS)}",
                  file=sys.stderr)
            return 2
        elif snap is None:
            snap = a
        else:
            print(f"sphere viz tree: one snapshot file expected, got {snap!r} and {a!r}", file=sys.stderr)
            return 2
    if snap is None:
        print("sphere viz tree: missing SNAPSHOT_FILE (a trees/<name>.npz from sphere generate)",
              file=sys.stderr)
        return 2
    out = opts.get("out") or str(Path(snap).with_suffix(".html"))
    try:
        with command_errors("viz tree"):  # a full disk, a read-only out=: one line naming the path
            path = write_tree_html(snap, out, opts.get("title"))
    except (FileNotFoundError, ValueError) as e:
        print(f"sphere viz tree: {e}", file=sys.stderr)
        return 2
    print(f"sphere viz tree: wrote {path}")
    return 0
