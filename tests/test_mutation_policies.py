"""sphere/search/policies.py and sphere/rewards/base.py: the search's picks, asserted exactly (the mutation
run, scripts/mutation.sh / docs/mutation.md; each test fails on a mutant the rest of the suite let through).

What they guard:
- MCTS ``select_all`` / ``select_new``: k leaves per tree, never past the tree's remaining simulation budget,
  trees grouped by leaf count (smallest first), the selected (root, leaf) pairs and the collision count;
- MCTS ``done``: the simulation budget and the ``max_terminals`` budget (0 = off) end a tree exactly at the
  limit;
- PaperChains ``advance``: the max chain follows the best kept child, the min chain the worst, a chain moves
  only when its own head was expanded, stops when every candidate was pruned or its pick is terminal;
- PaperChains ``extremes``: Sol_max = the highest-reward path, Sol_min = the worst path, none for a bare root;
- ``value_rank``: value first, then the last step score, a trajectory without scores last;
- ``scorer_fits``: the scorer's own ``fits`` answer as booleans, every item fits a scorer without a window;
- ``combine_outcome``: the defaults (replace, weight 1) and the inclusive [0, 1] weight range of "mix".

A small stand-in driver (the policies read only ``forest``, ``cfg``, ``k``, ``batch``, ``stats`` and
``trajectory`` from it) over the real engines, C++ and Python reference.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from sphere.engine import EngineConfig, make_forest
from sphere.rewards.base import combine_outcome, scorer_fits
from sphere.search.policies import MCTS, PaperChains, TreeState, value_rank
from sphere.search.types import SearchStats, Trajectory

ENGINES = ["cpp", "py"]


def _driver(engine="cpp", *, simulations=4, k=3, max_terminals=0):
    # fpu="inf": an unvisited child always beats one with a descent in flight, so k descents into an expanded
    # node with >= k children return k distinct leaves (no collisions) and the picks are easy to state
    forest = make_forest(EngineConfig(rule="uct", fpu="inf", pruning="none"), backend=engine)
    cfg = SimpleNamespace(simulations=simulations, max_terminals=max_terminals,
                          engine=SimpleNamespace(rule="uct"))
    return SimpleNamespace(forest=forest, cfg=cfg, k=k, batch=8, stats=SearchStats(),
                           trajectory=lambda path: [int(n) for n in path])


def _tree(f, n=3, rewards=None, terminal=None) -> int:
    """A new tree: a root with ``n`` children (ids root+1 .. root+n); n=0: a bare root."""
    root = int(f.add_roots(np.array([0], dtype=np.int64))[0])
    if n:
        f.expand(np.array([root]), np.array([n]), np.full(n, 1.0 / n), np.arange(1, n + 1),
                 np.asarray(rewards if rewards is not None else [0.5] * n, dtype=np.float32),
                 np.full(n, np.nan, dtype=np.float32), np.asarray(terminal or [0] * n, dtype=np.uint8))
    return root


def _traj(value, scores):
    return Trajectory(["s"] * len(scores), False, value, [0.0] * len(scores), list(scores), "answer")


# ------------------------------------------------------------------ MCTS: which leaves a round selects
@pytest.mark.parametrize("engine", ENGINES)
def test_mcts_select_all_gives_each_tree_its_remaining_budget_smallest_groups_first(engine):
    d = _driver(engine, simulations=4, k=3)
    f = d.forest
    a, b, c, e = (_tree(f) for _ in range(4))
    assert (a, b, c, e) == (0, 4, 8, 12)
    # budget 4, k 3: a (0 done) gets 3 leaves, b (3 done) 1, c (4 done) none, e (2 done) 2
    live = {r: TreeState(job=None, root=r, sims=s) for r, s in ((a, 0), (b, 3), (c, 4), (e, 2))}
    roots, leaves = [], []
    assert MCTS(d).select_all(live, roots, leaves) == 6
    # one select() per leaf count, in increasing count: b's 1 leaf, e's 2, a's 3
    assert roots == [b, e, e, a, a, a]
    assert leaves == [b + 1, e + 1, e + 2, a + 1, a + 2, a + 3]
    assert d.stats.collisions == 0
    assert f.inflight(np.array(leaves, dtype=np.int32)).tolist() == [1] * 6
    assert f.inflight(np.array([c + 1, c + 2, c + 3], dtype=np.int32)).tolist() == [0, 0, 0]


@pytest.mark.parametrize("engine", ENGINES)
def test_mcts_select_all_selects_nothing_once_every_budget_is_spent(engine):
    d = _driver(engine, simulations=2, k=3)
    a, b = _tree(d.forest), _tree(d.forest)
    roots, leaves = [], []
    live = {a: TreeState(job=None, root=a, sims=2), b: TreeState(job=None, root=b, sims=2)}
    assert MCTS(d).select_all(live, roots, leaves) == 0
    assert roots == [] and leaves == []


@pytest.mark.parametrize("engine", ENGINES)
def test_mcts_select_new_stays_within_the_remaining_budget(engine):
    d = _driver(engine, simulations=4, k=3)
    p = MCTS(d)
    fresh, late, spent, over = (_tree(d.forest) for _ in range(4))
    roots, leaves = [], []
    assert p.select_new(TreeState(job=None, root=fresh), roots, leaves) == 3
    assert roots == [fresh] * 3 and leaves == [fresh + 1, fresh + 2, fresh + 3]
    roots, leaves = [], []
    assert p.select_new(TreeState(job=None, root=late, sims=3), roots, leaves) == 1  # 4 - 3, not k
    assert roots == [late] and leaves == [late + 1]
    for st in (TreeState(job=None, root=spent, sims=4), TreeState(job=None, root=over, sims=5)):
        roots, leaves = [], []
        assert p.select_new(st, roots, leaves) == 0  # spent (or past) budget: no leaf, no error
        assert roots == [] and leaves == []


@pytest.mark.parametrize("engine", ENGINES)
def test_mcts_collisions_add_to_the_running_count(engine):
    # a bare root: the first of k=3 descents takes it, the other two end on it while in flight (collisions)
    d = _driver(engine, simulations=4, k=3)
    root = _tree(d.forest, n=0)
    d.stats.collisions = 5
    roots, leaves = [], []
    assert MCTS(d).select_new(TreeState(job=None, root=root), roots, leaves) == 1
    assert roots == [root] and leaves == [root]
    assert d.stats.collisions == 7


# ------------------------------------------------------------------ MCTS: when a tree is done
@pytest.mark.parametrize("engine", ENGINES)
def test_mcts_done_at_the_simulation_budget_exactly(engine):
    d = _driver(engine, simulations=4, max_terminals=0)
    root = _tree(d.forest, terminal=[1, 1, 1])  # terminals do not count with max_terminals 0 (off)
    p = MCTS(d)
    got = [p.done(TreeState(job=None, root=root, sims=s)) for s in (0, 3, 4, 5)]
    assert got == [False, False, True, True]


@pytest.mark.parametrize("engine", ENGINES)
def test_mcts_done_when_the_tree_holds_max_terminals(engine):
    d = _driver(engine, simulations=10)
    f = d.forest
    none, one, two = _tree(f, terminal=[0, 0, 0]), _tree(f, terminal=[0, 1, 0]), _tree(f, terminal=[1, 0, 1])
    p = MCTS(d)

    def done(root, budget):
        d.cfg.max_terminals = budget
        return p.done(TreeState(job=None, root=root, sims=1))

    assert [done(r, 1) for r in (none, one, two)] == [False, True, True]
    assert [done(r, 2) for r in (none, one, two)] == [False, False, True]
    assert [done(r, 3) for r in (none, one, two)] == [False, False, False]
    assert [done(r, 0) for r in (none, one, two)] == [False, False, False]  # 0: no terminal budget


# ------------------------------------------------------------------ MCTS extremes: value_rank
def test_value_rank_is_value_then_last_score_and_no_score_ranks_last():
    assert value_rank(_traj(0.75, [0.2, 0.6])) == (0.75, 0.6)
    no_scores = value_rank(_traj(0.5, []))
    assert no_scores == (0.5, -math.inf) and no_scores[1] < 0 and math.isinf(no_scores[1])
    bare, scored = _traj(1.0, []), _traj(1.0, [0.0])
    smax, smin = MCTS(None).extremes(None, [bare, scored])
    assert smax is scored and smin is bare
    assert MCTS(None).extremes(None, []) == (None, None)


# ------------------------------------------------------------------ PaperChains: advancing the two chains
def _chains(heads=(5, 5), active=(True, True)):
    return TreeState(job=None, root=0, heads=list(heads), active=list(active))


IDS = np.array([10, 11, 12, 13])


def test_paper_chains_follow_the_best_and_the_worst_kept_child():
    st = _chains()
    keep = np.array([True, True, False, True])
    # 12 has the lowest reward but was pruned; the min chain takes the worst kept one (11), not the first (10)
    rewards = np.array([0.5, 0.2, 0.1, 0.9], dtype=np.float32)
    PaperChains(None).advance(st, 5, IDS, keep, rewards, np.zeros(4, dtype=bool))
    assert st.heads == [13, 11] and st.active == [True, True]


def test_paper_chains_only_the_chain_whose_head_was_expanded_moves():
    rewards = np.array([0.5, 0.2, 0.1, 0.9], dtype=np.float32)
    keep, terms = np.ones(4, dtype=bool), np.zeros(4, dtype=bool)
    st = _chains(heads=(5, 7))
    PaperChains(None).advance(st, 5, IDS, keep, rewards, terms)
    assert st.heads == [13, 7] and st.active == [True, True]
    st = _chains(heads=(5, 7))
    PaperChains(None).advance(st, 7, IDS, keep, rewards, terms)
    assert st.heads == [5, 12] and st.active == [True, True]
    st = _chains(heads=(5, 5), active=(True, False))  # a stopped chain stays where it stopped
    PaperChains(None).advance(st, 5, IDS, keep, rewards, terms)
    assert st.heads == [13, 5] and st.active == [True, False]


def test_paper_chains_stop_when_every_candidate_was_pruned():
    st = _chains()
    p = PaperChains(None)
    p.advance(st, 5, IDS, np.zeros(4, dtype=bool), np.array([0.5, 0.2, 0.1, 0.9]), np.zeros(4, dtype=bool))
    assert st.heads == [5, 5]
    assert st.active[0] is False and st.active[1] is False  # both chains, each a bool
    assert p.done(st) is True


def test_paper_chains_stop_at_a_terminal_pick():
    st = _chains()
    p = PaperChains(None)
    terms = np.array([False, False, False, True])  # the best child (13) is terminal, the worst (11) is not
    p.advance(st, 5, IDS, np.ones(4, dtype=bool), np.array([0.5, 0.2, 0.3, 0.9]), terms)
    assert st.heads == [13, 11]
    assert st.active[0] is False and st.active[1] is True
    assert p.done(st) is False
    all4 = np.ones(4, dtype=bool)
    p.advance(st, 11, IDS + 10, all4, np.array([0.4, 0.3, 0.2, 0.1]), all4)  # every child terminal
    assert st.heads == [13, 23] and st.active[1] is False and p.done(st) is True


# ------------------------------------------------------------------ PaperChains: Sol_max / Sol_min
@pytest.mark.parametrize("engine", ENGINES)
def test_paper_extremes_are_the_reward_paths_and_none_for_a_bare_root(engine):
    d = _driver(engine)
    f = d.forest
    bare = _tree(f, n=0)
    one = _tree(f, rewards=[0.2, 0.9, 0.5], terminal=[1, 1, 1])
    p = PaperChains(d)
    assert p.extremes(TreeState(job=None, root=bare), []) == (None, None)
    # by reward: 0.9 (one+2), not by visits (all 0: the first child); the worst: 0.2 (one+1)
    assert p.extremes(TreeState(job=None, root=one), []) == ([one, one + 2], [one, one + 1])
    # two levels: the max path follows the highest reward at each level, the min path the lowest
    deep = _tree(f, n=2, rewards=[0.6, 0.3], terminal=[0, 0])
    kids = f.expand(np.array([deep + 1, deep + 2], dtype=np.int32), np.array([2, 2]), np.full(4, 0.5),
                    np.arange(4), np.array([0.1, 0.7, 0.8, 0.4], dtype=np.float32),
                    np.full(4, np.nan, dtype=np.float32), np.ones(4, dtype=np.uint8)).tolist()
    assert p.extremes(TreeState(job=None, root=deep), []) == ([deep, deep + 1, kids[1]],
                                                              [deep, deep + 2, kids[3]])


# ------------------------------------------------------------------ rewards/base.py: scorer_fits
class _WindowScorer:
    """A scorer with a window: an item fits when it has at most two steps (answers 2 / 0, not bools)."""

    def __init__(self):
        self.seen = None

    def fits(self, items):
        self.seen = items
        return [2 if len(steps) <= 2 else 0 for _, steps in items]


def test_scorer_fits_asks_the_scorer_and_returns_booleans():
    items = [("p", ["a"]), ("p", ["a", "b", "c"]), ("q", ["a", "b"])]
    sc = _WindowScorer()
    got = scorer_fits(sc, items)
    assert got == [True, False, True] and all(type(x) is bool for x in got)
    assert sc.seen is items


def test_scorer_fits_every_item_when_the_scorer_has_no_window():
    items = [("p", ["a"]), ("p", ["a", "b", "c"])]
    assert scorer_fits(object(), items) == [True, True]
    assert scorer_fits(object(), []) == []


# ------------------------------------------------------------------ rewards/base.py: combine_outcome
def test_combine_outcome_defaults_replace_with_weight_one():
    assert combine_outcome(0.3, True) == 1.0 and combine_outcome(0.3, False) == 0.0
    assert combine_outcome(0.3, True, "mix") == 1.0 and combine_outcome(0.3, False, "mix") == 0.0
    assert combine_outcome(0.25, True, "add") == 1.25 and combine_outcome(0.25, False, "add") == -0.75


def test_combine_outcome_mix_accepts_both_ends_of_the_weight_range():
    assert combine_outcome(0.3, True, "mix", 0.0) == 0.3
    assert combine_outcome(0.3, False, "mix", 1.0) == 0.0
    assert combine_outcome(0.3, True, "mix", 1.0) == 1.0
    for w in (-0.01, 1.01):
        with pytest.raises(ValueError, match="'mix' needs 0 <= w <= 1"):
            combine_outcome(0.3, True, "mix", w)
