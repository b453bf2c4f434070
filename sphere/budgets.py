"""Length budgets of a run against every model's window (dry runs; issue #28 item 1).

A chain of the search is the prompt followed by up to ``search.max_depth`` steps of at most
``search.max_step_tokens`` tokens, each step followed by the prompt family's step delimiter. Every model that
reads a chain has a window, and ``length_budgets(cfg)`` checks each budget against it with its numbers:

- stage 1 (policy): prompt + depth x step vs the policy's window, min(``backend.max_model_len``, the policy's
  ``max_position_embeddings``) as the backends clamp it;
- stage 2 (policy): the reflection prompt embeds a whole wrong attempt (a stage-1 chain) before its own chain;
- stage 3 (small model): prompt + depth x step vs the small model's window;
- step scorer (PRM): system + problem + the steps joined by a reward token per step vs ``scorer.max_length``
  or the PRM's ``max_position_embeddings``;
- DPO: prompt + the longest chain + EOS vs ``train.max_length``;
- evaluation: prompt + ``eval.max_tokens`` (null = ``sampling.max_solution_tokens``) vs the evaluated model's
  window.

Where the longest possible chain exceeds a window the line says what happens to such chains at run time (the
search ends a chain whose next prompt no longer fits the policy's window with finish "length" and one whose
PRM input would pass the scorer's window with finish "window", both recorded and counted in
generate_stats.json; DPO drops and counts pairs longer than ``train.max_length``; evaluation clips a solution
to the window). Where not even one step fits (a typical prompt + one step over a window) the run is refused
with one line naming both numbers and the keys (``check_length_budgets``).

Prompt lengths: measured with the model's own tokenizer (local directory, shipped stand-in, or a hub model
already in the local Hugging Face cache; nothing is downloaded) over the problems the run reads (the longest
of the 64 longest problems by characters; "typical" is the median of 33 problems spread over the length
order), estimated as characters / 3 + 64 template tokens where the tokenizer is not local, or a stated
allowance (1,024 longest, 256 typical) where the problems are not read in a dry run (``hf:`` datasets, the
NuminaMath / MetaMathQA pools). Token counts of the policy and the PRM are added as if the two tokenizers
agreed (they are the same family for the Qwen setting; phi-4 and R1 are an approximation).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

PROMPT_ALLOWANCE = 1024  # longest prompt when the problems are not read in a dry run
TYPICAL_ALLOWANCE = 256  # typical prompt, same case
CHARS_PER_TOKEN = 3.0  # estimate where the tokenizer is not local (math text: ~3-4 characters per token)
TEMPLATE_ALLOWANCE = 64  # chat template, default system message and special tokens, same case
LONGEST_SAMPLE = 64  # the longest prompt is measured over this many longest problems (by characters)
TYPICAL_SAMPLE = 33  # the typical prompt: median over this many problems spread over the length order


class LengthBudgetError(ValueError):
    """A budget where not even one step fits a window (a bad config: the CLI prints it as one line)."""


@dataclass
class Window:
    tokens: int | None
    why: str  # how it was found, with the numbers
    keys: str  # config keys that set it


@dataclass
class Prompt:
    longest: int
    typical: int
    how: str
    n: int = 0  # problems it was taken over (0: an allowance)
    top: tuple[int, ...] = ()  # the measured lengths of the longest problems, longest first

    def public(self) -> dict:
        return {"longest": self.longest, "typical": self.typical, "how": self.how, "problems": self.n}

    def over(self, limit: int) -> str:
        """How many problems have a prompt longer than ``limit`` ("" when none or unknown)."""
        k = sum(1 for v in self.top if v > limit)
        if not k:
            return ""
        if k == len(self.top) and self.n > k:
            return f"at least {k:,} of {self.n:,}"
        return f"{k:,} of {self.n:,}"


def _n(x: int | None) -> str:
    return "?" if x is None else f"{int(x):,}"


def _steps(k: int) -> str:
    return f"{k} full step" + ("" if k == 1 else "s")


# ------------------------------------------------------------------------------------------ windows
def generation_window(cfg: Any, name: str) -> Window:
    """The window a generation backend gives model ``name``: min(backend.max_model_len, the model's own)."""
    from sphere.modelinfo import model_window

    mw, src = model_window(name)
    be = cfg.get("backend") or {}
    cap = be.get("max_model_len")
    cap = int(cap) if cap else None
    own = f"{name}'s max_position_embeddings {_n(mw)} [{src}]"
    if mw and cap:
        if cap <= mw:
            return Window(cap, f"backend.max_model_len {_n(cap)} (<= {own})", "backend.max_model_len")
        return Window(mw, f"{own} (backend.max_model_len {_n(cap)} is clamped to it)",
                      f"{name}'s max_position_embeddings")
    if mw:
        return Window(mw, own, f"{name}'s max_position_embeddings")
    if cap:
        return Window(cap, f"backend.max_model_len {_n(cap)} ({name}'s own window unknown)", "backend.max_model_len")
    return Window(None, f"unknown ({name}: not local, not a known hub model)", "")


def prm_window(cfg: Any) -> Window | None:
    """The PRM's window: ``scorer.max_length`` or its max_position_embeddings (sphere/rewards/prm.py); the
    vLLM engine's ``scorer.max_model_len`` caps it. None when the step scorer is not a PRM."""
    from sphere.modelinfo import model_window

    sc = cfg.get("scorer") or {}
    if str(sc.get("name")) != "prm":
        return None
    name = str(sc.get("model"))
    mw, src = model_window(name)
    ml = sc.get("max_length")
    if ml:
        w = Window(int(ml), f"scorer.max_length {_n(ml)} ({name}'s max_position_embeddings {_n(mw)})",
                   "scorer.max_length")
    elif mw:
        w = Window(mw, f"{name}'s max_position_embeddings {_n(mw)} [{src}] (scorer.max_length null)",
                   "scorer.max_length")
    else:
        return Window(None, f"unknown ({name}: not local, not a known hub model; set scorer.max_length)",
                      "scorer.max_length")
    cap = sc.get("max_model_len") if str(sc.get("engine")) == "vllm" else None
    if cap and int(cap) < int(w.tokens):
        w = Window(int(cap), f"scorer.max_model_len {_n(cap)} (vLLM engine; < {w.why})", "scorer.max_model_len")
    return w


# ------------------------------------------------------------------------------------------ prompts
_TOKENIZERS: dict[str, Any] = {}


def local_tokenizer(name: str) -> Any | None:
    """The tokenizer of ``name`` when its files are here (local directory, stand-in, mini model, or the local
    Hugging Face cache); None otherwise. Never downloads; no remote code."""
    if name in _TOKENIZERS:
        return _TOKENIZERS[name]
    from sphere.modelinfo import local_model_dir

    tok = None
    d = local_model_dir(name)
    if d is not None and ((d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file()):
        try:
            if (d / "tokenizer.json").is_file():  # the fast tokenizer alone: no torch import in a dry run
                from transformers import PreTrainedTokenizerFast

                tok = PreTrainedTokenizerFast.from_pretrained(str(d), trust_remote_code=False)
            else:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(str(d), trust_remote_code=False)
        except Exception:  # noqa: BLE001 - an unreadable tokenizer: the lengths are estimated instead
            tok = None
    _TOKENIZERS[name] = tok
    return tok


def problem_texts(cfg: Any) -> tuple[list[str] | None, str]:
    """The texts of the problems ``data.problems`` gives, from local files (no hub, no pools: None)."""
    from sphere.data.benchmarks import load_problems_jsonl
    from sphere.data.problems import NAMED, sources

    d = cfg.data
    out: list[str] = []
    for src in sources(d):
        if src == "mini":
            from sphere.mini.world import training_problems

            out += [p["problem"] for p in training_problems(int(d.mini_n), seed=int(d.mini_seed) + int(cfg.seed))]
        elif src == "training":
            from sphere.data.training import describe_source

            uses = describe_source(d).get("uses")
            if not isinstance(uses, list) or any(u not in NAMED for u in uses):
                return None, "the NuminaMath / MetaMathQA pools"
            for u in uses:
                out += [p["problem"] for p in load_problems_jsonl(f"{d.data_dir}/{NAMED[u]}")]
        elif src.startswith(("hf:", "numina:", "metamath:")):
            return None, src
        else:
            path = f"{d.data_dir}/{NAMED[src]}" if src in NAMED else src
            out += [p["problem"] for p in load_problems_jsonl(path)]
    if d.get("limit") is not None:
        out = out[: int(d.limit)]
    return out, "training"


def benchmark_texts(cfg: Any) -> list[str] | None:
    """The problems evaluated every round (``eval.benchmarks`` + the model's extra ones, ``eval.limit``)."""
    if cfg.get("eval") is None:
        return None
    from sphere.data.benchmarks import load_benchmark
    from sphere.evaluation.settings import round_benchmarks

    out: list[str] = []
    for b in round_benchmarks(cfg):
        out += [p["problem"] for p in load_benchmark(b, cfg.paths.data_dir, cfg.eval.get("limit"))]
    return out


def prm_input_ids(tokenizer: Any, system: str, step_tag: str, problem: str, steps: list[str]) -> list[int]:
    """The PRM's input for (problem, steps): what ``sphere.rewards.prm.PRMScorer.build_ids`` builds (kept
    equal by tests/test_budgets.py; that module imports torch, a dry run does not)."""
    clean = [st.replace(step_tag, "").strip() for st in steps]
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": problem},
        {"role": "assistant", "content": step_tag.join(clean) + step_tag},
    ]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(f"{system}\n\n{problem}\n\n{msgs[-1]['content']}")["input_ids"])


def prompt_lengths(texts: list[str] | None, src: str, tok: Any, tok_name: str,
                   count: Callable[[Any, str], int], extra_chars: int) -> Prompt:
    """Longest and typical prompt over ``texts`` (see the module docstring for the three ways)."""
    if not texts:
        return Prompt(PROMPT_ALLOWANCE, TYPICAL_ALLOWANCE,
                      f"allowance: {src} not read in a dry run")
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    n = len(order)
    longest = order[-LONGEST_SAMPLE:]
    spread = sorted({order[round(k * (n - 1) / (TYPICAL_SAMPLE - 1))] for k in range(TYPICAL_SAMPLE)})
    if tok is not None:
        def f(t: str) -> int:
            return count(tok, t)

        how = f"measured with {tok_name}'s tokenizer over {n:,} {src} problems"
    else:
        def f(t: str) -> int:
            return math.ceil((len(t) + extra_chars) / CHARS_PER_TOKEN) + TEMPLATE_ALLOWANCE

        how = (f"estimated over {n:,} {src} problems as characters / {CHARS_PER_TOKEN:g} + {TEMPLATE_ALLOWANCE} "
               f"template tokens ({tok_name}'s tokenizer is not local)")
    typ = sorted(f(texts[i]) for i in spread)
    top = tuple(sorted((f(texts[i]) for i in longest), reverse=True))
    return Prompt(top[0], typ[len(typ) // 2], how, n, top)


FLOOR = "floor"


def _floor() -> Prompt:
    return Prompt(1, 1, FLOOR)


def _after(p: Prompt, what: str = "prompt", but: str = "") -> str:
    """How a refusal names the prompt it counted: a typical one (measured or estimated), or any at all."""
    if p.how == FLOOR:
        return f"even a 1-token {what}{but}"
    return f"a typical {what} of {_n(p.typical)} tokens{but} ({p.how})"


# ------------------------------------------------------------------------------------------ the checks
def _refuse(checks: list[dict], name: str, msg: str) -> None:
    checks.append({"check": name, "status": "refused", "line": msg})


def _check(checks: list[dict], name: str, status: str, line: str, **nums: Any) -> None:
    checks.append({"check": name, "status": status, "line": line, **nums})


def _generation_checks(cfg: Any, P: dict[str, Prompt], W: dict[str, Window | None], step: dict,
                       checks: list[dict]) -> dict:
    """The search, PRM and DPO lines; returns the longest chain (tokens) and the PRM's longest input."""
    S, D, d = step["max_step_tokens"], step["max_depth"], step["delimiter_tokens"]
    per = S + d
    full = D * per
    pol, prm = W["policy"], W.get("prm")
    wk = f"the policy window {_n(pol.tokens)} ({pol.why})"
    # ---- stage 1
    p = P["policy"]
    reach = full
    if pol.tokens is None:
        _check(checks, "stage 1 (policy)", "unknown", f"stage 1 (policy): window unknown ({pol.why}): not checked")
    elif p.typical + S > pol.tokens:
        _refuse(checks, "stage 1 (policy)",
                f"search.max_step_tokens={S}: one step after {_after(p)} needs {_n(p.typical + S)} tokens > "
                f"{wk}; lower search.max_step_tokens or raise the window")
        return {}
    else:
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
    # ---- the PRM: it ends chains too, so the chains any stage can reach are capped by it
    prm_cap = None
    prm_input = None
    if prm is not None:
        q = P["prm"]
        full_prm = D * (S + 1)  # a reward token after every step
        if prm.tokens is None:
            _check(checks, "step scorer (PRM)", "unknown", f"step scorer (PRM): window unknown ({prm.why})")
        elif q.typical + S + 1 > prm.tokens:
            _refuse(checks, "step scorer (PRM)",
                    f"search.max_step_tokens={S}: the PRM cannot score even a one-step item: {_after(q, 'PRM prompt')}"
                    f" + {S} + 1 reward token = {_n(q.typical + S + 1)} > the PRM window {_n(prm.tokens)} "
                    f"({prm.why}); lower search.max_step_tokens or raise scorer.max_length")
            return {}
        else:
            need = q.longest + full_prm
            room = prm.tokens - q.longest
            k = max(0, room) // (S + 1)
            prm_cap = max(0, room - min(D, math.ceil(max(0, room) / (S + 1))))  # tokens of steps, tags off
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
        prm_input = q.longest + min(full_prm, reach + D)
        if prm.tokens is not None:
            prm_input = min(prm_input, prm.tokens)
    longest = min(reach, prm_cap) if prm_cap is not None else reach
    # ---- stage 2: the reflection prompt embeds a whole wrong attempt (a stage-1 chain)
    st = cfg.get("stages") or {}
    if bool(st.get("stage2", True)) and pol.tokens is not None:
        r = P["reflection"]
        if r.typical + S > pol.tokens:
            _refuse(checks, "stage 2 (policy)",
                    f"search.max_step_tokens={S}: one stage-2 step after "
                    f"{_after(r, 'reflection prompt', ' without its attempt')} needs {_n(r.typical + S)} > {wk}; "
                    "lower search.max_step_tokens or raise the window")
            return {}
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
    # ---- stage 3: the small model
    small_reach = None
    if bool(st.get("stage3", False)):
        sw, ps = W.get("small"), P["small"]
        name = str(cfg.model.small)
        if sw is None or sw.tokens is None:
            _check(checks, "stage 3 (small)", "unknown",
                   f"stage 3 (small {name}): window unknown ({sw.why if sw else '?'}): not checked")
        elif ps.typical + S > sw.tokens:
            _refuse(checks, "stage 3 (small)",
                    f"search.max_step_tokens={S}: one step of the small model {name} after {_after(ps)} needs "
                    f"{_n(ps.typical + S)} > its window {_n(sw.tokens)} ({sw.why}); lower "
                    "search.max_step_tokens or raise the window")
            return {}
        else:
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
    longest_any = max(longest, small_reach or 0)
    # ---- DPO: prompt + chosen (or rejected) + EOS
    tr = cfg.get("train")
    if tr is not None and tr.get("max_length") is not None:
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
    return {"longest_chain": longest_any, "prm_input_max": prm_input}


def _eval_check(cfg: Any, P: dict[str, Prompt], W: dict[str, Window | None], checks: list[dict]) -> None:
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


def _prompts(cfg: Any, names: dict[str, str], step: dict, measure: bool) -> dict[str, Prompt]:
    from sphere.prompts import build_reflection_ids, encode, family_config, header_text, load_family

    fam = family_config(cfg)
    tfam_name = cfg.model.get("train_target_family")
    tfam = load_family(str(tfam_name)) if tfam_name else fam
    if not measure:
        texts, src, bench = None, "the problems", None
    else:
        texts, src = problem_texts(cfg)
        bench = benchmark_texts(cfg)
    instr = len(fam.get("instruction") or "") + len(fam.get("system") or "")

    def header(f: dict) -> Callable[[Any, str], int]:
        return lambda tok, t: len(encode(tok, header_text(tok, t, f), f))

    def tok(role: str) -> tuple[Any, str]:
        name = names.get(role)
        return (local_tokenizer(name) if measure and name else None), str(name)

    out: dict[str, Prompt] = {}
    t, n = tok("policy")
    out["policy"] = prompt_lengths(texts, src, t, n, header(fam), instr)
    refl = fam.get("reflection") or ""
    out["reflection"] = prompt_lengths(texts, src, t, n, lambda k, x: len(build_reflection_ids(k, x, [], fam)),
                                       instr + len(refl))
    if t is not None:
        step["delimiter_tokens"] = max(1, len(t(fam["step_delimiter"], add_special_tokens=False)["input_ids"]))
    if "small" in names:
        t2, n2 = tok("small")
        out["small"] = prompt_lengths(texts, src, t2, n2, header(fam), instr)
    if "prm" in names:
        sc = cfg.scorer
        system, tag = str(sc.get("system") or ""), str(sc.get("step_tag") or "<extra_0>")
        t3, n3 = tok("prm")
        out["prm"] = prompt_lengths(texts, src, t3, n3,
                                    lambda k, x: len(prm_input_ids(k, system, tag, x, [""])) - 1, len(system))
    t4, n4 = tok("train_target")
    out["train"] = prompt_lengths(texts, src, t4, n4, header(tfam),
                                  len(tfam.get("instruction") or "") + len(tfam.get("system") or ""))
    if "eval" in names:
        efam = tfam if cfg.model.get("train_target") else fam
        t5, n5 = tok("eval")
        out["eval"] = prompt_lengths(bench, "benchmark", t5, n5, header(efam),
                                     len(efam.get("instruction") or "") + len(efam.get("system") or ""))
    return out


def length_budgets(cfg: Any, measure: bool = True, phases: tuple[str, ...] = ("generate", "train", "eval")) -> dict:
    """Every length budget against its window (see the module docstring). ``measure=False``: windows and
    allowances only (no tokenizer, no problem files), for the memory plan of a real run. ``phases``: which
    budgets (`sphere generate` checks ``("generate",)``; `sphere run` all three). The dict: ``windows``,
    ``prompts``, ``step``, ``checks`` (each: check, status ok | over | unknown | refused, line, and need /
    limit), ``longest_chain`` and ``prm_input_max`` (tokens; None where unknown)."""
    from omegaconf import OmegaConf

    if "train" not in phases or "eval" not in phases:  # a view without the phases not checked
        # every node but the phases not checked and Hydra's own (its ${hydra:...} fields resolve only inside a
        # running job), each resolved against the whole config
        view = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
                for k in cfg if k != "hydra" and k not in ("train", "eval") or k in phases}
        cfg = OmegaConf.create(view)
    rounds = cfg.get("rounds")
    generates = "generate" in phases and (rounds is None or int(rounds) > 0)  # `sphere run rounds=0`: eval only
    sr = cfg.search
    step = {"max_step_tokens": int(sr.max_step_tokens), "max_depth": int(sr.max_depth), "delimiter_tokens": 1}
    m = cfg.model
    target = str(m.get("train_target") or m.policy)
    names = {"policy": str(m.policy), "train_target": target}
    W: dict[str, Window | None] = {"policy": generation_window(cfg, str(m.policy))}
    st = cfg.get("stages") or {}
    if generates and bool(st.get("stage3", False)):
        names["small"] = str(m.small)
        W["small"] = generation_window(cfg, str(m.small))
    pw = prm_window(cfg) if generates else None
    if pw is not None:
        names["prm"] = str(cfg.scorer.model)
        W["prm"] = pw
    if m.get("train_target"):
        W["train_target"] = generation_window(cfg, target)
    if cfg.get("eval") is not None:
        names["eval"] = target if m.get("train_target") else str(m.policy)
        W["eval"] = W["train_target"] if m.get("train_target") else W["policy"]

    def run_checks(P: dict[str, Prompt]) -> tuple[list[dict], dict]:
        checks: list[dict] = []
        extra: dict = {}
        if generates:
            extra = _generation_checks(cfg, P, W, step, checks)
        if not any(c["status"] == "refused" for c in checks):
            _eval_check(cfg, P, W, checks)
        return checks, extra

    # first with a one-token prompt: a step larger than a window is refused before any tokenizer loads
    floor = {k: _floor() for k in ("policy", "reflection", "small", "prm", "train", "eval")}
    checks, extra = run_checks(floor)
    if not any(c["status"] == "refused" for c in checks):
        P = _prompts(cfg, names, step, measure)
        checks, extra = run_checks(P)
    else:
        P = floor
    return {"windows": {k: asdict(v) for k, v in W.items() if v is not None},
            "prompts": {k: v.public() for k, v in P.items()},
            "step": step, "checks": checks,
            "longest_chain": extra.get("longest_chain"), "prm_input_max": extra.get("prm_input_max")}


def check_length_budgets(cfg: Any, measure: bool = True,
                         phases: tuple[str, ...] = ("generate", "train", "eval")) -> dict:
    """``length_budgets``; raises ``LengthBudgetError`` (one line, both numbers and the keys) where not even
    one step fits a window. `sphere generate` (sphere/runners.py) calls it with ``phases=("generate",)``
    before any model loads, and prints ``format_budgets`` of the result on stderr."""
    b = length_budgets(cfg, measure=measure, phases=phases)
    bad = [c for c in b["checks"] if c["status"] == "refused"]
    if bad:
        raise LengthBudgetError(f"length budget: {bad[0]['line']}")
    return b


def format_budgets(b: dict) -> str:
    """The dry run's block (stderr): windows, prompts, the step budget, then one line per check."""
    s = b["step"]
    lines = ["Length budgets (tokens):", "  windows:"]
    for k, w in b["windows"].items():
        lines.append(f"    - {k}: {_n(w['tokens'])} = {w['why']}")
    lines.append("  prompts (longest / typical):")
    for k, p in b["prompts"].items():
        lines.append(f"    - {k}: {_n(p['longest'])} / {_n(p['typical'])} ({p['how']})")
    full = s["max_depth"] * (s["max_step_tokens"] + s["delimiter_tokens"])
    lines.append(f"  chain: search.max_depth {s['max_depth']} steps x (search.max_step_tokens "
                 f"{_n(s['max_step_tokens'])} + {s['delimiter_tokens']} delimiter) = {_n(full)}; after the "
                 f"longest prompt the windows stop a chain at {_n(b['longest_chain'])}")
    for c in b["checks"]:
        lines.append(f"  - {c['line']}")
    return "\n".join(lines)
