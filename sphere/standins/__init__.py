"""Models built locally from nothing (no hub access, ever): what the tests, CI, the benchmarks and the paper
path at toy scale run on in place of the paper's checkpoints.

- ``tiny``: a tiny Llama policy and a tiny Qwen2.5-Math-PRM-shaped reward model, built in seconds and cached
  by recipe hash (``tiny_model_path()``, ``tiny_prm_path()``);
- ``qwen2_5``: the Qwen2.5-shaped stand-in family shipped in assets/standin/ (policy, small model, PRM), with
  ``recipe`` (its recipe and shared helpers), ``convert`` (tokenizers, exact Llama conversions),
  ``reward_model`` (the stand-in PRM), ``measure`` (held-out accuracy);
- ``families``: the phi-4 and DeepSeek-R1-distill stand-ins;
- ``build_prefix``: CI's reproducibility check of the shipped builds.
"""

from __future__ import annotations

from sphere.standins.tiny import tiny_model_path, tiny_prm_path

__all__ = ["tiny_model_path", "tiny_prm_path"]
