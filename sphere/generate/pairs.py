"""Preference pairs from search results, and the filters applied before they are written.

A pair is (chosen = a correct trajectory, rejected = a wrong one) for one prompt. ``pairs.jsonl`` uses
TRL's preference format: ``prompt``/``chosen``/``rejected`` as strings (plain models) or as message lists
(models with a chat template), plus provenance fields.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from sphere.backends.base import has_boxed_answer
from sphere.search.types import Trajectory


@dataclass
class PairFilter:
    """Filters (conf/generate.yaml ``filters``)."""

    dedup: bool = True
    min_margin: float = 0.0  # value(chosen) - value(rejected) must be >= this
    min_edit_distance: float = 0.0  # 1 - difflib ratio between chosen and rejected texts, in [0, 1]
    max_length_ratio: float = 0.0  # max(len)/min(len) of the two texts; 0 disables
    chosen_min_step_score: float = 0.0  # every step of the chosen solution must score >= this (0 = off)

    @classmethod
    def from_cfg(cls, c: Any) -> PairFilter:
        f = cls(
            dedup=bool(c.dedup),
            min_margin=float(c.min_margin),
            min_edit_distance=float(c.min_edit_distance),
            max_length_ratio=float(c.max_length_ratio),
            chosen_min_step_score=float(c.get("chosen_min_step_score", 0.0) or 0.0),
        )
        if not 0.0 <= f.chosen_min_step_score <= 1.0:
            raise ValueError(f"config filters.chosen_min_step_score={f.chosen_min_step_score}: "
                             "allowed [0, 1] (a raw step score; 0 = off)")
        if not 0.0 <= f.min_edit_distance <= 1.0:
            raise ValueError(f"config filters.min_edit_distance={f.min_edit_distance}: allowed [0, 1]")
        if f.max_length_ratio != 0.0 and f.max_length_ratio < 1.0:
            raise ValueError(
                f"config filters.max_length_ratio={f.max_length_ratio}: allowed 0 (off) or >= 1"
            )
        return f


def solution_text(t: Trajectory, delimiter: str) -> str:
    return delimiter.join(t.steps)


# ------------------------------------------------------------------------ picking a stage's solution
def prm_rank(t: Trajectory) -> tuple[float, float]:
    """How plausible the step scorer finds a solution: its last step's raw score (the PRM's judgement of the
    whole solution so far), then its weakest step. Not the outcome-replaced engine value: with
    ``search.outcome: replace`` every terminal's value is 1 or 0, and ranking by it is ranking by node id."""
    if not t.scores:
        return (float("-inf"), float("-inf"))
    return (float(t.scores[-1]), float(min(t.scores)))


def has_final_answer(t: Trajectory, delimiter: str = "\n\n") -> bool:
    """Whether the solution states a final answer (a closed ``\\boxed{}``)."""
    return has_boxed_answer(solution_text(t, delimiter))


# Phrases by which a solution written under the reflection prompt refers to the attempt it was shown. When the
# pair is trained on the plain problem prompt (stages.stage2_prompt_with_attempt: false), such a chosen text
# refers to something its prompt never shows.
_ATTEMPT_REFS = (
    r"\b(the|this|that|your|my) (previous |given |above |original |earlier |attempted |first |provided )?"
    r"(attempt|attempted solution|solution above|solution to review)\b",
    r"\b(the|this) (previous|given|above|original|earlier|attempted|provided) solution\b",
    r"\b(first )?incorrect step\b", r"\bthe (mistake|error) (is|was|in|occurs)\b",
    r"\bcorrected solution\b", r"\bre-?view(ing)? (the|this) solution\b",
)


def mentions_attempt(text: str) -> bool:
    return any(re.search(p, text, flags=re.IGNORECASE) for p in _ATTEMPT_REFS)


def pick_solution(extreme: Trajectory | None, pool: list[Trajectory], ok, *, best: bool = True
                  ) -> Trajectory | None:
    """The search's own extreme (Sol_max) when it qualifies (``ok``), else the best (``best``) or worst
    qualifying terminal by ``prm_rank``; None when nothing qualifies."""
    if extreme is not None and ok(extreme):
        return extreme
    cands = [t for t in pool if ok(t)]
    if not cands:
        return None
    return max(cands, key=prm_rank) if best else min(cands, key=prm_rank)


# difflib is quadratic: two 32 KB texts take over a minute, two 1 MB ones hours (tests/test_adversarial.py),
# and long chain-of-thought solutions are that long. Above this product of lengths the common prefix and
# suffix are matched first; a middle still too long for character-level difflib is matched line by line
# (steps are lines), and only a middle with too many lines falls back to difflib's quick_ratio (character
# multisets: an upper bound on the similarity, so the distance is then a lower bound).
EXACT_EDIT_BUDGET = 4_000_000


def _line_matches(a: str, b: str) -> float | None:
    """Characters in the lines difflib matches between a and b; None when there are too many lines."""
    # blank lines left out: hundreds of identical elements make difflib slow (their characters then count
    # as unmatched: the distance errs high, which keeps a pair rather than dropping it)
    la = [x for x in a.splitlines(keepends=True) if x.strip()]
    lb = [x for x in b.splitlines(keepends=True) if x.strip()]
    if len(la) * len(lb) > EXACT_EDIT_BUDGET:
        return None
    sm = difflib.SequenceMatcher(None, la, lb, autojunk=False)
    return float(sum(len(x) for m in sm.get_matching_blocks() for x in la[m.a:m.a + m.size]))


def edit_distance(a: str, b: str) -> float:
    """Normalised edit distance in [0, 1] (1 - difflib's similarity ratio); bounded time on long texts."""
    if not a and not b:
        return 0.0
    if len(a) * len(b) <= EXACT_EDIT_BUDGET:
        return 1.0 - difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()
    n = min(len(a), len(b))
    pre = 0
    while pre < n and a[pre] == b[pre]:
        pre += 1
    suf = 0
    while suf < n - pre and a[len(a) - 1 - suf] == b[len(b) - 1 - suf]:
        suf += 1
    ma, mb = a[pre:len(a) - suf], b[pre:len(b) - suf]
    if len(ma) * len(mb) <= EXACT_EDIT_BUDGET:
        mid = difflib.SequenceMatcher(None, ma, mb, autojunk=False).ratio() * (len(ma) + len(mb)) / 2
    else:
        mid = _line_matches(ma, mb)
        if mid is None:
            sm = difflib.SequenceMatcher(None, ma, mb, autojunk=False)
            mid = sm.quick_ratio() * (len(ma) + len(mb)) / 2
    matches = pre + suf + mid
    return min(1.0, max(0.0, 1.0 - 2.0 * matches / (len(a) + len(b))))


def make_pair(
    *,
    stage: int,
    problem: dict,
    prompt: Any,
    chosen: Trajectory,
    rejected: Trajectory,
    delimiter: str,
    chosen_model: str,
    rejected_model: str,
    config_hash: str,
    conversational: bool,
    extra: dict | None = None,
    response_prefix: str = "",
) -> dict:
    """A preference pair record. ``response_prefix``: the text the assistant turn starts with in generation
    (the family's ``assistant_prefix``, e.g. R1's ``<think>\n``); a conversational chosen/rejected starts
    with it, so DPO scores the solution in the context it was generated in (TRL trains on the common prefix
    of the prompt and prompt + completion)."""
    c_text = solution_text(chosen, delimiter)
    r_text = solution_text(rejected, delimiter)
    if conversational:
        c_out: Any = [{"role": "assistant", "content": response_prefix + c_text}]
        r_out: Any = [{"role": "assistant", "content": response_prefix + r_text}]
    else:
        c_out, r_out = c_text, r_text
    rec = {
        "prompt": prompt,
        "chosen": c_out,
        "rejected": r_out,
        "stage": int(stage),
        "problem_id": str(problem["id"]),
        "source": problem.get("source", ""),
        "chosen_correct": bool(chosen.correct),
        "rejected_correct": bool(rejected.correct),
        "chosen_value": float(chosen.value),
        "rejected_value": float(rejected.value),
        "chosen_rewards": [float(x) for x in chosen.rewards],
        "rejected_rewards": [float(x) for x in rejected.rewards],
        "chosen_scores": [float(x) for x in chosen.scores],  # raw step-scorer scores (PRM / checker)
        "rejected_scores": [float(x) for x in rejected.scores],
        "margin": float(chosen.value) - float(rejected.value),
        "edit_distance": edit_distance(c_text, r_text),
        "chosen_model": chosen_model,
        "rejected_model": rejected_model,
        "config_hash": config_hash,
    }
    if extra:
        rec.update(extra)
    return rec


def _text(x: Any) -> str:
    if isinstance(x, str):
        return x
    return json.dumps(x, sort_keys=True, ensure_ascii=False)


def filter_pairs(pairs: list[dict], f: PairFilter) -> tuple[list[dict], dict]:
    """Apply the filters in order; returns kept pairs and a count of drops per reason."""
    drops = {"dedup": 0, "min_margin": 0, "min_edit_distance": 0, "length_ratio": 0, "not_contrastive": 0,
             "chosen_step_score": 0}
    seen: set[str] = set()
    kept = []
    for p in pairs:
        if not (p["chosen_correct"] and not p["rejected_correct"]):
            drops["not_contrastive"] += 1
            continue
        if f.dedup:
            h = hashlib.sha1(
                (_text(p["prompt"]) + "\x00" + _text(p["chosen"]) + "\x00" + _text(p["rejected"])).encode()
            ).hexdigest()
            if h in seen:
                drops["dedup"] += 1
                continue
            seen.add(h)
        if p["margin"] < f.min_margin:
            drops["min_margin"] += 1
            continue
        if p["edit_distance"] < f.min_edit_distance:
            drops["min_edit_distance"] += 1
            continue
        if f.max_length_ratio:
            a, b = len(_text(p["chosen"])), len(_text(p["rejected"]))
            if max(a, b) > f.max_length_ratio * max(1, min(a, b)):
                drops["length_ratio"] += 1
                continue
        # a correct final answer reached through a step the scorer judges wrong (a slip that cancels out, a
        # copied operand) teaches the slip: with a threshold, such a chosen solution is not used
        if f.chosen_min_step_score and min(p.get("chosen_scores") or [1.0]) < f.chosen_min_step_score:
            drops["chosen_step_score"] += 1
            continue
        kept.append(p)
    return kept, drops
