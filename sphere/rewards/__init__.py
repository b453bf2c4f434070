"""Step scorers (the PRM role) and reward shaping.

- ``StepScorer`` protocol, ``shape_rewards``, ``combine_outcome``: ``sphere.rewards.base``;
- ``SymbolicStepScorer`` (exact arithmetic checker, the mini world's default): ``sphere.rewards.symbolic``;
- ``MiniWorldStepScorer`` (the mini world's exact step verifier: sees copied operands; an oracle PRM):
  ``sphere.rewards.mini_world``;
- ``PRMScorer`` (process reward model): ``sphere.rewards.prm``; ``RolloutScorer`` (Monte-Carlo rollout
  values): ``sphere.rewards.rollout``.

``make_scorer(cfg, backend=None)`` builds the one named by ``cfg.name`` (conf/scorer/<name>.yaml); ``cfg``
may be the ``scorer`` node or the whole config.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from sphere.rewards.base import OUTCOME_MODES, SHAPE_MODES, StepScorer, combine_outcome, shape_rewards
from sphere.rewards.mini_world import MiniWorldStepScorer
from sphere.rewards.rollout import RolloutScorer
from sphere.rewards.symbolic import SymbolicStepScorer

SCORERS = ("symbolic", "prm", "rollout", "mini_world")

__all__ = [
    "StepScorer",
    "shape_rewards",
    "combine_outcome",
    "make_scorer",
    "SHAPE_MODES",
    "OUTCOME_MODES",
    "SCORERS",
]


def _full_config(cfg: Any) -> Any:
    """The whole config holding ``cfg`` as its ``scorer`` node (PRM / rollout scorers read ``cfg.scorer``
    and ``cfg.model``); a stand-alone scorer node is wrapped as ``{"scorer": node}``."""
    if cfg is None:
        return None
    if "name" not in cfg and "scorer" in cfg:
        return cfg  # already the whole config
    if isinstance(cfg, DictConfig):
        root = cfg._get_root()
        if root is not cfg and "scorer" in root:
            return root
        return OmegaConf.create({"scorer": OmegaConf.to_container(cfg, resolve=False)})
    return OmegaConf.create({"scorer": dict(cfg)})


def make_scorer(cfg: Any, backend: Any = None, **kw: Any) -> StepScorer:
    """The step scorer named by ``cfg.name`` (or ``cfg.scorer.name``): ``symbolic`` | ``mini_world`` | ``prm`` | ``rollout``.

    ``backend``: the policy backend, needed by ``rollout`` (it samples completions)."""
    node = cfg.get("scorer", cfg) if cfg is not None and "name" not in cfg else cfg
    name = str(node.get("name", "")) if node is not None else ""
    if name == "symbolic":
        return SymbolicStepScorer(node, **kw)
    if name == "mini_world":
        return MiniWorldStepScorer(node)
    if name == "prm":
        from sphere.rewards.prm import PRMScorer  # imports torch

        return PRMScorer(_full_config(cfg), **kw)
    if name == "rollout":
        return RolloutScorer(_full_config(cfg), backend=backend, **kw)
    raise ValueError(f"scorer.name={name!r} (conf/scorer/): allowed {', '.join(SCORERS)}")
