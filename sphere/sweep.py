"""`sphere sweep FILE [overrides]`: run the Hydra multiruns a sweep file describes.

A sweep file (``sweeps/*.yaml``) names a command, overrides shared by every job, and one or more
*blocks*; each block is one Hydra multirun (``key=v1,v2,...`` cartesian product) written to
``<dir>/<block>/<job>``. Blocks let a sweep cover parameters that only make sense together (a pruning
threshold only matters for the ``threshold`` policy)::

    command: generate
    overrides: [data.mini_n=48]
    blocks:
      policies: {search.pruning.policy: "none,minmax"}
      threshold: {search.pruning.policy: threshold, search.pruning.tau: "0.0,0.1,0.2"}

Each block runs in a fresh process (Hydra keeps global state). ``sphere report DIR`` tabulates the result.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import yaml
from omegaconf import OmegaConf


def build_commands(spec: dict, extra: list[str], out_dir: str) -> list[list[str]]:
    if not isinstance(spec, dict):
        raise ValueError(f"sweep file: expected a mapping with the keys `command` and `blocks`, got a "
                         f"{type(spec).__name__}")
    missing = [k for k in ("command", "blocks") if k not in spec]
    if missing:
        raise ValueError(f"sweep file: needs the keys `command` and `blocks` (missing: "
                         f"{', '.join(missing)}); e.g. blocks: {{policies: {{search.pruning.policy: none,minmax}}}}")
    if not isinstance(spec["blocks"], dict) or not spec["blocks"]:
        raise ValueError("sweep file: `blocks` must map block names to {override key: values}")
    if not isinstance(spec.get("overrides") or [], list):
        raise ValueError("sweep file: `overrides` must be a list of key=value strings")
    cmd = str(spec["command"]).split()
    base = [str(o) for o in spec.get("overrides") or []]
    out = []
    for name, params in spec["blocks"].items():
        if not isinstance(params, dict) or not params:
            raise ValueError(f"sweep file: block {name!r} must map override keys to values")
        args = [f"{k}={v}" for k, v in params.items()]
        out.append([*cmd, "-m", *base, *args, *extra, f"hydra.sweep.dir={out_dir}/{name}"])
    return out


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    path = Path(argv[0])
    if not path.is_file():
        print(f"sphere sweep: {path}: no such sweep file", file=sys.stderr)
        return 2
    try:
        spec = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except yaml.YAMLError as e:  # one line: the file, the line and column, what the parser expected
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        print(f"sphere sweep: {path}:{where}: not valid YAML ({what})", file=sys.stderr)
        return 2
    except (UnicodeDecodeError, ValueError) as e:
        print(f"sphere sweep: {path}: not a readable sweep file ({e})", file=sys.stderr)
        return 2
    extra = [a for a in argv[1:] if not a.startswith("dir=")]
    dirs = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("dir=")]
    out_dir = dirs[0] if dirs else f"multirun/sweep-{path.stem}/{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    try:
        commands = build_commands(spec, extra, out_dir)
    except ValueError as e:
        print(f"sphere sweep: {path}: {e}", file=sys.stderr)
        return 2
    for args in commands:
        print("[sphere sweep] sphere " + " ".join(args), flush=True)
        rc = subprocess.call([sys.executable, "-m", "sphere.cli", *args])
        if rc != 0:
            print(f"sphere sweep: block failed with exit code {rc}", file=sys.stderr)
            return rc
    print(f"[sphere sweep] done: {out_dir}  (tabulate: sphere report {out_dir})")
    return 0
