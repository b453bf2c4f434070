"""Engine fuzzing, stateful (issue #11): a hypothesis RuleBasedStateMachine drives the C++ Forest and the
pure-Python PyForest with the same operations, hostile ones included (out-of-range ids, NaN/inf/huge
rewards, wrong dtypes and lengths, double backups, expanding a node twice), and after every rule requires
identical results or identical exception types, bit-identical state (child_scores of every expanded node
included) and every invariant of tests/test_engine_parity.py. Hypothesis shrinks a failing run to a minimal
rule sequence.

Also run under AddressSanitizer + UBSan by scripts/asan_engine_tests.sh.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

os.environ.setdefault("OMP_NUM_THREADS", "1")

from test_engine_parity import (  # noqa: E402
    GRID,
    Tracker,
    _bits,
    both,
    check_selected,
    configs,
    same_child_scores,
    same_forest,
)

from sphere.engine import EXPANDED, TERMINAL, Forest, PyForest, core_available  # noqa: E402

pytestmark = pytest.mark.skipif(not core_available(), reason="sphere._core not built")

EXAMPLES = 100  # state machine runs; each up to STEPS rules (counted in the README's Reliability paragraph)
STEPS = 40
HOSTILE_FLOATS = [float("nan"), float("inf"), -float("inf"), 1e38, -1e38, 5e-324, -0.0]


class ForestMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.fc = self.fp = None
        self.tracker = Tracker()
        self.pending: list[int] = []
        self.roots = np.zeros(0, np.int32)

    @initialize(cfg=configs, n=st.integers(1, 3))
    def start(self, cfg, n):
        self.fc, self.fp = Forest(cfg), PyForest(cfg)
        self._add(n)

    def _add(self, n: int) -> None:
        new, err = both(self.fc, self.fp, "add_roots", np.arange(n, dtype=np.int64) + 100 * len(self.roots))
        assert err is None
        self.roots = np.concatenate([self.roots, new]).astype(np.int32)

    @rule(n=st.integers(1, 3))
    def add_roots(self, n):
        self._add(n)

    @rule(data=st.data(), k=st.integers(0, 4))
    def select(self, data, k):
        idx = data.draw(st.permutations(range(len(self.roots))))
        idx = idx[: data.draw(st.integers(0, len(idx)))]
        (_, leaves, coll), err = both(self.fc, self.fp, "select", self.roots[list(idx)].astype(np.int32), k)
        assert err is None
        check_selected(self.fc, leaves)
        assert len(leaves) + int(coll.sum()) <= k * len(idx)
        self.pending.extend(leaves.tolist())

    @precondition(lambda self: bool(self.pending))
    @rule(data=st.data(), hostile=st.booleans())
    def expand(self, data, hostile):
        flags = self.fc.snapshot()["flags"]
        cand = sorted({n for n in self.pending if not flags[n] & (EXPANDED | TERMINAL)})
        if not cand:
            return
        chosen = data.draw(st.lists(st.sampled_from(cand), min_size=1, max_size=3, unique=True))
        counts = [data.draw(st.integers(0, 4)) for _ in chosen]
        c = sum(counts)
        g = st.sampled_from(GRID + HOSTILE_FLOATS) if hostile else st.sampled_from(GRID)
        both(self.fc, self.fp, "expand", np.array(chosen, np.int32), np.array(counts, np.int32),
             np.array([data.draw(g) for _ in range(c)], np.float32), np.arange(c, dtype=np.int64),
             np.array([data.draw(g) for _ in range(c)], np.float32),
             np.array([data.draw(g) for _ in range(c)], np.float32),
             np.array([data.draw(st.sampled_from([0, 0, 1])) for _ in range(c)], np.uint8))

    @precondition(lambda self: bool(self.pending))
    @rule(data=st.data(), cancel=st.booleans())
    def resolve(self, data, cancel):
        chosen = data.draw(st.lists(st.sampled_from(self.pending), min_size=1, max_size=len(self.pending),
                                    unique=True))
        if cancel:
            _, err = both(self.fc, self.fp, "cancel", np.array(chosen, np.int32))
        else:
            vals = np.array([data.draw(st.sampled_from(GRID)) for _ in chosen], np.float32)
            _, err = both(self.fc, self.fp, "backup", np.array(chosen, np.int32), vals)
            if err is None:
                tree = self.fc.snapshot()["tree"]
                for n in chosen:
                    self.tracker.backups[int(tree[n])] = self.tracker.backups.get(int(tree[n]), 0) + 1
        assert err is None
        for n in chosen:
            self.pending.remove(n)

    @rule(tau=st.sampled_from([0.0, 0.1, 0.5, 2.0]), mv=st.integers(0, 3))
    def prune(self, tau, mv):
        both(self.fc, self.fp, "prune_subtrees", self.roots, tau, mv)

    @rule(data=st.data())
    def query(self, data):
        r = int(self.roots[data.draw(st.integers(0, len(self.roots) - 1))])
        for by in ("visits", "value", "reward"):
            both(self.fc, self.fp, "best_path", r, by=by)
        both(self.fc, self.fp, "worst_path", r)
        both(self.fc, self.fp, "terminals", self.roots)
        nodes = np.arange(self.fc.num_nodes, dtype=np.int32)
        for name in ("paths", "payload", "reward", "visits", "value", "depth", "parent", "is_terminal"):
            both(self.fc, self.fp, name, nodes)

    @rule(bad=st.sampled_from(["oob_select", "neg_select", "oob_query", "backup_twice", "expand_twice",
                               "len_mismatch", "neg_count", "dup_roots", "idle_cancel", "huge_k"]),
          data=st.data())
    def hostile_call(self, bad, data):
        """An invalid call: the same exception type on both engines, and no state change at all."""
        fc, fp, n = self.fc, self.fp, self.fc.num_nodes
        before = {k: np.array(v) for k, v in fc.snapshot().items()}
        if bad == "oob_select":
            _, err = both(fc, fp, "select", np.array([n + data.draw(st.integers(0, 10**6))], np.int32), 1)
        elif bad == "neg_select":
            _, err = both(fc, fp, "select", np.array([-1 - data.draw(st.integers(0, 5))], np.int32), 1)
        elif bad == "oob_query":
            _, err = both(fc, fp, "visits", np.array([0, n], np.int32))
        elif bad == "backup_twice":
            # Only a leaf with one in-flight descent: a pending leaf that was expanded since and has a deeper
            # descent through it holds inflight 2, and backing it up twice is then indistinguishable from
            # two legitimate backups (found by hypothesis).
            once = [x for x in self.pending if int(fc.inflight(np.array([x], np.int32))[0]) == 1]
            if not once:
                return
            x = once[0]
            _, err = both(fc, fp, "backup", np.array([x, x], np.int32), np.zeros(2, np.float32))
        elif bad == "expand_twice":
            done = np.flatnonzero(before["flags"] & EXPANDED)
            if len(done) == 0:
                return
            _, err = both(fc, fp, "expand", done[:1].astype(np.int32), np.array([1], np.int32),
                          np.ones(1, np.float32), np.zeros(1, np.int64), np.zeros(1, np.float32),
                          np.zeros(1, np.float32), np.zeros(1, np.uint8))
        elif bad == "len_mismatch":
            if not self.pending:
                return
            _, err = both(fc, fp, "expand", np.array(self.pending[:1], np.int32), np.array([2], np.int32),
                          np.ones(1, np.float32), np.zeros(2, np.int64), np.zeros(2, np.float32),
                          np.zeros(2, np.float32), np.zeros(2, np.uint8))
        elif bad == "neg_count":
            if not self.pending:
                return
            _, err = both(fc, fp, "expand", np.array(self.pending[:1], np.int32), np.array([-1], np.int32),
                          np.ones(0, np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32),
                          np.zeros(0, np.float32), np.zeros(0, np.uint8))
        elif bad == "dup_roots":
            _, err = both(fc, fp, "select", np.concatenate([self.roots, self.roots[:1]]), 1)
        elif bad == "idle_cancel":
            idle = np.flatnonzero(fc.inflight(np.arange(n)) == 0)
            if len(idle) == 0:
                return
            _, err = both(fc, fp, "cancel", idle[:1].astype(np.int32))
        else:
            _, err = both(fc, fp, "select", self.roots, -(2**31))
        assert err is not None, f"{bad}: accepted"
        after = fc.snapshot()
        for key in before:
            assert np.array_equal(_bits(before[key]), _bits(after[key])), (bad, key)

    @invariant()
    def engines_agree(self):
        if self.fc is None:
            return
        same_forest(self.fc, self.fp)
        same_child_scores(self.fc, self.fp)
        self.tracker.check(self.fc, self.pending)
        self.fp.validate()

    def teardown(self):
        if self.fc is not None and self.pending:
            both(self.fc, self.fp, "cancel", np.array(self.pending, np.int32))
            self.pending.clear()
            same_forest(self.fc, self.fp)
            self.tracker.check(self.fc, self.pending)


ForestMachine.TestCase.settings = settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
                                           suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.filter_too_much])
TestForestMachine = ForestMachine.TestCase
