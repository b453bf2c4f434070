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
from sphere.rewards.base import combine_outcome, scorer_fits, shape_rewards
from sphere.search.candidates import (  # moved out of this module (issue #18); the names stay importable here
    _CONTEXT_END,
    _WINDOW_END,
    CUT_ENDS,
    _context_end,
    _window_end,
    answer_closed,
    merge_duplicates,
)
from sphere.search.config import (  # moved out of this module (issue #18); the names stay importable here
    _engine_config,
    estimate_backend_calls,  # noqa: F401
    validate_search_config,
)
from sphere.search.policies import POLICIES, TreeState
from sphere.search.types import (  # moved out of this module (issue #18); the names stay importable here
    Round,
    SearchJob,
    SearchResult,
    SearchStats,
    Trajectory,
    call_fill,  # noqa: F401
)


class SearchDriver:
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
    def _select(self, live: dict[int, TreeState]) -> Round:
        """Leaves across all live trees; new jobs join until the batch is full."""
        t0 = time.perf_counter()
        rd = Round()
        pending = self.policy.select_all(live, rd.roots, rd.leaves)
        while self._queue and pending < self.batch:
            root = int(self.forest.add_roots(np.array([0], dtype=np.int64))[0])
            st = TreeState(job=self._queue.popleft(), root=root, heads=[root, root])
            live[root] = st
            pending += self.policy.select_new(st, rd.roots, rd.leaves)
        if len(rd.leaves) > self.batch:
            self.policy.cap(rd.roots, rd.leaves)
        rd.queue_nonempty = bool(self._queue)
        self.stats.engine_s += time.perf_counter() - t0
        return rd

    def _prompts(self, rd: Round, live: dict[int, TreeState]) -> None:
        """Each leaf's root->leaf step payloads and the token ids of its prompt."""
        t0 = time.perf_counter()
        rd.leaves_arr = np.asarray(rd.leaves, dtype=np.int32)
        offsets, nodes = self.forest.paths(rd.leaves_arr)
        self.stats.engine_s += time.perf_counter() - t0
        for i, root in enumerate(rd.roots):
            pls = [int(p) for p in self.forest.payload(nodes[offsets[i]: offsets[i + 1]])[1:]]
            rd.paths.append(pls)
            rd.prompts.append(self._prompt_for(live[root].job, pls))

    def _call_backend(self, rd: Round, sp: SamplingParams, live: dict[int, TreeState]) -> None:
        """One backend call for every leaf whose prompt still fits the context window; a chain whose prompt
        no longer fits ends there (finish="length"), and so does a candidate step the scorer's window cannot
        take (finish="window"): cut chains are graded wrong. A failed call removes the virtual loss of the
        selected leaves (MCTS) and re-raises, leaving the trees intact."""
        t0 = time.perf_counter()
        fits = [self._fits(p) for p in rd.prompts]
        send = [p for p, ok in zip(rd.prompts, fits, strict=True) if ok]
        try:
            got = iter(self.backend.next_steps(send, sp) if send else [])
        except Exception:
            if self.policy.backs_up:
                self.forest.cancel(rd.leaves_arr)
            raise
        cands = [next(got) if ok else [_context_end()] for ok in fits]
        st = self.stats
        st.context_ends += fits.count(False)
        st.window_ends += self._cut_at_scorer_window(rd, cands, live)
        st.backend_s += time.perf_counter() - t0
        st.backend_calls += 1
        st.leaves += len(rd.prompts)
        if rd.queue_nonempty:
            st.full_calls += 1
            st.full_call_leaves += len(rd.prompts)
        for cl in cands:
            st.candidates += len(cl)
            st.tokens += sum(len(c.token_ids) for c in cl)
        if self.dedup:  # identical candidates of one expansion: one child, multiplicity kept
            cands, mults = merge_duplicates(cands)
            st.merged += sum(m - 1 for ml in mults for m in ml)
        else:
            mults = [[1] * len(cl) for cl in cands]
        rd.cands, rd.mults = cands, mults
        rd.flat = [c for cl in cands for c in cl]
        rd.owner = [i for i, cl in enumerate(cands) for _ in cl]

    def _cut_at_scorer_window(self, rd: Round, cands: list[list[Any]], live: dict[int, TreeState]) -> int:
        """Candidates whose (problem, steps) item does not fit the step scorer's window (a PRM's 4,096
        positions against chains of 16 x 512 tokens) become window-end placeholders, before duplicates
        merge: that chain ends there. Returns how many were cut."""
        if getattr(self.scorer, "fits", None) is None:
            return 0
        idx = [(i, j) for i, cl in enumerate(cands) for j, c in enumerate(cl) if c.finish not in CUT_ENDS]
        if not idx:
            return 0
        items = [(live[rd.roots[i]].job.problem["problem"], [self.steps[p] for p in rd.paths[i]]
                  + [cands[i][j].text]) for i, j in idx]
        cut = 0
        for (i, j), ok in zip(idx, scorer_fits(self.scorer, items), strict=True):
            if not ok:
                cands[i][j] = _window_end()
                cut += 1
        return cut

    def _score_candidates(self, rd: Round, live: dict[int, TreeState]) -> None:
        """The step scorer (the PRM role) on every candidate step; a context end keeps its parent's score."""
        t0 = time.perf_counter()
        for j, c in enumerate(rd.flat):
            i = rd.owner[j]
            rd.items.append((live[rd.roots[i]].job.problem["problem"], [self.steps[p] for p in rd.paths[i]]
                             + [c.text]))
        forced = [c.finish in CUT_ENDS for c in rd.flat]
        scored = iter(self._score([x for x, e in zip(rd.items, forced, strict=True) if not e])
                      if rd.items else [])
        rd.scores = [[self.step_score[rd.paths[rd.owner[j]][-1]] if rd.paths[rd.owner[j]] else 0.0]
                     if e else next(scored) for j, e in enumerate(forced)]
        self.stats.scorer_s += time.perf_counter() - t0

    def _check_terminals(self, rd: Round, live: dict[int, TreeState]) -> None:
        """Which candidates end their solution; the checker grades those that ended on their own (a stated
        answer, or the model's end of turn). A chain cut at max depth, the policy's window or the scorer's
        window is wrong without grading: its last number is not an answer (an R1 chain cut inside <think>
        must never become a chosen solution)."""
        t0 = time.perf_counter()
        max_depth = int(self.cfg.max_depth)
        to_check = []
        for j, c in enumerate(rd.flat):
            depth = len(rd.paths[rd.owner[j]]) + 1
            if c.finish == "answer" and c.stop_hit and self.answer_after and not answer_closed(
                    self.delim.join(rd.items[j][1]), self.answer_after):
                c.finish = "step"  # a boxed answer inside the thinking block: the solution goes on
            ended = c.finish in ("answer", "eos")
            term = ended or c.finish in CUT_ENDS or depth >= max_depth
            rd.terminal.append(term)
            if ended:
                full = self.delim.join(rd.items[j][1])
                to_check.append((j, full, live[rd.roots[rd.owner[j]]].job.problem["answer"]))
        if to_check:
            res = self.verifier([(t[1], t[2]) for t in to_check])
            rd.verdicts = {t[0]: bool(v) for t, v in zip(to_check, res, strict=True)}
        self.stats.verify_s += time.perf_counter() - t0

    def _shape(self, rd: Round) -> None:
        """Step rewards (shaped over the path's raw scores; the paper: advantage), node values (the outcome
        folded in at terminals), priors (softmax of mean logprob, a merged child weighing its multiplicity);
        every candidate enters the step store."""
        scfg, rmode, max_depth = self.cfg, str(self.cfg.reward), int(self.cfg.max_depth)
        rd.mult = np.array([m for ml in rd.mults for m in ml], dtype=np.float64)
        for j, c in enumerate(rd.flat):
            i = rd.owner[j]
            last = float(rd.scores[j][-1]) if len(rd.scores[j]) else 0.0
            r = shape_rewards([self.step_score[p] for p in rd.paths[i]] + [last], rmode)[-1]
            value = last
            ok = rd.verdicts.get(j, False)
            if rd.terminal[j]:
                value = combine_outcome(last, ok, str(scfg.outcome), float(scfg.outcome_weight))
                if scfg.outcome_in_reward:  # steer reward-based pruning towards correct answers
                    r = combine_outcome(r, ok, "add", float(scfg.outcome_weight))
            d = len(rd.paths[i]) + 1
            finish = ("length" if c.finish == _CONTEXT_END else "window" if c.finish == _WINDOW_END else
                      c.finish if c.finish in ("answer", "eos") or d < max_depth else "depth")
            rd.payloads.append(len(self.steps))
            self.steps.append(c.text)
            self.step_score.append(last)
            self.step_finish.append(finish)
            self.step_correct.append(bool(ok))
            self.step_mult.append(int(rd.mult[j]))
            rd.rewards.append(r)
            rd.values.append(value)
            rd.terms.append(1 if rd.terminal[j] else 0)
        lp = np.array([c.logprob_mean for c in rd.flat], dtype=np.float64)
        rd.priors = np.zeros(len(rd.flat), dtype=np.float64)
        for a, b in rd.spans():
            if b > a:
                x = rd.mult[a:b] * np.exp(lp[a:b] - lp[a:b].max())
                rd.priors[a:b] = x / x.sum()

    def _expand_backup(self, rd: Round, live: dict[int, TreeState]) -> None:
        """Children into the forest (pruned at expansion), values backed up (mean over the samples, a merged
        child counting its multiplicity, or max), trees advanced by the search policy."""
        t0 = time.perf_counter()
        f = self.forest
        rd.child_ids = f.expand(rd.leaves_arr, np.array([len(cl) for cl in rd.cands], dtype=np.int32),
                                rd.priors.astype(np.float32), np.asarray(rd.payloads, dtype=np.int64),
                                np.asarray(rd.rewards, dtype=np.float32),
                                np.asarray(rd.values, dtype=np.float32), np.asarray(rd.terms, dtype=np.uint8))
        pruned = f.is_pruned(rd.child_ids)
        vals, rw = np.asarray(rd.values, dtype=np.float32), np.asarray(rd.rewards, dtype=np.float32)
        tm = np.asarray(rd.terms, dtype=bool)
        bvals = np.zeros(len(rd.cands), dtype=np.float32)
        for i, (a, b) in enumerate(rd.spans()):
            keep = ~pruned[a:b]
            if b > a:
                k = keep if keep.any() else np.ones(b - a, dtype=bool)
                v, w = vals[a:b][k], rd.mult[a:b][k]
                bvals[i] = v.max() if self.cfg.backup == "max" else (
                    v.mean() if (w == 1).all() else (v * w).sum() / w.sum())
            st = live[rd.roots[i]]
            st.sims += 1
            st.expansions += 1
            st.nodes += b - a
            self.policy.advance(st, rd.leaves[i], rd.child_ids[a:b], keep, rw[a:b], tm[a:b])
        if self.policy.backs_up:
            f.backup(rd.leaves_arr, bvals)
        self.stats.pruned += int(pruned.sum())
        self.stats.engine_s += time.perf_counter() - t0

    # ------------------------------------------------------------------ retirement + extraction
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
