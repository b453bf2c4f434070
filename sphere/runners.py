"""The runner layer: `sphere generate` and `sphere eval` in one process or on Ray actors, chosen by name.

    sphere generate runner=local ...      # sphere.generate.local.run_local
    sphere generate runner=ray ...        # sphere.scale.ray_runner.main_generate
    sphere eval runner=ray ...            # sphere.scale.ray_runner.evaluate

Imports go downward only (docs/ARCHITECTURE.md, tests/test_layers.py): ``cli`` and ``pipeline`` call this
layer; it calls ``generate``/``evaluation`` (the single-process code) or ``scale`` (the Ray drivers, which call
the same single-process code inside their actors). ``generate`` and ``evaluation`` never import ``scale``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

RUNNERS = ("local", "ray")


def runner_name(cfg: Any) -> str:
    """``cfg.runner.name`` (``local`` when the config has no runner group); an unknown name is an error."""
    from omegaconf import OmegaConf

    name = str(OmegaConf.select(cfg, "runner.name", default="local"))
    if name not in RUNNERS:
        raise ValueError(f"config runner.name={name!r}: allowed {' | '.join(RUNNERS)} (conf/runner/)")
    return name


def _out_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def generate_main(cfg: Any) -> float:
    """Hydra entry of `sphere generate`: validate, check the run directory's signature, run; pairs written."""
    from sphere.generate.generator import validate_generate_config
    from sphere.generate.local import run_local
    from sphere.rundir import check_generate

    from sphere.budgets import check_length_budgets
    from sphere.generate.local import check_generate_memory

    out = _out_dir()
    validate_generate_config(cfg)
    name = runner_name(cfg)
    # before any model loads, on every runner: a step budget no window can take is refused in one line
    check_length_budgets(cfg, phases=("generate",))
    check_generate(cfg, out)  # signature.json: refuse to resume outputs of other settings (resume=...)
    if name == "ray":
        check_generate_memory(cfg)  # (runner=local checks it in run_local, before its models load)
        from sphere.scale.ray_runner import main_generate

        return main_generate(cfg, out)
    return run_local(cfg, out)


def eval_main(cfg: Any) -> float:
    """Hydra entry of `sphere eval`: evaluate on the chosen runner, print the table; the mean accuracy."""
    from sphere.evaluation.harness import evaluate, report

    out = _out_dir()
    if runner_name(cfg) == "ray":
        from sphere.scale.ray_runner import evaluate as evaluate_ray

        results = evaluate_ray(cfg, out)
    else:
        results = evaluate(cfg, out)
    return report(results, out)
