"""Benchmarks: `sphere bench <name>`; each prints its results on stdout (a table, then one JSON object as the
last line) and its progress and log lines on stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from sphere.io import atomic_write_json


def emit(res: dict) -> None:
    """Save ``res`` as ``result.json`` in the Hydra run directory (when run under Hydra) and print it as
    the last stdout line, the contract every `sphere bench` command keeps."""
    # Not under a Hydra run (a test calling main() directly, or compose(), which sets a HydraConfig
    # whose runtime.output_dir is still missing): print only.
    outdir = None
    if HydraConfig.initialized():
        found = OmegaConf.select(HydraConfig.get(), "runtime.output_dir", default=None, throw_on_missing=False)
        outdir = Path(found) if found else None
    if outdir is not None:
        atomic_write_json(outdir / "result.json", res)
    print(json.dumps(res), flush=True)


def metrics_table(title: str, res: dict, keys: Iterable[str], fmt: Callable[[object], str] = str) -> None:
    """A two-column rich table of ``res[key]`` for the keys present, on stdout: results go to stdout (as
    `sphere eval`'s table does), progress and log lines to stderr; ``emit`` prints the JSON line after it, so
    the last stdout line stays the one JSON object."""
    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for key in keys:
        if key in res:
            t.add_row(key, fmt(res[key]))
    Console(file=sys.stdout).print(t)
