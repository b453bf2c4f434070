"""Progress bars (rich) that stay quiet in non-interactive logs.

On a TTY: a live bar with figures. Elsewhere (CI, SLURM logs): one plain line every ``every_s`` seconds,
so logs stay readable and nothing floods them.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class StageProgress:
    def __init__(self, total: int, label: str, every_s: float = 30.0):
        self.total = total
        self.label = label
        self.every_s = every_s
        self._last = 0.0
        self._t0 = time.perf_counter()
        self._tty = sys.stderr.isatty()
        self._progress = None
        self._task = None

    def __enter__(self) -> StageProgress:
        if self._tty:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("{task.fields[info]}"), transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=self.total, info="")
        return self

    def update(self, counts: dict[str, Any]) -> None:
        """``counts``: ``done`` (problems with nothing left to search), ``pairs`` per stage, and optionally
        ``searched`` per stage with ``queued`` searches of stages 2 and 3 (a problem is routed there only
        after its stage-1 search), ``tokens``."""
        done = int(counts.get("done", 0))
        pairs = counts.get("pairs", {})
        info = " ".join(f"s{k}:{v}" for k, v in pairs.items())
        if pairs:
            info = "pairs before filters " + info
        searched, queued = counts.get("searched"), counts.get("queued") or {}
        if searched:
            parts = [f"stage 1 {searched.get(1, 0)}/{self.total}"]
            parts += [f"stage {s} {searched.get(s, 0)}/{queued[s]}" for s in (2, 3) if queued.get(s)]
            info = "searched " + ", ".join(parts) + (f"; {info}" if info else "")
        el = time.perf_counter() - self._t0
        if "tokens" in counts and el > 0:
            info += f" tok/s:{counts['tokens'] / el:.0f}"
        if self._progress is not None:
            self._progress.update(self._task, completed=done, info=info)
        elif time.perf_counter() - self._last >= self.every_s or done == self.total:
            self._last = time.perf_counter()
            print(f"[{self.label}] {done}/{self.total} done; {info} ({el:.0f}s)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
