"""What `sphere generate` writes at the end, rebuilt from the stage logs (``Generator.finalize``):
``trajectories.jsonl`` (one line per distinct trajectory of a record, with its roles), ``pairs.jsonl`` (the
construction's pairs after the filters) and ``generate_stats.json`` (routes, pairs per stage, the searches'
totals, ``chain_ends``); and how a trajectory is stored in a record (``traj_to_dict`` /
``traj_from_dict``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sphere.search.types import Trajectory, call_fill

FINISHES = ("answer", "eos", "depth", "length", "window")
CUT_FINISHES = ("depth", "length", "window")  # chains cut before a stated answer: graded wrong, never chosen
# the searches' statistics summed over the policy's and the small model's searches
SEARCH_TOTALS = ("backend_calls", "tokens", "candidates", "leaves", "engine_s", "backend_s", "scorer_s",
                 "verify_s", "full_calls", "full_call_leaves", "collisions", "pruned", "context_ends",
                 "window_ends")


def chain_ends(recs: dict[int, list[dict]]) -> dict:
    """Terminal trajectories of the stage records by finish, in all and per stage, with the share cut at the
    depth limit, the policy's window and the scorer's window (generate_stats.json ``chain_ends``)."""

    def count(rs: list[dict]) -> dict:
        c = {f: 0 for f in FINISHES}
        for r in rs:
            for t in r.get("terminals") or []:
                f = str(t.get("finish", ""))
                c[f] = c.get(f, 0) + 1
        n = sum(c.values())
        return {"terminals": n, **c, "share": {f: c[f] / n if n else 0.0 for f in CUT_FINISHES}}

    out = count([r for rs in recs.values() for r in rs])
    out["by_stage"] = {str(s): count(rs) for s, rs in sorted(recs.items())}
    return out


def traj_to_dict(t: Trajectory | None) -> dict | None:
    if t is None:
        return None
    return {
        "steps": t.steps,
        "correct": t.correct,
        "value": t.value,
        "rewards": t.rewards,
        "scores": t.scores,
        "finish": t.finish,
    }


def traj_from_dict(d: dict | None) -> Trajectory | None:
    if d is None:
        return None
    return Trajectory(d["steps"], bool(d["correct"]), float(d["value"]), list(d["rewards"]),
                      list(d["scores"]), str(d["finish"]))


def trajectory_lines(recs: dict[int, list[dict]], wanted: set) -> tuple[list[dict], dict[int, list[dict]]]:
    """(trajectories.jsonl lines, the records used per stage: the first record of each wanted problem)."""
    traj_lines = []
    used: dict[int, list[dict]] = {1: [], 2: [], 3: []}
    for s in (1, 2, 3):
        seen = set()
        for r in recs[s]:
            if r["problem_id"] not in wanted or r["problem_id"] in seen:
                continue
            seen.add(r["problem_id"])
            used[s].append(r)
            # one line per distinct trajectory of the record, with every role it plays (Sol_max and
            # Sol_min are terminals too, and may be the same trajectory)
            lines: dict[str, dict] = {}
            tagged = [("sol_max", r.get("sol_max")), ("sol_min", r.get("sol_min"))]
            for role, t in [*tagged, *(("terminal", t) for t in r["terminals"])]:
                if t is None:
                    continue
                line = lines.setdefault(json.dumps(t, sort_keys=True),
                                        {"problem_id": r["problem_id"], "stage": s, **t, "roles": []})
                if role not in line["roles"]:
                    line["roles"].append(role)
            traj_lines.extend(lines.values())
    return traj_lines, used


def previous_stats(stats_path: Path) -> dict:
    """The generate_stats.json of an earlier attempt ({} when none or unreadable)."""
    if stats_path.exists():
        try:
            return json.loads(stats_path.read_text())
        except json.JSONDecodeError:
            return {}
    return {}


def search_totals(search: dict) -> dict[str, float]:
    tot = {k: 0.0 for k in SEARCH_TOTALS}
    for sd in search.values():
        for k in tot:
            tot[k] += float(sd.get(k, 0))
    return tot


def generate_stats(*, config_hash: str, construction: str, problems: list[dict], recs: dict[int, list[dict]],
                   wanted: set, kept: list[dict], all_pairs: list[dict], drops: dict, search: dict,
                   batch: int, wall_s: float, prev: dict) -> dict:
    """The generate_stats.json dict (keys in the order the file has always had)."""
    s1 = {r["problem_id"]: r for r in recs[1] if r["problem_id"] in wanted}
    routes: dict[str, int] = {}
    for r in s1.values():
        routes[r["route"]] = routes.get(r["route"], 0) + 1
    pairs_per_stage = {str(s): sum(1 for p in kept if int(p["stage"]) == s) for s in (1, 2, 3)}
    tot = search_totals(search)
    pol = search.get("policy", {})
    return {
        "config_hash": config_hash,
        "construction": construction,
        "problems": len(problems),
        "problems_done_stage1": len(s1),
        "routes": routes,
        "problems_per_stage": {"1": len(s1), "2": sum(1 for r in recs[2] if r["problem_id"] in wanted),
                               "3": sum(1 for r in recs[3] if r["problem_id"] in wanted)},
        "pairs_per_stage": pairs_per_stage,
        "pairs_total": len(kept),
        "pairs_before_filters": len(all_pairs),
        "filter_drops": drops,
        "yield": len(kept) / max(1, len(problems)),
        "backend_calls": int(tot["backend_calls"]),
        "tokens": int(tot["tokens"]),
        "candidates": int(tot["candidates"]),
        "mean_leaves_per_call": call_fill(tot, batch)["mean_leaves_per_call"],
        # over the policy search's calls made while problems remained queued (its queue is longest)
        "leaves_per_call_frac": call_fill(pol, batch)["leaves_per_call_frac"],
        "engine_s": tot["engine_s"],
        "backend_s": tot["backend_s"],
        "scorer_s": tot["scorer_s"],
        "verify_s": tot["verify_s"],
        "engine_time_frac": tot["engine_s"] / max(1e-9, wall_s),
        "collisions": int(tot["collisions"]),
        "pruned": int(tot["pruned"]),
        "context_ends": int(tot["context_ends"]),  # leaves whose prompt no longer fit the policy's window
        "window_ends": int(tot["window_ends"]),  # candidate steps over the step scorer's window
        # how the chains ended: every terminal trajectory of the searches, by finish; the share cut at
        # search.max_depth (depth), the policy's window (length) and the step scorer's window (window)
        "chain_ends": chain_ends({s: [r for r in recs[s] if r["problem_id"] in wanted] for s in recs}),
        "wall_s": wall_s,
        "search": search,
        "previous_attempts_wall_s": (prev.get("previous_attempts_wall_s", 0.0) + prev.get("wall_s", 0.0))
        if prev.get("config_hash") == config_hash else 0.0,
    }


def report_cut_chains(stats: dict) -> None:
    """Say on stderr how many chains were cut before an answer (where the user looks, not only the file)."""
    ce = stats["chain_ends"]
    if any(ce[f] for f in CUT_FINISHES):
        print(f"[generate] {sum(ce[f] for f in CUT_FINISHES)} of {ce['terminals']} chains were cut before an "
              f"answer: {ce['depth']} at search.max_depth, {ce['length']} at the policy's window, "
              f"{ce['window']} at the step scorer's window (graded wrong, never chosen; generate_stats.json "
              "chain_ends)", file=sys.stderr, flush=True)
