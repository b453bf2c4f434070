"""What `sphere run` checks before any model loads, and what a dry run prints.

    sphere run experiment=paper_qwen2_5_7b dry_run=true   # the plan as one JSON document on stdout

``validate_run_config``: the run's own keys (rounds, benchmarks, controls, the runner they need, the generate
settings); ``preflight``: that plus every length budget against its window, the GPU memory plan and (Ray) the
placement; ``plan``: all of it as a dict, without loading a model; ``print_plan``: the dry run's output.
"""

from __future__ import annotations

import json
import sys

from omegaconf import DictConfig, OmegaConf

from sphere.budgets import check_length_budgets, format_budgets
from sphere.controls import enabled_controls, validate_controls_config
from sphere.data.benchmarks import benchmark_key, load_benchmark
from sphere.data.problems import count_problems
from sphere.data.training import describe_source
from sphere.evaluation.settings import round_benchmarks
from sphere.generate.settings import validate_generate_config
from sphere.loop.controls import controls_estimate
from sphere.memplan import check_memory_plan, format_plan
from sphere.runners import runner_name
from sphere.scale.placement import check_placement, format_placement
from sphere.search.config import estimate_backend_calls, validate_search_config
from sphere.train.train_config import resolve_train_cfg


def _validate_runner(cfg: DictConfig) -> None:
    """What runs on ``runner=local`` only (a transfer run), and the controls a transfer run has none of."""
    ray = runner_name(cfg) == "ray"
    if ray and cfg.model.get("train_target"):
        raise ValueError("runner=ray with model.train_target (a transfer run) is not supported: its pairs "
                         "are written with the target model's prompt and tokenizer (Generator pair_tok), "
                         "which the Ray workers do not build; use runner=local for transfer runs")
    if enabled_controls(cfg) and cfg.model.get("train_target"):
        raise ValueError("config controls: the per-round controls are part of the self-evolution loop, "
                         "not of a transfer run (model.train_target); turn them off (controls.rft=false "
                         "controls.random_pairs=false)")


def validate_run_config(cfg: DictConfig) -> None:
    """The run's own errors, named by their keys, before any work."""
    if int(cfg.rounds) < 0:
        raise ValueError(f"config rounds={cfg.rounds}: allowed an integer >= 0")
    if cfg.model.get("train_target") and int(cfg.rounds) != 1:
        raise ValueError(f"config rounds={cfg.rounds}: a transfer run (model.train_target set) has exactly "
                         "1 round")
    try:
        names = round_benchmarks(cfg)
    except ValueError as e:
        raise ValueError(f"config eval.benchmarks is empty: list at least one benchmark ({e})") from None
    for name in names:  # unknown or missing: fail before any work
        benchmark_key(name)
        load_benchmark(name, cfg.paths.data_dir, cfg.eval.limit)
    validate_controls_config(cfg)
    _validate_runner(cfg)
    if int(cfg.rounds) > 0:  # the generate settings too, before round 0 spends time (issue #11)
        validate_generate_config(cfg)


def preflight(cfg: DictConfig) -> None:
    """Everything `sphere run` refuses before any model loads."""
    validate_run_config(cfg)  # the config's own errors first, named by their keys
    check_length_budgets(cfg)  # a step budget no window can take is refused before any model loads
    check_placement(cfg, check_memory_plan(cfg))  # (no-op without hardware.gpu_memory_gb)


def _settings(cfg: DictConfig) -> dict:
    """The plan's echo of the run's settings."""
    return {
        "models": {"policy": str(cfg.model.policy), "small": str(cfg.model.small), "prm": str(cfg.model.prm),
                   "train_target": cfg.model.get("train_target")},
        "backend": str(cfg.backend.name),
        "prompt_family": str(cfg.prompt.name),
        "rounds": int(cfg.rounds),
    }


def plan(cfg: DictConfig) -> dict:
    """What a run would do, without loading any model (dry runs)."""
    validate_search_config(cfg.search)
    validate_generate_config(cfg)
    validate_run_config(cfg)
    resolve_train_cfg(cfg.train)  # unknown or bad train.* keys fail here, not after generation
    budgets = check_length_budgets(cfg)  # every length budget vs its window; refuses where not one step fits
    mem = check_memory_plan(cfg, budgets)  # refuses a plan that cannot fit hardware.gpu_memory_gb
    placement = check_placement(cfg, mem)  # runner=ray: which GPU of the described cluster holds what
    n = count_problems(cfg.data, int(cfg.seed))
    return {
        **_settings(cfg),
        "problems": n,
        "data": OmegaConf.to_container(cfg.data.problems, resolve=True)
        if OmegaConf.is_config(cfg.data.problems) else str(cfg.data.problems),
        "data_source": describe_source(cfg.data),  # which pools data.problems reads, and why
        "stages": {"1": True, "2": bool(cfg.stages.stage2), "3": bool(cfg.stages.stage3)},
        "search": {"mode": str(cfg.search.mode), "E": int(cfg.search.expansions),
                   "E_small": int(cfg.search.expansions) * int(cfg.stages.small_expansions_factor),
                   "temperature": float(cfg.search.temperature), "max_depth": int(cfg.search.max_depth),
                   "pruning": str(cfg.search.pruning.policy), "batch_leaves": int(cfg.search.batch_leaves)},
        "scorer": str(cfg.scorer.name),
        "train": {"lora": bool(cfg.train.lora.enabled) if "lora" in cfg.train else None,
                  "loss": OmegaConf.to_container(cfg.train.loss, resolve=True)
                  if "loss" in cfg.train else None},
        "eval": {"benchmarks": round_benchmarks(cfg), "limit": cfg.eval.limit},
        "controls": enabled_controls(cfg),
        "estimate_per_round_controls": controls_estimate(cfg, n),
        "estimate_per_round_stage1": estimate_backend_calls(n, cfg.search),
        "length_budgets": budgets,
        "memory_plan": mem,
        "placement": placement,
    }


def print_plan(cfg: DictConfig) -> None:
    """The dry run: the plan as one JSON document on stdout (scripts parse it), the tables on stderr."""
    p = plan(cfg)
    print(json.dumps(p, indent=2))
    print(format_budgets(p["length_budgets"]), file=sys.stderr)
    print(format_plan(p["memory_plan"]), file=sys.stderr)
    if runner_name(cfg) == "ray":
        print(format_placement(p["placement"]), file=sys.stderr)
