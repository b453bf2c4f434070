"""Which sources ``data.problems`` names (``sources``) and where the shipped train splits live (``NAMED``).
The bottom of sphere.data's problem loading: ``sphere.data.problems`` (the loaders) and
``sphere.data.training.sources`` (the pools' config glue) both read it, so neither imports the other back."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf


def sources(dcfg: Any) -> list[str]:
    src = dcfg.problems
    if OmegaConf.is_config(src) or isinstance(src, (list, tuple)):
        return [str(s) for s in src]
    return [str(src)]


NAMED = {"math_train": "math/train.jsonl", "gsm8k_train": "gsm8k/train.jsonl"}
