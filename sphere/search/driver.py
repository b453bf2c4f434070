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
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sphere.backends.base import SamplingParams
from sphere.engine import EngineConfig, make_forest
from sphere.rewards.base import combine_outcome, shape_rewards

_CONTEXT_END = "context_end"  # finish of the placeholder candidate of a leaf whose prompt fills the window


def _value_rank(t: Trajectory) -> tuple[float, float]:
    return (t.value, t.scores[-1] if t.scores else float("-inf"))


def _context_end():
    from sphere.backends.base import Candidate

    return Candidate(text="", token_ids=[], logprob_sum=0.0, logprob_mean=0.0, finish=_CONTEXT_END,
                     token_logprobs=[])


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
    finish: str  # how the last step ended: answer | eos | length | depth
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


def _engine_config(scfg: Any) -> EngineConfig:
    e = scfg.engine
    return EngineConfig(
        rule=str(e.rule),
        c=float(e.c),
        virtual_loss=float(e.virtual_loss),
        fpu=str(e.fpu),
        fpu_reduction=float(e.fpu_reduction),
        q_norm=bool(e.q_norm),
        max_depth=int(scfg.max_depth),
        pruning=str(scfg.pruning.policy),
        prune_k=int(scfg.pruning.k),
        prune_tau=float(scfg.pruning.tau),
        prune_relative=bool(scfg.pruning.relative),
    )


def validate_search_config(scfg: Any) -> None:
    """Raise ValueError naming the key and what is allowed."""

    def need(cond: bool, key: str, allowed: str, val: Any) -> None:
        if not cond:
            raise ValueError(f"config search.{key}={val!r} is invalid: allowed {allowed}")

    need(scfg.mode in ("paper", "mcts"), "mode", "'paper' or 'mcts'", scfg.mode)
    need(int(scfg.expansions) >= 1, "expansions", "an integer >= 1 (E candidates per expansion)",
         scfg.expansions)
    need(int(scfg.max_depth) >= 1, "max_depth", "an integer >= 1", scfg.max_depth)
    need(int(scfg.batch_leaves) >= 1, "batch_leaves", "an integer >= 1", scfg.batch_leaves)
    need(int(scfg.k) >= 1, "k", "an integer >= 1 (leaves per tree per round)", scfg.k)
    need(int(scfg.simulations) >= 1, "simulations", "an integer >= 1", scfg.simulations)
    need(float(scfg.temperature) >= 0, "temperature", "a number >= 0", scfg.temperature)
    need(0 < float(scfg.top_p) <= 1, "top_p", "a number in (0, 1]", scfg.top_p)
    need(scfg.reward in ("raw", "advantage", "min"), "reward", "raw | advantage | min", scfg.reward)
    need(scfg.outcome in ("none", "replace", "mix", "add"), "outcome", "none | replace | mix | add",
         scfg.outcome)
    need(scfg.backup in ("mean", "max"), "backup", "mean | max", scfg.backup)
    dd = scfg.get("dedup_candidates", True)
    need(isinstance(dd, bool), "dedup_candidates", "true | false", dd)
    p = scfg.pruning
    need(p.policy in ("none", "minmax", "topk", "threshold"), "pruning.policy",
         "none | minmax | topk | threshold", p.policy)
    if p.policy == "topk":
        need(1 <= int(p.k) <= int(scfg.expansions), "pruning.k",
             f"1..search.expansions ({scfg.expansions})", p.k)
    if p.policy == "threshold":
        hi = 2.0 if p.relative else 1.0
        need(0.0 <= float(p.tau) <= hi, "pruning.tau",
             "[0, 1] (absolute) or [0, 2] (relative to the best sibling)", p.tau)
    e = scfg.engine
    need(e.rule in ("uct", "puct"), "engine.rule", "uct | puct", e.rule)
    need(float(e.c) >= 0, "engine.c", "a number >= 0", e.c)
    need(float(e.virtual_loss) >= 0, "engine.virtual_loss", "a number >= 0", e.virtual_loss)


class SearchDriver:
    """Grow one tree per job, many jobs at once, through one backend.

    Args:
        backend: a ``sphere.backends`` backend (tokenizer + next_steps).
        scorer: a ``StepScorer`` (``score(items) -> list[list[float]]``).
        verifier: ``check(list[(completion, gold)]) -> list[bool]`` (``sphere.verify.check_answers``).
        scfg: the ``search`` config node (conf/search/*.yaml).
        delimiter: the step delimiter (prompt.step_delimiter).
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
        engine_backend: str = "cpp",
        seed: int = 0,
    ):
        validate_search_config(scfg)
        self.backend = backend
        self.scorer = scorer
        self.verifier = verifier
        self.cfg = scfg
        self.delim = delimiter
        self.mode = str(scfg.mode)
        self.E = int(scfg.expansions)
        self.k = int(scfg.k)
        self.batch = int(scfg.batch_leaves)
        self.seed = int(seed)
        self.forest = make_forest(_engine_config(scfg), backend=engine_backend)
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

    def _trajectory(self, path_nodes: np.ndarray) -> Trajectory:
        pls = self._path_steps(path_nodes)
        rewards = self.forest.reward(path_nodes[1:]).tolist() if len(path_nodes) > 1 else []
        last = pls[-1] if pls else 0
        fin = self.step_finish[last] if pls else ""
        val = float(self.forest.value(path_nodes[-1:])[0]) if len(path_nodes) else 0.0
        correct = bool(self.step_correct[last]) if pls else False
        keep = len(pls)
        if pls and self.steps[last] == "" and fin == "length":  # a context end: not a step of the solution
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
        """Search every job; ``on_result`` is called once per finished job, as soon as it finishes."""
        self._queue: deque[SearchJob] = deque(jobs)
        queue = self._queue
        live: dict[int, dict] = {}  # root node id -> state
        f = self.forest
        scfg = self.cfg
        sp = SamplingParams(
            n=self.E,
            temperature=float(scfg.temperature),
            top_p=float(scfg.top_p),
            max_tokens=int(scfg.max_step_tokens),
            seed=None,
            stop=[self.delim],
        )
        round_idx = 0
        while queue or live:
            t0 = time.perf_counter()
            # ---- select: leaves across all live trees; admit new jobs until the batch is full.
            sel_roots: list[int] = []
            sel_leaves: list[int] = []
            pending = self._select_live(live, sel_roots, sel_leaves)
            while queue and pending < self.batch:
                job = queue.popleft()
                root = int(f.add_roots(np.array([0], dtype=np.int64))[0])
                st = {"job": job, "root": root, "sims": 0, "chains": [root, root], "active": [True, True],
                      "expansions": 0, "nodes": 1}
                live[root] = st
                got = self._select_tree(st, sel_roots, sel_leaves)
                pending += got
            if self.mode == "paper" and len(sel_leaves) > self.batch:
                # chain heads not sent now stay heads: they are picked up next round (oldest trees first)
                del sel_roots[self.batch :], sel_leaves[self.batch :]
            queue_nonempty = bool(queue)
            self.stats.engine_s += time.perf_counter() - t0
            if not sel_leaves:
                # Nothing selectable: every live tree is finished or exhausted.
                self._retire(live, on_result, force_all=True)
                continue

            # ---- paths -> prompts
            t0 = time.perf_counter()
            leaves_arr = np.asarray(sel_leaves, dtype=np.int32)
            offsets, nodes = f.paths(leaves_arr)
            self.stats.engine_s += time.perf_counter() - t0
            path_payloads: list[list[int]] = []
            prompts: list[list[int]] = []
            for i, root in enumerate(sel_roots):
                pn = nodes[offsets[i] : offsets[i + 1]]
                pls = [int(p) for p in f.payload(pn)[1:]]
                path_payloads.append(pls)
                prompts.append(self._prompt_for(live[root]["job"], pls))

            # ---- one backend call for every selected leaf whose prompt still fits the context window;
            # a chain whose prompt no longer fits ends there (finish="length", graded as it is)
            t0 = time.perf_counter()
            sp.seed = self.seed * 1_000_003 + round_idx
            fits = [self._fits(p) for p in prompts]
            send = [p for p, ok in zip(prompts, fits) if ok]
            try:
                got = self.backend.next_steps(send, sp) if send else []
            except Exception:
                if self.mode != "paper":  # failed request: remove the virtual loss, keep the trees intact
                    f.cancel(leaves_arr)
                raise
            it = iter(got)
            cands = [next(it) if ok else [_context_end()] for ok in fits]
            self.stats.context_ends += fits.count(False)
            self.stats.backend_s += time.perf_counter() - t0
            self.stats.backend_calls += 1
            self.stats.leaves += len(prompts)
            if queue_nonempty:
                self.stats.full_calls += 1
                self.stats.full_call_leaves += len(prompts)
            for cl in cands:
                self.stats.candidates += len(cl)
                self.stats.tokens += sum(len(c.token_ids) for c in cl)
            # ---- merge identical candidates of one expansion (one child, multiplicity kept)
            if self.dedup:
                cands, mults = merge_duplicates(cands)
                self.stats.merged += sum(m - 1 for ml in mults for m in ml)
            else:
                mults = [[1] * len(cl) for cl in cands]

            # ---- score every candidate (the PRM role) and check finished answers
            t0 = time.perf_counter()
            items = []
            owners = []
            for i, cl in enumerate(cands):
                job = live[sel_roots[i]]["job"]
                prev = [self.steps[p] for p in path_payloads[i]]
                for c in cl:
                    items.append((job.problem["problem"], prev + [c.text]))
                    owners.append(i)
            forced = [c.finish == _CONTEXT_END for cl in cands for c in cl]
            scored = self._score([x for x, e in zip(items, forced) if not e]) if items else []
            it = iter(scored)
            # a context end adds no step: it keeps its parent's score (zero advantage)
            scores = [[self.step_score[path_payloads[owners[j]][-1]] if path_payloads[owners[j]] else 0.0]
                      if e else next(it) for j, e in enumerate(forced)]
            self.stats.scorer_s += time.perf_counter() - t0

            t0 = time.perf_counter()
            flat = [c for cl in cands for c in cl]
            depth_of_leaf = [len(p) for p in path_payloads]
            terminal = []
            to_check = []
            for j, c in enumerate(flat):
                d = depth_of_leaf[owners[j]] + 1
                term = c.finish in ("answer", "eos", _CONTEXT_END) or d >= int(scfg.max_depth)
                terminal.append(term)
                if term:
                    full = self.delim.join([x for x in items[j][1] if x or c.finish != _CONTEXT_END])
                    to_check.append((j, full, live[sel_roots[owners[j]]]["job"].problem["answer"]))
            verdicts = {}
            if to_check:
                res = self.verifier([(t[1], t[2]) for t in to_check])
                verdicts = {t[0]: bool(v) for t, v in zip(to_check, res)}
            self.stats.verify_s += time.perf_counter() - t0

            # ---- rewards, values, priors
            counts = np.array([len(cl) for cl in cands], dtype=np.int32)
            payloads, rewards, values, terms = [], [], [], []
            rmode = str(scfg.reward)
            lp = np.array([c.logprob_mean for c in flat], dtype=np.float64)
            flat_mult = np.array([m for ml in mults for m in ml], dtype=np.float64)
            for j, c in enumerate(flat):
                i = owners[j]
                s = scores[j]
                last = float(s[-1]) if len(s) else 0.0
                # step reward: shaped over the path's raw scores (the paper: advantage)
                path_scores = [self.step_score[p] for p in path_payloads[i]] + [last]
                r = shape_rewards(path_scores, rmode)[-1]
                value = last
                if terminal[j]:
                    ok = verdicts.get(j, False)
                    value = combine_outcome(last, ok, str(scfg.outcome), float(scfg.outcome_weight))
                    if scfg.outcome_in_reward:  # steer reward-based pruning towards correct answers
                        r = combine_outcome(r, ok, "add", float(scfg.outcome_weight))
                pid = len(self.steps)
                self.steps.append(c.text)
                self.step_score.append(last)
                d = depth_of_leaf[i] + 1
                if c.finish == _CONTEXT_END:
                    self.step_finish.append("length")
                else:
                    self.step_finish.append(c.finish if c.finish in ("answer", "eos") or d < int(scfg.max_depth)
                                            else "depth")
                self.step_correct.append(bool(verdicts.get(j, False)))
                self.step_mult.append(int(flat_mult[j]))
                payloads.append(pid)
                rewards.append(r)
                values.append(value)
                terms.append(1 if terminal[j] else 0)
            # priors: softmax over the candidates' mean token logprob (a cheap policy prior for PUCT); a merged
            # child weighs its multiplicity, i.e. gets the summed prior of its copies
            priors = np.zeros(len(flat), dtype=np.float64)
            off = 0
            for n in counts.tolist():
                if n:
                    x = flat_mult[off : off + n] * np.exp(lp[off : off + n] - lp[off : off + n].max())
                    priors[off : off + n] = x / x.sum()
                off += n

            t0 = time.perf_counter()
            child_ids = f.expand(
                leaves_arr,
                counts,
                np.asarray(priors, dtype=np.float32),
                np.asarray(payloads, dtype=np.int64),
                np.asarray(rewards, dtype=np.float32),
                np.asarray(values, dtype=np.float32),
                np.asarray(terms, dtype=np.uint8),
            )
            pruned = f.is_pruned(child_ids)
            # backup value per leaf: mean or max over the kept children's values
            bvals = np.zeros(len(cands), dtype=np.float32)
            off = 0
            vals = np.asarray(values, dtype=np.float32)
            for i, cl in enumerate(cands):
                n = len(cl)
                keep = ~pruned[off : off + n]
                if not keep.any():
                    keep = np.ones(n, dtype=bool)
                v = vals[off : off + n][keep]
                w = flat_mult[off : off + n][keep]  # mean over the samples: merged children count m times
                if not n:
                    bvals[i] = 0.0
                elif scfg.backup == "max":
                    bvals[i] = v.max()
                else:
                    bvals[i] = v.mean() if (w == 1).all() else (v * w).sum() / w.sum()
                off += n
            if self.mode != "paper":
                # paper chains are chosen by reward, not by select(): nothing is in flight to back up
                f.backup(leaves_arr, bvals)
            self.stats.pruned += int(pruned.sum())
            # advance the paper chains
            off = 0
            for i, cl in enumerate(cands):
                st = live[sel_roots[i]]
                n = len(cl)
                st["sims"] += 1
                st["expansions"] += 1
                st["nodes"] += n
                if self.mode == "paper":
                    ids = child_ids[off : off + n]
                    keep = ~pruned[off : off + n]
                    rw = np.asarray(rewards[off : off + n], dtype=np.float32)
                    tm = np.asarray(terms[off : off + n], dtype=bool)
                    leaf = sel_leaves[i]
                    kid = np.nonzero(keep)[0]
                    for c in (0, 1):
                        if not st["active"][c] or st["chains"][c] != leaf:
                            continue
                        if len(kid) == 0:  # every candidate pruned: the chain stops here
                            st["active"][c] = False
                            continue
                        pick = kid[np.argmax(rw[kid])] if c == 0 else kid[np.argmin(rw[kid])]
                        st["chains"][c] = int(ids[pick])
                        if tm[pick]:
                            st["active"][c] = False
                off += n
            self.stats.engine_s += time.perf_counter() - t0
            self.stats.rounds += 1
            round_idx += 1
            self._retire(live, on_result)
            if progress is not None:
                progress({"live": len(live), "queued": len(queue), **self.stats.as_dict(self.batch)})
        return self.stats

    def submit(self, job: SearchJob) -> None:
        """Queue one more job while ``run`` is going (e.g. a stage-2 job from a stage-1 result)."""
        self._queue.append(job)

    # ------------------------------------------------------------------ selection per mode
    def _select_live(self, live: dict, roots: list[int], leaves: list[int]) -> int:
        n = 0
        if self.mode == "paper":
            for st in live.values():
                n += self._select_tree(st, roots, leaves)
            return n
        budget = int(self.cfg.simulations)
        # k leaves per tree, but never past a tree's remaining simulation budget: one select() call per
        # distinct leaf count (at most k calls per round, each batched over its trees)
        groups: dict[int, list[int]] = {}
        for r, st in live.items():
            kk = min(self.k, budget - st["sims"])
            if kk > 0:
                groups.setdefault(kk, []).append(r)
        n = 0
        for kk, active in sorted(groups.items()):
            ra = np.asarray(active, dtype=np.int32)
            tree_idx, lv, coll = self.forest.select(ra, kk)
            self.stats.collisions += int(np.asarray(coll).sum())
            for t, leaf in zip(tree_idx.tolist(), lv.tolist()):
                roots.append(int(ra[t]))
                leaves.append(int(leaf))
            n += len(lv)
        return n

    def _select_tree(self, st: dict, roots: list[int], leaves: list[int]) -> int:
        f = self.forest
        if self.mode == "paper":
            got = 0
            for node in {st["chains"][c] for c in (0, 1) if st["active"][c]}:
                roots.append(st["root"])
                leaves.append(node)
                got += 1
            return got
        kk = min(self.k, int(self.cfg.simulations) - st["sims"])
        if kk <= 0:
            return 0
        tree_idx, lv, coll = f.select(np.asarray([st["root"]], dtype=np.int32), kk)
        self.stats.collisions += int(np.asarray(coll).sum())
        for leaf in lv.tolist():
            roots.append(st["root"])
            leaves.append(int(leaf))
        return len(lv)

    # ------------------------------------------------------------------ retirement + extraction
    def _done(self, st: dict) -> bool:
        f = self.forest
        root = np.asarray([st["root"]], dtype=np.int32)
        if bool(f.is_exhausted(root)[0]):
            return True
        if self.mode == "paper":
            return not any(st["active"])
        if st["sims"] >= int(self.cfg.simulations):
            return True
        term_budget = int(self.cfg.max_terminals)
        if term_budget > 0:
            off, _, _ = f.terminals(root)
            if int(off[-1]) >= term_budget:
                return True
        return False

    def _retire(self, live: dict, on_result, force_all: bool = False) -> None:
        t0 = time.perf_counter()
        done = [r for r, st in live.items() if force_all or self._done(st)]
        self.stats.engine_s += time.perf_counter() - t0
        for r in done:
            st = live.pop(r)
            on_result(self._extract(st))

    def _extract(self, st: dict) -> SearchResult:
        f = self.forest
        root = st["root"]
        ra = np.asarray([root], dtype=np.int32)
        off, tnodes, tvals = f.terminals(ra)
        terms = []
        for node in tnodes.tolist():
            path = self._path_to(node)
            terms.append(self._trajectory(path))
        if self.mode == "paper":
            pmax = np.asarray(f.best_path(root, by="reward"), dtype=np.int32)
            pmin = np.asarray(f.worst_path(root), dtype=np.int32)
            smax = self._trajectory(pmax) if len(pmax) > 1 else None
            smin = self._trajectory(pmin) if len(pmin) > 1 else None
        else:
            # by value, ties (outcome-replaced values are 1/0) broken by the step scorer's last score
            smax = max(terms, key=_value_rank) if terms else None
            smin = min(terms, key=_value_rank) if terms else None
        snap = self.tree_snapshot(root) if st["job"].meta.get("snapshot") else None
        return SearchResult(
            job=st["job"],
            sol_max=smax,
            sol_min=smin,
            terminals=terms,
            nodes=int(st["nodes"]),
            expansions=int(st["expansions"]),
            snapshot=snap,
        )

    def _path_to(self, node: int) -> np.ndarray:
        off, nodes = self.forest.paths(np.asarray([node], dtype=np.int32))
        return nodes[off[0] : off[1]]

    def tree_snapshot(self, root: int) -> dict:
        snap = dict(self.forest.tree_snapshot(root))
        snap["text"] = [self.steps[int(p)] for p in snap["payload"]]
        return snap


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


def estimate_backend_calls(n_problems: int, scfg: Any) -> dict:
    """Rough plan figures for dry runs: expansions, candidates and backend calls."""
    if scfg.mode == "paper":
        exp_per_problem = 2 * int(scfg.max_depth)
    else:
        exp_per_problem = int(scfg.simulations)
    expansions = n_problems * exp_per_problem
    return {
        "expansions": expansions,
        "candidates": expansions * int(scfg.expansions),
        "backend_calls": math.ceil(expansions / max(1, int(scfg.batch_leaves))),
    }
