"""The tree engine: one arena ("forest") of many MCTS trees, batched over trees in every call.

Two engines, one API: `Forest` (C++ `sphere._core`) and `PyForest` (pure-Python reference,
`sphere.engine.reference`). Both build bit-identical trees for the same call sequence; the tests hold
the C++ engine to the reference. Layout, formulas and invariants: ``csrc/forest.hpp``.

A search round is a handful of calls, each over every tree at once::

    f = make_forest(EngineConfig(rule="puct", pruning="minmax"))
    roots = f.add_roots(np.arange(T))                      # int64[T] payloads -> int32[T] ids
    tree_idx, leaves, collisions = f.select(roots, k=4)    # int32[M], int32[M], int32[T]
    offsets, nodes = f.paths(leaves)                       # CSR: int64[M+1], int32[sum]; root first
    ...  # Python builds prompts from f.payload(nodes), asks the LLM, scores the steps
    ids = f.expand(leaves, counts, priors, payloads, rewards, values, terminal)
    f.backup(leaves, leaf_values)                          # or f.cancel(leaves) when a request failed
    offsets, scores = f.child_scores(roots)                # CSR: int64[T+1], f64[]: what select() compares

Node ids are int32 indices into the arena; payloads are int64 ids into a Python-side step store (text
never enters C++). Node states only move forward: unexpanded -> expanded, flags are never cleared.
"""

from __future__ import annotations

import numpy as np

from ._common import (
    EXHAUSTED,
    EXPANDED,
    FPUS,
    PATH_BY,
    PRUNED,
    PRUNED_EXPAND,
    PRUNED_SUBTREE,
    PRUNINGS,
    RULES,
    TERMINAL,
    EngineConfig,
    as_count,
    as_f32,
    as_flag,
    as_index,
    as_int,
    path_by,
)
from .reference import PyCore

__all__ = [
    "EngineConfig",
    "Forest",
    "PyForest",
    "make_forest",
    "core_available",
    "TERMINAL",
    "EXPANDED",
    "PRUNED_EXPAND",
    "PRUNED_SUBTREE",
    "EXHAUSTED",
]

try:  # the compiled engine; a missing build names the fix when Forest is used
    from sphere import _core
except ImportError as _e:  # pragma: no cover - depends on the build
    _core = None
    _CORE_ERROR = _e
else:
    _CORE_ERROR = None


def core_available() -> bool:
    """True when the C++ extension `sphere._core` is built and importable."""
    return _core is not None


def _core_args(cfg: EngineConfig) -> tuple:
    return (
        RULES[cfg.rule], float(cfg.c), float(cfg.virtual_loss), float(cfg.virtual_loss_value),
        FPUS[cfg.fpu_mode], cfg.fpu_const, float(cfg.fpu_reduction), bool(cfg.q_norm), int(cfg.max_depth),
        PRUNINGS[cfg.pruning], int(cfg.prune_k), float(cfg.prune_tau), bool(cfg.prune_relative),
    )


class _ForestAPI:
    """Argument conversion and the documented API; `self._f` is the C++ or the Python core."""

    backend = "?"

    def __init__(self, cfg: EngineConfig | None = None, capacity: int = 0, **overrides) -> None:
        if cfg is None:
            cfg = EngineConfig(**overrides)
        elif overrides:
            raise ValueError("pass either an EngineConfig or keyword overrides, not both")
        if not isinstance(cfg, EngineConfig):
            raise ValueError(f"cfg must be an EngineConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self._f = self._new_core(_core_args(cfg))
        if capacity:
            self._f.reserve(as_count(capacity, "capacity"))

    def _new_core(self, args: tuple):  # pragma: no cover - overridden
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(nodes={self.num_nodes}, trees={self.num_trees}, cfg={self.cfg})"

    @property
    def num_nodes(self) -> int:
        """Nodes in the forest (all trees)."""
        return int(self._f.num_nodes)

    @property
    def num_trees(self) -> int:
        return int(self._f.num_trees)

    def reset(self) -> None:
        """Empty the forest (ids restart at 0)."""
        self._f.reset()

    def add_roots(self, payloads) -> np.ndarray:
        """payloads: int64[T] -> root ids int32[T] (one new tree each)."""
        return self._f.add_roots(as_int(payloads, "payloads", np.int64))

    def select(self, roots, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """k descents per tree with virtual loss. roots: int32[T] root ids, k >= 0.

        Returns (tree_idx int32[M] index into `roots`, leaves int32[M], collisions int32[T]). A descent that
        ends on a leaf already in flight is a collision: counted, its virtual loss removed, not returned.
        Exhausted trees yield nothing."""
        return self._f.select(as_int(roots, "roots", np.int32), as_count(k, "k"))

    def paths(self, leaves) -> tuple[np.ndarray, np.ndarray]:
        """Root->node ids for every node: (offsets int64[M+1], nodes int32[offsets[-1]]), root first."""
        return self._f.paths(as_int(leaves, "leaves", np.int32))

    def expand(self, leaves, counts, priors, payloads, rewards, values, terminal) -> np.ndarray:
        """Add counts[i] children to leaves[i]. leaves int32[M] (distinct, unexpanded, not terminal),
        counts int32[M] >= 0; per child (C = counts.sum(), leaf order): priors f32[C], payloads int64[C],
        rewards f32[C], values f32[C] (initial value, NaN = none), terminal uint8/bool[C].
        Returns child ids int32[C]. Pruning at expansion flags children pruned (they still exist)."""
        return self._f.expand(
            as_int(leaves, "leaves", np.int32), as_int(counts, "counts", np.int32), as_f32(priors, "priors"),
            as_int(payloads, "payloads", np.int64), as_f32(rewards, "rewards"), as_f32(values, "values"),
            as_flag(terminal, "terminal"),
        )

    def backup(self, leaves, values) -> None:
        """leaves int32[M] from select(), values f32[M] (finite): on each path visits += 1,
        value_sum += value, in-flight -= 1. Raises (changing nothing) if a leaf has no select in flight."""
        self._f.backup(as_int(leaves, "leaves", np.int32), as_f32(values, "values"))

    def cancel(self, leaves) -> None:
        """Remove the virtual loss of leaves int32[M] (a failed LLM request); nothing else changes."""
        self._f.cancel(as_int(leaves, "leaves", np.int32))

    def prune_subtrees(self, roots, tau: float, min_visits: int = 1) -> int:
        """Flag pruned every non-root node (not under a pruned node) with visits >= max(min_visits, 1) and
        mean value < tau; returns how many were newly pruned. roots: int32[T]."""
        return int(self._f.prune_subtrees(as_int(roots, "roots", np.int32), float(tau),
                                          as_count(min_visits, "min_visits")))

    def child_scores(self, nodes) -> tuple[np.ndarray, np.ndarray]:
        """Selection scores of the children of each node, read-only: nodes int32[M], each expanded ->
        (offsets int64[M+1], scores float64[offsets[-1]]), CSR: node i's children (child order, ids
        first_child..first_child+count-1) score scores[offsets[i]:offsets[i+1]].

        Each score is exactly what the next select() descent reaching the node would compute now (both
        engines use the very routine select() uses): virtual loss of in-flight descents on the children,
        the node's P_eff counting its in-flight descents plus the one that descent adds, FPU for unvisited
        children, q_norm, PUCT/UCT as in csrc/forest.hpp. Exhausted children (never selected) are -inf.
        The first child with the highest score is the one select() takes. Raises ValueError for a node
        that is not expanded and IndexError for an id out of range, naming nodes[i]."""
        return self._f.child_scores(as_int(nodes, "nodes", np.int32))

    def best_path(self, root: int, by: str = "visits") -> np.ndarray:
        """Greedy descent over non-pruned children by "visits" | "value" | "reward" (ties: lowest id).
        Returns int32[L], `root` first."""
        return self._f.best_path(as_index(root, "root"), PATH_BY[path_by(by)])

    def worst_path(self, root: int) -> np.ndarray:
        """Greedy descent by the lowest reward over non-pruned children, preferring children that lead to a
        terminal (the paper's Sol_min). Returns int32[L], `root` first."""
        return self._f.worst_path(as_index(root, "root"))

    def terminals(self, roots) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Terminal nodes of each tree not pruned nor under a pruned ancestor, ascending ids:
        (offsets int64[T+1], nodes int32[], values f32[]); value = mean backed-up value if visited, else the
        initial value, else the reward."""
        return self._f.terminals(as_int(roots, "roots", np.int32))

    def tree_nodes(self, root: int) -> np.ndarray:
        """All node ids of one tree, ascending (parents before children). int32[]"""
        return self._f.tree_nodes(as_index(root, "root"))

    # per-node getters: nodes int32[M] -> [M]
    def payload(self, nodes) -> np.ndarray:
        return self._f.get_payload(as_int(nodes, "nodes", np.int32))

    def reward(self, nodes) -> np.ndarray:
        return self._f.get_reward(as_int(nodes, "nodes", np.int32))

    def prior(self, nodes) -> np.ndarray:
        return self._f.get_prior(as_int(nodes, "nodes", np.int32))

    def visits(self, nodes) -> np.ndarray:
        return self._f.get_visits(as_int(nodes, "nodes", np.int32))

    def inflight(self, nodes) -> np.ndarray:
        return self._f.get_inflight(as_int(nodes, "nodes", np.int32))

    def value(self, nodes) -> np.ndarray:
        """Mean backed-up value (else initial value, else reward), f32[M]."""
        return self._f.get_value(as_int(nodes, "nodes", np.int32))

    def depth(self, nodes) -> np.ndarray:
        return self._f.get_depth(as_int(nodes, "nodes", np.int32))

    def parent(self, nodes) -> np.ndarray:
        return self._f.get_parent(as_int(nodes, "nodes", np.int32))

    def flags(self, nodes) -> np.ndarray:
        return self._f.get_flags(as_int(nodes, "nodes", np.int32))

    def is_terminal(self, nodes) -> np.ndarray:
        return (self.flags(nodes) & TERMINAL) != 0

    def is_pruned(self, nodes) -> np.ndarray:
        """True for nodes flagged pruned themselves (at expansion or as a subtree root)."""
        return (self.flags(nodes) & PRUNED) != 0

    def is_expanded(self, nodes) -> np.ndarray:
        return (self.flags(nodes) & EXPANDED) != 0

    def is_exhausted(self, nodes) -> np.ndarray:
        """Terminal, pruned, or expanded with every child exhausted: select() never enters it."""
        return (self.flags(nodes) & EXHAUSTED) != 0

    def stats(self) -> dict:
        """nodes, trees, expanded, terminal, pruned_at_expansion, pruned_subtrees, collisions (total),
        exhausted_roots, inflight_roots, depth_histogram (list, index = depth), bytes_per_node."""
        return dict(self._f.stats())

    def snapshot(self) -> dict[str, np.ndarray]:
        """The arena's arrays by field name (see csrc/forest.hpp). C++: zero-copy read-only views, valid
        only until the next call that adds nodes or resets (copy them to keep). Python: copies."""
        return dict(self._f.snapshot())

    def tree_snapshot(self, root: int) -> dict[str, np.ndarray]:
        """A compact copy of one tree with ids remapped to 0..n-1 (root = 0, parents before children), for
        saving and the HTML viewer: node_id (original) int32, parent int32 (-1 root), depth int32,
        payload int64, prior/reward/init_value/value f32, visits int32, flags uint8."""
        ids = self.tree_nodes(root)
        remap = {int(n): i for i, n in enumerate(ids.tolist())}
        parent = self.parent(ids)
        return {
            "node_id": ids,
            "parent": np.array([remap.get(int(p), -1) for p in parent.tolist()], np.int32),
            "depth": self.depth(ids),
            "payload": self.payload(ids),
            "prior": self.prior(ids),
            "reward": self.reward(ids),
            "init_value": self.snapshot_field("init_value", ids),
            "value": self.value(ids),
            "visits": self.visits(ids),
            "flags": self.flags(ids),
        }

    def snapshot_field(self, name: str, nodes) -> np.ndarray:
        """One snapshot field gathered at `nodes` (a copy)."""
        snap = self.snapshot()
        if name not in snap:
            raise ValueError(f"name={name!r}: allowed {sorted(snap)}")
        return np.array(snap[name][as_int(nodes, "nodes", np.int32)])

    def validate(self) -> None:
        """Check every invariant (csrc/forest.hpp); raises RuntimeError naming the first broken one."""
        msg = self._f.validate()
        if msg:
            raise RuntimeError(f"{type(self).__name__} invariant broken: {msg}")


class Forest(_ForestAPI):
    """The C++ engine (`sphere._core.Forest`); long calls release the GIL."""

    backend = "cpp"

    def _new_core(self, args: tuple):
        if _core is None:
            raise ImportError(
                "sphere._core (the C++ engine) is not built: run `pip install --no-build-isolation -e .` "
                f"from the repository root, or use PyForest / make_forest(backend='py') ({_CORE_ERROR})"
            )
        return _core.Forest(*args)


class PyForest(_ForestAPI):
    """The pure-Python reference engine (same API, same trees, ~100x slower)."""

    backend = "py"

    def _new_core(self, args: tuple):
        return PyCore(*args)


def make_forest(cfg: EngineConfig | None = None, backend: str = "cpp", capacity: int = 0) -> _ForestAPI:
    """A forest on `backend` "cpp" (C++, default) or "py" (reference)."""
    if backend == "cpp":
        return Forest(cfg, capacity=capacity)
    if backend == "py":
        return PyForest(cfg, capacity=capacity)
    raise ValueError(f"backend={backend!r}: allowed 'cpp', 'py'")
