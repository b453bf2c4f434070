"""The figures of `sphere report` (sphere.runreport), drawn with matplotlib (Agg) where the data allow:
accuracy per round per benchmark, stacked pairs per stage, yield and pairs against the swept setting, and
final accuracy against it (95% CI bars; jobs that do not set the swept value are horizontal references)."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from sphere.evaluation.metrics import wilson_ci
from sphere.runreport.jobs import STAGES, Job, _as_float, numeric_axis

STAGE_COLORS = {"1": "#0969da", "2": "#bf8700", "3": "#8250df"}


# ---------------------------------------------------------------------------------------------- plotting
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "font.size": 9})
    return plt


def _save(fig, path: Path) -> Path:
    """Write the figure atomically: a full disk or a read-only directory leaves no partial (0-byte) PNG."""
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                fig.savefig(f, dpi=110, format="png")
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it 0600
            os.replace(tmp, path)
        except BaseException as e:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(e, OSError) and not e.filename:  # savefig wrote to a file object: name the file
                raise OSError(e.errno, e.strerror or str(e), str(path)) from None
            raise
    finally:
        plt.close(fig)
    return path


def _acc_points(rounds: list[dict], bench: str) -> tuple[list[int], list[float], list[list[float]]]:
    xs, ys, err = [], [], [[], []]
    for r in rounds:
        ev = (r.get("eval") or {}).get(bench)
        if not ev or ev.get("accuracy") is None:
            continue
        a = 100 * float(ev["accuracy"])
        xs.append(int(r.get("round", len(xs))))
        ys.append(a)
        lo, hi = ev.get("ci95_low"), ev.get("ci95_high")
        err[0].append(a - 100 * float(lo) if lo is not None else 0.0)
        err[1].append(100 * float(hi) - a if hi is not None else 0.0)
    return xs, ys, err


def plot_accuracy_per_round(jobs: list[Job], out: Path) -> Path | None:
    runs = [j for j in jobs if j.kind == "run" and j.data.get("rounds")]
    benches = sorted({b for j in runs for r in j.data["rounds"] for b in (r.get("eval") or {})})
    if not benches:
        return None
    plt = _plt()
    if len(runs) == 1:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for b in benches:
            xs, ys, err = _acc_points(runs[0].data["rounds"], b)
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=b)
        axes = [ax]
        ax.set_title("accuracy per round")
    else:
        fig, axs = plt.subplots(1, len(benches), figsize=(5.2 * len(benches), 3.8), squeeze=False)
        axes = list(axs[0])
        for ax, b in zip(axes, benches, strict=False):
            for j in runs:
                xs, ys, err = _acc_points(j.data["rounds"], b)
                if xs:
                    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=j.label)
            ax.set_title(f"{b}: accuracy per round")
    for ax in axes:
        ax.set_xlabel("round (0 = base policy)")
        ax.set_ylabel("accuracy (%)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7)
    return _save(fig, out / "accuracy_per_round.png")


def plot_pairs_per_stage(jobs: list[Job], out: Path) -> Path | None:
    runs = [j for j in jobs if j.kind == "run"]
    if len(jobs) == 1 and runs:  # one run: pairs per round
        rounds = runs[0].data.get("rounds") or []
        labels, rows = [], []
        for r in rounds:
            if r.get("pairs_per_stage"):
                labels.append(f"round {r['round']}")
                rows.append(r["pairs_per_stage"])
        if rounds and rounds[-1].get("next_round_pairs_per_stage"):
            labels.append(f"round {int(rounds[-1]['round']) + 1} (next)")
            rows.append(rounds[-1]["next_round_pairs_per_stage"])
        xlabel = "pairs generated for (trained into) the round's policy"
    else:
        labels, rows = [], []
        for j in jobs:
            pps = j.pairs_per_stage()
            if pps is not None:
                labels.append(j.label)
                rows.append(pps)
        xlabel = "job"
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.75 * len(labels) + 2.5), 4.0))
    bottom = [0] * len(rows)
    for s in STAGES:
        vals = [int(r.get(s, 0)) for r in rows]
        ax.bar(range(len(rows)), vals, bottom=bottom, color=STAGE_COLORS[s], label=f"stage {s}")
        bottom = [b + v for b, v in zip(bottom, vals, strict=False)]
    for i, tot in enumerate(bottom):
        ax.text(i, tot, str(tot), ha="center", va="bottom", fontsize=7)
    tilt = len(labels) > 3
    ax.set_xticks(range(len(rows)), labels, rotation=30 if tilt else 0, ha="right" if tilt else "center")
    ax.set_ylabel("preference pairs")
    ax.set_xlabel(xlabel)
    ax.set_title("pairs per stage")
    ax.legend(fontsize=7)
    return _save(fig, out / "pairs_per_stage.png")


def _split(v: Any) -> tuple[float, float | None, float | None]:
    """value_fn results: a number, or (value, low, high) for an interval."""
    if isinstance(v, tuple | list):
        y, lo, hi = v
        return float(y), (None if lo is None else float(lo)), (None if hi is None else float(hi))
    return float(v), None, None


def _series(jobs: list[Job], xkey: str, value_fn, name: str):
    lines: dict[str, list[tuple]] = {}
    refs: list[tuple] = []
    for j in jobs:
        v = value_fn(j)
        if v is None:
            continue
        y, lo, hi = _split(v)
        rest = ", ".join(f"{k}={val}" for k, val in j.swept.items() if k != xkey)
        if xkey in j.swept:
            lines.setdefault(rest or name, []).append((float(_as_float(j.swept[xkey])), y, lo, hi))
        else:
            refs.append((rest or j.label, y, lo, hi))
    for xy in lines.values():
        xy.sort(key=lambda t: t[0])
    return lines, refs


def series_against(jobs: list[Job], xkey: str, value_fn, name: str = "value"
                   ) -> tuple[dict[str, list[tuple[float, float]]], list[tuple[str, float]]]:
    """(lines: label -> sorted [(x, y)] for jobs that set ``xkey``, refs: [(label, y)] for jobs that don't);
    a line's label is the job's other swept settings. ``value_fn(job)`` gives y, (y, low, high) or None."""
    lines, refs = _series(jobs, xkey, value_fn, name)
    return ({k: [(x, y) for x, y, _, _ in v] for k, v in lines.items()}, [(n, y) for n, y, _, _ in refs])


def _yerr(pts: list[tuple]) -> list[list[float]] | None:
    if not any(lo is not None and hi is not None for *_, lo, hi in pts):
        return None
    return [[(y - lo) if lo is not None else 0.0 for _, y, lo, _ in pts],
            [(hi - y) if hi is not None else 0.0 for _, y, _, hi in pts]]


def _against(ax, jobs: list[Job], xkey: str | None, value_fn, ylabel: str) -> bool:
    """One metric against the swept setting: lines over `xkey` (with interval bars where value_fn gives
    them), horizontal references (interval shaded) for jobs that do not set `xkey`."""
    pts = [(j, value_fn(j)) for j in jobs]
    pts = [(j, _split(v)) for j, v in pts if v is not None]
    if not pts:
        return False
    if xkey is None:  # categorical: one bar per job
        bars = [(j.label, *v) for j, v in pts]
        ax.bar(range(len(bars)), [b[1] for b in bars], yerr=_yerr(bars), capsize=3, color="#0969da")
        ax.set_xticks(range(len(bars)), [b[0] for b in bars], rotation=30, ha="right")
        for i, b in enumerate(bars):
            ax.text(i, b[1], f"{b[1]:.3g}", ha="center", va="bottom", fontsize=7)
        ax.set_ylabel(ylabel)
        return True
    lines, refs = _series(jobs, xkey, value_fn, ylabel)
    for name, xy in lines.items():
        ax.errorbar([t[0] for t in xy], [t[1] for t in xy], yerr=_yerr(xy), marker="o", capsize=3, label=name)
    styles = ["--", ":", "-.", (0, (5, 1, 1, 1))]
    for i, (name, y, lo, hi) in enumerate(refs):
        color = f"C{(i + len(lines)) % 10}"
        ax.axhline(y, linestyle=styles[i % len(styles)], color=color, label=name)
        if lo is not None and hi is not None:
            ax.axhspan(lo, hi, color=color, alpha=0.08)
    ax.set_xlabel(xkey)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    return True


def _yield_ci(j: Job):
    y, k, n = j.data.get("yield"), j.data.get("pairs_total"), j.data.get("problems")
    if y is None:
        return None
    if isinstance(k, int) and isinstance(n, int) and 0 <= k <= n and n > 0:
        return (float(y), *wilson_ci(k, n))  # at most one pair per problem: a proportion
    return float(y)


def plot_yield_against(jobs: list[Job], out: Path) -> Path | None:
    gens = [j for j in jobs if j.kind == "generate"]
    if len(gens) < 2:
        return None
    xkey = numeric_axis(gens)
    plt = _plt()
    fig, axs = plt.subplots(1, 2, figsize=(11, 4.0))
    _against(axs[0], gens, xkey, _yield_ci, "yield (pairs per problem, 95% CI)")
    _against(axs[1], gens, xkey, lambda j: j.data.get("pairs_total"), "pairs (after filters)")
    what = xkey or "setting"
    axs[0].set_title(f"yield against {what}")
    axs[1].set_title(f"pairs against {what}")
    return _save(fig, out / f"yield_vs_{_fname(xkey)}.png")


def plot_accuracy_against(jobs: list[Job], out: Path) -> Path | None:
    accs = [j for j in jobs if j.kind in ("run", "eval") and j.final_accuracy()]
    if len(accs) < 2:
        return None
    xkey = numeric_axis(accs)
    benches = sorted({b for j in accs for b in j.final_accuracy()})
    plt = _plt()
    fig, axs = plt.subplots(1, len(benches), figsize=(5.5 * len(benches), 4.0), squeeze=False)
    for ax, b in zip(axs[0], benches, strict=False):
        def acc(j, b=b):
            v = j.final_accuracy().get(b)
            if v is None or v.get("accuracy") is None:
                return None
            lo, hi = v.get("ci95_low"), v.get("ci95_high")
            return (100 * float(v["accuracy"]), None if lo is None else 100 * float(lo),
                    None if hi is None else 100 * float(hi))

        _against(ax, accs, xkey, acc, "final accuracy (%, 95% CI)")
        ax.set_title(f"{b}: accuracy against {xkey or 'setting'}")
    return _save(fig, out / f"accuracy_vs_{_fname(xkey)}.png")


def _fname(key: str | None) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key) if key else "setting"
