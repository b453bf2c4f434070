"""sphere/generate/pairs.py: the pair record, the filters and the picks, asserted field by field (the mutation
run, scripts/mutation.sh / docs/mutation.md, found these unasserted; each test fails on such a mutant)."""

from __future__ import annotations

import difflib

import pytest
from omegaconf import OmegaConf

from sphere.generate import pairs as P
from sphere.generate.pairs import (
    PairFilter,
    _line_matches,
    edit_distance,
    filter_pairs,
    has_final_answer,
    make_pair,
    mentions_attempt,
    pick_solution,
    prm_rank,
)
from sphere.search.types import Trajectory

D = "\n\n"


def _t(steps, correct, value=0.0, rewards=None, scores=None):
    return Trajectory(list(steps), correct, value, list(rewards or [0.1] * len(steps)),
                      list(scores if scores is not None else [0.5] * len(steps)), "answer")


def _cfg(**kw):
    base = {"dedup": True, "min_margin": 0.0, "min_edit_distance": 0.0, "max_length_ratio": 0.0}
    return OmegaConf.create({**base, **kw})


def test_filter_from_config_reads_every_field():
    f = PairFilter.from_cfg(_cfg(dedup=False, min_margin=0.25, min_edit_distance=0.5, max_length_ratio=2.5,
                                 chosen_min_step_score=0.75))
    assert f == PairFilter(dedup=False, min_margin=0.25, min_edit_distance=0.5, max_length_ratio=2.5,
                           chosen_min_step_score=0.75)
    assert PairFilter.from_cfg(_cfg()).chosen_min_step_score == 0.0
    assert PairFilter.from_cfg(_cfg(chosen_min_step_score=None)).chosen_min_step_score == 0.0
    top = PairFilter.from_cfg(_cfg(chosen_min_step_score=1.0, min_edit_distance=1.0))
    assert top.min_edit_distance == 1.0
    assert PairFilter.from_cfg(_cfg(max_length_ratio=1.0)).max_length_ratio == 1.0


@pytest.mark.parametrize("kw,msg", [
    ({"min_edit_distance": 1.5}, r"^config filters.min_edit_distance=1.5: allowed \[0, 1\]$"),
    ({"min_edit_distance": -0.1}, r"^config filters.min_edit_distance=-0.1: allowed \[0, 1\]$"),
    ({"max_length_ratio": 0.5}, r"^config filters.max_length_ratio=0.5: allowed 0 \(off\) or >= 1$"),
    ({"chosen_min_step_score": 1.5},
     r"^config filters.chosen_min_step_score=1.5: allowed \[0, 1\] \(a raw step score; 0 = off\)$"),
    ({"chosen_min_step_score": -0.5}, r"^config filters.chosen_min_step_score=-0.5"),
])
def test_filter_from_config_refuses_out_of_range(kw, msg):
    with pytest.raises(ValueError, match=msg):
        PairFilter.from_cfg(_cfg(**kw))


def test_prm_rank_is_last_score_then_weakest_step():
    assert prm_rank(_t(["a", "b", "c"], True, scores=[0.2, 0.9, 0.6])) == (0.6, 0.2)
    assert prm_rank(_t([], True, scores=[])) == (float("-inf"), float("-inf"))


def test_has_final_answer_reads_the_joined_steps():
    assert has_final_answer(_t(["x", "so \\boxed{3}"], False))
    assert not has_final_answer(_t(["x", "so 3"], False))
    assert has_final_answer(_t(["\\boxed{", "3}"], False), delimiter="")  # the delimiter joins the steps
    assert has_final_answer(_t(["\\boxed{3", "x"], False), delimiter="}")  # joined: "\\boxed{3}x"
    assert not has_final_answer(_t(["\\boxed{3", "x"], False))  # joined by "\n\n": never closed
    assert has_final_answer(_t(["\\boxed{3}"], False))  # default delimiter


@pytest.mark.parametrize("text", [
    "The previous attempt is wrong.", "this attempted solution forgot a sign", "my solution above is fine",
    "the solution to review", "The given solution adds wrongly", "the original solution",
    "first incorrect step",
    "The mistake is in step 2", "the error occurs here", "Corrected solution:", "Reviewing the solution",
    "review this solution", "THE ATTEMPT", "the earlier attempt",
])
def test_mentions_attempt(text):
    assert mentions_attempt(text)


@pytest.mark.parametrize("text", ["We attempt to add 1 and 2.", "the solution is 3", "no error here",
                                  "an incorrect answer"])
def test_mentions_attempt_not_on_plain_solutions(text):
    assert not mentions_attempt(text)


def test_pick_solution_best_and_worst_by_rank():
    lo = _t(["a"], False, scores=[0.1])
    mid = _t(["b"], False, scores=[0.5])
    hi = _t(["c"], False, scores=[0.9])
    right = _t(["d"], True, scores=[1.0])
    wrong = lambda t: not t.correct  # noqa: E731
    assert pick_solution(None, [lo, hi, mid, right], wrong, best=True) is hi
    assert pick_solution(None, [mid, lo, hi, right], wrong, best=False) is lo
    assert pick_solution(None, [lo, hi], wrong) is hi  # best is the default
    assert pick_solution(mid, [lo, hi], wrong, best=True) is mid  # the qualifying extreme wins
    assert pick_solution(right, [lo, hi], wrong, best=True) is hi  # a non-qualifying extreme does not
    assert pick_solution(None, [right], wrong) is None
    assert pick_solution(None, [], wrong) is None


def _ref_distance(a, b):
    return 1.0 - difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def test_edit_distance_exact_on_short_texts():
    assert edit_distance("", "") == 0.0
    assert edit_distance("abc", "") == 1.0
    assert edit_distance("abcd", "abcd") == 0.0
    a, b = "1 + 2 = 3\n\nso \\boxed{3}", "1 + 2 = 4\n\nso \\boxed{4}"
    assert edit_distance(a, b) == pytest.approx(_ref_distance(a, b))
    # autojunk off: a text with a popular character (>1% of 200+ chars) is still matched exactly
    a = "x" * 150 + "abc" * 30 + "y"
    b = "x" * 150 + "abd" * 30 + "y"
    assert edit_distance(a, b) == pytest.approx(_ref_distance(a, b))


def test_edit_distance_above_the_budget_matches_prefix_suffix_then_the_middle(monkeypatch):
    """Above the budget: common prefix and suffix first, then the middle by characters (when it fits the
    budget), by lines (when the lines do), else difflib's quick_ratio."""
    a = "PRE" + "x\nbeta\ngamma\ny" + "SUF"
    b = "PRE" + "z\nbeta\ngamma\nw" + "SUF"
    n = len(a) + len(b)
    ma, mb = "x\nbeta\ngamma\ny", "z\nbeta\ngamma\nw"  # 14 characters each, 4 lines each
    assert n == 40 and len(ma) == len(mb) == 14
    monkeypatch.setattr(P, "EXACT_EDIT_BUDGET", 14 * 14)  # the middle fits by characters
    chars = difflib.SequenceMatcher(None, ma, mb, autojunk=False).ratio() * 14
    assert chars == pytest.approx(12.0)
    assert edit_distance(a, b) == pytest.approx(1 - 2 * (3 + 3 + 12) / n)
    monkeypatch.setattr(P, "EXACT_EDIT_BUDGET", 14 * 14 - 1)  # by lines: "beta\n" and "gamma\n" match
    assert _line_matches(ma, mb) == 11.0
    assert edit_distance(a, b) == pytest.approx(1 - 2 * (3 + 3 + 11) / n)
    monkeypatch.setattr(P, "EXACT_EDIT_BUDGET", 15)  # 4 x 4 lines > 15: quick_ratio (multisets)
    qr = difflib.SequenceMatcher(None, ma, mb, autojunk=False).quick_ratio()
    assert qr == pytest.approx(12 / 14)
    assert edit_distance(a, b) == pytest.approx(1 - 2 * (3 + 3 + 12) / n)
    # the whole texts within the budget: exact, no prefix/suffix split
    monkeypatch.setattr(P, "EXACT_EDIT_BUDGET", 20 * 20)
    assert edit_distance(a, b) == pytest.approx(_ref_distance(a, b))
    # identical texts above the budget: distance 0; texts differing at the end only
    monkeypatch.setattr(P, "EXACT_EDIT_BUDGET", 1)
    assert edit_distance("abc", "abc") == 0.0
    assert edit_distance("abcX", "abcY") == pytest.approx(1 - 2 * 3 / 8)
    assert edit_distance("Xabc", "Yabc") == pytest.approx(1 - 2 * 3 / 8)
    assert edit_distance("ab", "abab") == pytest.approx(1 - 2 * 2 / 6)


def test_line_matches_counts_matched_line_characters(monkeypatch):
    # characters of the matched lines (line ends kept), blank lines left out
    assert _line_matches("x\nyy\n\nzzz\n", "x\nQ\n\nzzz\n") == float(len("x\n") + len("zzz\n"))
    assert _line_matches("x\ny", "x\ny") == 3.0
    assert _line_matches("a\n\n\n\nb", "a\nb") == 3.0
    # many identical lines are matched one for one (no autojunk: difflib would drop lines seen in over 1% of
    # a 200+ line text from its index, and match none of them)
    assert _line_matches("k\n" * 300 + "z\n", "q\n" + "k\n" * 300) == 600.0
    monkeypatch.setattr(P, "EXACT_EDIT_BUDGET", 3)
    assert _line_matches("a\nb\n", "a\nb\n") is None  # 2 x 2 lines > 3
    monkeypatch.setattr(P, "EXACT_EDIT_BUDGET", 4)
    assert _line_matches("a\nb\n", "a\nb\n") == 4.0  # 2 x 2 = 4: within


def _pair(chosen, rejected, conversational=False, extra=None, prefix=""):
    return make_pair(stage=2, problem={"id": 7, "problem": "q", "source": "gsm8k"}, prompt="P:",
                     chosen=chosen, rejected=rejected, delimiter=D, chosen_model="pol",
                     rejected_model="small",
                     config_hash="h1", conversational=conversational, extra=extra, response_prefix=prefix)


def test_make_pair_record_field_by_field():
    c = _t(["1 + 2 = 3", "\\boxed{3}"], True, value=0.75, rewards=[0.25, 0.5], scores=[0.9, 0.8])
    r = _t(["1 + 2 = 4", "\\boxed{4}"], False, value=0.125, rewards=[-0.25, -0.5], scores=[0.1, 0.2])
    rec = _pair(c, r, extra={"route": "pair"})
    assert rec == {
        "prompt": "P:", "chosen": "1 + 2 = 3\n\n\\boxed{3}", "rejected": "1 + 2 = 4\n\n\\boxed{4}",
        "stage": 2,
        "problem_id": "7", "source": "gsm8k", "chosen_correct": True, "rejected_correct": False,
        "chosen_value": 0.75, "rejected_value": 0.125, "chosen_rewards": [0.25, 0.5],
        "rejected_rewards": [-0.25, -0.5], "chosen_scores": [0.9, 0.8], "rejected_scores": [0.1, 0.2],
        "margin": 0.625, "edit_distance": edit_distance("1 + 2 = 3\n\n\\boxed{3}", "1 + 2 = 4\n\n\\boxed{4}"),
        "chosen_model": "pol", "rejected_model": "small", "config_hash": "h1", "route": "pair"}
    assert 0 < rec["edit_distance"] < 1
    conv = _pair(c, r, conversational=True, prefix="<think>\n")
    assert conv["chosen"] == [{"role": "assistant", "content": "<think>\n1 + 2 = 3\n\n\\boxed{3}"}]
    assert conv["rejected"] == [{"role": "assistant", "content": "<think>\n1 + 2 = 4\n\n\\boxed{4}"}]
    assert "route" not in conv
    nosrc = make_pair(stage=1, problem={"id": "a"}, prompt="p", chosen=c, rejected=r, delimiter=D,
                      chosen_model="m", rejected_model="m", config_hash="h", conversational=False)
    assert nosrc["source"] == "" and nosrc["stage"] == 1


def _rec(**kw):
    base = {"prompt": "p", "chosen": "right", "rejected": "wrong", "chosen_correct": True,
            "rejected_correct": False, "margin": 0.5, "edit_distance": 0.5, "chosen_scores": [0.9]}
    return {**base, **kw}


def test_filter_pairs_each_reason_and_its_boundary():
    none = {"dedup": 0, "min_margin": 0, "min_edit_distance": 0, "length_ratio": 0, "not_contrastive": 0,
            "chosen_step_score": 0}
    f = PairFilter(dedup=True, min_margin=0.5, min_edit_distance=0.5, max_length_ratio=2.0,
                   chosen_min_step_score=0.9)
    ok = _rec()
    cases = [
        (_rec(chosen_correct=False), "not_contrastive"), (_rec(rejected_correct=True), "not_contrastive"),
        (_rec(chosen_correct=False, rejected_correct=True), "not_contrastive"),
        (_rec(margin=0.4999), "min_margin"), (_rec(edit_distance=0.4999), "min_edit_distance"),
        (_rec(chosen="r" * 11, rejected="w" * 5), "length_ratio"),
        (_rec(chosen="r" * 5, rejected="w" * 11), "length_ratio"),
        (_rec(chosen_scores=[0.95, 0.8999]), "chosen_step_score"),
    ]
    for rec, why in cases:
        kept, drops = filter_pairs([rec], f)
        assert kept == [] and drops == {**none, why: 1}, (rec, why)
    # at the boundaries: kept
    for rec in (ok, _rec(margin=0.5), _rec(edit_distance=0.5), _rec(chosen="r" * 10, rejected="w" * 5),
                _rec(chosen_scores=[0.9, 1.0]), _rec(chosen_scores=[]), _rec(chosen_scores=None)):
        rec.setdefault("chosen_scores", None)
        kept, drops = filter_pairs([rec], f)
        assert kept == [rec] and drops == none, rec
    # empty texts: the ratio's denominator is at least 1
    kept, _ = filter_pairs([_rec(chosen="", rejected="ab")], f)
    assert kept
    kept, drops = filter_pairs([_rec(chosen="", rejected="abc")], f)
    assert not kept and drops["length_ratio"] == 1


def test_filter_pairs_off_switches_and_dedup():
    off = PairFilter(dedup=False, min_margin=-1.0, min_edit_distance=0.0, max_length_ratio=0.0,
                     chosen_min_step_score=0.0)
    recs = [_rec(chosen="r" * 100, rejected="w", chosen_scores=[0.0]), _rec(chosen="r" * 100, rejected="w",
                                                                          chosen_scores=[0.0])]
    kept, drops = filter_pairs(recs, off)
    assert kept == recs and sum(drops.values()) == 0
    dd = PairFilter(dedup=True, min_margin=-1.0)
    a, b, c = _rec(), _rec(), _rec(rejected="other")
    d = _rec(prompt=[{"role": "user", "content": "p"}])
    e = _rec(prompt="p\x00right", chosen="wrong")  # the fields are joined with a separator
    kept, drops = filter_pairs([a, b, c, d, e], dd)
    assert kept == [a, c, d, e] and drops["dedup"] == 1
    # the dedup key covers the message lists of conversational records
    m1 = _rec(chosen=[{"role": "assistant", "content": "x"}])
    m2 = _rec(chosen=[{"role": "assistant", "content": "y"}])
    kept, drops = filter_pairs([m1, m2, dict(m1)], dd)
    assert kept == [m1, m2] and drops["dedup"] == 1
    # a dropped pair (not contrastive) does not take a dedup slot
    bad = _rec(chosen_correct=False)
    kept, drops = filter_pairs([bad, _rec(chosen_correct=True)], dd)
    assert len(kept) == 1 and drops["not_contrastive"] == 1 and drops["dedup"] == 0
    # several of one reason are counted
    kept, drops = filter_pairs([_rec(margin=-2.0), _rec(margin=-3.0, chosen="x")], dd)
    assert kept == [] and drops["min_margin"] == 2


def test_make_pair_records_correctness_as_given_and_no_prefix_by_default():
    """The stages write pairs before the filters: a record must carry rejected_correct=True when it is."""
    c = _t(["\\boxed{3}"], True)
    r = _t(["\\boxed{4}"], False)
    swapped = make_pair(stage=1, problem={"id": "a"}, prompt="p", chosen=r, rejected=c, delimiter=D,
                        chosen_model="m", rejected_model="m", config_hash="h", conversational=False)
    assert swapped["chosen_correct"] is False and swapped["rejected_correct"] is True
    conv = make_pair(stage=1, problem={"id": "a"}, prompt="p", chosen=c, rejected=r, delimiter=D,
                     chosen_model="m", rejected_model="m", config_hash="h", conversational=True)
    assert conv["chosen"] == [{"role": "assistant", "content": "\\boxed{3}"}]


def test_edit_distance_at_the_budget_is_exact(monkeypatch):
    """len(a) * len(b) == the budget still takes the exact (whole-text) difflib path."""
    seen = []
    real = difflib.SequenceMatcher

    class Spy(real):
        def __init__(self, isjunk=None, a="", b="", autojunk=True):
            seen.append((a, b))
            super().__init__(isjunk, a, b, autojunk)

    a, b = "abXcd", "abYcd"
    monkeypatch.setattr(P, "EXACT_EDIT_BUDGET", len(a) * len(b))
    monkeypatch.setattr(difflib, "SequenceMatcher", Spy)
    edit_distance(a, b)
    assert seen == [(a, b)]
    seen.clear()
    monkeypatch.setattr(P, "EXACT_EDIT_BUDGET", len(a) * len(b) - 1)
    edit_distance(a, b)
    assert seen == [("X", "Y")]


def test_dedup_and_length_of_message_lists_ignore_key_order_and_keep_unicode():
    dd = PairFilter(dedup=True, min_margin=-1.0)
    m1 = _rec(chosen=[{"role": "assistant", "content": "x"}])
    m2 = _rec(chosen=[{"content": "x", "role": "assistant"}])  # the same message, keys in another order
    kept, drops = filter_pairs([m1, m2], dd)
    assert kept == [m1] and drops["dedup"] == 1
    # lengths are compared on the text as written (a non-ASCII character is one character, not \\uXXXX)
    ratio = PairFilter(dedup=False, min_margin=-1.0, max_length_ratio=1.5)
    u = _rec(chosen=[{"role": "assistant", "content": "é" * 40}], rejected=[{"role": "assistant",
                                                                              "content": "e" * 40}])
    kept, drops = filter_pairs([u], ratio)
    assert kept == [u] and drops["length_ratio"] == 0


def test_edit_distance_middle_without_autojunk(monkeypatch):
    """The middle of two long texts is matched without difflib's autojunk (which drops characters seen in over
    1% of a 200+ character text: every character of a long solution)."""
    ma, mb = "X" + "ab" * 150 + "Y", "Z" + "ab" * 150 + "W"
    a, b = "P" + ma + "S", "P" + mb + "S"
    monkeypatch.setattr(P, "EXACT_EDIT_BUDGET", len(ma) * len(mb))
    assert edit_distance(a, b) == pytest.approx(1 - 2 * (1 + 1 + 300) / (len(a) + len(b)))


def test_not_contrastive_drops_are_counted():
    kept, drops = filter_pairs([_rec(chosen_correct=False), _rec(rejected_correct=True, chosen="c")],
                               PairFilter())
    assert kept == [] and drops["not_contrastive"] == 2


def test_every_drop_is_counted_and_the_pairs_after_a_drop_still_filtered():
    f = PairFilter(dedup=True, min_margin=0.5, min_edit_distance=0.5, max_length_ratio=2.0,
                   chosen_min_step_score=0.9)
    good = [_rec(prompt=f"good{i}") for i in range(7)]
    stream = [
        _rec(prompt="d"), _rec(prompt="d"), _rec(prompt="d"), good[0],  # 2 duplicates
        _rec(prompt="e1", edit_distance=0.1), _rec(prompt="e2", edit_distance=0.2), good[1],
        _rec(prompt="l1", chosen="r" * 50), _rec(prompt="l2", rejected="w" * 50), good[2],
        _rec(prompt="s1", chosen_scores=[0.1]), _rec(prompt="s2", chosen_scores=[0.5]), good[3],
        _rec(prompt="m1", margin=0.1), _rec(prompt="m2", margin=0.2), good[4],
    ]
    kept, drops = filter_pairs(stream, f)
    assert kept == [stream[0]] + good[:5]
    assert drops == {"dedup": 2, "min_margin": 2, "min_edit_distance": 2, "length_ratio": 2,
                     "not_contrastive": 0, "chosen_step_score": 2}


def test_filter_from_config_dedup_on():
    assert PairFilter.from_cfg(_cfg(dedup=True)).dedup is True
    assert PairFilter.from_cfg(_cfg(dedup=False)).dedup is False
