"""Batched tree search over many problems at once: the SPHERE self-generation loop.

One ``SearchDriver`` owns a forest (``sphere.engine``), a backend (``sphere.backends``) and a step scorer
(``sphere.rewards``). Each round:

    select leaves across all live trees  ->  one backend call for all of them (n = E candidates each)
    ->  score every candidate step  ->  expand with the configured pruning  ->  back up  ->  retire trees

Trees retire when they reach their budget and new jobs join while the queue lasts, so every backend
call carries (close to) ``batch_leaves`` prompts until the data runs out (KataGo's lesson: batch across
many games first, within one tree second).

Two modes:

- ``paper`` (arXiv 2503.04813, Sec. 3.1): two greedy chains per problem. Every expansion samples E
  candidates; the pruning policy (``minmax`` in the paper) keeps the best and the worst by reward; the
  max chain follows the best kept child, the min chain the worst. Sol_max / Sol_min are the two chains.
- ``mcts``: UCT/PUCT with virtual loss, ``k`` leaves per tree per round, a simulation budget and any
  pruning policy; Sol_max / Sol_min are the highest- and lowest-value terminal trajectories.

Text never enters the engine: node payloads index ``self.steps`` (a Python list of step strings).

Duplicate candidates (``search.dedup_candidates``, default on): at T=0.8 the E samples of one expansion are
often the same text. Identical candidates (same text and finish) are merged into one child, kept at the
position of their first occurrence, and every distinct (problem, steps) item is scored once per call. The
merged child keeps the policy's probability mass: its prior is its multiplicity times the softmax weight of
its mean logprob (= the sum of the priors its copies would have had), the mean backup weights children by
multiplicity, and ``step_mult[payload]`` records the count. In paper mode the chains pick the same texts
as without merging (first maximum / first minimum by reward; identical texts score identically), so
Sol_max/Sol_min and the pairs are unchanged for a deterministic scorer (tests/test_dedup.py). UCT ignores
priors: there the multiplicity is only recorded.

The code lives in four modules, this one keeps the SearchDriver class and its phases and keeps the other
names importable: sphere.search.types (jobs, results, trajectories, the per-round state ``Round``,
``SearchStats``, ``call_fill``), sphere.search.config (``validate_search_config``, the engine config,
``estimate_backend_calls``) and sphere.search.candidates (merging duplicate candidates, the context-end
placeholder, ``answer_closed``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from sphere.backends.base import SamplingParams
from sphere.engine import make_forest
from sphere.search.config import (  # moved out of this module (issue #18); the names stay importable here
    _engine_config,
    validate_search_config,
)
from sphere.search.phases import RoundPhases
from sphere.search.policies import POLICIES, TreeState
from sphere.search.types import (  # moved out of this module (issue #18); the names stay importable here
    SearchJob,
    SearchResult,
    SearchStats,
    Trajectory,
)


class SearchDriver(RoundPhases):
    """Grow one tree per job, many jobs at once, through one backend.

    Args:
        backend: a ``sphere.backends`` backend (tokenizer + next_steps).
        scorer: a ``StepScorer`` (``score(items) -> list[list[float]]``).
        verifier: ``check(list[(completion, gold)]) -> list[bool]`` (``sphere.verify.check_answers``).
        scfg: the ``search`` config node (conf/search/*.yaml).
        delimiter: the step delimiter (prompt.step_delimiter).
        answer_after: the prompt family's ``answer_after`` (R1 distills: ``</think>``): a step with a
            ``\\boxed{}`` ends the solution only when the boxed answer follows this marker; inside the
            thinking block the chain goes on (a step that ended at EOS or the budget still ends it).
        build_prompt_ids: ``(job, steps) -> list[int]``: token ids of the prompt plus the steps so far.
    """

    def __init__(
        self,
        backend: Any,
        scorer: Any,
        verifier: Callable[[list[tuple[str, str]]], list[bool]],
        scfg: Any,
        *,
        delimiter: str = "\n\n",
        answer_after: str = "",
        engine_backend: str = "cpp",
        seed: int = 0,
    ):
        validate_search_config(scfg)
        self.backend = backend
        self.scorer = scorer
        self.verifier = verifier
        self.cfg = scfg
        self.delim = delimiter
        self.answer_after = str(answer_after or "")
        self.mode = str(scfg.mode)
        self.E = int(scfg.expansions)
        self.k = int(scfg.k)
        self.batch = int(scfg.batch_leaves)
        self.seed = int(seed)
        self.forest = make_forest(_engine_config(scfg), backend=engine_backend)
        self.policy = POLICIES[self.mode](self)  # paper chains or MCTS (sphere/search/policies.py)
        self.stats = SearchStats()
        self._queue: deque[SearchJob] = deque()
        # Python-side step store: payload id -> step text / raw score / verdict.
        self.steps: list[str] = [""]  # payload 0 = root (no text)
        self.step_score: list[float] = [0.0]
        self.step_finish: list[str] = [""]
        self.step_correct: list[bool] = [False]
        self.step_mult: list[int] = [1]  # how many of the E samples were this step (merged duplicates)
        self.dedup = bool(scfg.get("dedup_candidates", True))

    # ------------------------------------------------------------------ helpers
    def _path_steps(self, path_nodes: np.ndarray) -> list[int]:
        """Payload ids along a root->node path, root excluded."""
        pl = self.forest.payload(path_nodes)
        return [int(p) for p in pl[1:]]

    def _prompt_for(self, job: SearchJob, payloads: list[int]) -> list[int]:
        return job.prompt_fn([self.steps[p] for p in payloads])

    def trajectory(self, path_nodes: np.ndarray) -> Trajectory:
        pls = self._path_steps(path_nodes)
        rewards = self.forest.reward(path_nodes[1:]).tolist() if len(path_nodes) > 1 else []
        last = pls[-1] if pls else 0
        fin = self.step_finish[last] if pls else ""
        val = float(self.forest.value(path_nodes[-1:])[0]) if len(path_nodes) else 0.0
        correct = bool(self.step_correct[last]) if pls else False
        keep = len(pls)
        if pls and self.steps[last] == "" and fin in ("length", "window"):  # a cut placeholder: not a step
            keep -= 1
        return Trajectory(
            steps=[self.steps[p] for p in pls[:keep]],
            correct=correct,
            value=val,
            rewards=[float(r) for r in rewards[:keep]],
            scores=[float(self.step_score[p]) for p in pls[:keep]],
            finish=fin,
            nodes=[int(n) for n in path_nodes],
        )

    def _score(self, items: list[tuple[str, list[str]]]) -> list[list[float]]:
        """The step scorer on ``items``; with dedup on, each distinct (problem, steps) item once."""
        if not self.dedup:
            self.stats.scored_items += len(items)
            return self.scorer.score(items)
        index: dict[tuple, int] = {}
        uniq: list[tuple[str, list[str]]] = []
        where = []
        for x in items:
            key = (x[0], tuple(x[1]))
            if key not in index:
                index[key] = len(uniq)
                uniq.append(x)
            where.append(index[key])
        self.stats.scored_items += len(uniq)
        got = self.scorer.score(uniq)
        return [list(got[k]) for k in where]

    def _fits(self, prompt: list[int]) -> bool:
        """Whether the backend can still generate after ``prompt`` (one token at least)."""
        max_len = getattr(self.backend, "max_model_len", None)
        return not max_len or len(prompt) + 1 <= int(max_len)

    # ------------------------------------------------------------------ main loop
    def run(
        self,
        jobs: Iterable[SearchJob],
        on_result: Callable[[SearchResult], None],
        *,
        progress: Callable[[dict], None] | None = None,
    ) -> SearchStats:
        """Search every job; ``on_result`` is called once per finished job, as soon as it finishes.

        One round: select -> prompts -> backend call (cancel on error) -> score -> check -> shape ->
        expand/backup -> advance -> retire, each phase a method below over a ``Round``."""
        self._queue = deque(jobs)
        live: dict[int, TreeState] = {}  # root node id -> tree
        sp = SamplingParams(n=self.E, temperature=float(self.cfg.temperature), top_p=float(self.cfg.top_p),
                            max_tokens=int(self.cfg.max_step_tokens), seed=None, stop=[self.delim],
                            logprobs=bool(self.policy.uses_priors))
        round_idx = 0
        while self._queue or live:
            rd = self._select(live)
            if not rd.leaves:  # nothing selectable: every live tree is finished or exhausted
                self._retire(live, on_result, force_all=True)
                continue
            self._prompts(rd, live)
            sp.seed = self.seed * 1_000_003 + round_idx
            self._call_backend(rd, sp, live)
            self._score_candidates(rd, live)
            self._check_terminals(rd, live)
            self._shape(rd)
            self._expand_backup(rd, live)
            self.stats.rounds += 1
            round_idx += 1
            self._retire(live, on_result)
            if progress is not None:
                progress({"live": len(live), "queued": len(self._queue), **self.stats.as_dict(self.batch)})
        return self.stats

    def submit(self, job: SearchJob) -> None:
        """Queue one more job while ``run`` is going (e.g. a stage-2 job from a stage-1 result)."""
        self._queue.append(job)

    # ------------------------------------------------------------------ phases
    def _done(self, st: TreeState) -> bool:
        if bool(self.forest.is_exhausted(np.asarray([st.root], dtype=np.int32))[0]):
            return True
        return self.policy.done(st)

    def _retire(self, live: dict[int, TreeState], on_result, force_all: bool = False) -> None:
        t0 = time.perf_counter()
        done = [r for r, st in live.items() if force_all or self._done(st)]
        self.stats.engine_s += time.perf_counter() - t0
        for r in done:
            on_result(self._extract(live.pop(r)))

    def _extract(self, st: TreeState) -> SearchResult:
        _, tnodes, _ = self.forest.terminals(np.asarray([st.root], dtype=np.int32))
        terms = [self.trajectory(self._path_to(node)) for node in tnodes.tolist()]
        smax, smin = self.policy.extremes(st, terms)
        snap = self.tree_snapshot(st.root) if st.job.meta.get("snapshot") else None
        return SearchResult(job=st.job, sol_max=smax, sol_min=smin, terminals=terms, nodes=int(st.nodes),
                            expansions=int(st.expansions), snapshot=snap)

    def _path_to(self, node: int) -> np.ndarray:
        off, nodes = self.forest.paths(np.asarray([node], dtype=np.int32))
        return nodes[off[0] : off[1]]

    def tree_snapshot(self, root: int) -> dict:
        snap = dict(self.forest.tree_snapshot(root))
        snap["text"] = [self.steps[int(p)] for p in snap["payload"]]
        return snap
