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

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from sphere.data.problems import count_problems, load_problems  # noqa: F401 - re-exported (data layer)
from sphere.generate.pairs import (
    PairFilter,
    filter_pairs,
    solution_text,
)
from sphere.generate.records import STAGE_FILES, read_stage_logs
from sphere.generate.stages import (  # one stage-log reader, one resume rule
    StageContext,
    route,
    stage1_outcome,
    stage2_outcome,
    stage3_outcome,
)
from sphere.io import JsonlAppender, atomic_write_json, atomic_write_text
from sphere.search.driver import SearchDriver, SearchJob, SearchResult, Trajectory, call_fill


# ---------------------------------------------------------------------------------------------- config
def config_hash(cfg: Any) -> str:
    """Signature of everything that changes the generated data (not paths, logging or workers)."""
    # resolve each node against the whole config (data.data_dir points at paths.data_dir)
    keep = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in ("model", "search", "stages", "scorer", "data", "prompt", "seed") if k in cfg}
    blob = json.dumps(keep, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def validate_generate_config(cfg: Any) -> None:
    st = cfg.stages
    if str(st.inverted) not in ("swap", "drop"):
        raise ValueError(f"config stages.inverted={st.inverted!r}: allowed swap | drop")
    if str(st.stage2_rejected) not in ("sol_max", "sol_min"):
        raise ValueError(f"config stages.stage2_rejected={st.stage2_rejected!r}: allowed sol_max | sol_min")
    if int(st.small_expansions_factor) < 1:
        raise ValueError(f"config stages.small_expansions_factor={st.small_expansions_factor}: allowed >= 1")
    if cfg.data.limit is not None and int(cfg.data.limit) < 0:
        raise ValueError(f"config data.limit={cfg.data.limit}: allowed null or an integer >= 0")
    if "scorer" in cfg and str(cfg.scorer.get("name", "")) == "mini_world":  # no model: its knobs check here
        from sphere.rewards.mini_world import MiniWorldStepScorer

        MiniWorldStepScorer(cfg.scorer)
    # the search and filter settings too, before any model loads or output file is created (issue #11)
    from sphere.search.driver import validate_search_config

    validate_search_config(cfg.search)
    PairFilter.from_cfg(cfg.filters)
    from sphere.generate.constructions import Construction

    con = Construction.from_cfg(cfg.get("construction"))
    runner = cfg.get("runner")
    if con.name != "sphere" and runner is not None and str(runner.get("name", "local")) != "local":
        raise ValueError(f"config construction={con.name}: runs with runner=local only (runner=ray writes the "
                         "paper's pairs: construction=sphere)")
    if str(cfg.get("engine_backend", "cpp")) not in ("cpp", "py"):
        raise ValueError(f"config engine_backend={cfg.engine_backend!r}: allowed cpp | py")


FINISHES = ("answer", "eos", "depth", "length", "window")
CUT_FINISHES = ("depth", "length", "window")  # chains cut before a stated answer: graded wrong, never chosen


def chain_ends(recs: dict[int, list[dict]]) -> dict:
    """Terminal trajectories of the stage records by finish, in all and per stage, with the share cut at the
    depth limit, the policy's window and the scorer's window (generate_stats.json ``chain_ends``)."""

    def count(rs: list[dict]) -> dict:
        c = {f: 0 for f in FINISHES}
        for r in rs:
            for t in r.get("terminals") or []:
                f = str(t.get("finish", ""))
                c[f] = c.get(f, 0) + 1
        n = sum(c.values())
        return {"terminals": n, **c, "share": {f: c[f] / n if n else 0.0 for f in CUT_FINISHES}}

    out = count([r for rs in recs.values() for r in rs])
    out["by_stage"] = {str(s): count(rs) for s, rs in sorted(recs.items())}
    return out


def traj_to_dict(t: Trajectory | None) -> dict | None:
    if t is None:
        return None
    return {
        "steps": t.steps,
        "correct": t.correct,
        "value": t.value,
        "rewards": t.rewards,
        "scores": t.scores,
        "finish": t.finish,
    }


def traj_from_dict(d: dict | None) -> Trajectory | None:
    if d is None:
        return None
    return Trajectory(d["steps"], bool(d["correct"]), float(d["value"]), list(d["rewards"]),
                      list(d["scores"]), str(d["finish"]))


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
        from sphere.generate.constructions import Construction

        self.construction = Construction.from_cfg(cfg.get("construction"))  # conf/construction/
        self.pair_ctx = None  # set by run(): how the non-paper constructions write a pair
        from sphere.prompts import family_config

        self.fam = family_config(cfg)
        self.delim = str(self.fam["step_delimiter"])
        self.answer_after = str(self.fam.get("answer_after") or "")  # R1: boxed answers count after </think>
        (self.out / "stages").mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ prompts
    def _prompt_fn(self, tokenizer: Any, problem: dict):
        from sphere.prompts import build_prompt_ids

        fam, text = self.fam, problem["problem"]
        return lambda steps: build_prompt_ids(tokenizer, text, steps, fam)

    def _reflection_fn(self, tokenizer: Any, problem: dict, attempt: Trajectory):
        from sphere.prompts import build_reflection_ids

        fam, text, att = self.fam, problem["problem"], list(attempt.steps)
        return lambda steps: build_reflection_ids(tokenizer, text, att, fam, continue_steps=steps)

    def _pair_prompt(self, tokenizer: Any, problem: dict, attempt: Trajectory | None = None) -> Any:
        """The pair's prompt: text for plain models, a user message list for chat models (TRL format)."""
        from sphere.prompts import build_prompt_text, build_reflection_text, uses_chat

        fam = getattr(self, "pair_fam", None) or self.fam
        if uses_chat(tokenizer, fam):
            from sphere.prompts import _user_text

            if attempt is None:
                content = _user_text(fam, problem["problem"])
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
        st_cfg = cfg.stages
        from sphere.generate.constructions import PairContext, sample_and_score, seed_from

        from sphere.rundir import generate_signature

        seed_from(self.construction, self.out, self.hash,  # construction.search_from: another run's search
                  lambda: generate_signature(cfg, self.policy_name or cfg.model.policy,
                                             self.small_name or cfg.model.get("small")))
        done1, done2, done3 = self._done(1), self._done(2), self._done(3)
        by_id = {p["id"]: p for p in problems}
        if len(by_id) != len(problems):
            dup = len(problems) - len(by_id)
            raise ValueError(f"data.problems: {dup} duplicate problem ids; ids must be unique")
        tok = policy_backend.tokenizer
        if hasattr(scorer, "set_golds"):  # rollout values need each problem's gold answer
            scorer.set_golds(problems)
        # provenance of the pairs: the models that actually ran (sphere run: round r's trained checkpoint)
        ptok = self.pair_tok or tok  # the pairs' prompt: the trained model's (a transfer target's) own
        ctx = StageContext.from_config(
            cfg, delim=self.delim, policy_name=self.policy_name or str(cfg.model.policy),
            small_name=self.small_name or str(cfg.model.small), config_hash=self.hash,
            conversational=self._conv(ptok), response_prefix=self._prefix(ptok),
            pair_prompt=lambda p, attempt: self._pair_prompt(ptok, p, attempt))
        self.pair_ctx = PairContext(delim=ctx.delim, pair_prompt=ctx.pair_prompt, conversational=ctx.conversational,
                                    response_prefix=ctx.response_prefix, policy_name=ctx.policy_name,
                                    config_hash=ctx.config_hash)
        snap_every = int(cfg.output.snapshot_every)
        w = {s: JsonlAppender(self.out / "stages" / f) for s, f in STAGE_FILES.items()}
        stats_acc: dict = {"search": {}}
        # progress: problems finished, searches done per stage, and searches queued for stages 2 and 3 (known
        # only once stage 1 routes a problem there), so a long stage 2 does not look like a stall
        counts = {"done": 0, "pairs": {1: 0, 2: 0, 3: 0}, "searched": {1: 0, 2: 0, 3: 0},
                  "queued": {2: 0, 3: 0}}
        try:
            driver = SearchDriver(policy_backend, scorer, verifier, cfg.search, delimiter=self.delim,
                                  answer_after=self.answer_after,
                                  engine_backend=str(cfg.engine_backend), seed=int(cfg.seed))

            def stage2_job(p: dict, rec1: dict) -> SearchJob:
                # both_wrong implies a chain (route: no terminal at all is no_chain, never stage 2)
                attempt = traj_from_dict(rec1[str(st_cfg.stage2_rejected)] or rec1["sol_max"] or rec1["sol_min"])
                return SearchJob(f"2:{p['id']}", p, self._reflection_fn(tok, p, attempt),
                                 {"stage": 2, "attempt": attempt})

            jobs, stage3_todo = [], []
            for i, p in enumerate(problems):  # resume: the stage each problem still needs
                r1 = done1.get(p["id"])
                if r1 is None:
                    meta = {"stage": 1, "snapshot": snap_every > 0 and i % snap_every == 0}
                    jobs.append(SearchJob(f"1:{p['id']}", p, self._prompt_fn(tok, p), meta))
                    continue
                counts["searched"][1] += 1
                nxt = {"both_wrong": 2, "both_right": 3}.get(r1["route"])
                if nxt == 2 and st_cfg.stage2 or nxt == 3 and st_cfg.stage3:
                    counts["queued"][nxt] += 1
                    if p["id"] in (done2 if nxt == 2 else done3):
                        counts["searched"][nxt] += 1
                        counts["done"] += 1
                    elif nxt == 2:
                        jobs.append(stage2_job(p, r1))
                    else:
                        stage3_todo.append((p, r1))
                else:
                    counts["done"] += 1

            if progress is not None:  # a resumed run starts where it stopped
                progress(counts)

            def finish(stage: int, p: dict, res: SearchResult, route_: str, pairs: list[dict]) -> dict:
                rec = self._record(stage, p, res, route_, pairs)
                w[stage].write(rec)
                counts["pairs"][stage] += len(pairs)
                return rec

            def on_result(res: SearchResult) -> None:  # stages 1 and 2 (the policy's searches)
                p, stage = res.job.problem, int(res.job.meta["stage"])
                if res.snapshot is not None:
                    self._save_snapshot(self.out / "trees", f"stage{stage}-{p['id']}", res)
                counts["searched"][stage] += 1
                if stage == 1:
                    rt, pairs, nxt = stage1_outcome(res, p, ctx)
                    rec = finish(1, p, res, rt, pairs)
                    if nxt in (2, 3):
                        counts["queued"][nxt] += 1
                    if nxt == 2:
                        driver.submit(stage2_job(p, rec))
                    elif nxt == 3:
                        stage3_todo.append((p, rec))
                    else:
                        counts["done"] += 1
                else:
                    finish(2, p, res, *stage2_outcome(res, p, res.job.meta["attempt"], ctx))
                    counts["done"] += 1
                if progress is not None:
                    progress(counts)

            if jobs:
                driver.run(jobs, on_result)
                stats_acc["search"]["policy"] = driver.stats.as_dict(int(cfg.search.batch_leaves))
            if self.construction.name == "best_worst_of_n":  # sampled while the policy is loaded (resumes)
                sample_and_score(cfg, self.construction, policy_backend, scorer, problems, self.out,
                                 self.policy_name or str(cfg.model.policy), self.fam, self.delim)
            if stage3_todo:  # the small model looks for plausible wrong solutions
                small = small_backend_factory() if small_backend_factory is not None else policy_backend
                stats_acc["search"]["small"] = self._stage3(small, scorer, verifier, stage3_todo, ctx,
                                                            finish, counts, progress)
        finally:
            for a in w.values():
                a.close()
        return self.finalize(problems, stats_acc, time.perf_counter() - t_start)

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
        from sphere.prompts import uses_chat

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
        from sphere.viz.snapshot import save_tree_snapshot

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
        cfg = self.cfg
        recs = {s: list(d.values()) for s, d in read_stage_logs(self.out).items()}
        wanted = {p["id"] for p in problems}
        traj_lines = []
        used: dict[int, list[dict]] = {1: [], 2: [], 3: []}
        for s in (1, 2, 3):
            seen = set()
            for r in recs[s]:
                if r["problem_id"] not in wanted or r["problem_id"] in seen:
                    continue
                seen.add(r["problem_id"])
                used[s].append(r)
                # one line per distinct trajectory of the record, with every role it plays (Sol_max and
                # Sol_min are terminals too, and may be the same trajectory)
                lines: dict[str, dict] = {}
                tagged = [("sol_max", r.get("sol_max")), ("sol_min", r.get("sol_min"))]
                for role, t in [*tagged, *(("terminal", t) for t in r["terminals"])]:
                    if t is None:
                        continue
                    line = lines.setdefault(json.dumps(t, sort_keys=True),
                                            {"problem_id": r["problem_id"], "stage": s, **t, "roles": []})
                    if role not in line["roles"]:
                        line["roles"].append(role)
                traj_lines.extend(lines.values())
        from sphere.generate.constructions import build_pairs  # conf/construction/: which pairs the search makes

        all_pairs = build_pairs(self.construction, used, {str(p["id"]): p for p in problems}, self.pair_ctx,
                                self.out)
        kept, drops = filter_pairs(all_pairs, PairFilter.from_cfg(cfg.filters))
        atomic_write_text(self.out / "pairs.jsonl",
                          "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in kept))
        atomic_write_text(self.out / "trajectories.jsonl",
                          "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in traj_lines))
        s1 = {r["problem_id"]: r for r in recs[1] if r["problem_id"] in wanted}
        routes: dict[str, int] = {}
        for r in s1.values():
            routes[r["route"]] = routes.get(r["route"], 0) + 1
        pairs_per_stage = {str(s): sum(1 for p in kept if int(p["stage"]) == s) for s in (1, 2, 3)}
        search = stats_acc.get("search", {})
        prev = {}
        stats_path = self.out / "generate_stats.json"
        if stats_path.exists():
            try:
                prev = json.loads(stats_path.read_text())
            except json.JSONDecodeError:
                prev = {}
        tot = {k: 0.0 for k in ("backend_calls", "tokens", "candidates", "leaves", "engine_s", "backend_s",
                                "scorer_s", "verify_s", "full_calls", "full_call_leaves", "collisions",
                                "pruned", "context_ends", "window_ends")}
        for sd in search.values():
            for k in tot:
                tot[k] += float(sd.get(k, 0))
        batch = int(cfg.search.batch_leaves)
        pol = search.get("policy", {})
        stats = {
            "config_hash": self.hash,
            "construction": self.construction.name,
            "problems": len(problems),
            "problems_done_stage1": len(s1),
            "routes": routes,
            "problems_per_stage": {"1": len(s1), "2": sum(1 for r in recs[2] if r["problem_id"] in wanted),
                                   "3": sum(1 for r in recs[3] if r["problem_id"] in wanted)},
            "pairs_per_stage": pairs_per_stage,
            "pairs_total": len(kept),
            "pairs_before_filters": len(all_pairs),
            "filter_drops": drops,
            "yield": len(kept) / max(1, len(problems)),
            "backend_calls": int(tot["backend_calls"]),
            "tokens": int(tot["tokens"]),
            "candidates": int(tot["candidates"]),
            "mean_leaves_per_call": call_fill(tot, batch)["mean_leaves_per_call"],
            # over the policy search's calls made while problems remained queued (its queue is longest)
            "leaves_per_call_frac": call_fill(pol, batch)["leaves_per_call_frac"],
            "engine_s": tot["engine_s"],
            "backend_s": tot["backend_s"],
            "scorer_s": tot["scorer_s"],
            "verify_s": tot["verify_s"],
            "engine_time_frac": tot["engine_s"] / max(1e-9, wall_s),
            "collisions": int(tot["collisions"]),
            "pruned": int(tot["pruned"]),
            "context_ends": int(tot["context_ends"]),  # leaves whose prompt no longer fit the policy's window
            "window_ends": int(tot["window_ends"]),  # candidate steps over the step scorer's window
            # how the chains ended: every terminal trajectory of the searches, by finish; the share cut at
            # search.max_depth (depth), the policy's window (length) and the step scorer's window (window)
            "chain_ends": chain_ends({s: [r for r in recs[s] if r["problem_id"] in wanted] for s in recs}),
            "wall_s": wall_s,
            "search": search,
            "previous_attempts_wall_s": (prev.get("previous_attempts_wall_s", 0.0) + prev.get("wall_s", 0.0))
            if prev.get("config_hash") == self.hash else 0.0,
        }
        atomic_write_json(stats_path, stats)
        ce = stats["chain_ends"]
        if any(ce[f] for f in CUT_FINISHES):  # say it where the user looks, not only in the stats file
            import sys

            print(f"[generate] {sum(ce[f] for f in CUT_FINISHES)} of {ce['terminals']} chains were cut before an "
                  f"answer: {ce['depth']} at search.max_depth, {ce['length']} at the policy's window, "
                  f"{ce['window']} at the step scorer's window (graded wrong, never chosen; generate_stats.json "
                  "chain_ends)", file=sys.stderr, flush=True)
        return stats


__all__ = ["Generator", "load_problems", "route", "solution_text"]
