"""`sphere generate`: the three SPHERE stages over a problem set, written as preference pairs.

    sphere generate hydra.run.dir=DIR                     # mini world, CPU defaults
    sphere generate search=mcts search.pruning.policy=topk search.pruning.k=3
    sphere generate data.problems=data/benchmarks/math/train.jsonl model=qwen2_5_7b backend=vllm

Routing (arXiv 2503.04813, Sec. 3):
  stage 1  Sol_max correct, Sol_min wrong -> (Sol_max, Sol_min)
  stage 2  both wrong  -> the policy gets the reflection prompt with its wrong attempt, the same search
           runs; a corrected correct solution is chosen over the wrong attempt
  stage 3  both right  -> the small model searches with 2E candidates for plausible wrong solutions;
           the policy's correct solution is chosen over the small model's most plausible wrong one
  Sol_max wrong but Sol_min right: ``stages.inverted`` = swap (a stage-1 pair with the roles swapped) or drop.

Outputs (run directory): ``stages/stage{1,2,3}.jsonl`` (one durable line per finished problem and stage:
the resume log), then, rebuilt atomically from it at the end: ``pairs.jsonl``, ``trajectories.jsonl``,
``generate_stats.json``, and ``trees/<problem>.npz`` snapshots for a sample of problems.
A kill -9 at any moment loses at most the problems in flight; a rerun skips every finished one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from sphere.generate.constructions import Construction, PairContext, build_pairs, sample_and_score, seed_from
from sphere.generate.outputs import (
    generate_stats,
    previous_stats,
    report_cut_chains,
    traj_from_dict,
    traj_to_dict,
    trajectory_lines,
)
from sphere.generate.pairs import (
    PairFilter,
    filter_pairs,
    solution_text,
)
from sphere.generate.records import STAGE_FILES, read_stage_logs
from sphere.generate.settings import config_hash, validate_generate_config
from sphere.generate.stages import (  # one stage-log reader, one resume rule
    StageContext,
    route,
    stage1_outcome,
    stage2_outcome,
    stage3_outcome,
)
from sphere.io import JsonlAppender, atomic_write_json, atomic_write_text
from sphere.prompts import (
    build_prompt_ids,
    build_prompt_text,
    build_reflection_ids,
    build_reflection_text,
    family_config,
    user_text,
    uses_chat,
)
from sphere.rundir import generate_signature
from sphere.search.driver import SearchDriver
from sphere.search.types import SearchJob, SearchResult, Trajectory
from sphere.viz.snapshot import save_tree_snapshot


class Generator:
    """Runs the three stages; used by `sphere generate` and by `sphere run` (one backend per model)."""

    def __init__(self, cfg: DictConfig, out_dir: Path, *, logger: Any = None, policy_name: str | None = None,
                 small_name: str | None = None, pair_family: dict | None = None, pair_tokenizer: Any = None):
        """``pair_family`` / ``pair_tokenizer``: write the pairs' prompts in another model's prompt (a transfer
        run trains and evaluates ``model.train_target`` with its own family: its pairs must be in the prompt
        it is evaluated with, not the generating policy's); default: the policy's family and tokenizer."""
        self.policy_name, self.small_name = policy_name, small_name
        self.pair_fam, self.pair_tok = pair_family, pair_tokenizer
        validate_generate_config(cfg)
        self.cfg = cfg
        self.out = Path(out_dir)
        self.logger = logger
        self.hash = config_hash(cfg)
        self.construction = Construction.from_cfg(cfg.get("construction"))  # conf/construction/
        self.pair_ctx = None  # set by run(): how the non-paper constructions write a pair
        self.fam = family_config(cfg)
        self.delim = str(self.fam["step_delimiter"])
        self.answer_after = str(self.fam.get("answer_after") or "")  # R1: boxed answers count after </think>
        (self.out / "stages").mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ prompts
    def _prompt_fn(self, tokenizer: Any, problem: dict):
        fam, text = self.fam, problem["problem"]
        return lambda steps: build_prompt_ids(tokenizer, text, steps, fam)

    def _reflection_fn(self, tokenizer: Any, problem: dict, attempt: Trajectory):
        fam, text, att = self.fam, problem["problem"], list(attempt.steps)
        return lambda steps: build_reflection_ids(tokenizer, text, att, fam, continue_steps=steps)

    def _pair_prompt(self, tokenizer: Any, problem: dict, attempt: Trajectory | None = None) -> Any:
        """The pair's prompt: text for plain models, a user message list for chat models (TRL format)."""
        fam = getattr(self, "pair_fam", None) or self.fam
        if uses_chat(tokenizer, fam):
            if attempt is None:
                content = user_text(fam, problem["problem"])
            else:
                content = fam["reflection"].format(problem=problem["problem"],
                                                   attempt=self.delim.join(attempt.steps),
                                                   instruction=fam.get("instruction") or "")
            msgs = [{"role": "system", "content": fam["system"]}] if fam.get("system") else []
            return msgs + [{"role": "user", "content": content}]
        if attempt is None:
            return build_prompt_text(tokenizer, problem["problem"], [], fam)
        return build_reflection_text(tokenizer, problem["problem"], attempt.steps, fam)

    def pair_prompt_fn(self, tokenizer: Any) -> tuple[Any, bool, str]:
        """How this generator writes a problem's pair: (problem -> prompt, conversational?, the prefix a
        conversational chosen/rejected starts with). sphere.controls builds its pairs with the same three."""
        tokenizer = self.pair_tok or tokenizer
        return (lambda p: self._pair_prompt(tokenizer, p)), self._conv(tokenizer), self._prefix(tokenizer)

    # ------------------------------------------------------------------ resume
    def _done(self, stage: int) -> dict[str, dict]:
        return read_stage_logs(self.out)[stage]

    # ------------------------------------------------------------------ stages
    def run(self, problems: list[dict], policy_backend: Any, scorer: Any, verifier: Any,
            small_backend_factory: Any = None, progress: Any = None) -> dict:
        """Run all three stages. ``small_backend_factory()`` opens the small model's backend (stage 3);
        it is called after the policy's stages are done, so callers may free the policy first."""
        t_start = time.perf_counter()
        cfg = self.cfg
        seed_from(self.construction, self.out, self.hash,  # construction.search_from: another run's search
                  lambda: generate_signature(cfg, self.policy_name or cfg.model.policy,
                                             self.small_name or cfg.model.get("small")))
        done = {s: self._done(s) for s in (1, 2, 3)}
        by_id = {p["id"]: p for p in problems}
        if len(by_id) != len(problems):
            dup = len(problems) - len(by_id)
            raise ValueError(f"data.problems: {dup} duplicate problem ids; ids must be unique")
        tok = policy_backend.tokenizer
        if hasattr(scorer, "set_golds"):  # rollout values need each problem's gold answer
            scorer.set_golds(problems)
        ctx = self._stage_context(tok)
        snap_every = int(cfg.output.snapshot_every)
        stats_acc: dict = {"search": {}}
        run = _PolicyStages(self, ctx, tok, progress)
        try:
            run.driver = SearchDriver(policy_backend, scorer, verifier, cfg.search, delimiter=self.delim,
                                      answer_after=self.answer_after,
                                      engine_backend=str(cfg.engine_backend), seed=int(cfg.seed))
            jobs = run.resume_plan(problems, done, snap_every)
            run.report()  # a resumed run starts where it stopped
            if jobs:
                run.driver.run(jobs, run.on_result)
                stats_acc["search"]["policy"] = run.driver.stats.as_dict(int(cfg.search.batch_leaves))
            if self.construction.name == "best_worst_of_n":  # sampled while the policy is loaded (resumes)
                sample_and_score(cfg, self.construction, policy_backend, scorer, problems, self.out,
                                 self.policy_name or str(cfg.model.policy), self.fam, self.delim)
            if run.stage3_todo:  # the small model looks for plausible wrong solutions
                small = small_backend_factory() if small_backend_factory is not None else policy_backend
                stats_acc["search"]["small"] = self._stage3(small, scorer, verifier, run.stage3_todo, ctx,
                                                            run.finish, run.counts, progress)
        finally:
            run.close()
        return self.finalize(problems, stats_acc, time.perf_counter() - t_start)

    def _stage_context(self, tok: Any) -> StageContext:
        """How the stages write their pairs (and ``self.pair_ctx``, the same for the other constructions).
        Provenance of the pairs: the models that actually ran (sphere run: round r's trained checkpoint)."""
        cfg = self.cfg
        ptok = self.pair_tok or tok  # the pairs' prompt: the trained model's (a transfer target's) own
        ctx = StageContext.from_config(
            cfg, delim=self.delim, policy_name=self.policy_name or str(cfg.model.policy),
            small_name=self.small_name or str(cfg.model.small), config_hash=self.hash,
            conversational=self._conv(ptok), response_prefix=self._prefix(ptok),
            pair_prompt=lambda p, attempt: self._pair_prompt(ptok, p, attempt))
        self.pair_ctx = PairContext(delim=ctx.delim, pair_prompt=ctx.pair_prompt, conversational=ctx.conversational,
                                    response_prefix=ctx.response_prefix, policy_name=ctx.policy_name,
                                    config_hash=ctx.config_hash)
        return ctx

    def _stage3(self, small: Any, scorer: Any, verifier: Any, todo: list[tuple[dict, dict]], ctx: StageContext,
                finish: Any, counts: dict, progress: Any) -> dict:
        """Stage 3: the small model searches with factor x E candidates; returns its search statistics."""
        cfg = self.cfg
        scfg3 = OmegaConf.merge(cfg.search, {
            "expansions": int(cfg.search.expansions) * int(cfg.stages.small_expansions_factor)})
        driver3 = SearchDriver(small, scorer, verifier, scfg3, delimiter=self.delim,
                               answer_after=self.answer_after,
                               engine_backend=str(cfg.engine_backend), seed=int(cfg.seed) + 3)
        jobs3 = [SearchJob(f"3:{p['id']}", p, self._prompt_fn(small.tokenizer, p), {"stage": 3, "rec1": r1})
                 for p, r1 in todo]

        def on_result3(res: SearchResult) -> None:
            p = res.job.problem
            chosen = traj_from_dict(res.job.meta["rec1"]["sol_max"])
            finish(3, p, res, *stage3_outcome(res, p, chosen, ctx))
            counts["searched"][3] += 1
            counts["done"] += 1
            if progress is not None:
                progress(counts)

        driver3.run(jobs3, on_result3)
        return driver3.stats.as_dict(int(cfg.search.batch_leaves))

    def _prefix(self, tok: Any) -> str:
        """What a conversational pair's chosen/rejected start with: the pairs' family's assistant_prefix."""
        fam = getattr(self, "pair_fam", None) or self.fam
        return str(fam.get("assistant_prefix") or "") if self._conv(tok) else ""

    def _conv(self, tok: Any) -> bool:
        """Whether the pairs are conversational (the pairs' family and tokenizer use a chat template)."""
        return uses_chat(tok, getattr(self, "pair_fam", None) or self.fam)

    def _record(self, stage: int, p: dict, res: SearchResult, route_: str, pairs: list[dict]) -> dict:
        return {
            "problem_id": p["id"],
            "stage": stage,
            "route": route_,
            "answer": p["answer"],
            "sol_max": traj_to_dict(res.sol_max),
            "sol_min": traj_to_dict(res.sol_min),
            "terminals": [traj_to_dict(t) for t in res.terminals],
            "nodes": res.nodes,
            "expansions": res.expansions,
            "pairs": pairs,
            "config_hash": self.hash,
        }

    def _save_snapshot(self, d: Path, name: str, res: SearchResult) -> None:
        """The searched tree as trees/<name>.npz (``sphere viz tree`` renders it)."""
        snap = res.snapshot
        arrays = {k: np.asarray(v) for k, v in snap.items() if k != "text"}
        index = {int(n): i for i, n in enumerate(np.asarray(snap["node_id"]).tolist())}
        meta = {
            "problem": res.job.problem["problem"],
            "answer": res.job.problem["answer"],
            "problem_id": res.job.problem["id"],
            "stage": res.job.meta.get("stage"),
            "text": list(snap["text"]),
            "sol_max": traj_to_dict(res.sol_max),
            "sol_min": traj_to_dict(res.sol_min),
            "sol_max_nodes": [index[n] for n in res.sol_max.nodes if n in index] if res.sol_max else None,
            "sol_min_nodes": [index[n] for n in res.sol_min.nodes if n in index] if res.sol_min else None,
            "config_hash": self.hash,
        }
        save_tree_snapshot(d / f"{name}.npz", arrays, meta)

    # ------------------------------------------------------------------ outputs
    def finalize(self, problems: list[dict], stats_acc: dict, wall_s: float) -> dict:
        """Rebuild pairs.jsonl / trajectories.jsonl / generate_stats.json from the stage logs."""
        # problem order, not stage-log order: the logs are in completion order, which differs between runners
        # (the Ray driver appends whole chunks as they return), and DPO's shuffle depends on the pairs' order
        pos = {p["id"]: i for i, p in enumerate(problems)}
        recs = {s: sorted(d.values(), key=lambda r: pos.get(r["problem_id"], len(pos)))
                for s, d in read_stage_logs(self.out).items()}
        wanted = set(pos)
        traj_lines, used = trajectory_lines(recs, wanted)
        # conf/construction/: which pairs the search makes
        all_pairs = build_pairs(self.construction, used, {str(p["id"]): p for p in problems}, self.pair_ctx,
                                self.out)
        kept, drops = filter_pairs(all_pairs, PairFilter.from_cfg(self.cfg.filters))
        atomic_write_text(self.out / "pairs.jsonl",
                          "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in kept))
        atomic_write_text(self.out / "trajectories.jsonl",
                          "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in traj_lines))
        stats_path = self.out / "generate_stats.json"
        stats = generate_stats(config_hash=self.hash, construction=self.construction.name, problems=problems,
                               recs=recs, wanted=wanted, kept=kept, all_pairs=all_pairs, drops=drops,
                               search=stats_acc.get("search", {}), batch=int(self.cfg.search.batch_leaves),
                               wall_s=wall_s, prev=previous_stats(stats_path))
        atomic_write_json(stats_path, stats)
        report_cut_chains(stats)
        return stats


class _PolicyStages:
    """One run's policy searches (stages 1 and 2): the stage logs they append to, what a resumed run still
    needs, the progress counts and the problems queued for stage 3."""

    def __init__(self, gen: Generator, ctx: StageContext, tok: Any, progress: Any):
        self.gen, self.ctx, self.tok, self.progress = gen, ctx, tok, progress
        self.w = {s: JsonlAppender(gen.out / "stages" / f) for s, f in STAGE_FILES.items()}
        # progress: problems finished, searches done per stage, and searches queued for stages 2 and 3 (known
        # only once stage 1 routes a problem there), so a long stage 2 does not look like a stall
        self.counts = {"done": 0, "pairs": {1: 0, 2: 0, 3: 0}, "searched": {1: 0, 2: 0, 3: 0},
                       "queued": {2: 0, 3: 0}}
        self.stage3_todo: list[tuple[dict, dict]] = []
        self.driver: SearchDriver | None = None

    def close(self) -> None:
        for a in self.w.values():
            a.close()

    def report(self) -> None:
        if self.progress is not None:
            self.progress(self.counts)

    def stage2_job(self, p: dict, rec1: dict) -> SearchJob:
        # both_wrong implies a chain (route: no terminal at all is no_chain, never stage 2)
        st_cfg = self.gen.cfg.stages
        attempt = traj_from_dict(rec1[str(st_cfg.stage2_rejected)] or rec1["sol_max"] or rec1["sol_min"])
        return SearchJob(f"2:{p['id']}", p, self.gen._reflection_fn(self.tok, p, attempt),
                         {"stage": 2, "attempt": attempt})

    def resume_plan(self, problems: list[dict], done: dict[int, dict], snap_every: int) -> list[SearchJob]:
        """Resume: the stage each problem still needs (stage-1 and stage-2 jobs; stage 3 is queued)."""
        st_cfg, counts = self.gen.cfg.stages, self.counts
        jobs = []
        for i, p in enumerate(problems):
            r1 = done[1].get(p["id"])
            if r1 is None:
                meta = {"stage": 1, "snapshot": snap_every > 0 and i % snap_every == 0}
                jobs.append(SearchJob(f"1:{p['id']}", p, self.gen._prompt_fn(self.tok, p), meta))
                continue
            counts["searched"][1] += 1
            nxt = {"both_wrong": 2, "both_right": 3}.get(r1["route"])
            if nxt == 2 and st_cfg.stage2 or nxt == 3 and st_cfg.stage3:
                counts["queued"][nxt] += 1
                if p["id"] in (done[2] if nxt == 2 else done[3]):
                    counts["searched"][nxt] += 1
                    counts["done"] += 1
                elif nxt == 2:
                    jobs.append(self.stage2_job(p, r1))
                else:
                    self.stage3_todo.append((p, r1))
            else:
                counts["done"] += 1
        return jobs

    def finish(self, stage: int, p: dict, res: SearchResult, route_: str, pairs: list[dict]) -> dict:
        rec = self.gen._record(stage, p, res, route_, pairs)
        self.w[stage].write(rec)
        self.counts["pairs"][stage] += len(pairs)
        return rec

    def on_result(self, res: SearchResult) -> None:  # stages 1 and 2 (the policy's searches)
        p, stage = res.job.problem, int(res.job.meta["stage"])
        counts, ctx = self.counts, self.ctx
        if res.snapshot is not None:
            self.gen._save_snapshot(self.gen.out / "trees", f"stage{stage}-{p['id']}", res)
        counts["searched"][stage] += 1
        if stage == 1:
            rt, pairs, nxt = stage1_outcome(res, p, ctx)
            rec = self.finish(1, p, res, rt, pairs)
            if nxt in (2, 3):
                counts["queued"][nxt] += 1
            if nxt == 2:
                self.driver.submit(self.stage2_job(p, rec))
            elif nxt == 3:
                self.stage3_todo.append((p, rec))
            else:
                counts["done"] += 1
        else:
            self.finish(2, p, res, *stage2_outcome(res, p, res.job.meta["attempt"], ctx))
            counts["done"] += 1
        self.report()


__all__ = ["Generator", "route", "solution_text"]
