"""sphere/generate/stages.py: every stage outcome and every setting a stage reads, asserted (the mutation run,
scripts/mutation.sh / docs/mutation.md; each test fails on a mutant the rest of the suite let through)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from sphere.generate.stages import StageContext, route, stage1_outcome, stage2_outcome, stage3_outcome
from sphere.search.types import SearchJob, SearchResult, Trajectory

D = "\n\n"
P = {"id": "p0", "problem": "Add: 1, 2", "answer": "3", "source": "mini"}


def _t(text, correct, last=0.5):
    steps = text.split(D)
    return Trajectory(steps, correct, 0.5, [0.0] * len(steps), [0.5] * (len(steps) - 1) + [last], "answer")


def _res(sol_max, sol_min=None, terminals=()):
    job = SearchJob("p0", P, lambda steps: [])
    return SearchResult(job=job, sol_max=sol_max, sol_min=sol_min, terminals=list(terminals), nodes=1,
                        expansions=1)


def _ctx(**kw):
    base = dict(delim=D, inverted="swap", stage2=True, stage3=True, plain_stage2_prompt=True,
                drop_attempt_refs=True, rejected_needs_answer=True, policy_name="pol", small_name="small",
                config_hash="h", conversational=False, response_prefix="",
                pair_prompt=lambda p, attempt: "Q:" + p["problem"] + ("|A:" + D.join(attempt.steps)
                                                                      if attempt is not None else ""))
    return StageContext(**{**base, **kw})


RIGHT = _t("1 + 2 = 3\n\n\\boxed{3}", True)
WRONG = _t("1 + 2 = 4\n\n\\boxed{4}", False)


def _cfg(**stages_filters):
    st = {"inverted": "drop", "stage2": False, "stage3": True, "stage2_prompt_with_attempt": False}
    fl = {"stage2_drop_attempt_refs": False, "stage3_rejected_needs_answer": False}
    for k, v in stages_filters.items():
        (st if k in st else fl)[k] = v
    return OmegaConf.create({"stages": st, "filters": fl})


def test_context_from_config_reads_every_setting():
    pp = lambda p, a: "x"  # noqa: E731
    kw = dict(delim="\n", policy_name="P", small_name="S", config_hash="c", conversational=True,
              response_prefix="<think>\n", pair_prompt=pp)
    c = StageContext.from_config(_cfg(), **kw)
    assert c == StageContext(delim="\n", inverted="drop", stage2=False, stage3=True, plain_stage2_prompt=True,
                             drop_attempt_refs=False, rejected_needs_answer=False, policy_name="P",
                             small_name="S", config_hash="c", conversational=True,
                             response_prefix="<think>\n",
                             pair_prompt=pp)
    c = StageContext.from_config(_cfg(inverted="swap", stage2=True, stage3=False,
                                      stage2_drop_attempt_refs=True,
                                      stage3_rejected_needs_answer=True), **kw)
    assert (c.inverted, c.stage2, c.stage3, c.drop_attempt_refs, c.rejected_needs_answer) == \
        ("swap", True, False, True, True)
    # the attempt-reference filter applies only on the plain prompt
    c = StageContext.from_config(_cfg(stage2_prompt_with_attempt=True, stage2_drop_attempt_refs=True), **kw)
    assert c.plain_stage2_prompt is False and c.drop_attempt_refs is False
    # defaults when the filters are not set: both on
    bare = OmegaConf.create({"stages": {"inverted": "swap", "stage2": True, "stage3": True,
                                        "stage2_prompt_with_attempt": False}, "filters": {}})
    c = StageContext.from_config(bare, **kw)
    assert c.drop_attempt_refs is True and c.rejected_needs_answer is True


def test_context_pair_passes_its_settings_to_the_record():
    c = _ctx(conversational=True, response_prefix="<t>", config_hash="hh")
    rec = c.pair(3, P, "prompt", RIGHT, WRONG, rejected_model="other", extra={"route": "x"})
    assert rec["stage"] == 3 and rec["prompt"] == "prompt" and rec["problem_id"] == "p0"
    assert rec["chosen"] == [{"role": "assistant", "content": "<t>" + D.join(RIGHT.steps)}]
    assert rec["rejected"] == [{"role": "assistant", "content": "<t>" + D.join(WRONG.steps)}]
    assert (rec["chosen_model"], rec["rejected_model"], rec["config_hash"], rec["route"]) == \
        ("pol", "other", "hh", "x")
    assert c.pair(1, P, "p", RIGHT, WRONG)["rejected_model"] == "pol"  # the policy by default
    plain = _ctx(delim="|").pair(1, P, "p", RIGHT, WRONG)
    assert plain["chosen"] == "|".join(RIGHT.steps)


@pytest.mark.parametrize("mx,mn,want", [
    (None, None, "no_chain"), (RIGHT, WRONG, "pair"), (RIGHT, RIGHT, "both_right"), (WRONG, WRONG,
                                                                                     "both_wrong"),
    (WRONG, RIGHT, "inverted"), (RIGHT, None, "pair"), (None, WRONG, "both_wrong"), (None, RIGHT, "inverted"),
    (WRONG, None, "both_wrong"),
])
def test_route(mx, mn, want):
    assert route(mx, mn) == want


def test_stage1_next_stage_follows_the_switches():
    assert stage1_outcome(_res(WRONG, WRONG), P, _ctx())[::2] == ("both_wrong", 2)
    assert stage1_outcome(_res(WRONG, WRONG), P, _ctx(stage2=False))[::2] == ("both_wrong", None)
    assert stage1_outcome(_res(RIGHT, RIGHT), P, _ctx())[::2] == ("both_right", 3)
    assert stage1_outcome(_res(RIGHT, RIGHT), P, _ctx(stage3=False))[::2] == ("both_right", None)
    assert stage1_outcome(_res(WRONG, WRONG), P, _ctx(stage3=False))[2] == 2
    assert stage1_outcome(_res(RIGHT, RIGHT), P, _ctx(stage2=False))[2] == 3
    rt, pairs, nxt = stage1_outcome(_res(RIGHT, WRONG), P, _ctx())
    assert (rt, nxt, len(pairs)) == ("pair", None, 1)
    assert pairs[0]["stage"] == 1 and pairs[0]["prompt"] == "Q:Add: 1, 2" and pairs[0]["route"] == "pair"
    assert pairs[0]["chosen_model"] == pairs[0]["rejected_model"] == "pol"
    rt, pairs, nxt = stage1_outcome(_res(WRONG, RIGHT), P, _ctx())
    assert (rt, nxt) == ("inverted", None) and pairs[0]["route"] == "inverted"
    assert pairs[0]["chosen_correct"] and not pairs[0]["rejected_correct"]
    assert stage1_outcome(_res(None, None), P, _ctx()) == ("no_chain", [], None)


def test_stage2_corrected_pair_and_its_prompt():
    attempt = WRONG
    fix = _t("1 + 2 = 3\n\n\\boxed{3}", True)
    rt, pairs = stage2_outcome(_res(fix), P, attempt, _ctx())
    assert rt == "corrected" and len(pairs) == 1
    pr = pairs[0]
    assert pr["stage"] == 2 and pr["prompt"] == "Q:Add: 1, 2"  # the plain prompt
    assert pr["chosen"] == D.join(fix.steps) and pr["rejected"] == D.join(attempt.steps)
    assert pr["rejected_model"] == "pol"
    # with the attempt in the prompt (stages.stage2_prompt_with_attempt)
    _, pairs = stage2_outcome(_res(fix), P, attempt, _ctx(plain_stage2_prompt=False))
    assert pairs[0]["prompt"] == "Q:Add: 1, 2|A:" + D.join(attempt.steps)
    # a correct attempt needs no correction; no correct solution: uncorrected
    assert stage2_outcome(_res(fix), P, RIGHT, _ctx()) == ("uncorrected", [])
    assert stage2_outcome(_res(WRONG, terminals=[WRONG]), P, attempt, _ctx()) == ("uncorrected", [])


def test_stage2_drops_a_chosen_that_refers_to_the_attempt_only_when_asked():
    refers = _t("The previous attempt is wrong: 1 + 2 = 3\n\n\\boxed{3}", True, last=0.9)
    clean = _t("1 + 2 = 3\n\n\\boxed{3}", True, last=0.2)
    rt, pairs = stage2_outcome(_res(refers, terminals=[refers, clean]), P, WRONG, _ctx())
    assert rt == "corrected" and pairs[0]["chosen"] == D.join(clean.steps)
    _, pairs = stage2_outcome(_res(refers, terminals=[refers, clean]), P, WRONG,
                              _ctx(drop_attempt_refs=False))
    assert pairs[0]["chosen"] == D.join(refers.steps)
    # the highest-ranked qualifying terminal when Sol_max does not qualify
    better = _t("3 = 1 + 2\n\n\\boxed{3}", True, last=0.8)
    _, pairs = stage2_outcome(_res(WRONG, terminals=[WRONG, clean, better]), P, WRONG, _ctx())
    assert pairs[0]["chosen"] == D.join(better.steps)


def test_stage3_contrast_needs_a_correct_chosen_and_a_wrong_with_an_answer():
    small_wrong = _t("1 + 2 = 5\n\n\\boxed{5}", False)
    rt, pairs = stage3_outcome(_res(small_wrong), P, RIGHT, _ctx())
    assert rt == "contrast" and len(pairs) == 1
    pr = pairs[0]
    assert pr["stage"] == 3 and pr["prompt"] == "Q:Add: 1, 2" and pr["rejected_model"] == "small"
    assert pr["chosen_model"] == "pol"
    assert pr["chosen"] == D.join(RIGHT.steps) and pr["rejected"] == D.join(small_wrong.steps)
    assert stage3_outcome(_res(small_wrong), P, None, _ctx()) == ("no_wrong", [])
    assert stage3_outcome(_res(small_wrong), P, WRONG, _ctx()) == ("no_wrong", [])
    assert stage3_outcome(_res(RIGHT, terminals=[RIGHT]), P, RIGHT, _ctx()) == ("no_wrong", [])
    no_answer = _t("1 + 2 = 5", False)
    assert stage3_outcome(_res(no_answer, terminals=[no_answer]), P, RIGHT, _ctx()) == ("no_wrong", [])
    rt, pairs = stage3_outcome(_res(no_answer, terminals=[no_answer]), P, RIGHT,
                               _ctx(rejected_needs_answer=False))
    assert rt == "contrast" and pairs[0]["rejected"] == "1 + 2 = 5"
    # the answer check reads the context's delimiter
    split = Trajectory(["\\boxed{5", "x"], False, 0.5, [0.0, 0.0], [0.5, 0.5], "answer")
    assert stage3_outcome(_res(split, terminals=[split]), P, RIGHT, _ctx(delim="}"))[0] == "contrast"
    assert stage3_outcome(_res(split, terminals=[split]), P, RIGHT, _ctx())[0] == "no_wrong"
