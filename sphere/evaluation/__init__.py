"""`sphere eval`: the evaluation harness (greedy pass@1, sampled pass@k / maj@k, Wilson CIs).

Public API::

    run_eval(backend, benchmarks, out_dir, *, data_dir=None, limit=None, settings=EvalSettings(),
             family_cfg=None, model_name="", reference_path=None, progress=None) -> dict
    evaluate(cfg, out_dir, backend=None) -> dict      # from a composed conf/eval.yaml
    EvalSettings(n, temperature, top_p, max_tokens, seed, batch_size, resume, verify_timeout_s)
    wilson_ci, pass_at_k, majority_vote, summarize    # sphere.evaluation.metrics
"""

from __future__ import annotations

from sphere.evaluation.harness import evaluate, run_eval
from sphere.evaluation.metrics import majority_vote, pass_at_k, summarize, wilson_ci
from sphere.evaluation.settings import EvalSettings, expand_benchmarks

__all__ = ["EvalSettings", "evaluate", "expand_benchmarks", "run_eval", "majority_vote", "pass_at_k",
           "summarize", "wilson_ci"]
