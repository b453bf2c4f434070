"""Hand-computed golden trees for the selection options that parity tests alone cannot pin down.

C++ vs Python parity (tests/test_engine_parity.py) shows the two engines agree; it cannot show that either is
right. Here each option gets a small tree whose every selection score is written out by hand from the
formula documented in csrc/forest.hpp (and EngineConfig), and both engines' ``child_scores()`` and
``select()`` are held to it:

    n_vl = VL * inflight, N_eff = visits + n_vl, Q = (W + n_vl * L) / N_eff   (Q = FPU when N_eff == 0)
    P_eff = parent visits + VL * (parent inflight + 1 for the descent itself)
    PUCT: Q + c * prior * sqrt(P_eff) / (1 + N_eff)        UCT: Q + c * sqrt(ln(max(P_eff, 1)) / N_eff),
                                                                 an unvisited child scores its FPU
    FPU: parent = parent mean - fpu_reduction; value = the child's initial value (NaN -> parent);
         const = fpu_value (or a number given as fpu); inf
    q_norm: Q -> (Q - qmin) / (qmax - qmin) over the node means backup() has seen in this tree (finite Q,
            qmax > qmin only)

Priors, values and rewards are dyadic (exact in float32, which the engines store them in), so the expected
numbers below are the formula's, not a re-run of the code. Each case is chosen so that the option changes
which child is selected, not only the scores.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from sphere.engine import EngineConfig, core_available, make_forest

NO_CORE = pytest.mark.skipif(not core_available(), reason="sphere._core not built")
NAN = float("nan")
INF = float("inf")
S2, S3, S5, S11 = math.sqrt(2.0), math.sqrt(3.0), math.sqrt(5.0), math.sqrt(11.0)


@pytest.fixture(params=["py", pytest.param("cpp", marks=NO_CORE)])
def backend(request):
    return request.param


def expand(f, leaf, priors, values=None):
    n = len(priors)
    values = np.full(n, NAN) if values is None else np.asarray(values, float)
    return f.expand(np.array([leaf], np.int32), [n], np.asarray(priors, float), np.arange(n) + 100,
                    np.full(n, 0.5), values, np.zeros(n, bool))


def scores_of(f, node) -> list[float]:
    offsets, scores = f.child_scores(np.array([node], np.int32))
    assert offsets.tolist() == [0, len(scores)]
    return scores.tolist()


def select_one(f, root):
    """One descent from root: (leaves, collisions)."""
    _, leaves, coll = f.select(np.array([root], np.int32), 1)
    return leaves.tolist(), coll.tolist()


# --------------------------------------------------------------------------------------------- FPU
# Root expanded into three children (priors 1/2, 5/16, 3/16), backed up with 3/4; the first descent takes
# child 0 (it is backed up with 0), so the root has N=2, mean 3/8, child 0 N=1, Q=0, children 1 and 2 are
# unvisited and score their FPU. P_eff = 2 + 1*(0+1) = 3 for the next descent.
# Child 0 under PUCT: 0 + 1/2*sqrt(3)/(1+1); under UCT (c=1): 0 + sqrt(ln 3 / 1).
PUCT_C0 = 0.5 * S3 / 2
UCT_C0 = math.sqrt(math.log(3.0))
FPU_CASES = [
    # id, rule, config, initial values of the children, expected scores, child select() takes
    ("const_number", "puct", {"fpu": -0.5}, None,
     [PUCT_C0, -0.5 + 0.3125 * S3, -0.5 + 0.1875 * S3], 0),  # 0.433 > 0.041 > -0.175
    ("const_fpu_value", "puct", {"fpu": "const", "fpu_value": -0.5}, None,
     [PUCT_C0, -0.5 + 0.3125 * S3, -0.5 + 0.1875 * S3], 0),
    ("parent", "puct", {"fpu": "parent"}, None,
     [PUCT_C0, 0.375 + 0.3125 * S3, 0.375 + 0.1875 * S3], 1),  # 0.433 < 0.916
    ("parent_reduction", "puct", {"fpu": "parent", "fpu_reduction": 0.5}, None,
     [PUCT_C0, -0.125 + 0.3125 * S3, -0.125 + 0.1875 * S3], 0),  # 0.416 < 0.433: the reduction flips it
    ("value_nan_falls_back_to_parent", "puct", {"fpu": "value"}, None,
     [PUCT_C0, 0.375 + 0.3125 * S3, 0.375 + 0.1875 * S3], 1),
    ("value", "puct", {"fpu": "value"}, [NAN, NAN, 0.875],
     [PUCT_C0, 0.375 + 0.3125 * S3, 0.875 + 0.1875 * S3], 2),  # child 2's own initial value: 1.200
    ("inf", "puct", {"fpu": "inf"}, None, [PUCT_C0, INF, INF], 1),
    ("uct_const_high", "uct", {"fpu": 2.0}, None, [UCT_C0, 2.0, 2.0], 1),  # unvisited score = FPU exactly
    ("uct_const_low", "uct", {"fpu": -0.5}, None, [UCT_C0, -0.5, -0.5], 0),
    ("uct_parent_reduction", "uct", {"fpu": "parent", "fpu_reduction": 0.25}, None,
     [UCT_C0, 0.125, 0.125], 0),
]


@pytest.mark.parametrize("rule,kw,values,want,pick", [c[1:] for c in FPU_CASES], ids=[c[0] for c in FPU_CASES])
def test_golden_fpu(backend, rule, kw, values, want, pick):
    f = make_forest(EngineConfig(rule=rule, c=1.0, virtual_loss=1.0, virtual_loss_value=0.0, **kw),
                    backend=backend)
    (root,) = f.add_roots([0])
    assert select_one(f, root) == ([root], [0])
    kids = expand(f, root, [0.5, 0.3125, 0.1875], values).tolist()
    f.backup([root], [0.75])
    # first descent: every child unvisited, child 0 has the highest prior (PUCT) or wins the tie (UCT, equal
    # FPU), and under fpu=value child 2's 0.875 + 3/16*sqrt(2) = 1.140 < 3/4 + 1/2*sqrt(2) = 1.457
    assert select_one(f, root) == ([kids[0]], [0])
    f.backup([kids[0]], [0.0])
    assert f.visits([root, *kids]).tolist() == [2, 1, 0, 0]
    got = scores_of(f, root)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert select_one(f, root) == ([kids[pick]], [0])
    f.validate()


# ------------------------------------------------------------------------- virtual loss and its value
# Root with two children (priors 5/8, 3/8), fpu=inf so the set-up visits child 0 (backed up with 1) and
# child 1 (backed up with 0) once each: root N=3 (0.5 + 1 + 0). A third descent takes child 0 (Q 1 vs 0)
# and leaves it in flight. The next descent then sees, with VL and L:
#   P_eff = 3 + VL*(1+1);  child 0: n_vl = VL, N_eff = 1+VL, Q = (1 + VL*L)/(1+VL), + 5/8*sqrt(P_eff)/(2+VL)
#   child 1 (PUCT): 0 + 3/8*sqrt(P_eff)/2;  (UCT) child 0: Q + sqrt(ln P_eff/(1+VL)), child 1: sqrt(ln P_eff)
VL_CASES = [
    # id, rule, VL, L, expected scores, child the next descent takes (0 = the in-flight one: a collision)
    ("no_virtual_loss", "puct", 0.0, 0.0, [1 + 0.625 * S3 / 2, 0.375 * S3 / 2], 0),
    ("vl1_value0", "puct", 1.0, 0.0, [0.5 + 0.625 * S5 / 3, 0.375 * S5 / 2], 0),  # 0.966 vs 0.419
    ("vl1_value1", "puct", 1.0, 1.0, [1.0 + 0.625 * S5 / 3, 0.375 * S5 / 2], 0),
    ("vl1_value_minus2", "puct", 1.0, -2.0, [-0.5 + 0.625 * S5 / 3, 0.375 * S5 / 2], 1),  # L flips it
    ("vl4_value0", "puct", 4.0, 0.0, [0.2 + 0.625 * S11 / 6, 0.375 * S11 / 2], 1),  # the weight flips it
    ("uct_vl1_value0", "uct", 1.0, 0.0, [0.5 + math.sqrt(math.log(5.0) / 2), math.sqrt(math.log(5.0))], 0),
    ("uct_vl1_value_minus1", "uct", 1.0, -1.0, [0.0 + math.sqrt(math.log(5.0) / 2), math.sqrt(math.log(5.0))],
     1),
]


@pytest.mark.parametrize("rule,vl,lv,want,pick", [c[1:] for c in VL_CASES], ids=[c[0] for c in VL_CASES])
def test_golden_virtual_loss_and_value(backend, rule, vl, lv, want, pick):
    f = make_forest(EngineConfig(rule=rule, c=1.0, virtual_loss=vl, virtual_loss_value=lv, fpu="inf"),
                    backend=backend)
    (root,) = f.add_roots([0])
    select_one(f, root)
    kids = expand(f, root, [0.625, 0.375]).tolist()
    f.backup([root], [0.5])
    assert select_one(f, root) == ([kids[0]], [0])  # both unvisited (+inf): the first
    f.backup([kids[0]], [1.0])
    assert select_one(f, root) == ([kids[1]], [0])  # the unvisited one
    f.backup([kids[1]], [0.0])
    assert select_one(f, root) == ([kids[0]], [0])  # Q 1 vs 0, child 0's prior is larger too
    assert f.inflight([root, *kids]).tolist() == [1, 1, 0]
    got = scores_of(f, root)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
    leaves, coll = select_one(f, root)
    if pick == 0:
        assert (leaves, coll) == ([], [1])  # the in-flight child again: a collision, nothing returned
    else:
        assert (leaves, coll) == ([kids[pick]], [0])
    f.validate()


# ------------------------------------------------------------------------------------------- q_norm
@pytest.mark.parametrize("q_norm", [True, False])
def test_golden_q_norm_two_visited_children(backend, q_norm):
    """Tree A: root backed up with 1/2; children (priors 1/8, 7/8) visited once each (fpu=inf), with 3/4 and
    1/4. Means backup() saw in tree A: 1/2, 3/4, 5/8, 1/4, 1/2 -> [1/4, 3/4]. P_eff = 3 + 1 = 4.
    q_norm: child 0 Q = (3/4-1/4)/(1/2) = 1, child 1 Q = 0 -> 1 + 1/8*2/2 = 1.125 vs 0 + 7/8 = 0.875.
    Without: 3/4 + 1/8 = 0.875 vs 1/4 + 7/8 = 1.125. Tree B (same forest, backed up with 10) must not
    stretch tree A's range: the statistics are per tree."""
    f = make_forest(EngineConfig(rule="puct", c=1.0, virtual_loss=1.0, fpu="inf", q_norm=q_norm),
                    backend=backend)
    rb, ra = f.add_roots([1, 0]).tolist()  # tree A is the forest's second tree: its index is not 0
    _, leaves, _ = f.select(np.array([ra, rb], np.int32), 1)
    assert leaves.tolist() == [ra, rb]
    kids = f.expand(np.array([ra, rb], np.int32), [2, 2], np.array([0.125, 0.875, 0.125, 0.875]),
                    np.arange(4), np.full(4, 0.5), np.full(4, NAN), np.zeros(4, bool)).tolist()
    c0, c1 = kids[:2]  # tree A's children (contiguous, in leaf order)
    assert f.paths([c0, c1])[1].tolist() == [ra, c0, ra, c1]
    f.backup([ra, rb], [0.5, 10.0])
    assert select_one(f, ra) == ([c0], [0])
    f.backup([c0], [0.75])
    assert select_one(f, ra) == ([c1], [0])
    f.backup([c1], [0.25])
    want = [1.0 + 0.125, 0.0 + 0.875] if q_norm else [0.75 + 0.125, 0.25 + 0.875]
    assert scores_of(f, ra) == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert select_one(f, ra) == ([c0] if q_norm else [c1], [0])
    f.validate()


def test_golden_q_norm_normalises_the_fpu_and_needs_a_range(backend):
    """fpu=const 1/2, q_norm on. After the root's first backup (1/2) the range is a point: no normalisation,
    P_eff = 1 + 1 = 2 -> 1/2 + p*sqrt(2). After child 0 is backed up with 3/4 the range is [1/2, 3/4] (means
    1/2, 3/4, 5/8): child 0 Q = (3/4-1/2)/(1/4) = 1, the unvisited children's FPU (1/2) -> 0; P_eff = 3."""
    f = make_forest(EngineConfig(rule="puct", c=1.0, virtual_loss=1.0, fpu="const", fpu_value=0.5,
                                 q_norm=True), backend=backend)
    (root,) = f.add_roots([0])
    select_one(f, root)
    kids = expand(f, root, [0.5, 0.3125, 0.1875]).tolist()
    f.backup([root], [0.5])
    assert scores_of(f, root) == pytest.approx([0.5 + 0.5 * S2, 0.5 + 0.3125 * S2, 0.5 + 0.1875 * S2],
                                               rel=1e-12, abs=1e-12)
    assert select_one(f, root) == ([kids[0]], [0])
    f.backup([kids[0]], [0.75])
    assert scores_of(f, root) == pytest.approx([1.0 + 0.5 * S3 / 2, 0.0 + 0.3125 * S3, 0.0 + 0.1875 * S3],
                                               rel=1e-12, abs=1e-12)
    f.validate()
