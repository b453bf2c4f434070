"""Shared-prefix PRM scoring (issue 34): the E candidates of an expansion over one prefix, computed once, give the
scores of separate scoring (kv cache form and packed tree-attention form), on the stand-in PRM."""

from __future__ import annotations

import pytest

from sphere.rewards.shared_prefix import common_prefix_len, group_rows

PROBLEM = "Ann has 12 coins. Ann gets 5, then gets 3, then gives 4 away. How many coins now?"
STEPS = ["First, 12 + 5 = 17.", "Then, 17 + 3 = 20.", "Next, 20 - 4 = 16.", "So Ann has 16 coins left."] * 3
CANDS = ["The answer is \\boxed{16}.", "So 16 + 1 = 17.", "Then 7 * 3 = 21.", "Hence the total is 16.",
         "Check: 12 + 5 + 3 - 4 = 16."]
TOL = 1e-4  # fp32 (the bound)


@pytest.fixture(scope="module")
def standin_prm_path():
    from sphere.model_paths import resolve_model

    return resolve_model("standin-qwen2_5-prm", None)


def _scorer(path, mode, **kw):
    from sphere.rewards.prm import PRMScorer

    return PRMScorer(None, path, engine="transformers", device="cpu", shared_prefix=mode, **kw)


@pytest.fixture(scope="module")
def scorers(standin_prm_path):
    return {m: _scorer(standin_prm_path, m, batch_size=4) for m in ("off", "kv", "packed")}


def _max_diff(a, b):
    assert [len(x) for x in a] == [len(y) for y in b]
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def _round_items():
    """One search round's scorer call: two expansions of one problem (E=5 at depth 12, E=5 at depth 3), a
    stage-3 style 2E expansion of the same node, and an expansion of another problem."""
    items = [(PROBLEM, STEPS + [c]) for c in CANDS]
    items += [(PROBLEM, STEPS[:3] + [c]) for c in CANDS]
    items += [(PROBLEM, STEPS[:6] + [c]) for c in CANDS + [c + " Done." for c in CANDS]]
    items += [("What is 3 + 4?", ["3 + 4 = 7.", c]) for c in CANDS]
    return items


@pytest.mark.parametrize("mode", ["kv", "packed"])
def test_shared_prefix_scores_equal_separate(scorers, mode):
    items = _round_items()
    before = dict(scorers[mode].stats())
    ref = scorers["off"].score(items)
    got = scorers[mode].score(items)
    assert _max_diff(ref, got) <= TOL
    st = scorers[mode].stats()
    assert st["groups"] - before["groups"] >= 3  # the expansions became groups (not one row each)
    assert st["tokens_shared"] > before["tokens_shared"]


def test_shared_prefix_computes_fewer_tokens_per_expansion(scorers):
    """E=5 candidates over a 12-step prefix: the prefix is computed once, not five times."""
    items = [(PROBLEM, STEPS + [c]) for c in CANDS]
    off0, kv0 = scorers["off"].stats()["tokens_computed"], scorers["kv"].stats()["tokens_computed"]
    scorers["off"].score(items)
    scorers["kv"].score(items)
    off = scorers["off"].stats()["tokens_computed"] - off0
    kv = scorers["kv"].stats()["tokens_computed"] - kv0
    assert off / kv >= 3.0, (off, kv)


def test_step_that_tokenises_differently_at_the_boundary(scorers):
    """'... 20 coin' is a text prefix of '... 20 coins.', yet its last token 'Ġcoin' is not a token of the
    longer step ('Ġcoins'): only the longest common TOKEN prefix may be shared. Each candidate is tokenised
    whole, so the shared part ends before the merge, and the scores are those of separate scoring."""
    kv = scorers["kv"]
    short, long = "So the total is 20 coin", "So the total is 20 coins."
    tok = kv.tokenizer
    s_ids, l_ids = (tok(x, add_special_tokens=False)["input_ids"] for x in (short, long))
    assert l_ids[: len(s_ids)] != s_ids  # the boundary case is real on this tokenizer
    items = [(PROBLEM, STEPS[:2] + [c]) for c in (short, long, "So the total is 20", "So the total is 2")]
    rows = [kv.build_ids(p, s) for p, s in items]
    # The short and long steps' rows part at 'Ġcoin' / 'Ġcoins', before their text does.
    n = common_prefix_len(rows[0], rows[1])
    assert tok.decode(rows[0][:n]).endswith("So the total is 20")
    ref = scorers["off"].score(items)
    for mode in ("kv", "packed"):
        assert _max_diff(ref, scorers[mode].score(items)) <= TOL


def test_row_that_is_a_prefix_of_another(scorers, standin_prm_path):
    """Rows given as token ids: one row is the whole prefix of the others (no continuation of its own)."""
    import torch

    from sphere.rewards.shared_prefix import probs_shared

    kv = scorers["kv"]
    base = kv.build_ids(PROBLEM, STEPS[:4])
    rows = [base, base + base[-9:], base + base[-5:], base + base[-30:]]
    ref = kv._model  # the same weights for both paths
    off = scorers["off"]._probs_hf(rows)
    for mode in ("kv", "packed"):
        got = probs_shared(ref, rows, kv.tag_id, device=torch.device("cpu"), pad_id=0, batch_size=2,
                           mode=mode, min_shared=4)
        assert _max_diff(off, got) <= TOL


def test_group_rows_keeps_sibling_groups_and_leaves_strays():
    prefix = list(range(100, 400))  # 300 shared tokens
    sibs = [prefix + [1, 2, k] for k in range(5)]
    stray = prefix[:20] + [7, 7, 7]  # shares only 20 tokens (the system prompt and problem)
    alone = [9] * 50
    groups = group_rows(sibs + [stray, alone], min_shared=16)
    by_rows = {tuple(sorted(idx)): n for n, idx in groups}
    assert by_rows[(0, 1, 2, 3, 4)] == 302  # the siblings share 300 + [1, 2]
    assert by_rows[(5,)] == len(stray)  # not merged: it would cut the siblings' saving from 4*302 to 5*20
    assert by_rows[(6,)] == 50
    assert sorted(i for _, idx in groups for i in idx) == list(range(7))


def test_group_rows_min_shared():
    a, b = [1, 2, 3, 4, 5], [1, 2, 3, 9, 9]
    assert len(group_rows([a, b], min_shared=4)) == 2
    assert group_rows([a, b], min_shared=3) == [(3, [0, 1])]


@pytest.mark.parametrize("key,value", [("shared_prefix", "tree"), ("shared_prefix_min", 0)])
def test_bad_setting_is_one_line_naming_the_key(standin_prm_path, key, value):
    from sphere.rewards.prm import PRMScorer

    with pytest.raises(ValueError, match=f"scorer.{key}="):
        PRMScorer(None, standin_prm_path, engine="transformers", device="cpu", **{key: value})
