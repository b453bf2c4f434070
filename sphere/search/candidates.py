"""Candidate steps of one expansion (moved out of sphere/search/driver.py, issue #18): ``merge_duplicates``
(identical candidates of a leaf merged into their first occurrence, with multiplicities), the placeholder
candidate of a leaf whose prompt fills the context window (``_CONTEXT_END``, ``_context_end``) or whose
step the scorer's window cannot take (``_WINDOW_END``, ``_window_end``) and
``answer_closed`` (a boxed answer after the prompt family's ``answer_after`` marker)."""

from __future__ import annotations

from typing import Any

from sphere.backends.base import Candidate, has_boxed_answer

_CONTEXT_END = "context_end"  # finish of the placeholder candidate of a leaf whose prompt fills the window
_WINDOW_END = "window_end"  # finish of the placeholder of a candidate step the step scorer's window cannot take
CUT_ENDS = (_CONTEXT_END, _WINDOW_END)  # placeholders: the chain is cut there, the empty step is not part of it


def _context_end(finish: str = _CONTEXT_END):
    return Candidate(text="", token_ids=[], logprob_sum=0.0, logprob_mean=0.0, finish=finish,
                     token_logprobs=[])


def _window_end():
    return _context_end(_WINDOW_END)


def answer_closed(text: str, marker: str) -> bool:
    """A ``\\boxed{}`` answer after ``marker`` (R1: the end of the thinking block) in ``text``."""
    i = text.find(marker)
    return i >= 0 and has_boxed_answer(text[i + len(marker):])


def merge_duplicates(cands: list[list[Any]]) -> tuple[list[list[Any]], list[list[int]]]:
    """Per leaf, identical candidates (same text and finish) merged into their first occurrence.

    Returns the distinct candidates (first-occurrence order) and, parallel to them, their multiplicities."""
    out, mults = [], []
    for cl in cands:
        seen: dict[tuple[str, str], int] = {}
        row, m = [], []
        for c in cl:
            key = (c.text, c.finish)
            k = seen.get(key)
            if k is None:
                seen[key] = len(row)
                row.append(c)
                m.append(1)
            else:
                m[k] += 1
        out.append(row)
        mults.append(m)
    return out, mults
