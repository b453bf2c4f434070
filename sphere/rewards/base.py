"""The step-scorer protocol (the PRM role) and reward shaping for the search.

``StepScorer.score(items)``: for a batch of ``(problem, steps)`` one score in [0, 1] per step, where the
score of step t judges the prefix ``steps[:t+1]`` (a PRM reads the whole prefix; the symbolic checker
looks at step t alone; a rollout scorer samples completions from the prefix).

``shape_rewards(scores, mode)`` turns the per-step scores of one path into per-step rewards:
- ``"raw"``: the score itself, r_t = PRM(s<=t);
- ``"advantage"`` (the SPHERE paper, Sec. 3.1): r_0 = PRM(s0), r_t = PRM(s<=t) - PRM(s<=t-1), so a step is
  credited with the change it makes, and the rewards of a path sum to the last score;
- ``"min"``: the minimum score so far, r_t = min_{k<=t} PRM(s<=k) (one bad step caps the rest; the
  "min" aggregation of PRM-guided search, e.g. Lightman et al. 2023 / Wang et al. 2024).

``combine_outcome(step_reward, correct, mode, weight)`` folds the terminal answer check
(``sphere.verify.check_answer``) into the reward of a final step:
- ``"none"``: ignore the outcome, keep ``step_reward``;
- ``"replace"``: 1.0 if correct else 0.0 (the outcome is the only signal at the leaf);
- ``"mix"``: ``(1 - weight) * step_reward + weight * (1.0 if correct else 0.0)``, stays in [0, 1];
- ``"add"``: ``step_reward + weight * (+1 if correct else -1)`` (a bonus / penalty on top; unbounded).
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

SHAPE_MODES = ("raw", "advantage", "min")
OUTCOME_MODES = ("none", "replace", "mix", "add")


@runtime_checkable
class StepScorer(Protocol):
    """Scores steps of partial solutions. Implementations: ``sphere.rewards.symbolic.SymbolicStepScorer``,
    ``sphere.rewards.mini_world.MiniWorldStepScorer``, ``sphere.rewards.prm.PRMScorer``,
    ``sphere.rewards.rollout.RolloutScorer``."""

    def score(self, items: list[tuple[str, list[str]]]) -> list[list[float]]:
        """items: ``(problem, steps)``; returns, per item, one score in [0, 1] per step (same length)."""
        ...


# A scorer with a window (a PRM: ``max_position_embeddings``, or ``scorer.max_length``) may also have
# ``fits(items) -> list[bool]``: whether each ``(problem, steps)`` item fits it. The search asks before scoring;
# a candidate step whose item does not fit ends its chain there (finish "window", graded wrong, counted in
# generate_stats like a policy context overflow), instead of one long chain aborting the whole generation.
def scorer_fits(scorer: object, items: list[tuple[str, list[str]]]) -> list[bool]:
    """``scorer.fits(items)`` when the scorer has a window, else every item fits."""
    fits = getattr(scorer, "fits", None)
    return [True] * len(items) if fits is None else [bool(x) for x in fits(items)]


def shape_rewards(scores: list[float], mode: str = "advantage") -> list[float]:
    """Per-step rewards of one path from its per-step scores (see the module docstring for the modes)."""
    if mode not in SHAPE_MODES:
        raise ValueError(
            f"reward shaping mode {mode!r} (config search.reward): allowed {', '.join(SHAPE_MODES)}"
        )
    s = [float(x) for x in scores]
    for i, x in enumerate(s):
        if not math.isfinite(x):
            raise ValueError(f"shape_rewards: scores[{i}] = {x} is not finite")
    if mode == "raw":
        return s
    if mode == "advantage":
        return [s[0]] + [s[t] - s[t - 1] for t in range(1, len(s))] if s else []
    out, lo = [], math.inf
    for x in s:
        lo = min(lo, x)
        out.append(lo)
    return out


def combine_outcome(step_reward: float, correct: bool, mode: str = "replace", weight: float = 1.0) -> float:
    """Reward of a terminal step given the answer check (see the module docstring for the modes)."""
    if mode not in OUTCOME_MODES:
        raise ValueError(f"outcome mode {mode!r} (config search.outcome): allowed {', '.join(OUTCOME_MODES)}")
    o = 1.0 if correct else 0.0
    if mode == "none":
        return float(step_reward)
    if mode == "replace":
        return o
    if mode == "mix":
        if not 0.0 <= weight <= 1.0:
            raise ValueError(
                f"outcome weight {weight} (config search.outcome_weight): 'mix' needs 0 <= w <= 1"
            )
        return (1.0 - weight) * float(step_reward) + weight * o
    return float(step_reward) + float(weight) * (1.0 if correct else -1.0)
