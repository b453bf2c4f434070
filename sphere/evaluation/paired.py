"""Paired accuracy changes between evaluations of the same problems, and their markdown tables.

`sphere run` (sphere/loop/) writes them into ``summary.json`` / ``summary.md``; `sphere report`
(sphere/runreport/) reads them back. Both sit above this module, so the statistics have one owner:

- ``paired_changes``: round ``r`` against round 0 (``vs_r0``) and against round ``r - 1`` (``vs_prev``);
- ``control_paired_changes``: a per-round control against its start policy (``vs_start``) and SPHERE's
  round against the control (``sphere_vs_control``);
- ``evaluated_ids``: the problems every round evaluates (the figures are computed over these only);
- ``paired_markdown`` / ``controls_markdown``: the two tables of summary.md and report.md.

Every figure is ``sphere.evaluation.metrics.paired_accuracy_change`` over sample 0's verdict of each problem
in ``round_<r>/eval/<bench>.jsonl`` (``round_<r>/controls/<name>/eval/<bench>.jsonl`` for a control).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sphere.data.benchmarks import benchmark_key, load_benchmark
from sphere.evaluation.metrics import paired_accuracy_change
from sphere.evaluation.settings import round_benchmarks
from sphere.io import read_jsonl_tolerant

CONTROL_TITLES = {"rft": "SFT on SPHERE's chosen solutions (RFT)",
                  "random_pairs": "DPO on random right/wrong samples"}


def first_verdicts(path: Path, keep: list[str] | None = None) -> dict[str, bool]:
    """Sample 0's verdict per problem id of the records at ``path``; ``keep``: only these ids (the problems
    this evaluation covers: an earlier attempt with a larger ``eval.limit`` left more records there)."""
    got = {str(rec["id"]): bool(rec["verdicts"][0])
           for rec in read_jsonl_tolerant(path) if rec.get("verdicts")}
    if keep is None:
        return got
    return {i: got[i] for i in keep if i in got}


def evaluated_ids(cfg: Any) -> dict[str, list[str]]:
    """benchmark key -> the ids of the problems each round evaluates (``eval.benchmarks`` within
    ``eval.limit``): every figure of the summary is computed over these problems only."""
    return {benchmark_key(b): [str(p["id"]) for p in load_benchmark(b, cfg.paths.data_dir, cfg.eval.limit)]
            for b in round_benchmarks(cfg)}


def paired_over(order: dict, before: dict, after: dict) -> dict | None:
    """``paired_accuracy_change`` of ``before`` -> ``after`` over the problems both have, taken in ``order``'s
    order (the bootstrap is seeded, so the order is part of the result); None when they share none."""
    ids = [i for i in order if i in before and i in after]
    return paired_accuracy_change([before[i] for i in ids], [after[i] for i in ids]) if ids else None


def _round_eval(out: Path, r: int, bench: str, keep: list[str] | None) -> dict[str, bool]:
    return first_verdicts(out / f"round_{r}" / "eval" / f"{bench}.jsonl", keep)


def paired_changes(out: Path, r: int, benches, ids: dict | None = None) -> dict:
    """Per benchmark, the paired accuracy change of round ``r`` against round 0 (``vs_r0``) and against round
    ``r - 1`` (``vs_prev``, from round 2 on), over the problems both rounds evaluated, from the per-problem
    records ``round_<r>/eval/<bench>.jsonl`` (sample 0 of each problem: the greedy answer when eval.n = 1).
    See ``sphere.evaluation.metrics.paired_accuracy_change``."""
    res: dict = {}
    for b in benches:
        keep = (ids or {}).get(b)
        cur = _round_eval(out, r, b, keep)
        if not cur:
            continue
        entry = {}
        for key, q in (("vs_r0", 0), ("vs_prev", r - 1)):
            if q < 0 or (key == "vs_prev" and q == 0):
                continue
            c = paired_over(cur, _round_eval(out, q, b, keep), cur)
            if c:
                entry[key] = c
        if entry:
            res[b] = entry
    return res


def control_paired_changes(out: Path, r: int, name: str, benches, ids: dict | None = None) -> dict:
    """Per benchmark, control ``name`` of round ``r`` (trained from round ``r - 1``'s policy) against its
    start policy (``vs_start``: round ``r - 1``'s evaluation) and SPHERE's round ``r`` against the control
    (``sphere_vs_control``: positive = SPHERE better), over the same problems."""
    res: dict = {}
    for b in benches:
        keep = (ids or {}).get(b)
        ctrl = first_verdicts(out / f"round_{r}" / "controls" / name / "eval" / f"{b}.jsonl", keep)
        start, sphere = (_round_eval(out, q, b, keep) for q in (r - 1, r))
        entry = {k: c for k, c in (("vs_start", paired_over(ctrl, start, ctrl)),
                                   ("sphere_vs_control", paired_over(ctrl, ctrl, sphere))) if c}
        if entry:
            res[b] = entry
    return res


def add_paired(out: Path, rounds: list[dict], ids: dict | None = None) -> None:
    """Fill in ``paired`` of every round after round 0 and of every control that has none yet."""
    for rec in rounds:
        if rec.get("round", 0) > 0 and "paired" not in rec:
            rec["paired"] = paired_changes(out, int(rec["round"]), sorted(rec.get("eval") or {}), ids)
        for name, c in (rec.get("controls") or {}).items():
            if "paired" not in c:
                c["paired"] = control_paired_changes(out, int(rec["round"]), name,
                                                     sorted(c.get("eval") or {}), ids)


def interval(c: dict | None) -> str:
    """``+Δ [+low, +high]`` in points, or a dash."""
    if not c:
        return "—"
    return f"{100 * c['delta']:+.1f} [{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}]"


def paired_markdown(rounds: list[dict]) -> list[str]:
    """The paired-interval table (rounds with ``paired``; see ``paired_changes``), or nothing."""
    rows = [(r["round"], b, k, c) for r in rounds for b, v in sorted((r.get("paired") or {}).items())
            for k, c in (("r0", v.get("vs_r0")), ("prev", v.get("vs_prev"))) if c]
    if not rows:
        return []
    out = ["", "Paired accuracy change over the same problems (95% percentile bootstrap over problems; "
           "McNemar's exact test on the problems that changed):", "",
           "| round | benchmark | vs | n | Δ points | 95% paired CI | gained/lost | McNemar p |",
           "|---|---|---|---|---|---|---|---|"]
    for rnd, b, k, c in rows:
        vs = "round 0" if k == "r0" else f"round {rnd - 1}"
        out.append(f"| {rnd} | {b} | {vs} | {c['n']} | {100 * c['delta']:+.1f} | "
                   f"[{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}] | {c['gained']}/{c['lost']} | "
                   f"{c['mcnemar_p']:.3g} |")
    return out


def controls_markdown(rounds: list[dict]) -> list[str]:
    """The per-round controls table (rounds with ``controls``; sphere/loop/controls.py), or nothing."""
    rows = []
    for r in rounds:
        for name, c in (r.get("controls") or {}).items():
            for b, v in sorted((c.get("eval") or {}).items()):
                p = (c.get("paired") or {}).get(b, {})
                rows.append((r["round"], name, c.get("pairs", 0), b, v["accuracy"], p.get("vs_start"),
                             p.get("sphere_vs_control")))
    if not rows:
        return []
    out = ["", "Per-round controls: trained from the same start policy, on the same problems, with the same "
           "recipe, evaluated on the same problems (sphere/controls.py); Δ in points with the paired 95% CI:",
           "",
           "| round | control | pairs | benchmark | acc | Δ vs start policy | SPHERE − control |",
           "|---|---|---|---|---|---|---|"]
    for rnd, name, n, b, acc, vs, sv in rows:
        out.append(f"| {rnd} | {CONTROL_TITLES.get(name, name)} | {n} | {b} | {100 * acc:.1f}% | "
                   f"{interval(vs)} | {interval(sv)} |")
    return out
