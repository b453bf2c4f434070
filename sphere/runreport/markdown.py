"""The markdown of `sphere report` (sphere.runreport): ``report_markdown`` turns the jobs and the drawn
figures into report.md: the figures, a table of the generation jobs, a table of final accuracies (95%
Wilson intervals, change against round 0) and each run's rounds."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sphere.evaluation.paired import controls_markdown, paired_markdown
from sphere.runreport.jobs import STAGES, Job


# ---------------------------------------------------------------------------------------------- markdown
def _fmt(v: Any, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _md_escape(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _iv(c: dict | None) -> str:
    if not c:
        return "-"
    return f"{100 * c['delta']:+.1f} [{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}]"


def sweep_markdown(jobs: list[Job]) -> list[str]:
    """A sweep of `sphere run` jobs (sweeps/objectives.yaml, Hydra's Optuna sweeper): one row per job and
    benchmark with its final round's paired change against round 0 (95% paired bootstrap interval over the
    same problems) and, where the round ran controls, SPHERE's paired change against each; sorted by the
    change, best first. Nothing for fewer than two run jobs."""
    runs = [j for j in jobs if j.kind == "run" and len(j.data.get("rounds") or []) > 1]
    if len(runs) < 2:
        return []
    rows = []
    for j in runs:
        last = j.data["rounds"][-1]
        for b, v in sorted((last.get("paired") or {}).items()):
            c = v.get("vs_r0")
            if not c:
                continue
            ctl = {name: ((x.get("paired") or {}).get(b) or {}).get("sphere_vs_control")
                   for name, x in sorted((last.get("controls") or {}).items())}
            pairs = sum(int(x) for x in (j.data["rounds"][-1].get("pairs_per_stage") or {}).values())
            rows.append((c["delta"], j, b, c, pairs, ctl))
    if not rows:
        return []
    names = sorted({n for *_, ctl in rows for n in ctl})
    out = ["## Sweep: paired change per job", "",
           "Each job's final round against round 0 over the same problems (Δ in points, 95% paired bootstrap "
           "interval); an interval above zero is a gain this sweep can detect. Best first.", "",
           "| job | setting | pairs | benchmark | Δ vs round 0 [95% CI] | "
           + "".join(f"vs {n} [95% CI] | " for n in names),
           "|---|---|---|---|---|" + "---|" * len(names)]
    for _, j, b, c, pairs, ctl in sorted(rows, key=lambda r: -r[0]):
        out.append("| " + " | ".join(_md_escape(x) for x in [j.rel, j.label, str(pairs), b, _iv(c),
                                                              *(_iv(ctl.get(n)) for n in names)]) + " |")
    return [*out, ""]


def _header_markdown(root: Path, jobs: list[Job], figures: list[tuple[str, Path]], out: Path) -> list[str]:
    """The title, the source and its jobs, the swept settings and the figures."""
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
    return lines


def _generation_markdown(jobs: list[Job]) -> list[str]:
    """A table of the generation jobs; nothing without one."""
    gens = [j for j in jobs if j.kind == "generate"]
    if not gens:
        return []
    lines = ["## Generation jobs", "",
             "| job | setting | pairs s1 | s2 | s3 | total | yield | problems | wall (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for j in gens:
        pps = j.pairs_per_stage() or {}
        d = j.data
        lines.append("| " + " | ".join(_md_escape(x) for x in [
            j.rel, j.label, *(str(pps.get(s, 0)) for s in STAGES), _fmt(d.get("pairs_total")),
            _fmt(d.get("yield")), _fmt(d.get("problems")), _fmt(d.get("wall_s"), ".0f")]) + " |")
    lines.append("")
    return lines


def _accuracy_cell(j: Job, b: str, v: dict | None) -> str:
    """A job's final accuracy on benchmark ``b``: the Wilson interval where recorded and, for a run of more
    than one round, the change against round 0."""
    if not v or v.get("accuracy") is None:
        return "-"
    c = f"{100 * float(v['accuracy']):.1f}%"
    if v.get("ci95_low") is not None and v.get("ci95_high") is not None:
        c += f" [{100 * float(v['ci95_low']):.1f}, {100 * float(v['ci95_high']):.1f}]"
    if j.kind == "run":
        r0 = ((j.data["rounds"][0].get("eval") or {}).get(b) or {}).get("accuracy")
        if r0 is not None and len(j.data["rounds"]) > 1:
            c += f" ({100 * (float(v['accuracy']) - float(r0)):+.1f} vs round 0)"
    return c


def _accuracy_markdown(jobs: list[Job]) -> list[str]:
    """A table of the final accuracies of the run and eval jobs; nothing without one."""
    accs = [j for j in jobs if j.kind in ("run", "eval")]
    if not accs:
        return []
    benches = sorted({b for j in accs for b in j.final_accuracy()})
    lines = ["## Accuracy", "", "| job | setting | rounds | " + " | ".join(
        f"{b} (final)" for b in benches) + " |", "|---|---|---|" + "---|" * len(benches)]
    for j in accs:
        fa = j.final_accuracy()
        nr = len(j.data.get("rounds") or []) if j.kind == "run" else "-"
        cells = [_accuracy_cell(j, b, fa.get(b)) for b in benches]
        lines.append("| " + " | ".join(_md_escape(x) for x in [j.rel, j.label, str(nr), *cells]) + " |")
    lines.append("")
    return lines


def _rounds_markdown(j: Job, single: bool) -> list[str]:
    """A run's rounds: accuracies, pairs and times per round, then its paired intervals and controls."""
    rounds = j.data.get("rounds") or []
    benches = sorted({b for r in rounds for b in (r.get("eval") or {})})
    title = "Rounds" if single else f"Rounds of {j.rel} ({j.label})"
    lines = [f"## {_md_escape(title)}", "", "| round | " + " | ".join(benches)
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
    # the paired intervals and the per-round controls of summary.json, as in the run's summary.md
    return [*lines, *paired_markdown(rounds), *controls_markdown(rounds), ""]


def report_markdown(root: Path, jobs: list[Job], figures: list[tuple[str, Path]], out: Path) -> str:
    lines = _header_markdown(root, jobs, figures, out)
    lines += _generation_markdown(jobs)
    lines += _accuracy_markdown(jobs)
    lines += sweep_markdown(jobs)
    for j in [j for j in jobs if j.kind == "run"]:
        lines += _rounds_markdown(j, single=len(jobs) == 1)
    lines += ["Generated by `sphere report`. Accuracy brackets are 95% Wilson intervals where the evaluation "
              "recorded them.", ""]
    return "\n".join(lines)
