"""The replay backend: grade precomputed completions with the evaluation protocol (``sphere eval``).

Nothing is generated. Completions come from

- a JSONL file (``replay.path``), one record per problem: ``{"id": ..., "completion": "..."}`` or
  ``{"id": ..., "completions": ["...", ...]}`` (several samples, for pass@k / maj@k), optionally with
  ``"benchmark": "<name>"`` to keep ids of different benchmarks apart; or
- the benchmarks' own reference solutions (``replay.references=true``), graded verbatim (GSM8K's
  ``#### N`` line and MATH's ``\\boxed{}`` are left for the checker to find).

Completions are looked up by problem id, so this backend has no model and no tokenizer: the harness calls
``complete_records`` instead of ``complete`` (token-id prompts cannot be mapped back to problems here), and
``next_steps``/``score`` raise, naming what replay supports.
"""

from __future__ import annotations

import os
from pathlib import Path

from sphere.backends.base import Candidate, SamplingParams, has_boxed_answer
from sphere.io import iter_jsonl_strict

MISSING_POLICIES = ("skip", "empty", "error")


def _candidate(text: str) -> Candidate:
    return Candidate(
        text=text,
        token_ids=[],
        logprob_sum=0.0,
        logprob_mean=0.0,
        finish="answer" if has_boxed_answer(text) else "eos",
    )


class ReplayBackend:
    """Serve stored completions by problem id.

    ``completions``: ``{(benchmark or None, id): [text, ...]}``; ``references``: take ``record["solution"]``
    when no stored completion exists; ``missing``: what to do with a problem that has neither — ``skip``
    (leave it out of the benchmark, counted as ``skipped``), ``empty`` (grade an empty completion: wrong),
    ``error`` (raise, naming the problem).
    """

    name = "replay"
    tokenizer = None

    def __init__(
        self,
        completions: dict[tuple[str | None, str], list[str]] | None = None,
        *,
        references: bool = False,
        missing: str = "skip",
        source: str = "",
    ) -> None:
        if missing not in MISSING_POLICIES:
            raise ValueError(f"replay.missing: {missing!r} is not one of {', '.join(MISSING_POLICIES)}")
        if not completions and not references:
            raise ValueError(
                "backend=replay needs replay.path=FILE.jsonl (records with id and completion) "
                "or replay.references=true (grade the benchmarks' reference solutions)"
            )
        self.completions = dict(completions or {})
        self.references = references
        self.missing = missing
        self.source = source or ("references" if references else "memory")
        self._served = 0
        self._calls = 0

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kw) -> ReplayBackend:
        """Read ``{"id", "completion" | "completions"[, "benchmark"]}`` records; errors name the file and
        the record."""
        path = Path(path)
        table: dict[tuple[str | None, str], list[str]] = {}
        for k, rec in enumerate(iter_jsonl_strict(path, required=("id",)), 1):
            where = f"{path}: record {k} (id {rec['id']!r})"
            if "completions" in rec:
                texts = rec["completions"]
                if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
                    raise ValueError(f"{where}: 'completions' must be a non-empty list of strings")
            elif "completion" in rec:
                if not isinstance(rec["completion"], str):
                    raise ValueError(f"{where}: 'completion' must be a string")
                texts = [rec["completion"]]
            else:
                raise ValueError(f"{where}: needs 'completion' (string) or 'completions' (list of strings)")
            bench = rec.get("benchmark")
            if bench is not None and not isinstance(bench, str):
                raise ValueError(f"{where}: 'benchmark' must be a string or absent")
            key = (bench, rec["id"])
            if key in table:
                raise ValueError(f"{where}: a completion for this id{' in ' + bench if bench else ''} "
                                 "was already given; one record per problem")
            table[key] = list(texts)
        if not table:
            raise ValueError(f"{path}: no records (expected JSONL with id and completion)")
        return cls(table, source=str(path), **kw)

    # -- replay interface used by sphere.evaluation.harness -----------------------------------------
    def _texts(self, benchmark: str, rec: dict) -> list[str] | None:
        for key in ((benchmark, rec["id"]), (None, rec["id"])):
            if key in self.completions:
                return self.completions[key]
        if self.references and isinstance(rec.get("solution"), str) and rec["solution"].strip():
            return [rec["solution"]]
        return None

    def select(self, benchmark: str, records: list[dict]) -> tuple[list[dict], int]:
        """The records this backend can answer, and how many were skipped (``missing=skip``)."""
        if self.missing != "skip":
            return records, 0
        kept = [r for r in records if self._texts(benchmark, r) is not None]
        return kept, len(records) - len(kept)

    def complete_records(
        self, benchmark: str, records: list[dict], params: SamplingParams
    ) -> list[list[Candidate]]:
        """``params.n`` candidates per record. A record with fewer stored completions than ``n`` is an
        error (replaying cannot invent samples); with more, the first ``n`` are used."""
        self._calls += 1
        out: list[list[Candidate]] = []
        for rec in records:
            texts = self._texts(benchmark, rec)
            if texts is None:
                if self.missing == "error":
                    raise KeyError(
                        f"replay ({self.source}): no completion for {benchmark} problem {rec['id']!r}; "
                        "set replay.missing=skip|empty to leave it out or grade it as wrong"
                    )
                texts = [""] * params.n
            if len(texts) < params.n:
                raise ValueError(
                    f"replay ({self.source}): {benchmark} problem {rec['id']!r} has {len(texts)} "
                    f"completion(s) but sampling.n={params.n}; store 'completions' with >= n entries"
                )
            out.append([_candidate(t) for t in texts[: params.n]])
            self._served += params.n
        return out

    # -- Backend protocol -----------------------------------------------------------------------------
    def complete(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Candidate]]:
        raise TypeError(
            "replay backend: completions are looked up by problem id; call "
            "complete_records(benchmark, records, params) (sphere eval does), not complete(token ids)"
        )

    def next_steps(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Candidate]]:
        raise TypeError("replay backend: no model, so no step generation; use it only with sphere eval")

    def score(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
        raise TypeError("replay backend: no model, so no log-probabilities; use it only with sphere eval")

    def stats(self) -> dict:
        return {"calls": self._calls, "completions_served": self._served, "source": self.source}

    def close(self) -> None:
        pass


def make_replay_backend(cfg, model_path=None) -> ReplayBackend:
    """Build from config: ``replay.path`` (JSONL of completions), ``replay.references``,
    ``replay.missing``."""
    del model_path  # replay has no model
    rc = cfg.get("replay") if hasattr(cfg, "get") else None
    path = rc.get("path") if rc is not None else None
    references = bool(rc.get("references", False)) if rc is not None else False
    missing = str(rc.get("missing", "skip")) if rc is not None else "skip"
    if path:
        return ReplayBackend.from_file(path, references=references, missing=missing)
    return ReplayBackend(references=references, missing=missing)
