"""The settings of ``sphere eval`` (moved out of sphere/evaluation/harness.py, issue #18): ``EvalSettings``
(samples per problem, sampling, batch size, resume mode, checker timeout; checked on construction),
``expand_benchmarks`` (``all`` -> the six paper benchmarks, a single name as a list) and
``settings_from_config`` (``EvalSettings`` from conf/eval.yaml and the ``sampling`` node)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from sphere.backends.base import SamplingParams
from sphere.data import PAPER_BENCHMARKS
from sphere.rundir import resume_mode


@dataclass
class EvalSettings:
    n: int = 1  # samples per problem (sampling.n)
    temperature: float = 0.0  # 0 = greedy; the harness default for n == 1
    top_p: float = 1.0
    max_tokens: int = 1024  # generation budget per solution
    seed: int | None = 0
    batch_size: int | None = None  # problems per backend call; None = a whole benchmark in one call
    # reuse finished problems of eval/<benchmark>.jsonl: True/"auto" (same settings), False/"fresh" (move
    # eval/ aside, start over) or "force" (reuse whatever is there); sphere/rundir/
    resume: bool | str = True
    verify_timeout_s: float = 5.0  # per-answer checker timeout

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"sampling.n: must be >= 1, got {self.n}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size: must be a positive integer or null, got {self.batch_size}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {self.max_tokens}")

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(n=self.n, temperature=self.temperature, top_p=self.top_p,
                              max_tokens=self.max_tokens, seed=self.seed, stop=None)


def expand_benchmarks(names: Sequence[str] | str) -> list[str]:
    """``all`` -> the six paper benchmarks; duplicates removed, order kept. A single name (``benchmarks=mini``
    on the command line arrives as a string) is a one-element list, never a list of its letters."""
    if isinstance(names, str):
        names = [x.strip() for x in names.split(",") if x.strip()]
    out: list[str] = []
    for nm in names:
        for x in (PAPER_BENCHMARKS if nm == "all" else (str(nm),)):
            if x not in out:
                out.append(x)
    if not out:
        raise ValueError("benchmarks: empty list; give e.g. benchmarks=[math500,gsm8k] or benchmarks=[all]")
    return out


def settings_from_config(cfg) -> EvalSettings:
    """EvalSettings from the composed config (conf/eval.yaml + the ``sampling`` node)."""
    def sel(key, default):
        v = OmegaConf.select(cfg, key, default=default)
        return default if v is None else v

    n = int(sel("sampling.n", 1))
    temp = cfg.get("temperature")
    if temp is None:  # eval default: greedy for a single sample, the sampling temperature for n > 1
        temp = 0.0 if n == 1 else float(sel("sampling.temperature", 0.8))
    max_tokens = cfg.get("max_tokens")
    if max_tokens is None:
        max_tokens = int(sel("sampling.max_solution_tokens", 1024))
    return EvalSettings(n=n, temperature=float(temp), top_p=float(sel("sampling.top_p", 1.0)),
                        max_tokens=int(max_tokens),
                        seed=OmegaConf.select(cfg, "sampling.seed", default=cfg.get("seed")),
                        batch_size=cfg.get("batch_size"), resume=resume_mode(cfg.get("resume", True)),
                        verify_timeout_s=float(cfg.get("verify_timeout_s", 5.0)))


def round_benchmarks(cfg: Any) -> list[str]:
    """The benchmarks `sphere run` evaluates after every round: ``eval.benchmarks`` plus the model family's own
    ``model.extra_eval_benchmarks`` (the stand-ins add their mini test split to the paper's six)."""
    extra = cfg.model.get("extra_eval_benchmarks") or []
    return expand_benchmarks([*expand_benchmarks(cfg.eval.benchmarks), *extra])

