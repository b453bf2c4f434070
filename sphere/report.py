"""`sphere report DIR [out=OUT_DIR]`: plots and a markdown report from a run or a (multi)run directory.

    sphere report outputs/run/2026-01-01_00-00-00          # one `sphere run`
    sphere report multirun/sweep-pruning/2026-01-01_00-00-00  # a `sphere sweep` / Hydra multirun

Finds every job under DIR: a ``sphere run`` job (``summary.json``), a ``sphere generate`` job
(``generate_stats.json``) or a ``sphere eval`` job (``eval/results.json``), with the overrides Hydra
recorded in ``<job>/.hydra/overrides.yaml``. Overrides whose values differ between jobs are the swept
settings; a numeric one (a pruning threshold) becomes the x axis, the rest label the lines, and jobs that
do not set it (other pruning policies) are drawn as horizontal reference lines.

Writes ``OUT_DIR/report.md`` (default OUT_DIR = DIR) and beside it, where the data allow:
``accuracy_per_round.png`` (accuracy per round per benchmark, 95% CI bars), ``pairs_per_stage.png``
(stacked pairs per stage per round or per job), ``yield_vs_<key>.png`` (yield and pairs against the swept
setting) and ``accuracy_vs_<key>.png`` (final accuracy against the swept setting).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("1", "2", "3")
STAGE_COLORS = {"1": "#0969da", "2": "#bf8700", "3": "#8250df"}
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
    from omegaconf import OmegaConf

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


# ---------------------------------------------------------------------------------------------- plotting
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "font.size": 9})
    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

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
        from sphere.evaluation.metrics import wilson_ci

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


# ---------------------------------------------------------------------------------------------- markdown
def _fmt(v: Any, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _md_escape(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def report_markdown(root: Path, jobs: list[Job], figures: list[tuple[str, Path]], out: Path) -> str:
    lines = [f"# sphere report: `{root.name or root}`", "",
             f"Source: `{root}` ({len(jobs)} job{'s' if len(jobs) != 1 else ''}: "
             + ", ".join(f"{sum(1 for j in jobs if j.kind == k)} {k}" for k in ("run", "generate", "eval")
                         if any(j.kind == k for j in jobs)) + ").", ""]
    swept = sorted({k for j in jobs for k in j.swept})
    if swept:
        lines += ["Swept settings: " + ", ".join(f"`{k}`" for k in swept) + ".", ""]
    for title, path in figures:
        rel = os.path.relpath(path, out)
        lines += [f"## {title}", "", f"![{title}]({Path(rel).as_posix()})", ""]

    gens = [j for j in jobs if j.kind == "generate"]
    if gens:
        lines += ["## Generation jobs", "",
                  "| job | setting | pairs s1 | s2 | s3 | total | yield | problems | wall (s) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for j in gens:
            pps = j.pairs_per_stage() or {}
            d = j.data
            lines.append("| " + " | ".join(_md_escape(x) for x in [
                j.rel, j.label, *(str(pps.get(s, 0)) for s in STAGES), _fmt(d.get("pairs_total")),
                _fmt(d.get("yield")), _fmt(d.get("problems")), _fmt(d.get("wall_s"), ".0f")]) + " |")
        lines.append("")
    accs = [j for j in jobs if j.kind in ("run", "eval")]
    if accs:
        benches = sorted({b for j in accs for b in j.final_accuracy()})
        lines += ["## Accuracy", "", "| job | setting | rounds | " + " | ".join(
            f"{b} (final)" for b in benches) + " |", "|---|---|---|" + "---|" * len(benches)]
        for j in accs:
            fa = j.final_accuracy()
            nr = len(j.data.get("rounds") or []) if j.kind == "run" else "-"
            cells = []
            for b in benches:
                v = fa.get(b)
                if not v or v.get("accuracy") is None:
                    cells.append("-")
                    continue
                c = f"{100 * float(v['accuracy']):.1f}%"
                if v.get("ci95_low") is not None and v.get("ci95_high") is not None:
                    c += f" [{100 * float(v['ci95_low']):.1f}, {100 * float(v['ci95_high']):.1f}]"
                if j.kind == "run":
                    r0 = ((j.data["rounds"][0].get("eval") or {}).get(b) or {}).get("accuracy")
                    if r0 is not None and len(j.data["rounds"]) > 1:
                        c += f" ({100 * (float(v['accuracy']) - float(r0)):+.1f} vs round 0)"
                cells.append(c)
            lines.append("| " + " | ".join(_md_escape(x) for x in [j.rel, j.label, str(nr), *cells]) + " |")
        lines.append("")
    for j in [j for j in jobs if j.kind == "run"]:
        rounds = j.data.get("rounds") or []
        benches = sorted({b for r in rounds for b in (r.get("eval") or {})})
        title = "Rounds" if len(jobs) == 1 else f"Rounds of {j.rel} ({j.label})"
        lines += [f"## {_md_escape(title)}", "", "| round | " + " | ".join(benches)
                  + " | pairs s1/s2/s3 | generate (s) | train (s) | wall (s) |",
                  "|---|" + "---|" * (len(benches) + 4)]
        for r in rounds:
            ev = r.get("eval") or {}
            accs = [f"{100 * float(ev[b]['accuracy']):.1f}%" if ev.get(b, {}).get("accuracy") is not None
                    else "-" for b in benches]
            pps = r.get("pairs_per_stage")
            pairs = "/".join(str(pps.get(s_, 0)) for s_ in STAGES) if pps else "-"
            secs = [_fmt(r.get(k), ".0f") for k in ("generate_s", "train_s", "wall_s")]
            lines.append("| " + " | ".join([str(r.get("round", "?")), *accs, pairs, *secs]) + " |")
        lines.append("")
    lines += ["Generated by `sphere report`. Accuracy brackets are 95% Wilson intervals where the evaluation "
              "recorded them.", ""]
    return "\n".join(lines)


def write_report(root: str | os.PathLike, out: str | os.PathLike | None = None) -> tuple[Path, list[Path]]:
    """Find the jobs under ``root``, draw the figures and write ``report.md``; returns (report, figures)."""
    root = Path(root)
    jobs = find_jobs(root)
    if not jobs:
        raise FileNotFoundError(
            f"{root}: no jobs found; expected summary.json (sphere run), generate_stats.json "
            "(sphere generate) "
            "or eval/results.json (sphere eval) in DIR or its subdirectories")
    out = Path(out) if out is not None else root
    out.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, Path]] = []
    for title, fn in (("Accuracy per round", plot_accuracy_per_round),
                      ("Accuracy against the swept setting", plot_accuracy_against),
                      ("Yield and pairs against the swept setting", plot_yield_against),
                      ("Pairs per stage", plot_pairs_per_stage)):
        p = fn(jobs, out)
        if p is not None:
            figures.append((title, p))
    from sphere.io import atomic_write_text

    report = out / "report.md"
    atomic_write_text(report, report_markdown(root, jobs, figures, out))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(report, 0o666 & ~umask)  # the atomic write's temp file was 0600
    return report, [p for _, p in figures]


def main(argv: list[str]) -> int:
    """argv after ``sphere report``; returns the exit code."""
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    root, out = None, None
    for a in argv:
        key, eq, val = a.partition("=")
        if eq and key == "out":
            out = val
        elif eq and not Path(a).exists():
            print(f"sphere report: unknown option {key!r}; allowed: out=OUT_DIR", file=sys.stderr)
            return 2
        elif root is None:
            root = a
        else:
            print(f"sphere report: one directory expected, got {root!r} and {a!r}", file=sys.stderr)
            return 2
    if root is None:
        print("sphere report: missing DIR (a run or multirun directory)", file=sys.stderr)
        return 2
    try:
        report, figs = write_report(root, out)
    except (FileNotFoundError, ValueError) as e:
        print(f"sphere report: {e}", file=sys.stderr)
        return 2
    print(f"sphere report: wrote {report}" + "".join(f"\n  {p}" for p in figs))
    return 0
