"""Where ``runner=ray`` puts the models on a described cluster: ``runner.nodes`` nodes of
``runner.gpus_per_node`` GPUs (``hardware.gpu_memory_gb`` each), ``runner.workers`` actors of
``runner.gpus_per_worker`` GPUs. Printed by ``sphere run ... runner=ray dry_run=true``; a plan the cluster
cannot hold is refused (dry run and real run alike) in one message naming the keys.

What each worker holds is what ``sphere.lifecycle.Models`` opens inside the actor, phase by phase, as the
memory plan (sphere/memplan.py) counts it per GPU: the policy engine split over the worker's GPUs
(tensor parallelism), the PRM on the worker's first GPU (each worker scores its own chunks), and in the
stage-3 phase the small model (the policy closed first with ``stages.close_policy_before_small``). Ray
places an actor on ONE node (``num_gpus=gpus_per_worker``; Ray sets its CUDA_VISIBLE_DEVICES), so a worker
never spans nodes. Workers fill nodes in order, as Ray's default packing does for equal actors.
"""

from __future__ import annotations

from typing import Any


class PlacementError(ValueError):
    pass


def _gpus_per_worker(cfg: Any) -> int:
    g = cfg.runner.get("gpus_per_worker", "auto")
    tp = int(cfg.backend.get("tensor_parallel_size", 1) or 1)
    return tp if g == "auto" else int(g) if float(g) == int(float(g)) else g


def placement(cfg: Any, mem_plan: dict) -> dict | None:
    """``{"nodes", "gpus_per_node", "workers": [{worker, node, gpus}], "gpus": [{node, gpu, worker, phases:
    {phase: [(what, model, gb)]}, total_gb per phase}], "idle_gpus", "problems"}``; None when the cluster is
    not described (``runner.gpus_per_node`` null) or the runner is not Ray."""
    r = cfg.get("runner") or {}
    if str(r.get("name", "local")) != "ray" or r.get("gpus_per_node") in (None, 0):
        return None
    nodes, per_node, workers = int(r.get("nodes", 1)), int(r.gpus_per_node), int(r.workers)
    tp = int(cfg.backend.get("tensor_parallel_size", 1) or 1)
    gw = _gpus_per_worker(cfg)
    problems: list[str] = []
    if not isinstance(gw, int) or gw < 1:
        problems.append(f"runner.gpus_per_worker={gw!r}: a GPU cluster needs a whole number of GPUs >= 1 per "
                        "worker (auto = backend.tensor_parallel_size)")
        gw = max(1, int(float(gw))) if isinstance(gw, int | float) else 1
    if gw < tp:
        problems.append(f"runner.gpus_per_worker={gw} < backend.tensor_parallel_size={tp}: the policy engine "
                        "of a worker is split over its own GPUs")
    if gw > per_node:
        problems.append(f"runner.gpus_per_worker={gw} > runner.gpus_per_node={per_node}: a Ray actor lives on "
                        "one node")
    fit_per_node = per_node // gw if gw <= per_node else 0
    if workers > fit_per_node * nodes:
        problems.append(f"runner.workers={workers} x {gw} GPUs need {workers * gw} GPUs "
                        f"({fit_per_node} workers per node); the cluster has runner.nodes={nodes} x "
                        f"runner.gpus_per_node={per_node}: lower runner.workers to {fit_per_node * nodes} or "
                        "add nodes")
    gb = mem_plan.get("gpu_memory_gb")
    out: dict = {"nodes": nodes, "gpus_per_node": per_node, "gpus_per_worker": gw, "gpu_memory_gb": gb,
                 "workers": [], "gpus": [], "problems": problems}
    phases = mem_plan.get("phases", {})
    slot = 0
    for node in range(nodes):
        for k in range(fit_per_node):
            if slot >= workers:
                break
            gpus = list(range(k * gw, (k + 1) * gw))
            out["workers"].append({"worker": slot, "node": node, "gpus": gpus})
            for j, g in enumerate(gpus):
                held: dict[str, list] = {}
                for ph in ("generate", "stage3"):
                    items = [it for it in phases.get(ph, {}).get("items", [])
                             if j == 0 or it["what"] in ("policy", "small", "policy (still open)")]
                    if items:
                        held[ph] = [{"what": it["what"], "model": it.get("model", ""), "gb": it.get("gb")}
                                    for it in items]
                tot = {ph: (round(sum(x["gb"] for x in v), 2) if all(x["gb"] is not None for x in v) else None)
                       for ph, v in held.items()}
                out["gpus"].append({"node": node, "gpu": g, "worker": slot, "phases": held, "total_gb": tot})
                if gb:
                    for ph, t in tot.items():
                        if t is not None and t > float(gb):
                            problems.append(f"node {node} GPU {g} (worker {slot}), phase {ph}: {t:.1f} GB > "
                                            f"hardware.gpu_memory_gb={float(gb):g}")
            slot += 1
    used = {(g["node"], g["gpu"]) for g in out["gpus"]}
    out["idle_gpus"] = [(n, g) for n in range(nodes) for g in range(per_node) if (n, g) not in used]
    out["fits"] = not problems
    return out


def check_placement(cfg: Any, mem_plan: dict) -> dict | None:
    """The placement; raises ``PlacementError`` naming what the described cluster cannot hold."""
    pl = placement(cfg, mem_plan)
    if pl is not None and pl["problems"]:
        raise PlacementError("runner=ray: the cluster cannot hold this plan: " + "; ".join(pl["problems"])
                             + " (`sphere run ... runner=ray dry_run=true` prints the placement)")
    return pl


def format_placement(pl: dict | None) -> str:
    if pl is None:
        return ("Ray placement: not checked (runner.gpus_per_node=null; set runner.nodes, runner.gpus_per_node "
                "and hardware.gpu_memory_gb to describe the cluster)")
    gb = f", {pl['gpu_memory_gb']:g} GB each" if pl.get("gpu_memory_gb") else ""
    lines = [f"Ray placement ({pl['nodes']} node(s) x {pl['gpus_per_node']} GPUs{gb}; "
             f"{len(pl['workers'])} workers x {pl['gpus_per_worker']} GPU(s)):"]
    for g in pl["gpus"]:
        parts = []
        for ph, items in g["phases"].items():
            t = g["total_gb"][ph]
            what = " + ".join(f"{x['what']} {x['model']}" + (f" {x['gb']:.1f} GB" if x["gb"] is not None else "")
                              for x in items)
            parts.append(f"{ph}: {what}" + (f" = {t:.1f} GB" if t is not None else ""))
        lines.append(f"  node {g['node']} GPU {g['gpu']}: worker {g['worker']} | " + " | ".join(parts))
    if pl["idle_gpus"]:
        lines.append(f"  idle: {', '.join(f'node {n} GPU {g}' for n, g in pl['idle_gpus'])}")
    lines.append("  fits: yes" if pl["fits"] else "  fits: NO\n    " + "\n    ".join(pl["problems"]))
    return "\n".join(lines)
