"""The records of a batched search (moved out of sphere/search/driver.py, issue #18): ``SearchJob`` (one tree
to grow), ``Trajectory`` (one root-to-terminal path), ``SearchResult`` (a finished job's Sol_max/Sol_min and
terminals), ``Round`` (the per-round state the driver's phases fill in: selected leaves, prompts, candidates,
scores, rewards, child ids), ``SearchStats`` (the run's counters and timings) and ``call_fill`` (how full the
backend calls were, computed here only)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SearchJob:
    """One tree to grow. ``prompt_steps`` are fixed steps that precede the search (none usually)."""

    job_id: str
    problem: dict  # {"id", "problem", "answer", ...}
    # steps so far -> token ids of the whole prompt (problem or reflection header + steps + delimiters).
    # The whole text is tokenised at once so the model sees exactly the tokenisation it was trained on.
    prompt_fn: Callable[[list[str]], list[int]]
    meta: dict = field(default_factory=dict)


@dataclass
class Trajectory:
    steps: list[str]
    correct: bool
    value: float  # engine value of the terminal node
    rewards: list[float]  # shaped reward per step
    scores: list[float]  # raw step-scorer score per step
    # how the last step ended: answer (a stated \\boxed{} answer) | eos (the model ended its turn) | depth (cut
    # at search.max_depth) | length (cut: the next prompt did not fit the policy's window) | window (cut: the next
    # step did not fit the step scorer's window). Cut chains (depth, length, window) are graded wrong.
    finish: str
    nodes: list[int] = field(default_factory=list, repr=False)  # forest node ids, root first (this run only)


@dataclass
class SearchResult:
    job: SearchJob
    sol_max: Trajectory | None
    sol_min: Trajectory | None
    terminals: list[Trajectory]
    nodes: int
    expansions: int
    snapshot: dict | None = None  # engine tree snapshot (numpy arrays) + step texts, when requested


@dataclass
class Round:
    """One search round across trees. L = selected leaves, C = candidates (flat over the leaves, grouped by
    leaf in selection order; leaf i owns ``flat[a:b]`` for ``(a, b) = spans()[i]``)."""

    roots: list[int] = field(default_factory=list)  # [L] root node id of each selected leaf's tree
    leaves: list[int] = field(default_factory=list)  # [L] selected leaf node ids
    queue_nonempty: bool = False  # jobs were still queued (the call counts towards the batch-fill figure)
    leaves_arr: Any = None  # int32[L]
    paths: list[list[int]] = field(default_factory=list)  # [L] step payload ids root->leaf (root excluded)
    prompts: list[list[int]] = field(default_factory=list)  # [L] prompt token ids
    cands: list[list[Any]] = field(default_factory=list)  # [L][n_i] Candidates (duplicates merged)
    mults: list[list[int]] = field(default_factory=list)  # [L][n_i] multiplicity of each candidate
    flat: list[Any] = field(default_factory=list)  # [C]
    owner: list[int] = field(default_factory=list)  # [C] leaf index of each candidate
    items: list[tuple[str, list[str]]] = field(default_factory=list)  # [C] (problem, steps + candidate)
    scores: list[list[float]] = field(default_factory=list)  # [C] step-scorer scores (last = the candidate)
    terminal: list[bool] = field(default_factory=list)  # [C]
    verdicts: dict[int, bool] = field(default_factory=dict)  # candidate index -> checker verdict (terminals)
    mult: Any = None  # float64[C]
    payloads: list[int] = field(default_factory=list)  # [C] step-store ids
    rewards: list[float] = field(default_factory=list)  # [C]
    values: list[float] = field(default_factory=list)  # [C]
    terms: list[int] = field(default_factory=list)  # [C] 1 = terminal
    priors: Any = None  # float64[C]
    child_ids: Any = None  # int32[C]

    def spans(self) -> list[tuple[int, int]]:
        out, a = [], 0
        for cl in self.cands:
            out.append((a, a + len(cl)))
            a += len(cl)
        return out


@dataclass
class SearchStats:
    rounds: int = 0
    backend_calls: int = 0
    leaves: int = 0  # prompts sent (one per selected leaf)
    full_calls: int = 0  # calls made while the job queue was not empty
    full_call_leaves: int = 0
    candidates: int = 0
    tokens: int = 0
    engine_s: float = 0.0
    backend_s: float = 0.0
    scorer_s: float = 0.0
    verify_s: float = 0.0
    collisions: int = 0
    pruned: int = 0
    context_ends: int = 0  # chains ended because their prompt filled the backend's context window
    window_ends: int = 0  # candidate steps that did not fit the step scorer's window (their chain ends there)
    merged: int = 0  # duplicate candidates merged into a sibling (search.dedup_candidates)
    scored_items: int = 0  # (problem, steps) items sent to the step scorer (distinct per call when deduping)

    def as_dict(self, batch_leaves: int) -> dict:
        d = dict(self.__dict__)
        d.update(call_fill(d, batch_leaves))
        return d


def call_fill(stats: dict, batch_leaves: int) -> dict:
    """How full the backend calls were, from summed counters (the one place this is computed):
    ``mean_leaves_per_call`` = prompts per call; ``leaves_per_call_frac`` = prompts per call over the configured
    batch, counting only calls made while problems were still queued (the tail of a run cannot be full);
    None when no such call was made."""
    full = stats.get("full_calls", 0)
    return {"mean_leaves_per_call": stats.get("leaves", 0) / max(1, stats.get("backend_calls", 0)),
            "leaves_per_call_frac": (stats.get("full_call_leaves", 0) / full) / max(1, batch_leaves)
            if full else None}
