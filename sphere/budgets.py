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

Modules: ``sphere.budget_windows`` (the numbers, ``Window``, ``Prompt``, the models' windows),
``sphere.budget_prompts`` (problems, local tokenizers, prompt lengths), ``sphere.budget_checks`` (one check
per model that reads a chain); this one runs them (``length_budgets``) and prints them (``format_budgets``).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from omegaconf import OmegaConf

from sphere.budget_checks import eval_check, generation_checks
from sphere.budget_prompts import (
    measure_prompts,
)
from sphere.budget_windows import (
    LengthBudgetError,
    Prompt,
    Window,
    floor_prompt,
    generation_window,
    prm_window,
)
from sphere.budget_windows import (
    count_text as _n,
)


def _models_and_windows(cfg: Any, generates: bool) -> tuple[dict[str, str], dict[str, Window | None]]:
    """Which model reads prompts in each role (policy, small, prm, train_target, eval) and its window."""
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
    return names, W


def length_budgets(cfg: Any, measure: bool = True, phases: tuple[str, ...] = ("generate", "train", "eval")) -> dict:
    """Every length budget against its window (see the module docstring). ``measure=False``: windows and
    allowances only (no tokenizer, no problem files), for the memory plan of a real run. ``phases``: which
    budgets (`sphere generate` checks ``("generate",)``; `sphere run` all three). The dict: ``windows``,
    ``prompts``, ``step``, ``checks`` (each: check, status ok | over | unknown | refused, line, and need /
    limit), ``longest_chain`` and ``prm_input_max`` (tokens; None where unknown)."""
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
    names, W = _models_and_windows(cfg, generates)

    def run_checks(P: dict[str, Prompt]) -> tuple[list[dict], dict]:
        checks: list[dict] = []
        extra: dict = {}
        if generates:
            extra = generation_checks(cfg, P, W, step, checks)
        if not any(c["status"] == "refused" for c in checks):
            eval_check(cfg, P, W, checks)
        return checks, extra

    # first with a one-token prompt: a step larger than a window is refused before any tokenizer loads
    floor = {k: floor_prompt() for k in ("policy", "reflection", "small", "prm", "train", "eval")}
    checks, extra = run_checks(floor)
    if not any(c["status"] == "refused" for c in checks):
        P = measure_prompts(cfg, names, step, measure)
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
