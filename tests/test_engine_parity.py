"""The C++ engine against the pure-Python reference over random operation sequences (hypothesis).

Every step runs the same call on both engines and requires identical results, identical exceptions and
bit-identical arrays; after every step both engines must also pass validate() and the invariants below
(states only move forward, pruned/exhausted nodes never selected, virtual loss back to 0 once every select
is resolved, root visits = backups of the tree).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

os.environ.setdefault("OMP_NUM_THREADS", "1")

from sphere.engine import EXHAUSTED, EXPANDED, PRUNED, TERMINAL, EngineConfig, Forest, PyForest, core_available

pytestmark = pytest.mark.skipif(not core_available(), reason="sphere._core not built")

# Values on a coarse grid so that ties (and the lowest-index tie rule) happen often.
GRID = [0.0, 0.125, 0.25, 0.5, 0.75, 1.0]

configs = st.builds(
    EngineConfig,
    rule=st.sampled_from(["uct", "puct"]),
    c=st.sampled_from([0.0, 0.5, 1.25, 2.0]),
    virtual_loss=st.sampled_from([0.0, 1.0, 3.0]),
    virtual_loss_value=st.sampled_from([0.0, -1.0]),
    fpu=st.sampled_from(["parent", "value", "inf", "const", 0.25]),
    fpu_value=st.sampled_from([0.0, 0.5]),
    fpu_reduction=st.sampled_from([0.0, 0.1]),
    q_norm=st.booleans(),
    max_depth=st.integers(1, 5),
    pruning=st.sampled_from(["none", "minmax", "topk", "threshold"]),
    prune_k=st.integers(1, 3),
    prune_tau=st.sampled_from([0.0, 0.25, 0.5]),
    prune_relative=st.booleans(),
)


def _same(a, b) -> None:
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray)
        assert a.dtype == b.dtype, (a.dtype, b.dtype)
        assert a.shape == b.shape, (a.shape, b.shape)
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), (a, b)
    else:
        assert a == b, (a, b)


def _bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view(np.uint8) if a.dtype.kind == "f" else a


def same_forest(fc: Forest, fp: PyForest) -> None:
    sc, sp = fc.snapshot(), fp.snapshot()
    assert sc.keys() == sp.keys()
    for key in sc:
        assert sc[key].dtype == sp[key].dtype, key
        # compared bit for bit (floats as bytes, so NaN == NaN and -0.0 != 0.0)
        assert np.array_equal(_bits(sc[key]), _bits(sp[key])), key
    assert fc.stats() == fp.stats()


def both(fc, fp, name, *args, **kw):
    """Call `name` on both engines; same result or the same exception type."""
    outs, errs = [], []
    for f in (fc, fp):
        try:
            outs.append(getattr(f, name)(*args, **kw))
            errs.append(None)
        except (ValueError, IndexError) as e:
            outs.append(None)
            errs.append(type(e))
    assert errs[0] == errs[1], (name, errs)
    if errs[0] is None:
        _same(outs[0], outs[1])
    return outs[0], errs[0]


class Tracker:
    """Invariant bookkeeping on the C++ engine (the Python one is identical by the parity checks)."""

    def __init__(self) -> None:
        self.flags = np.zeros(0, np.uint8)
        self.visits = np.zeros(0, np.int32)
        self.backups: dict[int, int] = {}  # tree index -> backups completed

    def check(self, f, pending: list[int]) -> None:
        f.validate()
        snap = f.snapshot()
        flags, visits = np.array(snap["flags"]), np.array(snap["visits"])
        n_old = len(self.flags)
        assert len(flags) >= n_old
        assert np.all((flags[:n_old] & self.flags) == self.flags), "a flag was cleared"
        assert np.all(visits[:n_old] >= self.visits), "visits went down"
        self.flags, self.visits = flags, visits
        roots = np.array(snap["roots"])
        for t, r in enumerate(roots):
            assert visits[r] == self.backups.get(t, 0)
        if not pending:
            assert not np.any(np.array(snap["inflight"])), "virtual loss left after every select was resolved"


def check_selected(f, leaves: np.ndarray) -> None:
    if len(leaves) == 0:
        return
    fl = f.flags(leaves)
    assert not np.any(fl & (EXPANDED | TERMINAL | PRUNED | EXHAUSTED)), "selected an exhausted/pruned/expanded node"
    assert len(np.unique(leaves)) == len(leaves), "a leaf returned twice"
    offsets, nodes = f.paths(leaves)
    assert not np.any(f.flags(nodes) & (PRUNED | EXHAUSTED)), "descended through a pruned or exhausted node"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs, data=st.data())
def test_random_operation_sequences_match(cfg, data):
    fc, fp = Forest(cfg), PyForest(cfg)
    tracker = Tracker()
    pending: list[int] = []  # leaves returned by select, not yet backed up / cancelled
    roots = np.zeros(0, np.int32)
    n_ops = data.draw(st.integers(5, 40), label="n_ops")
    for _ in range(n_ops):
        op = data.draw(st.sampled_from(
            ["add_roots", "select", "select", "expand", "expand", "backup", "cancel", "prune", "query", "bad"]
        ), label="op")
        if op == "add_roots" or len(roots) == 0:
            n = data.draw(st.integers(1, 3), label="n_roots")
            new, _ = both(fc, fp, "add_roots", np.arange(n, dtype=np.int64) + 100 * len(roots))
            roots = np.concatenate([roots, new]).astype(np.int32)
        elif op == "select":
            idx = data.draw(st.permutations(range(len(roots))), label="order")
            idx = idx[: data.draw(st.integers(0, len(idx)), label="n_trees")]
            k = data.draw(st.integers(0, 4), label="k")
            (tree_idx, leaves, coll), _ = both(fc, fp, "select", roots[list(idx)].astype(np.int32), k)
            check_selected(fc, leaves)
            assert len(leaves) + int(coll.sum()) <= k * len(idx)
            pending.extend(leaves.tolist())
        elif op == "expand":
            snap = fc.snapshot()
            cand = [n for n in pending if not snap["flags"][n] & (EXPANDED | TERMINAL)]
            if data.draw(st.booleans(), label="expand_any_leaf"):  # the API allows any unexpanded leaf
                cand += [int(n) for n in np.flatnonzero((snap["flags"] & (EXPANDED | TERMINAL)) == 0)]
            cand = sorted(set(cand))
            if not cand:
                continue
            chosen = data.draw(st.lists(st.sampled_from(cand), min_size=1, max_size=4, unique=True), label="leaves")
            counts = [data.draw(st.integers(0, 4), label="count") for _ in chosen]
            c = sum(counts)
            g = st.sampled_from(GRID)
            priors = [data.draw(g, label="prior") for _ in range(c)]
            rewards = [data.draw(g, label="reward") for _ in range(c)]
            values = [data.draw(st.sampled_from([*GRID, float("nan")]), label="value") for _ in range(c)]
            term = [data.draw(st.sampled_from([0, 0, 0, 1]), label="terminal") for _ in range(c)]
            both(fc, fp, "expand", np.array(chosen, np.int32), np.array(counts, np.int32),
                 np.array(priors, np.float32), np.arange(c, dtype=np.int64), np.array(rewards, np.float32),
                 np.array(values, np.float32), np.array(term, np.uint8))
        elif op in ("backup", "cancel"):
            if not pending:
                continue
            chosen = data.draw(st.lists(st.sampled_from(pending), min_size=1, max_size=len(pending), unique=True),
                               label="resolve")
            if op == "backup":
                vals = np.array([data.draw(st.sampled_from(GRID), label="v") for _ in chosen], np.float32)
                _, err = both(fc, fp, "backup", np.array(chosen, np.int32), vals)
                if err is None:
                    tree = fc.snapshot()["tree"]
                    for n in chosen:
                        tracker.backups[int(tree[n])] = tracker.backups.get(int(tree[n]), 0) + 1
            else:
                _, err = both(fc, fp, "cancel", np.array(chosen, np.int32))
            assert err is None
            for n in chosen:
                pending.remove(n)
        elif op == "prune":
            tau = data.draw(st.sampled_from([0.1, 0.3, 0.6]), label="tau")
            mv = data.draw(st.integers(0, 3), label="min_visits")
            both(fc, fp, "prune_subtrees", roots, tau, mv)
        elif op == "query":
            r = int(roots[data.draw(st.integers(0, len(roots) - 1), label="root")])
            for by in ("visits", "value", "reward"):
                both(fc, fp, "best_path", r, by=by)
            both(fc, fp, "worst_path", r)
            both(fc, fp, "terminals", roots)
            nodes = np.arange(fc.num_nodes, dtype=np.int32)
            for name in ("paths", "payload", "reward", "visits", "value", "depth", "parent", "is_terminal",
                         "is_pruned", "is_exhausted"):
                both(fc, fp, name, nodes)
            ts_c, ts_p = fc.tree_snapshot(r), fp.tree_snapshot(r)
            assert ts_c.keys() == ts_p.keys()
            for key in ts_c:
                _same(ts_c[key], ts_p[key])
        else:  # an invalid call: same exception on both, nothing changes
            bad = data.draw(st.sampled_from(["backup_idle", "oob", "k", "dup"]), label="bad")
            before = {k: np.array(v) for k, v in fc.snapshot().items()}
            if bad == "backup_idle":  # a node with nothing in flight, after valid ones: all or nothing
                idle = np.flatnonzero(fc.inflight(np.arange(fc.num_nodes)) == 0).tolist()
                if not idle:
                    continue
                batch = pending[:2] + idle[:1]
                _, err = both(fc, fp, "backup", np.array(batch, np.int32), np.zeros(len(batch), np.float32))
                assert err is ValueError
            elif bad == "oob":
                _, err = both(fc, fp, "select", np.array([fc.num_nodes], np.int32), 1)
                assert err is IndexError
            elif bad == "k":
                _, err = both(fc, fp, "select", roots, -1)
                assert err is ValueError
            else:
                _, err = both(fc, fp, "select", np.concatenate([roots, roots[:1]]), 1)
                assert err is ValueError
            after = fc.snapshot()
            for key in before:
                assert np.array_equal(_bits(before[key]), _bits(after[key])), key
        same_forest(fc, fp)
        tracker.check(fc, pending)
        fp.validate()
    # resolve everything: virtual loss must return to 0 on both
    if pending:
        both(fc, fp, "cancel", np.array(pending, np.int32))
        pending.clear()
    tracker.check(fc, pending)
    same_forest(fc, fp)


@pytest.mark.parametrize("backend", [Forest, PyForest])
def test_workload_invariants(backend):
    """A bigger deterministic workload: select/expand/backup rounds with pruning, checked every round."""
    cfg = EngineConfig(rule="puct", pruning="topk", prune_k=3, max_depth=6, q_norm=True)
    f = backend(cfg)
    rng = np.random.default_rng(1)
    roots = f.add_roots(np.arange(8))
    tracker = Tracker()
    for rnd in range(12):
        tree_idx, leaves, coll = f.select(roots, 3)
        check_selected(f, leaves)
        tracker.check(f, leaves.tolist())
        counts = rng.integers(0, 5, len(leaves)).astype(np.int32)
        c = int(counts.sum())
        f.expand(leaves, counts, rng.random(c), np.arange(c), rng.random(c), rng.random(c), rng.random(c) < 0.1)
        half = len(leaves) // 2
        f.backup(leaves[:half], rng.random(half))
        f.cancel(leaves[half:])
        for t in tree_idx[:half]:
            tracker.backups[int(t)] = tracker.backups.get(int(t), 0) + 1
        if rnd % 4 == 3:
            f.prune_subtrees(roots, 0.3, 2)
        tracker.check(f, [])
    st_ = f.stats()
    assert st_["nodes"] == f.num_nodes and sum(st_["depth_histogram"]) == st_["nodes"]
