"""Engine API on both backends: a hand-computed golden tree, pruning rules, extraction, snapshots, and
error handling (bad input raises ValueError/IndexError and changes nothing; never a crash)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

from sphere.engine import EngineConfig, Forest, PyForest, core_available, make_forest

# The C++ engine is always a test parameter: without the build its cases are reported as skipped (which
# fails CI, tests/skip_gate.py), never silently dropped from the run.
NO_CORE = pytest.mark.skipif(not core_available(), reason="sphere._core not built")
BACKEND_PARAMS = ["py", pytest.param("cpp", marks=NO_CORE)]
NAN = float("nan")


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request):
    return request.param


def expand(f, leaves, rewards, priors=None, values=None, terminal=None):
    """Expand each leaf with the given per-leaf lists of child rewards."""
    counts = [len(r) for r in rewards]
    flat = [x for r in rewards for x in r]
    c = len(flat)
    priors = np.full(c, 1.0 / max(c, 1)) if priors is None else priors
    values = np.full(c, NAN) if values is None else values
    terminal = np.zeros(c, bool) if terminal is None else terminal
    return f.expand(np.asarray(leaves, np.int32), counts, priors, np.arange(c) + 1000, flat, values, terminal)


def test_golden_puct_selection_with_virtual_loss(backend):
    # Hand-computed (csrc/forest.hpp formulas), c=1, VL=1, L=0, FPU = parent mean (0.5):
    # d1: P_eff=2: scores 0.5 + p*sqrt(2) -> child 0 (p=.5); d2: P_eff=3: c0 = 0 + .5*sqrt(3)/2 = .433,
    # c1 = .5 + .3*sqrt(3) = 1.02, c2 = .5 + .2*sqrt(3) = .846 -> c1; d3: P_eff=4: c0 = .5, c1 = .3,
    # c2 = .5 + .2*2 = .9 -> c2; d4: P_eff=5: c0 = .5*sqrt(5)/2 = .559 wins -> in flight -> collision.
    f = make_forest(EngineConfig(rule="puct", c=1.0, virtual_loss=1.0, fpu="parent"), backend=backend)
    (root,) = f.add_roots([7])
    tree_idx, leaves, coll = f.select([root], 1)
    assert leaves.tolist() == [root] and coll.tolist() == [0]
    kids = expand(f, [root], [[0.1, 0.2, 0.3]], priors=np.array([0.5, 0.3, 0.2]))
    f.backup([root], [0.5])
    tree_idx, leaves, coll = f.select([root], 4)
    assert leaves.tolist() == kids.tolist() and tree_idx.tolist() == [0, 0, 0]
    assert coll.tolist() == [1] and f.stats()["collisions"] == 1
    assert f.inflight([root]).tolist() == [3] and f.inflight(kids).tolist() == [1, 1, 1]
    f.backup(kids[:2], [1.0, 0.0])
    f.cancel(kids[2:])
    assert f.inflight(np.arange(f.num_nodes)).tolist() == [0, 0, 0, 0]
    assert f.visits([root, *kids]).tolist() == [3, 1, 1, 0]
    # value of an unvisited node with a NaN initial value falls back to its reward (0.3)
    assert f.value([root, *kids]).tolist() == [0.5, 1.0, 0.0, np.float32(0.3)]
    offsets, nodes = f.paths(kids)
    assert offsets.tolist() == [0, 2, 4, 6] and nodes.tolist() == [root, kids[0], root, kids[1], root, kids[2]]
    assert f.payload(kids).tolist() == [1000, 1001, 1002] and f.payload([root]).tolist() == [7]
    assert f.best_path(root, by="visits").tolist() == [root, kids[0]]
    assert f.best_path(root, by="value").tolist() == [root, kids[0]]
    assert f.best_path(root, by="reward").tolist() == [root, kids[2]]
    f.validate()


def test_golden_uct_unvisited_first_and_collisions(backend):
    f = make_forest(EngineConfig(rule="uct", c=1.0, fpu="inf", virtual_loss=1.0), backend=backend)
    (root,) = f.add_roots([0])
    f.select([root], 1)
    kids = expand(f, [root], [[0.0, 0.0]])
    f.backup([root], [0.0])
    # fpu=inf: both unvisited children first, in index order; the third descent finds both in flight:
    # in-flight children score Q = 0 + sqrt(ln(P_eff)/1): equal -> child 0 (in flight) -> collision.
    _, leaves, coll = f.select([root], 3)
    assert leaves.tolist() == kids.tolist() and coll.tolist() == [1]


@pytest.mark.parametrize(
    "pruning,kw,rewards,kept",
    [
        ("minmax", {}, [0.2, 0.9, 0.5, 0.1, 0.9], [1, 3]),  # best (first 0.9) and worst
        ("minmax", {}, [0.5, 0.5, 0.5], [0, 1]),  # all tied: best = 0, worst among the others = 1
        ("minmax", {}, [0.3, 0.1], [0, 1]),  # two or fewer: keep all
        ("topk", {"prune_k": 2}, [0.5, 0.9, 0.5, 0.9], [1, 3]),
        ("topk", {"prune_k": 2}, [0.5, 0.25, 0.5, 0.5], [0, 2]),  # stable: lower index wins ties
        ("threshold", {"prune_tau": 0.5}, [0.25, 0.5, 0.75], [1, 2]),  # drop reward < tau
        ("threshold", {"prune_tau": 0.25, "prune_relative": True}, [0.25, 0.75, 0.5], [1, 2]),
        ("none", {}, [0.1, 0.2], [0, 1]),
    ],
)
def test_pruning_at_expansion(backend, pruning, kw, rewards, kept):
    f = make_forest(EngineConfig(pruning=pruning, **kw), backend=backend)
    (root,) = f.add_roots([0])
    f.select([root], 1)
    kids = expand(f, [root], [rewards])
    f.backup([root], [0.0])
    assert np.flatnonzero(~f.is_pruned(kids)).tolist() == kept
    assert f.stats()["pruned_at_expansion"] == len(rewards) - len(kept)
    # pruned children are never selected
    _, leaves, _ = f.select([root], 10)
    assert sorted(leaves.tolist()) == sorted(kids[kept].tolist())
    f.validate()


def test_exhaustion_terminals_and_extraction(backend):
    f = make_forest(EngineConfig(max_depth=3), backend=backend)
    (root,) = f.add_roots([0])
    f.select([root], 1)
    a, b, c = expand(f, [root], [[0.9, 0.2, 0.5]], values=np.array([NAN, 0.25, NAN]),
                     terminal=np.array([0, 1, 0], bool))
    f.backup([root], [0.5])
    assert f.is_terminal([a, b, c]).tolist() == [False, True, False]
    # b is terminal: never selected
    _, leaves, coll = f.select([root], 3)
    assert sorted(leaves.tolist()) == [a, c] and coll.tolist() == [1]
    (a1,) = expand(f, [a], [[0.7]])
    (c1, c2) = expand(f, [c], [[0.1, 0.3]], terminal=np.array([1, 1], bool))
    f.backup([a, c], [0.8, 0.2])
    assert f.is_exhausted([c]).tolist() == [True] and not f.is_exhausted([root])[0]
    assert f.depth([a1]).tolist() == [2]
    _, leaves, _ = f.select([root], 1)
    assert leaves.tolist() == [a1]
    (a2,) = expand(f, [a1], [[0.4]])  # depth 3 == max_depth: terminal automatically
    f.backup([a1], [1.0])
    assert f.is_terminal([a2])[0] and f.is_exhausted([root])[0]
    _, leaves, coll = f.select([root], 4)  # exhausted tree: nothing, no collisions
    assert len(leaves) == 0 and coll.tolist() == [0]
    offsets, nodes, values = f.terminals([root])
    assert offsets.tolist() == [0, 4] and nodes.tolist() == sorted([b, c1, c2, a2])
    # values: initial value 0.25 for b, rewards for the others (never visited, no initial value)
    assert values.tolist() == [np.float32(0.25), np.float32(0.1), np.float32(0.3), np.float32(0.4)]
    assert f.best_path(root, "visits").tolist() == [root, a, a1, a2]
    assert f.worst_path(root).tolist() == [root, b]  # lowest reward that reaches a terminal
    assert f.prune_subtrees([root], tau=0.5, min_visits=1) == 1  # c: mean 0.2 < 0.5 (a: 0.9, a1: 1.0)
    assert f.is_pruned([c])[0]
    offsets, nodes, _ = f.terminals([root])
    assert nodes.tolist() == sorted([b, a2])  # c's terminals are under a pruned node now
    assert f.prune_subtrees([root], tau=0.5, min_visits=1) == 0
    assert f.stats()["pruned_subtrees"] == 1
    ts = f.tree_snapshot(root)
    assert ts["parent"][0] == -1 and ts["node_id"].tolist() == sorted(ts["node_id"].tolist())
    assert all(ts["parent"][i] < i for i in range(1, len(ts["parent"])))
    assert set(ts) >= {"node_id", "parent", "depth", "payload", "prior", "reward", "value", "visits", "flags"}
    f.validate()
    f.reset()
    assert f.num_nodes == 0 and f.stats()["trees"] == 0


def test_prune_subtrees_respects_min_visits_and_skips_roots(backend):
    f = make_forest(EngineConfig(), backend=backend)
    roots = f.add_roots([0, 1])
    f.select(roots, 1)
    kids = expand(f, roots, [[0.5, 0.5], [0.5]])
    f.backup(roots, [0.0, 0.0])
    for _ in range(2):
        _, leaves, _ = f.select(roots, 1)
        f.backup(leaves, np.zeros(len(leaves)))
    assert f.prune_subtrees(roots, tau=0.5, min_visits=3) == 0  # nothing has 3 visits yet (roots skipped)
    n = f.prune_subtrees(roots, tau=0.5, min_visits=1)
    assert n == int(sum(f.visits(kids) >= 1))
    assert not f.is_pruned(roots).any()


def test_q_norm_and_fpu_options_run_and_validate(backend):
    rng = np.random.default_rng(0)
    for fpu in ("parent", "value", "inf", "const", -0.5):
        for rule in ("uct", "puct"):
            f = make_forest(EngineConfig(rule=rule, fpu=fpu, q_norm=True, fpu_reduction=0.1), backend=backend)
            roots = f.add_roots(np.arange(3))
            for _ in range(4):
                _, leaves, _ = f.select(roots, 2)
                counts = np.full(len(leaves), 3, np.int32)
                c = int(counts.sum())
                f.expand(leaves, counts, rng.random(c), np.arange(c), rng.random(c), rng.random(c), np.zeros(c, bool))
                f.backup(leaves, rng.random(len(leaves)))
            f.validate()


@NO_CORE
def test_snapshot_is_zero_copy_view_in_cpp():
    f = Forest(EngineConfig())
    roots = f.add_roots([1, 2])
    snap = f.snapshot()
    assert not snap["visits"].flags.writeable
    f.select(roots, 1)
    f.backup(roots, [0.5, 1.0])
    assert snap["visits"].tolist() == [1, 1]  # the view sees the update (no growth happened)
    assert snap["value_sum"].tolist() == [0.5, 1.0]
    assert f.stats()["bytes_per_node"] <= 64
    with pytest.raises(ValueError):
        snap["visits"][0] = 3


# ---------------------------------------------------------------- errors: raise, change nothing


def _state(f):
    return {k: np.array(v) for k, v in f.snapshot().items()}


def _unchanged(before, f):
    after = _state(f)
    for k in before:
        assert np.array_equal(before[k], after[k], equal_nan=before[k].dtype.kind == "f"), k


@pytest.fixture
def small(backend):
    f = make_forest(EngineConfig(), backend=backend)
    roots = f.add_roots([0, 1])
    f.select(roots, 1)
    kids = expand(f, roots, [[0.5, 0.5], [0.5]])
    f.backup(roots, [0.0, 0.0])
    _, leaves, _ = f.select(roots, 1)  # leaves in flight
    return f, roots, kids, leaves


BAD_CALLS = [
    ("select", lambda r, k, l: (r, -1), ValueError),  # k < 0
    ("select", lambda r, k, l: (r.reshape(1, 2), 1), ValueError),  # 2-D
    ("select", lambda r, k, l: (r.astype(np.float32), 1), ValueError),  # float ids
    ("select", lambda r, k, l: ([99], 1), IndexError),  # out of range
    ("select", lambda r, k, l: ([-1], 1), IndexError),
    ("select", lambda r, k, l: ([k[0]], 1), ValueError),  # not a root
    ("select", lambda r, k, l: ([r[0], r[0]], 1), ValueError),  # duplicate root
    ("select", lambda r, k, l: (r, 1.5), ValueError),  # k not an int
    ("paths", lambda r, k, l: ([5000],), IndexError),
    ("backup", lambda r, k, l: (l, np.zeros(len(l) + 1)), ValueError),  # length mismatch
    ("backup", lambda r, k, l: (l, np.full(len(l), np.nan)), ValueError),  # NaN value
    ("backup", lambda r, k, l: ([*l, k[-1]] if k[-1] not in l else [*l, k[0]], np.zeros(len(l) + 1)), ValueError),
    ("backup", lambda r, k, l: ([*l, *l], np.zeros(2 * len(l))), ValueError),  # twice: no select in flight
    ("cancel", lambda r, k, l: ([99],), IndexError),
    ("expand", lambda r, k, l: ([l[0]], [2], [0.5], [1], [0.5], [0.5], [0]), ValueError),  # counts mismatch
    ("expand", lambda r, k, l: ([l[0]], [-1], [], [], [], [], []), ValueError),  # negative count
    ("expand", lambda r, k, l: ([r[0]], [1], [0.5], [1], [0.5], [0.5], [0]), ValueError),  # already expanded
    ("expand", lambda r, k, l: ([l[0], l[0]], [1, 1], [.5, .5], [1, 2], [.5, .5], [.5, .5], [0, 0]), ValueError),
    ("expand", lambda r, k, l: ([l[0]], [1], [np.inf], [1], [0.5], [0.5], [0]), ValueError),  # inf prior
    ("expand", lambda r, k, l: ([l[0]], [1], [0.5], [1], [0.5], [0.5], [2]), ValueError),  # terminal not 0/1
    ("expand", lambda r, k, l: ([l[0]], [1, 1], [0.5], [1], [0.5], [0.5], [0]), ValueError),  # counts length
    ("expand", lambda r, k, l: ([1 << 40], [0], [], [], [], [], []), ValueError),  # id beyond int32
    ("prune_subtrees", lambda r, k, l: (r, float("nan"), 1), ValueError),
    ("prune_subtrees", lambda r, k, l: (r, 0.5, -1), ValueError),
    ("best_path", lambda r, k, l: (r[0], "nope"), ValueError),
    ("best_path", lambda r, k, l: (10_000,), IndexError),
    ("worst_path", lambda r, k, l: (-5,), IndexError),
    ("terminals", lambda r, k, l: ([k[0]],), ValueError),
    ("visits", lambda r, k, l: ([1234],), IndexError),
    ("tree_snapshot", lambda r, k, l: (k[0],), ValueError),
]


@pytest.mark.parametrize("name,make_args,exc", BAD_CALLS, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD_CALLS)])
def test_bad_calls_raise_and_change_nothing(small, name, make_args, exc):
    f, roots, kids, leaves = small
    before = _state(f)
    with pytest.raises(exc):
        getattr(f, name)(*make_args(roots, kids, leaves))
    _unchanged(before, f)
    f.validate()


@pytest.mark.parametrize(
    "kw",
    [{"rule": "ucb"}, {"fpu": "zero"}, {"fpu": float("inf")}, {"pruning": "best"}, {"c": -1.0},
     {"virtual_loss": -0.5}, {"max_depth": 0}, {"prune_k": 0}, {"prune_tau": float("nan")}, {"c": "1"}],
)
def test_bad_config_raises(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        EngineConfig(**kw)


def test_make_forest_backend_names():
    assert isinstance(make_forest(backend="py"), PyForest)
    with pytest.raises(ValueError, match="backend"):
        make_forest(backend="rust")


@NO_CORE
def test_raw_core_rejects_wrong_dtypes_without_crashing():
    from sphere import _core

    raw = _core.Forest(1, 1.0, 1.0, 0.0, 0, 0.0, 0.0, False, 4, 0, 2, 0.0, False)
    raw.add_roots(np.array([1], np.int64))
    with pytest.raises(TypeError):
        raw.select(np.array([0.0]), 1)  # float64 ids: rejected by the binding, not cast
    with pytest.raises(ValueError):
        raw.select(np.zeros((1, 1), np.int32), 1)
    with pytest.raises(ValueError):
        _core.Forest(7, 1.0, 1.0, 0.0, 0, 0.0, 0.0, False, 4, 0, 2, 0.0, False)
    assert raw.validate() == ""


def test_validate_detects_corruption():
    f = PyForest(EngineConfig())
    roots = f.add_roots([0])
    f.select(roots, 1)
    f._f.inflight[0] = -1  # corrupt on purpose
    with pytest.raises(RuntimeError, match="negative in-flight"):
        f.validate()
    assert math.isnan(f.snapshot()["init_value"][0])


@NO_CORE
def test_simd_path_is_the_one_built():
    """sphere._core.SIMD names the child-scoring path compiled in: "sse2" on x86-64, "scalar" elsewhere or with
    -DSPHERE_NO_SIMD. scripts/scalar_engine_tests.sh sets SPHERE_EXPECT_SIMD=scalar, so the parity tests it runs
    provably checked the scalar fallback (a build that kept SSE2 fails here instead of passing unnoticed)."""
    import platform

    from sphere import _core

    expected = os.environ.get("SPHERE_EXPECT_SIMD") or (
        "sse2" if platform.machine().lower() in ("x86_64", "amd64") else "scalar")
    assert _core.SIMD == expected
