"""Pure-Python reference engine: the same forest as the C++ `sphere._core.Forest`, written plainly.

`PyCore` mirrors the C++ class method by method (csrc/forest.cpp), with the same order of floating-point
operations (Python floats are IEEE doubles; storage is rounded to float32 where C++ stores float32), so the
two engines build bit-identical trees for the same operation sequence. The tests hold the C++ engine to
this file. It is slow on purpose of being obvious; use it for tests and small experiments.
"""

from __future__ import annotations

import math

import numpy as np

from ._common import (
    EXHAUSTED,
    EXPANDED,
    PRUNED,
    PRUNED_EXPAND,
    PRUNED_SUBTREE,
    TERMINAL,
)

_INF = math.inf
_I32_MAX = 2**31 - 1
BYTES_PER_NODE = 54  # the C++ layout (csrc/forest.hpp); the Python lists use far more
HOT_BYTES_PER_NODE = 32


def _f32(x: float) -> float:
    """Round a Python float to float32 and back (what storing into a float32 array does)."""
    return float(np.float32(x))


class PyCore:
    """Same constructor arguments and methods as the C++ binding `sphere._core.Forest`."""

    def __init__(self, rule, c, virtual_loss, virtual_loss_value, fpu, fpu_value, fpu_reduction, q_norm,
                 max_depth, pruning, prune_k, prune_tau, prune_relative):
        if rule not in (0, 1):
            raise ValueError("rule must be 0 (uct) or 1 (puct)")
        if fpu not in (0, 1, 2, 3):
            raise ValueError("fpu must be 0 (parent), 1 (value), 2 (inf) or 3 (const)")
        if pruning not in (0, 1, 2, 3):
            raise ValueError("pruning must be 0 (none), 1 (minmax), 2 (topk) or 3 (threshold)")
        if not 1 <= max_depth <= 32767:
            raise ValueError(f"max_depth must be in [1, 32767], got {max_depth}")
        if prune_k < 1:
            raise ValueError(f"prune_k must be >= 1, got {prune_k}")
        if not (math.isfinite(virtual_loss) and virtual_loss >= 0):
            raise ValueError("virtual_loss must be a finite number >= 0")
        if not (math.isfinite(c) and c >= 0):
            raise ValueError("c must be a finite number >= 0")
        self.rule, self.c, self.vl, self.vl_value = rule, float(c), float(virtual_loss), float(virtual_loss_value)
        self.fpu, self.fpu_value, self.fpu_reduction = fpu, float(fpu_value), float(fpu_reduction)
        self.q_norm, self.max_depth = bool(q_norm), int(max_depth)
        self.pruning, self.prune_k, self.prune_tau = pruning, int(prune_k), float(prune_tau)
        self.prune_relative = bool(prune_relative)
        self.reset()

    # ------------------------------------------------------------------ storage
    def reset(self) -> None:
        self.value_sum: list[float] = []
        self.parent: list[int] = []
        self.first_child: list[int] = []
        self.num_children: list[int] = []
        self.visits: list[int] = []
        self.inflight: list[int] = []
        self.prior: list[float] = []
        self.init_value: list[float] = []
        self.flags: list[int] = []
        self.payload: list[int] = []
        self.tree: list[int] = []
        self.reward: list[float] = []
        self.depth: list[int] = []
        self.roots: list[int] = []
        self.qmin: list[float] = []
        self.qmax: list[float] = []
        self.tree_collisions: list[int] = []
        self.pruned_subtrees_total = 0

    def reserve(self, nodes: int) -> None:
        if not 0 <= nodes <= _I32_MAX:
            raise ValueError(f"capacity must be in [0, 2^31-1], got {nodes}")

    @property
    def num_nodes(self) -> int:
        return len(self.parent)

    @property
    def num_trees(self) -> int:
        return len(self.roots)

    def _check_node(self, n: int, arg: str, i: int) -> None:
        if n < 0 or n >= len(self.parent):
            raise IndexError(f"{arg}[{i}]={n} is not a node id (forest has {len(self.parent)} nodes)")

    def _check_root(self, n: int, arg: str, i: int) -> None:
        self._check_node(n, arg, i)
        if self.parent[n] != -1:
            raise ValueError(f"{arg}[{i}]={n} is not a root (its parent is {self.parent[n]})")

    def _new_node(self, parent, payload, prior, reward, value, tree, depth) -> int:
        nid = len(self.parent)
        self.value_sum.append(0.0)
        self.parent.append(parent)
        self.first_child.append(-1)
        self.num_children.append(0)
        self.visits.append(0)
        self.inflight.append(0)
        self.prior.append(prior)
        self.init_value.append(value)
        self.flags.append(0)
        self.payload.append(payload)
        self.tree.append(tree)
        self.reward.append(reward)
        self.depth.append(depth)
        return nid

    # ------------------------------------------------------------------ operations
    def add_roots(self, payloads: np.ndarray) -> np.ndarray:
        if len(self.parent) + len(payloads) > _I32_MAX:
            raise ValueError("payloads: the forest would exceed 2^31-1 nodes")
        out = np.empty(len(payloads), np.int32)
        for i, p in enumerate(payloads.tolist()):
            t = len(self.roots)
            nid = self._new_node(-1, p, 1.0, 0.0, math.nan, t, 0)
            self.roots.append(nid)
            self.qmin.append(_INF)
            self.qmax.append(-_INF)
            self.tree_collisions.append(0)
            out[i] = nid
        return out

    def _mark_exhausted(self, n: int) -> None:
        flags, parent = self.flags, self.parent
        flags[n] |= EXHAUSTED
        p = parent[n]
        while p >= 0 and not flags[p] & EXHAUSTED:
            first = self.first_child[p]
            for ch in range(first, first + self.num_children[p]):
                if not flags[ch] & EXHAUSTED:
                    return
            flags[p] |= EXHAUSTED
            p = parent[p]

    def _mean_or_init(self, n: int) -> float:
        if self.visits[n] > 0:
            return self.value_sum[n] / self.visits[n]
        v = self.init_value[n]
        return 0.0 if math.isnan(v) else v

    def _node_value(self, n: int) -> float:
        if self.visits[n] > 0:
            return self.value_sum[n] / self.visits[n]
        if not math.isnan(self.init_value[n]):
            return self.init_value[n]
        return self.reward[n]

    def _pick_child(self, n: int, inflight: int, scores: list[float] | None = None) -> int:
        """The child a descent through n takes, n's in-flight count (that descent included) being `inflight`:
        the first child with the highest score (a score is taken when > the best so far, from -inf, like the
        C++ argmax; if none is, the first non-exhausted child). With a list `scores`, every child's score is
        also appended to it, in child order, -inf for an exhausted child: child_scores() reports through
        this very loop what select() compares. Returns -1 only when every child is exhausted."""
        vl, c, lv = self.vl, self.c, self.vl_value
        p_eff = float(self.visits[n]) + vl * float(inflight)
        puct = self.rule == 1
        sq = math.sqrt(p_eff) if puct else 0.0
        lg = 0.0 if puct else math.log(max(p_eff, 1.0))
        norm, lo, span = False, 0.0, 1.0
        if self.q_norm:
            t = self.tree[n]
            lo, hi = self.qmin[t], self.qmax[t]
            norm, span = hi > lo, hi - lo
        # Q of an unvisited child (FPU); fpu "value" (1) takes the child's init_value instead when not NaN.
        fpu = self.fpu
        if fpu == 0 or fpu == 1:
            fpu_q = self._mean_or_init(n) - self.fpu_reduction
        elif fpu == 2:
            fpu_q = _INF
        else:
            fpu_q = self.fpu_value
        by_value = fpu == 1
        flags, inflight_, visits, value_sum = self.flags, self.inflight, self.visits, self.value_sum
        prior, init_value = self.prior, self.init_value
        first = self.first_child[n]
        best, best_score = -1, -_INF
        for ch in range(first, first + self.num_children[n]):
            if flags[ch] & EXHAUSTED:
                if scores is not None:
                    scores.append(-_INF)
                continue
            nvl = vl * float(inflight_[ch])
            neff = float(visits[ch]) + nvl
            visited = neff > 0.0
            if visited:
                q = (value_sum[ch] + nvl * lv) / neff
            elif by_value:
                iv = init_value[ch]
                q = fpu_q if math.isnan(iv) else iv
            else:
                q = fpu_q
            if norm and math.isfinite(q):
                q = (q - lo) / span
            if puct:
                s = q + c * prior[ch] * sq / (1.0 + neff)
            else:
                s = q + c * math.sqrt(lg / neff) if visited else q
            if s > best_score:
                best, best_score = ch, s
            if scores is not None:
                scores.append(s)
        if best < 0:  # no score above -inf (only NaN or -inf ones, e.g. from overflow): the C++ fallback
            for ch in range(first, first + self.num_children[n]):
                if not flags[ch] & EXHAUSTED:
                    return ch
        return best

    def child_scores(self, nodes: np.ndarray):
        nl = nodes.tolist()
        for i, n in enumerate(nl):
            self._check_node(n, "nodes", i)
            if not self.flags[n] & EXPANDED:
                raise ValueError(f"nodes[{i}]={n} is not expanded (it has no children to score)")
        offsets = np.zeros(len(nl) + 1, np.int64)
        out: list[float] = []
        for i, n in enumerate(nl):
            # what a select() descent reaching n would compute now: it increments n's in-flight count first
            self._pick_child(n, self.inflight[n] + 1, out)
            offsets[i + 1] = len(out)
        return offsets, np.array(out, np.float64)

    def _descend(self, root: int) -> int:
        """One descent; returns the leaf, or -1 on a collision (in-flight counts restored)."""
        n = root
        flags, inflight, pick = self.flags, self.inflight, self._pick_child
        while flags[n] & EXPANDED:
            inflight[n] += 1
            n = pick(n, inflight[n])
        if inflight[n] > 0:
            p = self.parent[n]
            while p >= 0:
                self.inflight[p] -= 1
                p = self.parent[p]
            return -1
        self.inflight[n] += 1
        return n

    def select(self, roots: np.ndarray, k: int):
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        rl = roots.tolist()
        for i, r in enumerate(rl):
            self._check_root(r, "roots", i)
        seen = set()
        for i, r in enumerate(rl):
            if r in seen:
                raise ValueError(f"roots[{i}]={r} appears more than once")
            seen.add(r)
        tree_idx: list[int] = []
        leaves: list[int] = []
        coll = np.zeros(len(rl), np.int32)
        for i, root in enumerate(rl):
            for _ in range(k):  # the plain loop: every descent is walked, collisions included
                if self.flags[root] & EXHAUSTED:
                    break
                leaf = self._descend(root)
                if leaf >= 0:
                    tree_idx.append(i)
                    leaves.append(leaf)
                else:
                    coll[i] += 1
                    self.tree_collisions[self.tree[root]] += 1
        return np.array(tree_idx, np.int32), np.array(leaves, np.int32), coll

    def paths(self, nodes: np.ndarray):
        nl = nodes.tolist()
        for i, n in enumerate(nl):
            self._check_node(n, "leaves", i)
        offsets = np.zeros(len(nl) + 1, np.int64)
        out: list[int] = []
        for i, n in enumerate(nl):
            path = []
            while n >= 0:
                path.append(n)
                n = self.parent[n]
            out.extend(reversed(path))
            offsets[i + 1] = len(out)
        return offsets, np.array(out, np.int32)

    def _apply_pruning(self, first: int, count: int) -> None:
        r = self.reward[first:first + count]

        def prune(j: int) -> None:
            self.flags[first + j] |= PRUNED_EXPAND | EXHAUSTED

        if self.pruning == 0:
            return
        if self.pruning == 1:  # minmax: best (lowest index on ties) and the worst of the others
            if count <= 2:
                return
            best = 0
            for j in range(1, count):
                if r[j] > r[best]:
                    best = j
            worst = -1
            for j in range(count):
                if j != best and (worst < 0 or r[j] < r[worst]):
                    worst = j
            for j in range(count):
                if j not in (best, worst):
                    prune(j)
        elif self.pruning == 2:  # topk, stable
            if count <= self.prune_k:
                return
            order = sorted(range(count), key=lambda j: -r[j])
            for j in order[self.prune_k:]:
                prune(j)
        else:  # threshold
            cut = self.prune_tau
            if self.prune_relative:
                if count == 0:
                    return
                cut = max(r) - self.prune_tau
            for j in range(count):
                if r[j] < cut:
                    prune(j)

    def expand(self, leaves, counts, priors, payloads, rewards, values, terminal) -> np.ndarray:
        m, c = len(leaves), len(priors)
        if len(counts) != m:
            raise ValueError(f"counts must have one entry per leaf ({m}), got {len(counts)}")
        for name, a in (("payloads", payloads), ("rewards", rewards), ("values", values), ("terminal", terminal)):
            if len(a) != c:
                raise ValueError(f"{name} must have one entry per child like priors ({c}), got {len(a)}")
        ll, cl = leaves.tolist(), counts.tolist()
        total = 0
        for i, n in enumerate(ll):
            self._check_node(n, "leaves", i)
            if self.flags[n] & EXPANDED:
                raise ValueError(f"leaves[{i}]={n} is already expanded")
            if self.flags[n] & TERMINAL:
                raise ValueError(f"leaves[{i}]={n} is terminal; it cannot be expanded")
            if not 0 <= cl[i] <= 65535:
                raise ValueError(f"counts[{i}]={cl[i]} must be in [0, 65535]")
            total += cl[i]
        if total != c:
            raise ValueError(f"counts sum to {total} but the per-child arrays (priors, payloads, rewards, values, "
                             f"terminal) have {c} entries")
        if len(self.parent) + c > _I32_MAX:
            raise ValueError("expand: the forest would exceed 2^31-1 nodes")
        pl, yl, rl, vl, tl = priors.tolist(), payloads.tolist(), rewards.tolist(), values.tolist(), terminal.tolist()
        for j in range(c):
            if not math.isfinite(pl[j]):
                raise ValueError(f"priors[{j}] must be finite")
            if not math.isfinite(rl[j]):
                raise ValueError(f"rewards[{j}] must be finite")
            if math.isinf(vl[j]):
                raise ValueError(f"values[{j}] must be finite or NaN (none)")
        if len(set(ll)) != m:
            seen = set()
            for n in sorted(ll):
                if n in seen:
                    raise ValueError(f"leaves: node {n} appears more than once")
                seen.add(n)
        out = np.empty(c, np.int32)
        off = 0
        for i, leaf in enumerate(ll):
            cnt = cl[i]
            d = self.depth[leaf] + 1
            first = len(self.parent)
            for _ in range(cnt):
                nid = self._new_node(leaf, yl[off], pl[off], rl[off], vl[off], self.tree[leaf], d)
                if tl[off] or d >= self.max_depth:
                    self.flags[nid] |= TERMINAL | EXHAUSTED
                out[off] = nid
                off += 1
            self.first_child[leaf] = first if cnt > 0 else -1
            self.num_children[leaf] = cnt
            self.flags[leaf] |= EXPANDED
            self._apply_pruning(first, cnt)
            if all(self.flags[ch] & EXHAUSTED for ch in range(first, first + cnt)) and not self.flags[leaf] & EXHAUSTED:
                self._mark_exhausted(leaf)
        return out

    def _release(self, leaves: list[int], arg: str) -> None:
        for i, n in enumerate(leaves):
            self._check_node(n, arg, i)
        for i, leaf in enumerate(leaves):
            n = leaf
            while n >= 0:
                if self.inflight[n] <= 0:
                    u = leaf
                    while u != n:
                        self.inflight[u] += 1
                        u = self.parent[u]
                    for leaf2 in leaves[:i]:
                        u = leaf2
                        while u >= 0:
                            self.inflight[u] += 1
                            u = self.parent[u]
                    raise ValueError(f"{arg}[{i}]={leaf} has no select() in flight (node {n} would have a "
                                     f"negative in-flight count)")
                self.inflight[n] -= 1
                n = self.parent[n]

    def backup(self, leaves: np.ndarray, values: np.ndarray) -> None:
        if len(values) != len(leaves):
            raise ValueError(f"values must have one entry per leaf ({len(leaves)}), got {len(values)}")
        vl = values.tolist()
        for i, v in enumerate(vl):
            if not math.isfinite(v):
                raise ValueError(f"values[{i}] must be finite")
        ll = leaves.tolist()
        self._release(ll, "leaves")
        for leaf, v in zip(ll, vl):
            n = leaf
            while n >= 0:
                self.visits[n] += 1
                self.value_sum[n] += v
                if self.q_norm:
                    q = self.value_sum[n] / self.visits[n]
                    t = self.tree[n]
                    if q < self.qmin[t]:
                        self.qmin[t] = q
                    if q > self.qmax[t]:
                        self.qmax[t] = q
                n = self.parent[n]

    def cancel(self, leaves: np.ndarray) -> None:
        self._release(leaves.tolist(), "leaves")

    def prune_subtrees(self, roots: np.ndarray, tau: float, min_visits: int) -> int:
        if math.isnan(tau):
            raise ValueError("tau must not be NaN")
        if min_visits < 0:
            raise ValueError(f"min_visits must be >= 0, got {min_visits}")
        rl = roots.tolist()
        for i, r in enumerate(rl):
            self._check_root(r, "roots", i)
        need = max(min_visits, 1)
        count = 0
        for root in rl:
            stack = [root]
            while stack:
                n = stack.pop()
                if self.flags[n] & PRUNED:
                    continue
                if self.parent[n] >= 0 and self.visits[n] >= need and self.value_sum[n] / self.visits[n] < tau:
                    self.flags[n] |= PRUNED_SUBTREE
                    count += 1
                    if not self.flags[n] & EXHAUSTED:
                        self._mark_exhausted(n)
                    continue
                first = self.first_child[n]
                for ch in range(first + self.num_children[n] - 1, first - 1, -1):
                    if ch >= 0:
                        stack.append(ch)
        self.pruned_subtrees_total += count
        return count

    def _children(self, n: int) -> range:
        first = self.first_child[n]
        return range(first, first + self.num_children[n]) if first >= 0 else range(0)

    def best_path(self, root: int, by: int) -> np.ndarray:
        if by not in (0, 1, 2):
            raise ValueError("by must be 0 (visits), 1 (value) or 2 (reward)")
        self._check_node(root, "root", 0)
        out = [root]
        n = root
        while True:
            best, best_key = -1, 0.0
            for ch in self._children(n):
                if self.flags[ch] & PRUNED:
                    continue
                if by == 0:
                    key = float(self.visits[ch])
                elif by == 1:
                    key = self._node_value(ch)
                else:
                    key = self.reward[ch]
                if best < 0 or key > best_key:
                    best, best_key = ch, key
            if best < 0:
                break
            out.append(best)
            n = best
        return np.array(out, np.int32)

    def _collect(self, root: int, skip_pruned: bool) -> list[int]:
        out, stack = [], [root]
        while stack:
            n = stack.pop()
            if skip_pruned and self.flags[n] & PRUNED:
                continue
            out.append(n)
            stack.extend(self._children(n))
        return out

    def worst_path(self, root: int) -> np.ndarray:
        self._check_node(root, "root", 0)
        nodes = sorted(self._collect(root, True))
        reach = set()
        for n in reversed(nodes):
            if self.flags[n] & TERMINAL:
                reach.add(n)
            if n in reach and n != root:
                reach.add(self.parent[n])
        out = [root]
        n = root
        while True:
            worst, worst_reach = -1, False
            for ch in self._children(n):
                if self.flags[ch] & PRUNED:
                    continue
                rc = ch in reach
                if worst < 0 or (rc and not worst_reach) or (rc == worst_reach and self.reward[ch] < self.reward[worst]):
                    worst, worst_reach = ch, rc
            if worst < 0:
                break
            out.append(worst)
            n = worst
        return np.array(out, np.int32)

    def terminals(self, roots: np.ndarray):
        rl = roots.tolist()
        for i, r in enumerate(rl):
            self._check_root(r, "roots", i)
        offsets = np.zeros(len(rl) + 1, np.int64)
        nodes: list[int] = []
        values: list[float] = []
        for i, root in enumerate(rl):
            for n in sorted(self._collect(root, True)):
                if self.flags[n] & TERMINAL:
                    nodes.append(n)
                    values.append(self._node_value(n))
            offsets[i + 1] = len(nodes)
        return offsets, np.array(nodes, np.int32), np.array(values, np.float32)

    def tree_nodes(self, root: int) -> np.ndarray:
        self._check_root(root, "root", 0)
        return np.array(sorted(self._collect(root, False)), np.int32)

    def _get(self, nodes: np.ndarray, fn, dtype) -> np.ndarray:
        nl = nodes.tolist()
        for i, n in enumerate(nl):
            self._check_node(n, "nodes", i)
        return np.array([fn(n) for n in nl], dtype=dtype)

    def get_payload(self, nodes):
        return self._get(nodes, self.payload.__getitem__, np.int64)

    def get_reward(self, nodes):
        return self._get(nodes, self.reward.__getitem__, np.float32)

    def get_prior(self, nodes):
        return self._get(nodes, self.prior.__getitem__, np.float32)

    def get_visits(self, nodes):
        return self._get(nodes, self.visits.__getitem__, np.int32)

    def get_inflight(self, nodes):
        return self._get(nodes, self.inflight.__getitem__, np.int32)

    def get_value(self, nodes):
        return self._get(nodes, self._node_value, np.float32)

    def get_depth(self, nodes):
        return self._get(nodes, self.depth.__getitem__, np.int32)

    def get_parent(self, nodes):
        return self._get(nodes, self.parent.__getitem__, np.int32)

    def get_flags(self, nodes):
        return self._get(nodes, self.flags.__getitem__, np.uint8)

    def stats(self) -> dict:
        hist = [0] * (self.max_depth + 1)
        for d in self.depth:
            hist[d] += 1
        return {
            "nodes": len(self.parent),
            "trees": len(self.roots),
            "expanded": sum(1 for f in self.flags if f & EXPANDED),
            "terminal": sum(1 for f in self.flags if f & TERMINAL),
            "pruned_at_expansion": sum(1 for f in self.flags if f & PRUNED_EXPAND),
            "pruned_subtrees": self.pruned_subtrees_total,
            "collisions": sum(self.tree_collisions),
            "exhausted_roots": sum(1 for r in self.roots if self.flags[r] & EXHAUSTED),
            "inflight_roots": sum(1 for r in self.roots if self.inflight[r] > 0),
            "depth_histogram": hist,
            "bytes_per_node": BYTES_PER_NODE,
        }

    def snapshot(self) -> dict:
        """Copies (a Python engine has no contiguous storage to view), same keys and dtypes as C++."""
        return {
            "parent": np.array(self.parent, np.int32),
            "first_child": np.array(self.first_child, np.int32),
            "num_children": np.array(self.num_children, np.uint16),
            "visits": np.array(self.visits, np.int32),
            "inflight": np.array(self.inflight, np.int32),
            "value_sum": np.array(self.value_sum, np.float64),
            "prior": np.array(self.prior, np.float32),
            "init_value": np.array(self.init_value, np.float32),
            "flags": np.array(self.flags, np.uint8),
            "payload": np.array(self.payload, np.int64),
            "tree": np.array(self.tree, np.int32),
            "reward": np.array(self.reward, np.float32),
            "depth": np.array(self.depth, np.int16),
            "roots": np.array(self.roots, np.int32),
            "tree_collisions": np.array(self.tree_collisions, np.int64),
        }

    def validate(self) -> str:
        """Empty string when every invariant holds, else the first broken one (same checks as C++)."""
        nn = len(self.parent)
        for name in ("value_sum", "first_child", "num_children", "visits", "inflight", "prior", "init_value",
                     "flags", "payload", "tree", "reward", "depth"):
            if len(getattr(self, name)) != nn:
                return "per-node arrays have different lengths"
        if not len(self.qmin) == len(self.qmax) == len(self.tree_collisions) == len(self.roots):
            return "per-tree arrays have different lengths"
        for t, r in enumerate(self.roots):
            if r < 0 or r >= nn or self.parent[r] != -1 or self.tree[r] != t:
                return f"tree {t}: root id {r} is not a root of that tree"
            if self.tree_collisions[t] < 0:
                return f"tree {t}: negative collision count"
        for n in range(nn):
            ident = f"node {n}: "
            f = self.flags[n]
            p = self.parent[n]
            if p < -1 or p >= n:
                return ident + f"parent {p} is not an earlier node"
            if p == -1:
                t = self.tree[n]
                if t < 0 or t >= len(self.roots) or self.roots[t] != n:
                    return ident + "a parentless node that is not a registered root"
                if self.depth[n] != 0:
                    return ident + "root depth is not 0"
                if f & (PRUNED | TERMINAL):
                    return ident + "a root is flagged pruned or terminal"
            else:
                if self.depth[n] != self.depth[p] + 1:
                    return ident + "depth is not parent depth + 1"
                if self.tree[n] != self.tree[p]:
                    return ident + "tree differs from its parent's"
                if not self.first_child[p] <= n < self.first_child[p] + self.num_children[p]:
                    return ident + "not within its parent's children"
                if self.depth[n] > self.max_depth:
                    return ident + "deeper than max_depth"
                if self.depth[n] == self.max_depth and not f & TERMINAL:
                    return ident + "at max_depth but not terminal"
            if self.visits[n] < 0:
                return ident + "negative visits"
            if self.inflight[n] < 0:
                return ident + "negative in-flight count"
            if not math.isfinite(self.value_sum[n]):
                return ident + "value_sum is not finite"
            if self.visits[n] == 0 and self.value_sum[n] != 0.0:
                return ident + "value_sum is non-zero without visits"
            if f & TERMINAL and f & EXPANDED:
                return ident + "terminal and expanded"
            fc, nc = self.first_child[n], self.num_children[n]
            if not f & EXPANDED:
                if nc != 0 or fc != -1:
                    return ident + "unexpanded but has children"
            elif nc < 0 or (nc > 0 and fc <= n) or (nc == 0 and fc != -1) or fc + nc > nn:
                return ident + "children range is invalid"
            cv = ci = 0
            all_ex = True
            for ch in self._children(n):
                if self.parent[ch] != n:
                    return ident + f"child {ch} names another parent"
                cv += self.visits[ch]
                ci += self.inflight[ch]
                all_ex = all_ex and bool(self.flags[ch] & EXHAUSTED)
            if cv > self.visits[n]:
                return ident + "children have more visits than the node"
            if ci > self.inflight[n]:
                return ident + "children have more in-flight descents than the node"
            exhausted = bool(f & (TERMINAL | PRUNED)) or (bool(f & EXPANDED) and all_ex)
            if exhausted != bool(f & EXHAUSTED):
                return ident + ("should be exhausted but is not flagged" if exhausted else
                                "flagged exhausted but is not")
        return ""
