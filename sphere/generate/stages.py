"""The three SPHERE stages as pure functions: a finished search -> (route, pairs, follow-up).

``Generator.run`` (sphere/generate/generator.py) runs the searches, writes the records and queues the follow-up
jobs; what each stage makes of a search result is decided here, from the result, the problem and a
``StageContext``, with no I/O:

  stage 1  Sol_max correct, Sol_min wrong -> (Sol_max, Sol_min); both wrong -> stage 2; both right ->
           stage 3; Sol_max wrong but Sol_min right -> swapped pair (``stages.inverted: swap``) or nothing;
           no terminal at all -> nothing (route no_chain)
  stage 2  the correction search's best correct solution (its Sol_max when correct, else the correct
           terminal the step scorer ranks highest) over the wrong attempt
  stage 3  the policy's correct Sol_max over the small model's most plausible wrong solution (its Sol_max
           when wrong, else the wrong terminal the step scorer ranks highest; with a final answer)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sphere.generate.pairs import has_final_answer, make_pair, mentions_attempt, pick_solution
from sphere.search.types import SearchResult, Trajectory


@dataclass
class StageContext:
    """The settings and provenance the stage outcomes need (built once per ``Generator.run``)."""

    delim: str
    inverted: str  # stages.inverted: swap | drop
    stage2: bool
    stage3: bool
    plain_stage2_prompt: bool  # not stages.stage2_prompt_with_attempt: stage-2 pairs on the plain prompt
    drop_attempt_refs: bool  # filters.stage2_drop_attempt_refs (only with the plain prompt)
    rejected_needs_answer: bool  # filters.stage3_rejected_needs_answer
    policy_name: str
    small_name: str
    config_hash: str
    conversational: bool  # chat models: pairs as message lists (TRL's conversational format)
    response_prefix: str  # the family's assistant_prefix (conversational pairs start with it)
    pair_prompt: Callable[[dict, Trajectory | None], Any]  # (problem, attempt shown or None) -> prompt

    @classmethod
    def from_config(cls, cfg: Any, *, delim: str, policy_name: str, small_name: str, config_hash: str,
                    conversational: bool, response_prefix: str,
                    pair_prompt: Callable[[dict, Trajectory | None], Any]) -> StageContext:
        st, flt = cfg.stages, cfg.filters
        plain = not bool(st.stage2_prompt_with_attempt)
        return cls(delim=delim, inverted=str(st.inverted), stage2=bool(st.stage2), stage3=bool(st.stage3),
                   plain_stage2_prompt=plain,
                   drop_attempt_refs=plain and bool(flt.get("stage2_drop_attempt_refs", True)),
                   rejected_needs_answer=bool(flt.get("stage3_rejected_needs_answer", True)),
                   policy_name=policy_name, small_name=small_name, config_hash=config_hash,
                   conversational=conversational, response_prefix=response_prefix, pair_prompt=pair_prompt)

    def pair(self, stage: int, p: dict, prompt: Any, chosen: Trajectory, rejected: Trajectory,
             rejected_model: str | None = None, extra: dict | None = None) -> dict:
        return make_pair(stage=stage, problem=p, prompt=prompt, chosen=chosen, rejected=rejected,
                         delimiter=self.delim, chosen_model=self.policy_name,
                         rejected_model=rejected_model or self.policy_name, config_hash=self.config_hash,
                         conversational=self.conversational, response_prefix=self.response_prefix, extra=extra)


def route(sol_max: Trajectory | None, sol_min: Trajectory | None) -> str:
    """Which stage a stage-1 search result goes to: pair | both_right | both_wrong | inverted, or no_chain
    when the search reached no terminal at all (an MCTS budget too small to finish one chain): nothing to
    pair and no attempt to reflect on, so it goes nowhere (counted in generate_stats' routes)."""
    if sol_max is None and sol_min is None:
        return "no_chain"
    mx = bool(sol_max and sol_max.correct)
    mn = bool(sol_min and sol_min.correct)
    if mx and not mn:
        return "pair"
    if mx and mn:
        return "both_right"
    if not mx and not mn:
        return "both_wrong"
    return "inverted"


def stage1_outcome(res: SearchResult, p: dict, ctx: StageContext) -> tuple[str, list[dict], int | None]:
    """(route, pairs, the stage the problem goes to next: 2, 3 or None)."""
    rt = route(res.sol_max, res.sol_min)
    pairs = []
    if rt == "pair" or (rt == "inverted" and ctx.inverted == "swap"):
        ch, rj = (res.sol_max, res.sol_min) if rt == "pair" else (res.sol_min, res.sol_max)
        pairs.append(ctx.pair(1, p, ctx.pair_prompt(p, None), ch, rj, extra={"route": rt}))
    nxt = 2 if rt == "both_wrong" and ctx.stage2 else 3 if rt == "both_right" and ctx.stage3 else None
    return rt, pairs, nxt


def stage2_outcome(res: SearchResult, p: dict, attempt: Trajectory, ctx: StageContext
                   ) -> tuple[str, list[dict]]:
    """Self-correction: (corrected | uncorrected, pairs)."""

    def ok(t: Trajectory) -> bool:  # a correct solution its pair prompt can stand behind
        return t.correct and not (ctx.drop_attempt_refs and mentions_attempt(ctx.delim.join(t.steps)))

    best = pick_solution(res.sol_max, res.terminals, ok, best=True)
    if best is None or attempt.correct:
        return "uncorrected", []
    prompt = ctx.pair_prompt(p, None if ctx.plain_stage2_prompt else attempt)
    return "corrected", [ctx.pair(2, p, prompt, best, attempt)]


def stage3_outcome(res: SearchResult, p: dict, chosen: Trajectory | None, ctx: StageContext
                   ) -> tuple[str, list[dict]]:
    """Diversity induction: (contrast | no_wrong, pairs); ``chosen`` is the policy's stage-1 Sol_max."""

    def ok(t: Trajectory) -> bool:  # a plausible wrong solution: wrong, with a final answer
        return not t.correct and (not ctx.rejected_needs_answer or has_final_answer(t, ctx.delim))

    rej = pick_solution(res.sol_max, res.terminals, ok, best=True)
    if rej is None or chosen is None or not chosen.correct:
        return "no_wrong", []
    return "contrast", [ctx.pair(3, p, ctx.pair_prompt(p, None), chosen, rej, rejected_model=ctx.small_name)]
