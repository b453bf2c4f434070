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


_PROBE = "<<sphere-completion-probe>>"


def _overlap(head: str, text: str) -> int:
    """Length of the longest suffix of ``head`` that ``text`` starts with (e.g. R1's ``<think>\\n``, which the
    generation prompt ends with and a conversational completion also starts with)."""
    for n in range(min(len(head), len(text)), 0, -1):
        if head.endswith(text[:n]):
            return n
    return 0


def render_chat_pairs(rows: list[dict], tok, source: str = "pairs") -> tuple[list[dict], dict]:
    """Conversational pairs as the plain text the policy generated them in, for the trainer.

    TRL renders a conversational pair as ``template(prompt + [assistant])`` and trains on what follows the
    common prefix with ``template(prompt, add_generation_prompt=True)``. Templates that rewrite earlier
    assistant turns make that silently wrong: the DeepSeek-R1 distills' template keeps only the text after
    ``</think>``, so DPO would train on the final sentence and never see the reasoning the search compared
    (and on a prompt without the ``<think>\\n`` generation started with). Here the prompt is the template's
    generation prompt (exactly what `sphere generate` and `sphere eval` feed the model), the completion is the
    assistant text with any part the prompt already ends with removed (the family's ``assistant_prefix``),
    followed by the template's end of an assistant turn (probed once per prompt; a trailing newline after the
    EOS token is dropped, the model stops at the EOS). A leading BOS the tokenizer adds by itself is removed
    from the prompt text so it is not doubled. Returns ``(rows, stats)``; ``stats["template_rewrites"]``
    counts the pairs TRL's own rendering would have changed.
    """
    out, rewrites = [], 0
    eos = tok.eos_token or ""
    bos = tok.bos_token
    auto_bos = bool(bos) and tok("x")["input_ids"][:1] == [tok.bos_token_id]
    for i, row in enumerate(rows):
        msgs = list(row["prompt"])
        head = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        probe = tok.apply_chat_template(msgs + [{"role": "assistant", "content": _PROBE}], tokenize=False)
        at = probe.rfind(_PROBE)
        if at < 0:
            raise ValueError(f"{source}: pair {i}: the chat template drops the assistant turn; cannot render "
                             "the completion (use plain-text pairs for this model)")
        end = probe[at + len(_PROBE):]
        if eos and end.rstrip().endswith(eos):
            end = end.rstrip()
        new = dict(row)
        for key in ("chosen", "rejected"):
            ms = row[key]
            if len(ms) != 1 or ms[0]["role"] != "assistant":
                raise ValueError(f"{source}: pair {i}: field {key!r} must be one assistant message "
                                 f"(got roles {[m['role'] for m in ms]})")
            content = ms[0]["content"]
            text = content[_overlap(head, content):] + end
            if key == "chosen":
                trl = tok.apply_chat_template(msgs + ms, tokenize=False)
                common = next((j for j, (a, b) in enumerate(zip(head, trl)) if a != b), min(len(head), len(trl)))
                rewrites += trl[common:].rstrip() != text.rstrip()
            new[key] = text
        new["prompt"] = head[len(bos):] if auto_bos and head.startswith(bos) else head
        out.append(new)
    return out, {"template_rewrites": rewrites}
