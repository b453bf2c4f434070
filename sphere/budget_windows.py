"""The numbers of the length budgets: the allowances, ``Window`` (a model's window and where it came from),
``Prompt`` (longest / typical prompt) and the windows of the generation backends and the PRM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sphere.modelinfo import model_window

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


FLOOR = "floor"


def floor_prompt() -> Prompt:
    """A one-token prompt: the first pass of the checks, before any tokenizer loads."""
    return Prompt(1, 1, FLOOR)


def count_text(x: int | None) -> str:
    return "?" if x is None else f"{int(x):,}"


def full_steps(k: int) -> str:
    return f"{k} full step" + ("" if k == 1 else "s")


# ------------------------------------------------------------------------------------------ windows
def generation_window(cfg: Any, name: str) -> Window:
    """The window a generation backend gives model ``name``: min(backend.max_model_len, the model's own)."""
    mw, src = model_window(name)
    be = cfg.get("backend") or {}
    cap = be.get("max_model_len")
    cap = int(cap) if cap else None
    own = f"{name}'s max_position_embeddings {count_text(mw)} [{src}]"
    if mw and cap:
        if cap <= mw:
            return Window(cap, f"backend.max_model_len {count_text(cap)} (<= {own})", "backend.max_model_len")
        return Window(mw, f"{own} (backend.max_model_len {count_text(cap)} is clamped to it)",
                      f"{name}'s max_position_embeddings")
    if mw:
        return Window(mw, own, f"{name}'s max_position_embeddings")
    if cap:
        return Window(cap, f"backend.max_model_len {count_text(cap)} ({name}'s own window unknown)",
                      "backend.max_model_len")
    return Window(None, f"unknown ({name}: not local, not a known hub model)", "")


def prm_window(cfg: Any) -> Window | None:
    """The PRM's window: ``scorer.max_length`` or its max_position_embeddings (sphere/rewards/prm.py); the
    vLLM engine's ``scorer.max_model_len`` caps it. None when the step scorer is not a PRM."""
    sc = cfg.get("scorer") or {}
    if str(sc.get("name")) != "prm":
        return None
    name = str(sc.get("model"))
    mw, src = model_window(name)
    ml = sc.get("max_length")
    if ml:
        w = Window(int(ml),
                   f"scorer.max_length {count_text(ml)} ({name}'s max_position_embeddings {count_text(mw)})",
                   "scorer.max_length")
    elif mw:
        w = Window(mw, f"{name}'s max_position_embeddings {count_text(mw)} [{src}] (scorer.max_length null)",
                   "scorer.max_length")
    else:
        return Window(None, f"unknown ({name}: not local, not a known hub model; set scorer.max_length)",
                      "scorer.max_length")
    cap = sc.get("max_model_len") if str(sc.get("engine")) == "vllm" else None
    if cap and int(cap) < int(w.tokens):
        w = Window(int(cap), f"scorer.max_model_len {count_text(cap)} (vLLM engine; < {w.why})",
                   "scorer.max_model_len")
    return w
