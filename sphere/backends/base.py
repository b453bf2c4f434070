"""The generation-backend contract (docs/ARCHITECTURE.md, "Backend protocol") and helpers every backend shares.

A backend turns prompts given as token ids into candidates:

- ``next_steps``: n candidate next steps per partial solution, each stopped at the step delimiter
  (``params.stop``; the caller puts the delimiter there, ``sphere.prompts`` knows it per family), at the
  end of the solution (EOS) or at ``params.max_tokens``.
- ``complete``: n full solutions per prompt (evaluation, rollouts); stops at EOS, ``params.max_tokens`` or
  any string of ``params.stop``.
- ``score``: per-token log-probabilities of given continuations after given prompts.

All backends return the same ``Candidate`` fields, computed the same way (``finalize``), so the search
cannot tell them apart except by speed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

FINISH_REASONS = ("step", "answer", "length", "eos")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 0.8  # 0 -> greedy
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    stop: list[str] | None = None  # step mode adds the delimiter
    # per-token logprobs of the sampled tokens (Candidate.logprob_*: the PUCT prior). Off where nothing reads
    # them (paper chains, UCT): vLLM then skips building logprob data for every sampled token (~35% of a
    # mini-world generate call). Candidates then carry logprob 0.
    logprobs: bool = True

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Candidate:
    text: str  # generated text, WITHOUT the trailing delimiter
    token_ids: list[int]  # generated token ids (those that decode to `text`, see `trim_to_text`)
    logprob_sum: float
    logprob_mean: float
    finish: str  # "step" (hit the delimiter) | "answer" (\boxed{} seen / solution ended) | "length" | "eos"
    token_logprobs: list[float] = field(default_factory=list, repr=False)  # one per token id
    stop_hit: bool = False  # the sample ended at the step delimiter (the model meant to go on)


@runtime_checkable
class Backend(Protocol):
    name: str
    tokenizer: PreTrainedTokenizerBase

    def next_steps(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Candidate]]: ...

    def complete(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Candidate]]: ...

    def score(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[float]]: ...

    def stats(self) -> dict: ...

    def close(self) -> None: ...


class ContextOverflowError(ValueError):
    """A prompt (plus its generation budget) does not fit the model's context window."""


class BackendUnavailableError(RuntimeError):
    """A server did not answer (connection refused, timeout) after all retries."""


def has_boxed_answer(text: str) -> bool:
    r"""True when ``text`` contains ``\boxed{...}`` (or ``\fbox{...}``) with balanced, closed braces."""
    for key in ("\\boxed{", "\\fbox{"):
        start = text.find(key)
        while start >= 0:
            depth, i = 1, start + len(key)
            while i < len(text) and depth:
                c = text[i]
                depth += (c == "{") - (c == "}")
                i += 1
            if depth == 0:
                return True
            start = text.find(key, start + 1)
    return False


def cut_at_stop(text: str, stop: list[str] | None) -> tuple[str, bool]:
    """Text before the earliest stop string, and whether one was found."""
    best = -1
    for s in stop or ():
        if not s:
            continue
        i = text.find(s)
        if i >= 0 and (best < 0 or i < best):
            best = i
    return (text[:best], True) if best >= 0 else (text, False)


def trim_to_text(tokenizer, token_ids: list[int], text: str) -> int:
    """The number of leading ``token_ids`` that decode to (at least) ``text``.

    Engines report the tokens of the stop string too; this keeps the tokens that produce the returned
    text. When the delimiter shares a token with the text (BPE merges such as ``".\n\n"``) the last kept
    token also carries the start of the delimiter: the round trip is then exact up to that token.
    Binary search over prefix decodes: O(log L) decodes.
    """
    if not text:
        return 0
    lo, hi = 1, len(token_ids)
    full = tokenizer.decode(token_ids[:hi], skip_special_tokens=True)
    if len(full) < len(text):
        return hi
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(token_ids[:mid], skip_special_tokens=True)) >= len(text):
            hi = mid
        else:
            lo = mid + 1
    return lo


def finalize(
    tokenizer,
    gen_ids: list[int],
    gen_logprobs: list[float],
    *,
    stop: list[str] | None,
    hit_eos: bool,
    hit_length: bool,
    text: str | None = None,
    hit_stop: bool | None = None,
) -> Candidate:
    """Build a Candidate from raw generated tokens (without EOS/padding) the same way for every backend.

    ``text``/``hit_stop``: the engine's text and verdict when it already cut at a stop string (vLLM, HTTP);
    otherwise the tokens are decoded and cut here. Finish: "step" if a stop string was hit, "eos" on EOS,
    "length" at the token budget; any of them becomes "answer" when the text holds a closed ``\\boxed{}``
    (the step carries the final answer).
    """
    if text is None:
        raw = tokenizer.decode(gen_ids, skip_special_tokens=True)
        text, found = cut_at_stop(raw, stop)
        hit_stop = found
        cut_needed = found
    else:
        # The engine may still show a stop string (e.g. a server that ignores `stop`): cut defensively.
        text, found = cut_at_stop(text, stop)
        hit_stop = bool(hit_stop) or found
        cut_needed = hit_stop
    k = trim_to_text(tokenizer, gen_ids, text) if cut_needed else len(gen_ids)
    ids = [int(t) for t in gen_ids[:k]]
    lps = [float(x) for x in gen_logprobs[:k]]
    if hit_stop:
        finish = "step"
    elif hit_length and not hit_eos:
        finish = "length"
    else:
        finish = "eos"
    if has_boxed_answer(text):
        finish = "answer"
    s = float(sum(lps))
    return Candidate(
        text=text,
        token_ids=ids,
        logprob_sum=s,
        logprob_mean=s / len(lps) if lps else 0.0,
        finish=finish,
        token_logprobs=lps,
        stop_hit=bool(hit_stop),
    )


def check_context(prompts: list[list[int]], max_new: int, max_len: int, where: str) -> None:
    """Fail at once, naming the prompt index and the limit, when a prompt cannot fit the context window."""
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"{where}: prompt {i} is empty (token ids expected)")
        if len(p) + 1 > max_len:
            raise ContextOverflowError(
                f"{where}: prompt {i} has {len(p)} tokens; the context window is {max_len} "
                f"(model max / backend max_model_len). Shorten the prompt or raise max_model_len."
            )
    del max_new  # generation is clipped to the window rather than refused (see backends)


def check_sampling(params: SamplingParams) -> None:
    if not isinstance(params, SamplingParams):
        raise TypeError(f"expected sphere.backends.SamplingParams, got {type(params).__name__}")


class BackendBase:
    """Plumbing shared by the generating backends: ``next_steps`` and ``complete`` differ only in the
    params the caller passes (the step delimiter as a stop string, the token budget), so both go to the
    backend's ``_generate``; ``score`` inputs are validated and joined once here."""

    max_model_len: int | None = None

    def next_steps(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Candidate]]:
        return self._generate(prompts, params)

    def complete(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Candidate]]:
        return self._generate(prompts, params)

    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Candidate]]:
        raise NotImplementedError

    def _score_rows(self, prompts: list[list[int]], continuations: list[list[int]],
                    where: str) -> list[list[int]]:
        """prompt + continuation token rows for ``score``; checked against the context window."""
        if len(prompts) != len(continuations):
            raise ValueError(f"score: {len(prompts)} prompts but {len(continuations)} continuations")
        rows = [list(p) + list(c) for p, c in zip(prompts, continuations, strict=True)]
        check_context(rows, 0, self.max_model_len, where)
        return rows


def model_eos_ids(model_dir, tokenizer) -> set[int]:
    """Every token that ends a turn for the model in ``model_dir``: the tokenizer's EOS and the
    ``eos_token_id`` of ``config.json`` and ``generation_config.json`` (an int or a list). Phi-4-mini, for
    one, ends turns with ``<|end|>``, which only its generation config names (its tokenizer's EOS is
    ``<|endoftext|>``); vLLM stops there too, and the token must not reach the step text."""
    ids = {getattr(tokenizer, "eos_token_id", None)}
    for name in ("config.json", "generation_config.json"):
        p = Path(model_dir) / name
        try:
            e = json.loads(p.read_text()).get("eos_token_id") if p.is_file() else None
        except (OSError, ValueError):
            e = None
        ids.update(e if isinstance(e, list) else [e])
    return {int(i) for i in ids if i is not None}
