"""The typed evaluation settings (sphere.schema): `sphere eval`'s ``sampling`` node, the ``eval`` node of
`sphere eval` and of `sphere run`'s rounds, and `sphere eval`'s top-level keys; each field's type, default,
range and doc."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from sphere.schema_fields import _f
from sphere.schema_groups import SamplingSettings


# =========================================================================================== sampling
@dataclass
class EvalSamplingSettings(SamplingSettings):
    """`sphere eval`'s ``sampling`` node: the shared settings and the samples per problem."""

    n: int = _f(1, "samples per problem: 1 = greedy pass@1; K > 1 adds pass@k (unbiased) and maj@K "
                "(conf/eval.yaml: ${eval.n})", ge=1)


# =============================================================================================== eval
@dataclass
class EvalSettings:
    """The evaluation: `sphere run`'s per-round ``eval`` node and `sphere eval`'s (whose top-level keys read
    it, conf/eval.yaml). The defaults are `sphere eval`'s; conf/run.yaml sets the per-round deltas."""

    benchmarks: Any = _f(["mini"], "math500 | gsm8k (test) | aime24 | aime25 | amc23 | olympiadbench | mini "
                         "| gsm8k_train | math_train | all (the six paper benchmarks) | a local .jsonl (id, "
                         "problem, answer); files are read from paths.data_dir")
    limit: Optional[int] = _f(None, "problems per benchmark, the first N in file order (null = all)",
                              ge=1, word="a positive integer or null (all problems)")
    n: int = _f(1, "samples per problem: 1 = greedy pass@1; K > 1 adds pass@k / maj@K (sampled)", ge=1)
    batch_size: Optional[int] = _f(None, "problems per backend call (null = a whole benchmark in one call, "
                                   "the fastest with vLLM); finished problems are saved after each call",
                                   ge=1, word="a positive integer or null (one call per benchmark)")
    temperature: Optional[float] = _f(None, "null = greedy (0) for n == 1, sampling.temperature for n > 1; a "
                                      "number forces it", ge=0)
    max_tokens: Optional[int] = _f(None, "token budget per solution (null = sampling.max_solution_tokens)",
                                   ge=1)
    verify_timeout_s: float = _f(5.0, "seconds the checker may spend on one answer before it counts as wrong",
                                 gt=0)
    progress: Any = _f(None, "progress bar: null = only when stderr is a terminal; true / false force it")


@dataclass
class RunEvalSettings(EvalSettings):
    """`sphere run`'s per-round ``eval`` node: the evaluation settings and whether an interrupted round's
    finished problems are reused."""

    resume: bool = _f(True, "reuse finished problems of an interrupted run")


@dataclass
class EvalCommandSettings:
    """`sphere eval`'s top-level settings (conf/eval.yaml: they read ``eval.*``)."""

    limit: Optional[int] = _f(None, "see eval.limit", ge=1, word="a positive integer or null (all problems)")
    batch_size: Optional[int] = _f(None, "see eval.batch_size",
                                   ge=1, word="a positive integer or null (one call per benchmark)")
    temperature: Optional[float] = _f(None, "see eval.temperature", ge=0)
    max_tokens: Optional[int] = _f(None, "see eval.max_tokens", ge=1)
    verify_timeout_s: float = _f(5.0, "see eval.verify_timeout_s", gt=0)
