"""``summary.json`` / ``summary.md`` of `sphere run`, rewritten after every round.

``summary.json``: ``{"rounds": [{"round", "policy", "eval": {bench: {"accuracy", ...}}, "pairs_per_stage",
"paired", "controls"?, "wall_s", ...}, ...], "about"?}``. ``summary.md`` opens with what the run shows (the
experiment's ``about`` and the verdicts read off the paired intervals), then the per-round table and the
paired and controls tables (sphere.evaluation.paired, which also computes the intervals).
"""

from __future__ import annotations

import json
from pathlib import Path

from sphere.evaluation.paired import CONTROL_TITLES, add_paired, controls_markdown, paired_markdown
from sphere.io import atomic_write_json, atomic_write_text

TIMINGS = ("wall_s", "eval_s", "policy_s", "controls_s")


def _round_row(r: dict, benches: list[str], base: dict) -> str:
    ev = r.get("eval", {})
    acc = [f"{100 * ev[b]['accuracy']:.1f}%" if b in ev else "—" for b in benches]
    delta = [f"{100 * (ev[b]['accuracy'] - base[b]['accuracy']):+.1f}" if b in ev and b in base else "—"
             for b in benches]
    pp = r.get("pairs_per_stage") or {}
    pairs = "/".join(str(pp.get(k, 0)) for k in ("1", "2", "3")) if pp else "—"
    return "| " + " | ".join([str(r["round"]), *acc, *delta, pairs, f"{r['wall_s']:.0f}"]) + " |"


def summary_markdown(rounds: list[dict], about: str | None = None) -> str:
    """The per-round table; accuracy change against round 0 in points. ``about`` (the experiment's ``about``
    field: what its world can and cannot show) and the verdicts read off the paired intervals come first."""
    if not rounds:
        return "# sphere run\n\n(no rounds finished)\n"
    benches = sorted({b for r in rounds for b in r.get("eval", {})})
    head = ["round", *[f"{b} acc" for b in benches], *[f"{b} Δ vs r0" for b in benches],
            "pairs s1/s2/s3", "wall s"]
    lines = ["# sphere run: summary", *verdict_markdown(rounds, about), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = rounds[0].get("eval", {})
    lines += [_round_row(r, benches, base) for r in rounds]
    lines += ["", "Accuracy: greedy pass@1 on the configured benchmarks; Δ in points against round 0. "
              "Pairs are the preference pairs generated with that round's policy's predecessor."]
    lines += paired_markdown(rounds)
    lines += controls_markdown(rounds)
    return "\n".join(lines) + "\n"


def _reading(c: dict, better: str = "better", worse: str = "worse") -> str:
    """How a paired interval reads: above zero, below zero, or not distinguishable from no change."""
    if c["ci_low"] > 0:
        return f"{better} (interval above zero)"
    if c["ci_high"] < 0:
        return f"{worse} (interval below zero)"
    return "no difference this run can detect (interval spans zero)"


def _span(c: dict) -> str:
    return f"{100 * c['delta']:+.1f} points [{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}]"


def _verdicts(r: dict) -> list[str]:
    """Round ``r``'s verdict lines: the round against its start policy, SPHERE against each control."""
    rnd, out = r["round"], []
    for b, v in sorted((r.get("paired") or {}).items()):
        c = v.get("vs_prev") or v.get("vs_r0")
        if c:
            out.append(f"- Round {rnd} against the policy it started from, {b} ({c['n']} problems): "
                       f"{_span(c)}: {_reading(c)}.")
    for name, ctl in (r.get("controls") or {}).items():
        for b, p in sorted((ctl.get("paired") or {}).items()):
            c = p.get("sphere_vs_control")
            if c:
                title = CONTROL_TITLES.get(name, name)
                out.append(f"- Round {rnd}, SPHERE against the control {title}, {b}: "
                           f"{_span(c)}: {_reading(c, 'SPHERE better', 'the control better')}.")
    return out


def verdict_markdown(rounds: list[dict], about: str | None = None) -> list[str]:
    """"What this run shows": the experiment's ``about`` text, then one line per round and benchmark read off
    the paired intervals (the round against the policy it started from, SPHERE against each control); nothing
    when there is neither."""
    out = [line for r in rounds for line in _verdicts(r)]
    if not out and not about:
        return []
    head = ["", "## What this run shows", ""]
    if about:
        head += [" ".join(str(about).split()), ""]
    if out:
        head += ["Read off the paired 95% intervals below (same problems before and after):", "", *out]
    return head


def write_summary(out: Path, rounds: list[dict], about: str | None = None, ids: dict | None = None) -> None:
    """Paired intervals against round 0 / the previous round (same problems), then both files."""
    add_paired(out, rounds, ids)
    atomic_write_json(out / "summary.json", {"rounds": rounds, **({"about": about} if about else {})})
    atomic_write_text(out / "summary.md", summary_markdown(rounds, about))


def show_eval(out: Path, rounds: list[dict], rec: dict, carry_s: float, what: str,
              about: str | None = None, ids: dict | None = None) -> None:
    """Print round ``rec``'s accuracy and write the summary with it now, not only after the next round's
    pairs are generated and trained (hours on the paper's setting)."""
    print(f"[sphere run] round {rec['round']} {what}: " + ", ".join(
        f"{b} {100 * v['accuracy']:.1f}%" for b, v in rec["eval"].items()), flush=True)
    write_summary(out, [*rounds, {**rec, "wall_s": rec["eval_s"] + carry_s}], about, ids)


def earlier_rounds(summary_path: Path) -> dict[int, dict]:
    """Round records of an earlier attempt in this run directory (its summary.json), by round."""
    try:
        return {int(r["round"]): r for r in json.loads(summary_path.read_text())["rounds"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def keep_earlier_timings(rec: dict, before: dict | None) -> None:
    """A rerun that reuses a finished round measures only the reuse (seconds); the round's recorded times stay
    those of the attempt that did the work (the longer of the two, for the same policy)."""
    if not before or before.get("policy") != rec.get("policy"):
        return
    for k in TIMINGS:
        if isinstance(before.get(k), (int, float)) and before[k] > rec.get(k, 0.0):
            rec[k] = before[k]
