"""`sphere generate` in one process (``runner=local``): open the models, run ``Generator`` over the problems,
log the outcome. ``sphere.runners`` picks this or the Ray driver (sphere/scale/generate_driver.py); the
stages themselves live in ``sphere.generate.generator``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sphere import lifecycle  # lifecycle.Models: tests replace it there
from sphere.data.problems import load_problems
from sphere.generate.generator import Generator
from sphere.io import read_jsonl_tolerant
from sphere.loggers import make_logger
from sphere.memplan import MemoryPlanError, memory_plan
from sphere.progress import StageProgress
from sphere.verify import check_answers


def run_local(cfg: DictConfig, out: Path) -> float:
    """`sphere generate` in one process (``runner=local``; sphere/runners.py picks the runner): the three
    stages into ``out``; returns the number of pairs. The caller validated the config and the run dir."""
    check_generate_memory(cfg)  # before any model loads, as `sphere run` (needs hardware.gpu_memory_gb)
    problems = load_problems(cfg.data, int(cfg.seed))
    if not problems:
        raise SystemExit(f"sphere generate: data.problems={cfg.data.problems!r} gave no problems")
    logger = make_logger(cfg, out, "generate")
    try:
        with lifecycle.Models(cfg) as models:  # policy, small (stage 3), scorer: one owner, closed on exit
            gen = Generator(cfg, out, logger=logger)
            with StageProgress(len(problems), "generate") as prog:
                stats = gen.run(problems, models.policy(), models.scorer(), check_answers,
                                small_backend_factory=models.small if cfg.stages.stage3 else None,
                                progress=prog.update)
        log_generate_stats(logger, stats, out)
        print(json.dumps({k: stats[k] for k in ("pairs_per_stage", "yield", "engine_time_frac",
                                                 "leaves_per_call_frac", "wall_s")}))
        return float(stats["pairs_total"])
    finally:
        logger.finish()


def generate_memory_plan(cfg: DictConfig) -> dict:
    """``sphere.memplan.memory_plan`` for `sphere generate`: the phases it runs (``generate``: the policy
    engine and the PRM; ``stage3``: the small model's engine beside them), checked as `sphere run` checks
    them, without the DPO phase `sphere generate` never runs (its config has no ``train`` recipe unless an
    experiment set one)."""
    # every node but Hydra's own (its ${hydra:...} fields resolve only inside a running job)
    view = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in cfg if k != "hydra"}
    view["rounds"] = 1  # memplan counts stage 3 only for a run that generates
    view.setdefault("train", None)
    view["train"] = view["train"] or {}  # a placeholder: the train phase is dropped below
    plan = memory_plan(OmegaConf.create(view))
    plan["phases"].pop("train", None)
    plan["problems"] = [p for p in plan["problems"] if not p.startswith("phase train:")]
    if plan["fits"] is not None:
        plan["fits"] = not plan["problems"]
    return plan


def check_generate_memory(cfg: DictConfig) -> dict:
    """The plan; raises ``sphere.memplan.MemoryPlanError`` naming what does not fit when
    ``hardware.gpu_memory_gb`` is set (the same check and message as `sphere run`)."""
    plan = generate_memory_plan(cfg)
    if plan["fits"] is False:
        raise MemoryPlanError(
            f"the generation does not fit hardware.gpu_memory_gb={plan['gpu_memory_gb']:g}:\n  - "
            + "\n  - ".join(plan["problems"])
            + "\n(`sphere run ... dry_run=true` prints the whole plan; hardware.gpu_memory_gb=null skips the "
              "check)")
    return plan


def log_generate_stats(logger: Any, stats: dict, out: Path, step: int | None = None) -> None:
    """gen/ and search/ metrics, a sample table of pairs per stage, pairs.jsonl as an artifact."""
    if logger is None:
        return
    flat = {f"gen/pairs_stage{k}": v for k, v in stats["pairs_per_stage"].items()}
    flat.update({"gen/yield": stats["yield"], "gen/pairs_total": stats["pairs_total"],
                 "gen/wall_s": stats["wall_s"], "search/engine_time_frac": stats["engine_time_frac"],
                 "search/backend_calls": stats["backend_calls"], "search/tokens": stats["tokens"],
                 "search/mean_leaves_per_call": stats["mean_leaves_per_call"],
                 "search/pruned": stats["pruned"], "search/collisions": stats["collisions"]})
    ends = stats.get("chain_ends") or {}  # how chains ended: the shares cut at the depth and the two windows
    flat.update({f"search/chains_cut_{k}": v for k, v in (ends.get("share") or {}).items()})
    logger.log(flat, step=step)
    pairs = read_jsonl_tolerant(out / "pairs.jsonl")
    rows = []
    per_stage = int(getattr(logger, "table_rows", 32))
    for s in (1, 2, 3):
        for p in [q for q in pairs if int(q["stage"]) == s][:per_stage]:
            rows.append([s, p["problem_id"], json.dumps(p["prompt"])[:500], json.dumps(p["chosen"])[:1000],
                         json.dumps(p["rejected"])[:1000], p["margin"]])
    logger.log_table("gen/pairs_sample", ["stage", "problem_id", "prompt", "chosen", "rejected", "margin"],
                     rows)
    if (out / "pairs.jsonl").exists():
        logger.log_artifact(out / "pairs.jsonl", f"pairs-{stats['config_hash']}", "dataset")
