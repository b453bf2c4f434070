"""Reading and checking ``pairs.jsonl``: the preference data `sphere generate` writes, `sphere train` reads.

One JSON object per line, TRL's preference format plus SPHERE bookkeeping::

    {"prompt": str, "chosen": str, "rejected": str, "stage": 1|2|3, "problem_id": str, ...}

or, for models with a chat template, conversational messages::

    {"prompt": [{"role": "user", "content": ...}], "chosen": [{"role": "assistant", "content": ...}], ...}

The prompt is exactly the text the policy saw; the completions follow it directly. A file is all plain text
or all conversational. Errors name ``file:line``, the field and what is allowed.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sphere.io import iter_jsonl_strict

TEXT_FIELDS = ("prompt", "chosen", "rejected")
STAGES = (1, 2, 3)


@dataclass
class PairSet:
    """Validated pairs: ``rows`` hold only prompt/chosen/rejected (what the trainer consumes)."""

    path: Path
    rows: list[dict]
    conversational: bool
    stages: Counter = field(default_factory=Counter)  # stage -> count (missing stage counted as 0)

    def __len__(self) -> int:
        return len(self.rows)


def _check_messages(v, where: str, key: str) -> None:
    if not v:
        raise ValueError(f"{where}: field {key!r} is an empty message list; expected at least one message")
    for i, m in enumerate(v):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(
                f"{where}: field {key!r} message {i} must be an object with string 'role' and 'content' "
                f"(got {m!r:.80})"
            )


def load_pairs(path: str | os.PathLike) -> PairSet:
    """Parse and validate a pairs file; raises ``ValueError`` with ``file:line`` on the first bad record.

    Rules: ``prompt``/``chosen``/``rejected`` are all non-empty strings, or all lists of
    ``{"role", "content"}`` messages (one kind for the whole file); ``chosen != rejected``; ``stage``, when
    present, is 1, 2 or 3. Extra fields are allowed and ignored. Zero pairs is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: pairs file not found (config key `pairs`, or sphere generate's pairs.jsonl)")
    rows: list[dict] = []
    stages: Counter = Counter()
    kind: str | None = None  # "text" | "chat", fixed by the first record
    first_line = 0
    lineno = 0
    for lineno, rec in _iter_numbered(path):
        where = f"{path}:{lineno}"
        vals = {}
        for k in TEXT_FIELDS:
            if k not in rec:
                raise ValueError(
                    f"{where}: missing field {k!r}; a pair needs 'prompt', 'chosen' and 'rejected'")
            v = rec[k]
            if isinstance(v, str):
                if not v.strip():
                    raise ValueError(f"{where}: field {k!r} is an empty string; expected non-empty text")
                this = "text"
            elif isinstance(v, list):
                _check_messages(v, where, k)
                this = "chat"
            else:
                raise ValueError(
                    f"{where}: field {k!r} must be a string or a list of {{'role','content'}} messages "
                    f"(got {type(v).__name__})"
                )
            if kind is None:
                kind, first_line = this, lineno
            elif this != kind:
                names = {"chat": "conversational", "text": "plain text"}
                raise ValueError(
                    f"{where}: field {k!r} is {names[this]} but {path}:{first_line} set the file to "
                    f"{names[kind]}; a pairs file must be all plain text or all conversational"
                )
            vals[k] = v
        if vals["chosen"] == vals["rejected"]:
            raise ValueError(f"{where}: 'chosen' and 'rejected' are identical; a pair must differ")
        st = rec.get("stage")
        if st is not None and (isinstance(st, bool) or st not in STAGES):
            raise ValueError(f"{where}: field 'stage' must be one of {list(STAGES)} (got {st!r})")
        stages[int(st or 0)] += 1
        rows.append(vals)
    if not rows:
        raise ValueError(
            f"{path}: no preference pairs (file is empty); `sphere generate` found no chosen/rejected pairs, "
            "so there is nothing to train on"
        )
    return PairSet(path=path, rows=rows, conversational=kind == "chat", stages=stages)


def _iter_numbered(path: Path):
    """(line number, record) pairs; blank lines keep their numbers so errors point at the right line."""
    # iter_jsonl_strict skips blank lines and reports JSON/UTF-8 errors with file:line; we recount lines to
    # attach line numbers to the records it yields.
    it = iter_jsonl_strict(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            yield lineno, next(it)
