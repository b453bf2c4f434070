"""How a tree picks its next leaves, advances after an expansion, ends, and yields Sol_max / Sol_min.

The batched loop (``sphere.search.driver.SearchDriver``) is the same for both searches; the differences
live here, one class each, instead of ``mode == "paper"`` branches in the loop:

- ``PaperChains`` (arXiv 2503.04813, Sec. 3.1): two greedy chains per problem. Each expansion samples E
  candidates; the pruning policy (``minmax`` in the paper) keeps the best and the worst by reward; the max
  chain follows the best kept child, the min chain the worst. Nothing is backed up (the chains are chosen
  by reward, not by ``select``). Sol_max / Sol_min are the two chains.
- ``MCTS``: UCT/PUCT with virtual loss, ``k`` leaves per tree per round, a simulation budget and any
  pruning policy; values are backed up; Sol_max / Sol_min are the highest- and lowest-value terminal
  trajectories (ties broken by the step scorer's last score).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from sphere.search.types import SearchJob, Trajectory

if TYPE_CHECKING:  # pragma: no cover - annotation only: the driver imports this module and calls it
    from sphere.search.driver import SearchDriver


@dataclass
class TreeState:
    """One live tree. ``heads``: the paper chains' current nodes [max, min]; ``active``: which still grow."""

    job: SearchJob
    root: int
    sims: int = 0  # expansions of this tree's leaves so far (MCTS: the simulation count)
    expansions: int = 0
    nodes: int = 1
    heads: list[int] = field(default_factory=list)
    active: list[bool] = field(default_factory=lambda: [True, True])


def value_rank(t: Trajectory) -> tuple[float, float]:
    """MCTS extremes: by value, ties (outcome-replaced values are 1/0) broken by the last step score."""
    return (t.value, t.scores[-1] if t.scores else float("-inf"))


class SearchPolicy:
    """What differs between searches (see the module docstring). ``d`` is the driver that owns the forest."""

    backs_up = True  # whether expansions back values up through select()'s in-flight descents
    uses_priors = True  # whether the candidates' logprob priors steer anything (PUCT); else not requested

    def __init__(self, d: SearchDriver):
        self.d = d

    def select_all(self, live: dict[int, TreeState], roots: list[int], leaves: list[int]) -> int:
        raise NotImplementedError

    def select_new(self, st: TreeState, roots: list[int], leaves: list[int]) -> int:
        raise NotImplementedError

    def cap(self, roots: list[int], leaves: list[int]) -> None:
        """Trim a round's selection to the batch (only where leaves left out stay selectable)."""

    def advance(self, st: TreeState, leaf: int, ids: np.ndarray, keep: np.ndarray, rewards: np.ndarray,
                terms: np.ndarray) -> None:
        """After one of ``st``'s leaves was expanded into children ``ids`` (``keep``: not pruned)."""

    def done(self, st: TreeState) -> bool:
        raise NotImplementedError

    def extremes(self, st: TreeState, terminals: list[Trajectory]) -> tuple[Any, Any]:
        raise NotImplementedError


class PaperChains(SearchPolicy):
    backs_up = False
    uses_priors = False  # the chains follow rewards

    def select_all(self, live, roots, leaves):
        return sum(self.select_new(st, roots, leaves) for st in live.values())

    def select_new(self, st, roots, leaves):
        # the distinct heads in chain order (max first), never in node-id order: the calls (which prompts, in
        # which order, under which round's seed) must not depend on how nodes are numbered, or merging
        # duplicate candidates (fewer nodes) would change what a seeded backend samples
        heads = []
        for c in (0, 1):
            if st.active[c] and st.heads[c] not in heads:
                heads.append(st.heads[c])
        for node in heads:
            roots.append(st.root)
            leaves.append(node)
        return len(heads)

    def cap(self, roots, leaves):
        # chain heads not sent now stay heads: they are picked up next round (oldest trees first)
        del roots[self.d.batch:], leaves[self.d.batch:]

    def advance(self, st, leaf, ids, keep, rewards, terms):
        kid = np.nonzero(keep)[0]
        for c in (0, 1):
            if not st.active[c] or st.heads[c] != leaf:
                continue
            if len(kid) == 0:  # every candidate pruned: the chain stops here
                st.active[c] = False
                continue
            pick = kid[np.argmax(rewards[kid])] if c == 0 else kid[np.argmin(rewards[kid])]
            st.heads[c] = int(ids[pick])
            if terms[pick]:
                st.active[c] = False

    def done(self, st):
        return not any(st.active)

    def extremes(self, st, terminals):
        f = self.d.forest
        pmax = np.asarray(f.best_path(st.root, by="reward"), dtype=np.int32)
        pmin = np.asarray(f.worst_path(st.root), dtype=np.int32)
        return (self.d.trajectory(pmax) if len(pmax) > 1 else None,
                self.d.trajectory(pmin) if len(pmin) > 1 else None)


class MCTS(SearchPolicy):
    @property
    def uses_priors(self) -> bool:  # type: ignore[override]
        return str(self.d.cfg.engine.rule) == "puct"  # UCT ignores priors

    def _select(self, roots_arr: np.ndarray, kk: int, roots: list[int], leaves: list[int]) -> int:
        tree_idx, lv, coll = self.d.forest.select(roots_arr, kk)
        self.d.stats.collisions += int(np.asarray(coll).sum())
        for t, leaf in zip(tree_idx.tolist(), lv.tolist(), strict=True):
            roots.append(int(roots_arr[t]))
            leaves.append(int(leaf))
        return len(lv)

    def select_all(self, live, roots, leaves):
        # k leaves per tree, never past a tree's remaining simulation budget: one select() call per distinct
        # leaf count (at most k calls per round, each batched over its trees)
        budget = int(self.d.cfg.simulations)
        groups: dict[int, list[int]] = {}
        for r, st in live.items():
            kk = min(self.d.k, budget - st.sims)
            if kk > 0:
                groups.setdefault(kk, []).append(r)
        return sum(self._select(np.asarray(active, dtype=np.int32), kk, roots, leaves)
                   for kk, active in sorted(groups.items()))

    def select_new(self, st, roots, leaves):
        kk = min(self.d.k, int(self.d.cfg.simulations) - st.sims)
        return self._select(np.asarray([st.root], dtype=np.int32), kk, roots, leaves) if kk > 0 else 0

    def done(self, st):
        if st.sims >= int(self.d.cfg.simulations):
            return True
        budget = int(self.d.cfg.max_terminals)
        if budget > 0:
            off, _, _ = self.d.forest.terminals(np.asarray([st.root], dtype=np.int32))
            return int(off[-1]) >= budget
        return False

    def extremes(self, st, terminals):
        if not terminals:
            return None, None
        return max(terminals, key=value_rank), min(terminals, key=value_rank)


POLICIES = {"paper": PaperChains, "mcts": MCTS}
