"""The phases of one batched round of ``sphere.search.driver.SearchDriver`` (its base class
``RoundPhases``): select the leaves (``_select``), build their prompts (``_prompts``), one backend call
(``_call_backend``), the scorer's window (``_cut_at_scorer_window``), one scorer call (``_score_candidates``),
the terminal checks (``_check_terminals``), reward shaping (``_shape``) and expansion with backup
(``_expand_backup``). They read and write the driver's state (forest, step store, statistics, policy)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from sphere.backends.base import SamplingParams
from sphere.rewards.base import combine_outcome, scorer_fits, shape_rewards
from sphere.search.candidates import (
    _CONTEXT_END,
    _WINDOW_END,
    CUT_ENDS,
    _context_end,
    _window_end,
    answer_closed,
    merge_duplicates,
)
from sphere.search.policies import TreeState
from sphere.search.types import Round


class RoundPhases:
    """One round's phases, in order (see the module docstring); mixed into ``SearchDriver``."""

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
