"""The result of ``sphere bench pipeline`` (moved out of sphere/bench/pipeline.py, issue #18): ``_aggregate``
(the repeats of one arm: the first run's counts, median wall and CPU time, spread), ``_summary`` (the
speedups, per-pair figures and waste ratios of the result JSON) and ``_table`` (the stdout table printed
before the JSON line)."""

from __future__ import annotations

import statistics


def _aggregate(rs: list[dict]) -> dict:
    """The first run's counts (same seeds: the repeats sample the same); median wall / CPU time, spread."""
    out = dict(rs[0])
    walls = [r["wall_s"] for r in rs]
    med = statistics.median(walls)
    out["wall_s"] = round(med, 3)
    out["wall_s_runs"] = walls
    out["wall_s_spread"] = round((max(walls) - min(walls)) / med, 3) if med else None  # (max - min) / median
    out["pairs_runs"] = [r["pairs"] for r in rs]
    pairs = out["pairs"]
    out["per_pair"] = dict(out["per_pair"], wall_s=round(med / pairs, 4) if pairs else None)
    out["per_problem"] = dict(out["per_problem"], wall_s=round(med / max(1, out["problems"]), 4))
    for key in ("backend_s", "scorer_s"):
        out[key] = round(statistics.median(r[key] for r in rs), 3)
        out[f"{key}_runs"] = [r[key] for r in rs]
    cpus = [r["cpu_s"] for r in rs]
    if None not in cpus:
        cmed = statistics.median(cpus)
        out["cpu_s"] = round(cmed, 3)
        out["cpu_s_runs"] = cpus
        out["per_pair"]["cpu_s"] = round(cmed / pairs, 4) if pairs else None
        out["per_problem"]["cpu_s"] = round(cmed / max(1, out["problems"]), 4)
    return out


def _ratio(base: dict | None, ours: dict | None, key: str, per: str = "per_pair") -> float | None:
    if not base or not ours:
        return None
    b, o = base[per].get(key), ours[per].get(key)
    if b is None or o is None or o <= 0:
        return None
    return round(b / o, 2)


def _summary(res: dict) -> None:
    a = res["arms"]
    s, pp, ol = a.get("sphere"), a.get("per_problem"), a.get("one_leaf")
    res["speedup_vs_per_problem"] = _ratio(pp, s, "wall_s")
    res["speedup_vs_one_leaf"] = _ratio(ol, s, "wall_s")
    # the same ratios per problem (not subject to how many pairs each arm's samples happened to give)
    res["speedup_per_problem_basis_vs_per_problem"] = _ratio(pp, s, "wall_s", "per_problem")
    res["speedup_per_problem_basis_vs_one_leaf"] = _ratio(ol, s, "wall_s", "per_problem")
    # CPU seconds (user + system, this process and its children) per pair: the work, robust to a busy machine
    res["cpu_speedup_vs_per_problem"] = _ratio(pp, s, "cpu_s")
    res["cpu_speedup_vs_one_leaf"] = _ratio(ol, s, "cpu_s")
    res["per_pair"] = {k: v["per_pair"] for k, v in a.items()}
    res["pairs"] = {k: v["pairs"] for k, v in a.items()}
    waste = {}
    for k, v in a.items():
        waste[k] = {
            "prompts_per_call": v["prompts_per_call"],
            "prompt_computed_frac": round(
                v["prompt_tokens_computed"] / max(1, v["prompt_tokens_prefilled"]), 4
            ),
            "scorer_items_per_candidate": round(v["scorer_items_run"] / max(1, v["candidates"]), 4),
        }
    res["waste"] = waste


def _table(res: dict) -> None:
    rows = [
        ("wall s", "wall_s"),
        ("  in backend s", "backend_s"),
        ("  in scorer s", "scorer_s"),
        ("cpu s", "cpu_s"),
        ("backend calls", "backend_calls"),
        ("prompts / call", "prompts_per_call"),
        ("prompt tok sent", "prompt_tokens_sent"),
        ("prompt tok computed", "prompt_tokens_computed"),
        ("generated tok", "generated_tokens"),
        ("scorer items", "scorer_items_run"),
        ("scorer tok computed", "scorer_tokens_computed"),
        ("problems", "problems"),
        ("pairs", "pairs"),
    ]
    arms = list(res["arms"])
    print(
        f"bench pipeline: {res['problems']} problems, backend {res['backend']}, scorer {res['scorer']}, "
        f"model {res['model']}"
    )
    print(f"{'':<22}" + "".join(f"{a:>16}" for a in arms))
    for label, key in rows:
        print(f"{label:<22}" + "".join(f"{res['arms'][a][key]:>16}" for a in arms))
    for label, key in (
        ("wall s / pair", "wall_s"),
        ("cpu s / pair", "cpu_s"),
        ("prompt tok comp / pair", "prompt_tokens_computed"),
        ("gen tok / pair", "generated_tokens"),
        ("scorer tok / pair", "scorer_tokens_computed"),
    ):
        vals = [res["arms"][a]["per_pair"][key] for a in arms]
        print(f"{label:<22}" + "".join(f"{(v if v is not None else float('nan')):>16.2f}" for v in vals))
    print(
        f"speedup vs per-problem loop: {res['speedup_vs_per_problem']}, vs one-leaf loop: "
        f"{res['speedup_vs_one_leaf']} (wall s per pair); CPU s per pair: "
        f"{res['cpu_speedup_vs_per_problem']}, {res['cpu_speedup_vs_one_leaf']}"
    )
