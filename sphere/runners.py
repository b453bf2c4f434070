"""The runner seam: where generation and evaluation run, one process or Ray actors, chosen once by name.

    sphere generate runner=local ...      # LocalRunner: Generator.run in this process
    sphere generate runner=ray ...        # RayRunner: sphere.scale.ray_runner.generate
    sphere eval runner=ray ...            # RayRunner: sphere.scale.ray_runner.evaluate

``make_runner(cfg)`` picks the ``Runner`` from ``runner.name``; `sphere generate` (``generate_main``),
`sphere eval` (``eval_main``) and the round loop of `sphere run` (sphere/loop/rounds.py) all call it, and
none of them branches on the runner again. A runner's ``generate`` / ``evaluate`` take either the command's
own config (``policy=None``: `sphere generate` / `sphere eval`) or a `sphere run` config and the round's model
(``policy=PATH``); ``open(cfg, policy, small)`` holds a round's models open (local: one ``Models`` owner
serving the evaluation, the generation and the controls; Ray: nothing, the actors own them).

Imports go downward only (docs/ARCHITECTURE.md, tests/test_layers.py): ``cli`` and ``loop`` call this layer;
it calls ``generate``/``evaluation`` (the single-process code) or ``scale`` (the Ray drivers, which call the
same single-process code inside their actors). ``generate`` and ``evaluation`` never import ``scale``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from sphere.budgets import check_length_budgets
from sphere.controls import read_samples, sample_settings, sample_solutions, write_sample_problems
from sphere.data.problems import load_problems
from sphere.evaluation.harness import evaluate as evaluate_local
from sphere.evaluation.harness import report, run_eval
from sphere.evaluation.settings import round_benchmarks, settings_from_config
from sphere.generate.generator import Generator
from sphere.generate.local import check_generate_memory, log_generate_stats
from sphere.generate.settings import validate_generate_config
from sphere.lifecycle import Models
from sphere.loggers import make_logger
from sphere.model_paths import load_tokenizer
from sphere.progress import StageProgress
from sphere.prompts import family_config
from sphere.rundir import check_generate
from sphere.scale import ray_runner
from sphere.verify import check_answers

RUNNERS = ("local", "ray")
_SHOWN = ("pairs_per_stage", "yield", "engine_time_frac", "leaves_per_call_frac", "wall_s")


def runner_name(cfg: Any) -> str:
    """``cfg.runner.name`` (``local`` when the config has no runner group); an unknown name is an error."""
    name = str(OmegaConf.select(cfg, "runner.name", default="local"))
    if name not in RUNNERS:
        raise ValueError(f"config runner.name={name!r}: allowed {' | '.join(RUNNERS)} (conf/runner/)")
    return name


class Runner(Protocol):
    """Where `sphere generate`, `sphere eval` and each round of `sphere run` do their model work."""

    name: str
    tag: str  # how the round loop's progress lines name it ("" for the one-process default)

    def open(self, cfg: Any, policy: str, small: str | None = None) -> AbstractContextManager[Any]:
        """A round's models, open for its evaluation and generation (``None`` where the runner owns none)."""

    def generate(self, cfg: Any, out: Path, *, models: Any = None, policy: str | None = None,
                 small: str | None = None, problems: list[dict] | None = None, logger: Any = None,
                 step: int | None = None, label: str = "generate", pair_family: dict | None = None,
                 pair_tokenizer: Any = None) -> dict:
        """The three stages into ``out`` (stages/, pairs.jsonl, generate_stats.json); the stats dict."""

    def evaluate(self, cfg: Any, out: Path, *, models: Any = None, policy: str | None = None,
                 family: dict | None = None) -> dict:
        """``out/eval/`` (per-benchmark records, results.json/md); the results dict (with ``meta``)."""

    def sample(self, cfg: Any, out: Path, *, models: Any, policy: str,
               problems: Sequence[dict]) -> list[dict]:
        """The random-pairs control's samples (sphere.controls.sample_settings) of ``policy`` on ``problems``,
        graded, into ``out/samples/eval/``; the per-problem records."""

    def tokenizer(self, cfg: Any, *, models: Any, policy: str) -> Any:
        """``policy``'s tokenizer in this process (the controls write their pairs' prompts with it)."""


def _round_eval(cfg: Any) -> tuple[dict, dict]:
    """A round's evaluation settings: the ``eval`` node without ``n``, and ``sampling`` with ``eval.n``
    samples per problem (1 = greedy pass@1), not the search's ``sampling.n``."""
    ev = OmegaConf.to_container(cfg.eval, resolve=True)
    samp = {**OmegaConf.to_container(cfg.sampling, resolve=True), "n": int(ev.pop("n", 1))}
    return ev, samp


class LocalRunner:
    """Everything in this process: ``Generator.run`` and the evaluation harness on models ``Models`` owns."""

    name, tag = "local", ""

    def open(self, cfg: Any, policy: str, small: str | None = None) -> AbstractContextManager[Any]:
        return Models(cfg, policy=policy, small=small)

    def generate(self, cfg: Any, out: Path, *, models: Any = None, policy: str | None = None,
                 small: str | None = None, problems: list[dict] | None = None, logger: Any = None,
                 step: int | None = None, label: str = "generate", pair_family: dict | None = None,
                 pair_tokenizer: Any = None) -> dict:
        if problems is None:
            problems = load_problems(cfg.data, int(cfg.seed))
            if not problems:  # (the Ray driver says the same)
                raise SystemExit(f"sphere generate: data.problems={cfg.data.problems!r} gave no problems")
        with contextlib.ExitStack() as stack:
            if models is None:  # policy, small (stage 3), step scorer: one owner, closed on exit
                models = stack.enter_context(Models(cfg, policy=policy, small=small))
            gen = Generator(cfg, out, logger=logger, policy_name=policy, small_name=small,
                            pair_family=pair_family, pair_tokenizer=pair_tokenizer)
            with StageProgress(len(problems), label) as prog:
                stats = gen.run(problems, models.policy(), models.scorer(), check_answers,
                                small_backend_factory=models.small if cfg.stages.stage3 else None,
                                progress=prog.update)
        log_generate_stats(logger, stats, out, step=step)
        return stats

    def evaluate(self, cfg: Any, out: Path, *, models: Any = None, policy: str | None = None,
                 family: dict | None = None) -> dict:
        if policy is None:  # `sphere eval`: the harness builds (and closes) its own backend
            return evaluate_local(cfg, out)
        ev, samp = _round_eval(cfg)
        ecfg = OmegaConf.create({"sampling": samp, "seed": int(cfg.seed), **ev})
        with contextlib.ExitStack() as stack:
            if models is None:
                models = stack.enter_context(Models(cfg, policy=policy))
            return run_eval(models.policy(), round_benchmarks(cfg), out, data_dir=cfg.paths.data_dir,
                            limit=cfg.eval.limit, settings=settings_from_config(ecfg),
                            family_cfg=family or family_config(cfg), model_name=policy,
                            progress=cfg.eval.get("progress"))

    def sample(self, cfg: Any, out: Path, *, models: Any, policy: str,
               problems: Sequence[dict]) -> list[dict]:
        return sample_solutions(cfg, models.policy(), problems, out, policy, family_config(cfg))

    def tokenizer(self, cfg: Any, *, models: Any, policy: str) -> Any:
        return models.policy().tokenizer


def _round_config(cfg: Any, policy: str, **top: Any) -> Any:
    """``cfg`` resolved into a plain (non-struct) config with ``model.policy`` = this round's policy and the
    given top-level keys added (the eval-shaped keys of conf/eval.yaml for the Ray evaluation)."""
    plain = ray_runner.plain_config(cfg)
    plain["model"] = {**plain["model"], "policy": str(policy)}
    plain.update(top)
    return OmegaConf.create(plain)


class RayRunner:
    """Ray actors own the models (sphere.scale); the driver here writes the same files as one process.
    A round's outputs on Ray equal the local ones (tests/test_run_ray.py); ``ray_runner.json`` beside them
    adds the actors' bookkeeping."""

    name, tag = "ray", " (ray)"

    def open(self, cfg: Any, policy: str, small: str | None = None) -> AbstractContextManager[Any]:
        return contextlib.nullcontext(None)

    def generate(self, cfg: Any, out: Path, *, models: Any = None, policy: str | None = None,
                 small: str | None = None, problems: list[dict] | None = None, logger: Any = None,
                 step: int | None = None, label: str = "generate", pair_family: dict | None = None,
                 pair_tokenizer: Any = None) -> dict:
        if pair_family is not None or pair_tokenizer is not None:
            raise ValueError("runner=ray writes the pairs in the generating policy's own prompt: its workers "
                             "do not build another model's (Generator pair_family / pair_tokenizer)")
        stats = ray_runner.generate(cfg if policy is None else _round_config(cfg, policy), out)
        log_generate_stats(logger, stats, out, step=step)
        return stats

    def evaluate(self, cfg: Any, out: Path, *, models: Any = None, policy: str | None = None,
                 family: dict | None = None) -> dict:
        if policy is None:  # `sphere eval`
            return ray_runner.evaluate(cfg, out)
        if family is not None:
            raise ValueError("runner=ray evaluates in the config's prompt family only "
                             "(no model.train_target_family)")
        ev, samp = _round_eval(cfg)
        ev["benchmarks"] = round_benchmarks(cfg)
        ecfg = _round_config(cfg, policy, sampling=samp, reference_results=None, **ev)
        return ray_runner.evaluate(ecfg, out)

    def sample(self, cfg: Any, out: Path, *, models: Any, policy: str,
               problems: Sequence[dict]) -> list[dict]:
        """The actors sample ``out/problems.jsonl`` as a one-benchmark evaluation with the control's settings
        (the records and their format are the harness's, as in one process)."""
        bench, st = write_sample_problems(out, problems), sample_settings(cfg)
        ev, samp = _round_eval(cfg)
        samp.update(n=st.n, temperature=st.temperature, top_p=st.top_p, max_solution_tokens=st.max_tokens,
                    seed=st.seed)
        ev.update(benchmarks=[str(bench)], limit=None, temperature=st.temperature, max_tokens=st.max_tokens,
                  resume=True, verify_timeout_s=st.verify_timeout_s)
        ray_runner.evaluate(_round_config(cfg, policy, sampling=samp, reference_results=None, **ev),
                            out / "samples")
        return read_samples(out)

    def tokenizer(self, cfg: Any, *, models: Any, policy: str) -> Any:
        """Loaded here from the model directory (the actors hold the models)."""
        return load_tokenizer(policy, cfg)


def make_runner(cfg: Any) -> Runner:
    """The runner ``runner.name`` names (``local`` without a runner group)."""
    return {"local": LocalRunner, "ray": RayRunner}[runner_name(cfg)]()


def _out_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def generate_main(cfg: Any) -> float:
    """Hydra entry of `sphere generate`: validate, check the run directory's signature and the memory plan,
    run the three stages on the chosen runner; the number of pairs written."""
    out = _out_dir()
    validate_generate_config(cfg)
    runner = make_runner(cfg)
    # before any model loads, on every runner: a step budget no window can take is refused in one line
    check_length_budgets(cfg, phases=("generate",))
    check_generate(cfg, out)  # signature.json: refuse to resume outputs of other settings (resume=...)
    check_generate_memory(cfg)  # needs hardware.gpu_memory_gb; the same check and message as `sphere run`
    logger = make_logger(cfg, out, "generate")
    try:
        stats = runner.generate(cfg, out, logger=logger)
        print(json.dumps({k: stats[k] for k in _SHOWN}))
        return float(stats["pairs_total"])
    finally:
        logger.finish()


def eval_main(cfg: Any) -> float:
    """Hydra entry of `sphere eval`: evaluate on the chosen runner, print the table; the mean accuracy."""
    out = _out_dir()
    return report(make_runner(cfg).evaluate(cfg, out), out)
