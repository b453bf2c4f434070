"""The checks of the length budgets, one per model that reads a chain (see sphere/budgets.py): stage 1 and
stage 2 (the policy), the step scorer (PRM), stage 3 (the small model), DPO and evaluation. Each appends its
line to ``checks`` (status ok | over | unknown | refused, with need / limit); a refusal ends the checks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sphere.budget_windows import FLOOR, Prompt, Window
from sphere.budget_windows import count_text as _n
from sphere.budget_windows import full_steps as _steps


class _Refused(Exception):
    """A check refused (its line is in ``checks``): the remaining generation checks are not run."""


@dataclass(frozen=True)
class _Chain:
    """The search's chain budget: ``S`` tokens a step, ``D`` steps, ``per`` = a step and its delimiter."""

    S: int
    D: int
    per: int
    full: int

    @classmethod
    def of(cls, step: dict) -> _Chain:
        S, D, d = step["max_step_tokens"], step["max_depth"], step["delimiter_tokens"]
        return cls(S, D, S + d, D * (S + d))


def _after(p: Prompt, what: str = "prompt", but: str = "") -> str:
    """How a refusal names the prompt it counted: a typical one (measured or estimated), or any at all."""
    if p.how == FLOOR:
        return f"even a 1-token {what}{but}"
    return f"a typical {what} of {_n(p.typical)} tokens{but} ({p.how})"


def _refuse(checks: list[dict], name: str, msg: str) -> None:
    checks.append({"check": name, "status": "refused", "line": msg})


def _check(checks: list[dict], name: str, status: str, line: str, **nums: Any) -> None:
    checks.append({"check": name, "status": status, "line": line, **nums})


def generation_checks(cfg: Any, P: dict[str, Prompt], W: dict[str, Window | None], step: dict,
                      checks: list[dict]) -> dict:
    """The search, PRM and DPO lines; returns the longest chain (tokens) and the PRM's longest input ({}
    when a check refused)."""
    c = _Chain.of(step)
    st = cfg.get("stages") or {}
    try:
        reach = _stage1(P["policy"], W["policy"], c, checks)
        prm_cap, prm_input = _prm_check(cfg, P, W.get("prm"), c, reach, checks)
        longest = min(reach, prm_cap) if prm_cap is not None else reach
        if bool(st.get("stage2", True)) and W["policy"].tokens is not None:
            _stage2(P["reflection"], W["policy"], c, longest, checks)
        small_reach = _stage3(cfg, P["small"], W.get("small"), c, prm_cap, checks) if bool(
            st.get("stage3", False)) else None
    except _Refused:
        return {}
    longest_any = max(longest, small_reach or 0)
    _dpo_check(cfg, P, W, c, longest, longest_any, checks)
    return {"longest_chain": longest_any, "prm_input_max": prm_input}


def _policy_words(pol: Window) -> str:
    return f"the policy window {_n(pol.tokens)} ({pol.why})"


def _stage1(p: Prompt, pol: Window, c: _Chain, checks: list[dict]) -> int:
    """Stage 1 (policy): prompt + depth x step; returns how far a chain can reach (tokens of steps)."""
    S, D, per, full = c.S, c.D, c.per, c.full
    if pol.tokens is None:
        _check(checks, "stage 1 (policy)", "unknown",
               f"stage 1 (policy): window unknown ({pol.why}): not checked")
        return full
    if p.typical + S > pol.tokens:
        _refuse(checks, "stage 1 (policy)",
                f"search.max_step_tokens={S}: one step after {_after(p)} needs {_n(p.typical + S)} tokens > "
                f"{_policy_words(pol)}; lower search.max_step_tokens or raise the window")
        raise _Refused
    need = p.longest + full
    room = pol.tokens - p.longest
    reach = min(full, max(0, room))
    if need <= pol.tokens:
        _check(checks, "stage 1 (policy)", "ok",
               f"stage 1 (policy): prompt {_n(p.longest)} + {D} steps x {_n(per)} = {_n(need)} <= window "
               f"{_n(pol.tokens)}: ok", need=need, limit=pol.tokens)
    else:
        fit = f"{_n(room)} tokens of solution ({_steps(max(0, room) // per)})" if room > 0 else "no room"
        short = p.over(pol.tokens - S)
        _check(checks, "stage 1 (policy)", "over",
               f"stage 1 (policy): prompt {_n(p.longest)} + {D} steps x {_n(per)} = {_n(need)} > window "
               f"{_n(pol.tokens)}: a chain ends where its next prompt no longer fits (finish \"length\", "
               f"recorded; counted in generate_stats.json chain_ends/context_ends; graded wrong, never "
               f"chosen); the longest prompt leaves {fit}"
               + (f"; {short} problems' prompts leave less than one step, so their chains end in the first"
                  if short else ""), need=need, limit=pol.tokens)
    return reach


def _prm_check(cfg: Any, P: dict[str, Prompt], prm: Window | None, c: _Chain, reach: int,
               checks: list[dict]) -> tuple[int | None, int | None]:
    """The PRM: it ends chains too, so the chains any stage can reach are capped by it. Returns (the cap on
    a chain's tokens of steps or None, the PRM's longest input or None)."""
    if prm is None:
        return None, None
    S, D = c.S, c.D
    q = P["prm"]
    full_prm = D * (S + 1)  # a reward token after every step
    prm_cap = None
    if prm.tokens is None:
        _check(checks, "step scorer (PRM)", "unknown", f"step scorer (PRM): window unknown ({prm.why})")
    elif q.typical + S + 1 > prm.tokens:
        _refuse(checks, "step scorer (PRM)",
                f"search.max_step_tokens={S}: the PRM cannot score even a one-step item: "
                f"{_after(q, 'PRM prompt')}"
                f" + {S} + 1 reward token = {_n(q.typical + S + 1)} > the PRM window {_n(prm.tokens)} "
                f"({prm.why}); lower search.max_step_tokens or raise scorer.max_length")
        raise _Refused
    else:
        prm_cap = _prm_window_line(cfg, q, prm, c, full_prm, checks)
    prm_input = q.longest + min(full_prm, reach + D)
    if prm.tokens is not None:
        prm_input = min(prm_input, prm.tokens)
    return prm_cap, prm_input


def _prm_window_line(cfg: Any, q: Prompt, prm: Window, c: _Chain, full_prm: int,
                     checks: list[dict]) -> int | None:
    """The PRM's line where its window is known and one step fits; returns the cap on a chain's tokens of
    steps (None: ``scorer.long_chains: recent``, the PRM cuts no chain)."""
    S, D = c.S, c.D
    need = q.longest + full_prm
    room = prm.tokens - q.longest
    k = max(0, room) // (S + 1)
    # tokens of steps, tags off
    prm_cap: int | None = max(0, room - min(D, math.ceil(max(0, room) / (S + 1))))
    head = f"step scorer (PRM): prompt {_n(q.longest)} + {D} steps x ({_n(S)} + 1 reward token) = {_n(need)}"
    if need <= prm.tokens:
        tail, status = f" <= window {_n(prm.tokens)}: ok", "ok"
    elif str((cfg.get("scorer") or {}).get("long_chains", "end")) == "recent":
        prm_cap = None  # the PRM reads the newest steps that fit: it cuts no chain
        tail, status = (f" > window {_n(prm.tokens)}: past it the PRM reads the problem and the newest "
                        f"steps that fit (scorer.long_chains: recent; counted as items_truncated), so no "
                        f"chain ends here; after the longest prompt {_steps(k)} fit whole"), "over"
    else:
        tail, status = (f" > window {_n(prm.tokens)}: a chain ends where its PRM input would pass the "
                        f"window (finish \"window\", recorded; counted in generate_stats.json "
                        f"chain_ends/window_ends; graded wrong, never chosen); after the longest prompt "
                        f"{_steps(k)} fit"), "over"
    _check(checks, "step scorer (PRM)", status, head + tail, need=need, limit=prm.tokens)
    return prm_cap


def _stage2(r: Prompt, pol: Window, c: _Chain, longest: int, checks: list[dict]) -> None:
    """Stage 2 (policy): the reflection prompt embeds a whole wrong attempt (a stage-1 chain)."""
    S, D, per, full = c.S, c.D, c.per, c.full
    if r.typical + S > pol.tokens:
        _refuse(checks, "stage 2 (policy)",
                f"search.max_step_tokens={S}: one stage-2 step after "
                f"{_after(r, 'reflection prompt', ' without its attempt')} needs {_n(r.typical + S)} > "
                f"{_policy_words(pol)}; lower search.max_step_tokens or raise the window")
        raise _Refused
    need = r.longest + longest + full
    if need <= pol.tokens:
        _check(checks, "stage 2 (policy)", "ok",
               f"stage 2 (policy): reflection prompt {_n(r.longest)} + attempt {_n(longest)} + {D} steps x "
               f"{_n(per)} = {_n(need)} <= window {_n(pol.tokens)}: ok", need=need, limit=pol.tokens)
    else:
        no_step = pol.tokens - r.longest - per  # an attempt longer than this leaves less than one step
        _check(checks, "stage 2 (policy)", "over",
               f"stage 2 (policy): reflection prompt {_n(r.longest)} + attempt up to {_n(longest)} + {D} steps "
               f"x {_n(per)} = {_n(need)} > window {_n(pol.tokens)}: the corrected chain ends where its next "
               f"prompt no longer fits (finish \"length\", counted); an attempt over {_n(max(0, no_step))} "
               "tokens leaves less than one step of room, so that chain ends at once", need=need,
               limit=pol.tokens)


def _stage3(cfg: Any, ps: Prompt, sw: Window | None, c: _Chain, prm_cap: int | None,
            checks: list[dict]) -> int | None:
    """Stage 3 (the small model): prompt + depth x step; returns how far its chains reach (None: unknown)."""
    S, D, per, full = c.S, c.D, c.per, c.full
    name = str(cfg.model.small)
    if sw is None or sw.tokens is None:
        _check(checks, "stage 3 (small)", "unknown",
               f"stage 3 (small {name}): window unknown ({sw.why if sw else '?'}): not checked")
        return None
    if ps.typical + S > sw.tokens:
        _refuse(checks, "stage 3 (small)",
                f"search.max_step_tokens={S}: one step of the small model {name} after {_after(ps)} needs "
                f"{_n(ps.typical + S)} > its window {_n(sw.tokens)} ({sw.why}); lower "
                "search.max_step_tokens or raise the window")
        raise _Refused
    need = ps.longest + full
    room = sw.tokens - ps.longest
    small_reach = min(full, max(0, room))
    if prm_cap is not None:
        small_reach = min(small_reach, prm_cap)
    if need <= sw.tokens:
        _check(checks, "stage 3 (small)", "ok",
               f"stage 3 (small {name}): prompt {_n(ps.longest)} + {D} steps x {_n(per)} = {_n(need)} <= "
               f"window {_n(sw.tokens)}: ok", need=need, limit=sw.tokens)
    else:
        _check(checks, "stage 3 (small)", "over",
               f"stage 3 (small {name}): prompt {_n(ps.longest)} + {D} steps x {_n(per)} = {_n(need)} > "
               f"window {_n(sw.tokens)}: a chain ends where its next prompt no longer fits "
               f"(finish \"length\", counted); the longest prompt leaves {_n(max(0, room))} tokens "
               f"({_steps(max(0, room) // per)})", need=need, limit=sw.tokens)
    return small_reach


def _dpo_check(cfg: Any, P: dict[str, Prompt], W: dict[str, Window | None], c: _Chain, longest: int,
               longest_any: int, checks: list[dict]) -> None:
    """DPO: prompt + chosen (or rejected) + EOS against ``train.max_length`` and the trained model's
    window."""
    tr = cfg.get("train")
    if tr is None or tr.get("max_length") is None:
        return
    per = c.per
    st = cfg.get("stages") or {}
    ml = int(tr.max_length)
    pt = P["train"]
    with_attempt = bool(st.get("stage2", True)) and bool(st.get("stage2_prompt_with_attempt", False))
    pl = P["reflection"].longest + longest if with_attempt else pt.longest
    what = "reflection prompt with its attempt" if with_attempt else "prompt"
    need = max(pl, pt.longest) + longest_any + 1
    if pt.typical + per + 1 > ml and pt.how != FLOOR:  # not a refusal: real steps are often far shorter
        _check(checks, "DPO", "over",
               f"DPO: train.max_length {_n(ml)} < a typical prompt {_n(pt.typical)} + one full step "
               f"{_n(per)} + EOS = {_n(pt.typical + per + 1)}: a pair is kept only while its prompt + "
               f"solution stay within {_n(ml)} tokens (the longest could reach {_n(need)}); the rest are "
               "dropped and counted by the trainer (train_metrics.json), never cut", need=need, limit=ml)
    elif need <= ml:
        _check(checks, "DPO", "ok", f"DPO: {what} {_n(pl)} + the longest chain {_n(longest_any)} + EOS = "
               f"{_n(need)} <= train.max_length {_n(ml)}: ok", need=need, limit=ml)
    else:
        _check(checks, "DPO", "over",
               f"DPO: {what} {_n(pl)} + the longest chain {_n(longest_any)} + EOS = {_n(need)} > "
               f"train.max_length {_n(ml)}: pairs that do not fit are dropped and counted by the trainer "
               "(train_metrics.json), never cut", need=need, limit=ml)
    tw = W.get("train_target")
    if tw is not None and tw.tokens is not None and ml > tw.tokens:
        _check(checks, "DPO window", "over",
               f"DPO: train.max_length {_n(ml)} > the trained model's window {_n(tw.tokens)} ({tw.why}): "
               "pairs between the two are past the positions it was trained on")


def eval_check(cfg: Any, P: dict[str, Prompt], W: dict[str, Window | None], checks: list[dict]) -> None:
    ev = cfg.get("eval")
    if ev is None or "eval" not in W:
        return
    ew, pe = W["eval"], P["eval"]
    mt = ev.get("max_tokens")
    key = "eval.max_tokens" if mt is not None else "sampling.max_solution_tokens (eval.max_tokens null)"
    E = int(mt if mt is not None else cfg.sampling.get("max_solution_tokens", 1024))
    if ew.tokens is None:
        _check(checks, "evaluation", "unknown", f"evaluation: window unknown ({ew.why}): not checked")
        return
    if pe.typical + 1 > ew.tokens:
        _refuse(checks, "evaluation",
                f"evaluation: {_after(pe, 'benchmark prompt')} leaves no room in the window {_n(ew.tokens)} "
                f"({ew.why}); raise backend.max_model_len")
        return
    need = pe.longest + E
    if need <= ew.tokens:
        _check(checks, "evaluation", "ok", f"evaluation: prompt {_n(pe.longest)} + {key} {_n(E)} = {_n(need)} <= "
               f"window {_n(ew.tokens)}: ok", need=need, limit=ew.tokens)
    else:
        left = ew.tokens - pe.longest
        none = pe.over(ew.tokens - 1)
        _check(checks, "evaluation", "over",
               f"evaluation: prompt {_n(pe.longest)} + {key} {_n(E)} = {_n(need)} > window {_n(ew.tokens)}: "
               f"a solution is clipped at the window (finish \"length\", graded as it stands)"
               + (f"; the budget {_n(E)} is never reached" if E >= ew.tokens else "")
               + (f"; {none} benchmark prompts leave no room at all: they are not sent, graded wrong and counted "
                  "as overflow in the evaluation summary" if none else
                  f"; the longest prompt leaves {_n(max(0, left))} tokens"), need=need, limit=ew.tokens)
