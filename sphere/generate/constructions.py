"""Pair constructions over one search's output (``construction=`` on `sphere generate` / `sphere run`).

Every construction reads what the search already wrote (the stage logs ``stages/stage{1,2,3}.jsonl``: each
problem's Sol_max, Sol_min and every terminal chain with its steps, raw step-scorer scores and outcome), so
one search feeds every construction (``construction.search_from=DIR`` seeds a new run directory with another
one's stage logs instead of searching again):

- ``sphere`` (the paper's, the default): the stage routing of sphere/generate/stages.py, Sol_max over Sol_min
  (stage 1), the corrected solution over the attempt (stage 2), the policy's right solution over the small
  model's most plausible wrong one (stage 3). The pairs are the ones the stage logs carry, unchanged.
- ``first_wrong_step`` (Step-DPO, Lai et al. 2024): in the policy's stage-1 tree, a wrong chain's first wrong
  step is its first step whose recorded score is below ``construction.step_threshold``; a wrong chain with no
  such step errs at its last step (the answer check says wrong, the labels do not say where). The chain is
  paired with the right chain (every step at or above the threshold) that shares its longest prefix; the cut
  is where the two diverge (at or before the first wrong step). Prompt = problem + the shared correct prefix;
  chosen / rejected = the diverging step (``cut: step``, only when the chains diverge exactly at the first
  wrong step) or the rest of each chain (``cut: remainder``).
- ``siblings`` (tree-based step preferences): at each node of the stage-1 tree with two or more child steps,
  the child the step scorer ranks highest among those with a right chain below it over the child it ranks
  lowest among those with only wrong chains below, when their scores differ by at least
  ``construction.margin``. Prompt = problem + the node's prefix; chosen / rejected = the two steps or the rest
  of the chains through them (``cut``).
- ``best_worst_of_n`` (RLHFlow's online DPO): ``construction.samples`` full solutions per problem from the
  random-pairs control's sampler (sphere.controls.sample_solutions: the evaluation harness at the search
  temperature, no tree), scored by the step scorer; the right sample it ranks highest over the wrong sample it
  ranks lowest (rank = last step's score, then the weakest step: ``pairs.prm_rank``).

No construction pairs two right or two wrong chains: chosen is always a right chain (a stated answer that
checks) and rejected a wrong one, and ``filters`` (conf/generate.yaml) apply to every construction's pairs.
Step-level pairs (``cut: step``) do not end in an answer: train them with ``train.append_eos=false``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sphere.controls import sample_solutions
from sphere.generate.pairs import make_pair, prm_rank
from sphere.generate.records import read_stage_logs
from sphere.io import atomic_write_text, read_jsonl_tolerant
from sphere.prompts import steps_text
from sphere.rundir.resume import differences, flatten
from sphere.search.types import Trajectory

CONSTRUCTIONS = ("sphere", "first_wrong_step", "siblings", "best_worst_of_n")
CUTS = ("step", "remainder")
GRADED = ("answer", "eos")  # chains that end in a stated answer or the model's end: the only ones graded


@dataclass
class Construction:
    """``construction`` node (conf/construction/*.yaml)."""

    name: str = "sphere"
    step_threshold: float = 0.5  # first_wrong_step / siblings: a recorded step score below this is a wrong step
    cut: str = "remainder"  # first_wrong_step / siblings: step (the diverging step) | remainder (rest of chain)
    margin: float = 0.2  # siblings: minimum score gap between the chosen and the rejected sibling step
    max_per_problem: int = 1  # first_wrong_step / siblings: pairs kept per problem (0 = all)
    samples: int = 4  # best_worst_of_n: solutions sampled per problem (>= 2)
    search_from: str | None = None  # a generate directory whose stage logs seed this one (no new search)

    @classmethod
    def from_cfg(cls, node: Any) -> Construction:
        if node is None:
            return cls()
        d = dict(node.items()) if hasattr(node, "items") else {}
        allowed = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ValueError(f"config construction: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        c = cls(**d)
        if c.name not in CONSTRUCTIONS:
            raise ValueError(f"config construction.name={c.name!r}: allowed {' | '.join(CONSTRUCTIONS)} "
                             "(choose with construction=NAME)")
        if c.cut not in CUTS:
            raise ValueError(f"config construction.cut={c.cut!r}: allowed {' | '.join(CUTS)}")
        if not 0.0 <= float(c.step_threshold) <= 1.0:
            raise ValueError(f"config construction.step_threshold={c.step_threshold}: allowed [0, 1] (a raw "
                             "step score)")
        if not float(c.margin) >= 0.0:
            raise ValueError(f"config construction.margin={c.margin}: allowed >= 0")
        if isinstance(c.max_per_problem, bool) or int(c.max_per_problem) < 0:
            raise ValueError(f"config construction.max_per_problem={c.max_per_problem}: allowed an integer >= 0 "
                             "(0 = every pair)")
        if isinstance(c.samples, bool) or int(c.samples) < 2:
            raise ValueError(f"config construction.samples={c.samples}: allowed an integer >= 2")
        return c


def check_construction_override(args: list[str], conf_dir: Path) -> None:
    """``construction=NAME`` on the command line names a file of conf/construction/: otherwise one line naming
    the allowed values (Hydra's own message is a paragraph)."""
    for a in args:
        if a.startswith("construction="):
            name = a.split("=", 1)[1]
            opts = sorted(p.stem for p in (conf_dir / "construction").glob("*.yaml"))
            if name not in opts:
                raise SystemExit(f"sphere: construction={name}: no such pair construction; allowed: "
                                 f"{' | '.join(opts)} (conf/construction/)")


# ------------------------------------------------------------------------------------------- helpers
def _traj(d: Mapping) -> Trajectory:
    return Trajectory(list(d["steps"]), bool(d["correct"]), float(d["value"]), [float(x) for x in d["rewards"]],
                      [float(x) for x in d["scores"]], str(d["finish"]))


def _right(t: Trajectory) -> bool:
    return t.correct and t.finish in GRADED


def _clean(t: Trajectory, thr: float) -> bool:
    """A right chain none of whose steps the scorer labels wrong (a usable chosen solution)."""
    return _right(t) and all(s >= thr for s in t.scores)


def first_wrong_step(t: Trajectory, thr: float) -> int:
    """Index of a wrong chain's first step scored below ``thr``; its last step when none is."""
    for i, s in enumerate(t.scores):
        if s < thr:
            return i
    return len(t.steps) - 1


def _common(a: list[str], b: list[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _tail(t: Trajectory, start: int, step_only: bool) -> Trajectory:
    end = start + 1 if step_only else len(t.steps)
    return Trajectory(t.steps[start:end], t.correct, t.value, t.rewards[start:end], t.scores[start:end], t.finish)


@dataclass
class PairContext:
    """How a pair is written (the generator's prompt function and provenance; sphere.generate.stages'
    ``StageContext`` carries the same fields)."""

    delim: str
    pair_prompt: Callable[[dict, Any], Any]  # (problem, None) -> the pair prompt (text or messages)
    conversational: bool
    response_prefix: str
    policy_name: str
    config_hash: str


def _prefixed_pair(ctx: PairContext, construction: str, p: dict, prefix: list[str], chosen: Trajectory,
                   rejected: Trajectory, extra: dict) -> dict:
    """A pair whose prompt is the problem followed by ``prefix`` (steps shared by both chains). Plain text: the
    prefix ends the prompt. Conversational: the prompt is the user turn, so the prefix starts both assistant
    completions (it cancels in DPO's chosen-minus-rejected log-ratio; it counts in an SFT term)."""
    shared = steps_text(prefix, ctx.delim)
    base = ctx.pair_prompt(p, None)
    if isinstance(base, str):
        prompt, resp = base + shared, ctx.response_prefix
    else:
        prompt, resp = base, ctx.response_prefix + shared
    return make_pair(stage=1, problem=p, prompt=prompt, chosen=chosen, rejected=rejected, delimiter=ctx.delim,
                     chosen_model=ctx.policy_name, rejected_model=ctx.policy_name, config_hash=ctx.config_hash,
                     conversational=ctx.conversational, extra={"construction": construction,
                                                               "prefix_steps": len(prefix), **extra},
                     response_prefix=resp)


# ------------------------------------------------------------------------------------- constructions
def first_wrong_step_pairs(rec: Mapping, p: dict, c: Construction, ctx: PairContext) -> list[dict]:
    """Step-DPO pairs of one stage-1 record (see the module docstring)."""
    terms = [_traj(t) for t in rec.get("terminals") or []]
    thr = float(c.step_threshold)
    right = [t for t in terms if _clean(t, thr)]
    cands: list[tuple[tuple, dict]] = []
    seen: set[tuple] = set()
    for w in terms:
        if w.correct or not w.steps:
            continue
        k = first_wrong_step(w, thr)
        if k == len(w.steps) - 1 and w.finish not in GRADED and all(s >= thr for s in w.scores):
            continue  # a chain cut before any answer with no step labelled wrong: nothing shows where it errs
        best = None
        for r in right:
            d = _common(r.steps, w.steps)
            if d >= len(r.steps) or d >= len(w.steps) or d > k:
                continue
            key = (d, prm_rank(r))
            if best is None or key > best[0]:
                best = (key, r)
        if best is None:
            continue
        d, r = best[0][0], best[1]
        step_only = c.cut == "step"
        if step_only and d != k:
            continue  # the chains part before the wrong step: no single-step contrast at the first error
        key_seen = (tuple(w.steps[:d]), w.steps[d], r.steps[d])
        if key_seen in seen:
            continue
        seen.add(key_seen)
        pair = _prefixed_pair(ctx, "first_wrong_step", p, w.steps[:d], _tail(r, d, step_only),
                              _tail(w, d, step_only), {"first_wrong_step": k, "cut_step": d})
        cands.append(((d, prm_rank(r)), pair))
    cands.sort(key=lambda x: x[0], reverse=True)  # the longest shared correct prefix first
    out = [x[1] for x in cands]
    return out[:int(c.max_per_problem)] if int(c.max_per_problem) else out


def siblings_pairs(rec: Mapping, p: dict, c: Construction, ctx: PairContext) -> list[dict]:
    """Per-node sibling-step pairs of one stage-1 record (see the module docstring)."""
    terms = [_traj(t) for t in rec.get("terminals") or []]
    # the tree the terminal chains span: node = prefix of steps; child step -> (its score, chains through it)
    children: dict[tuple, dict[str, dict]] = {}
    for t in terms:
        for i, s in enumerate(t.steps):
            ch = children.setdefault(tuple(t.steps[:i]), {}).setdefault(s, {"score": t.scores[i], "chains": []})
            ch["chains"].append(t)
    step_only = c.cut == "step"
    cands: list[tuple[tuple, dict]] = []
    for prefix, kids in children.items():
        if len(kids) < 2:
            continue
        good = [(v["score"], s, max((t for t in v["chains"] if _right(t)), key=prm_rank))
                for s, v in kids.items() if any(_right(t) for t in v["chains"])]
        bad = [(v["score"], s, min(v["chains"], key=prm_rank))
               for s, v in kids.items() if not any(t.correct for t in v["chains"])]
        if not good or not bad:
            continue  # siblings with only right or only wrong chains below them: no contrast
        gs, _, gchain = max(good, key=lambda x: (x[0], x[1]))
        bs, _, bchain = min(bad, key=lambda x: (x[0], x[1]))
        gap = float(gs) - float(bs)
        if gap < float(c.margin):
            continue
        d = len(prefix)
        pair = _prefixed_pair(ctx, "siblings", p, list(prefix), _tail(gchain, d, step_only),
                              _tail(bchain, d, step_only), {"cut_step": d, "margin": gap})
        cands.append(((gap, d), pair))
    cands.sort(key=lambda x: x[0], reverse=True)  # the widest score gap first
    out = [x[1] for x in cands]
    return out[:int(c.max_per_problem)] if int(c.max_per_problem) else out


def best_worst_pair(sample: Mapping, p: dict, ctx: PairContext) -> list[dict]:
    """One scored sample record (``id``, ``completions``, ``verdicts``, ``scores``: per completion its step
    scores) -> the best right over the worst wrong solution, or nothing."""
    trajs = []
    for text, ok, sc in zip(sample.get("completions") or [], sample.get("verdicts") or [],
                            sample.get("scores") or [], strict=False):
        if not text.strip():
            continue
        steps = text.split(ctx.delim)
        sc = [float(x) for x in sc] or [0.0]
        trajs.append(Trajectory(steps, bool(ok), sc[-1], list(sc), list(sc), "answer"))
    right = [t for t in trajs if t.correct]
    wrong = [t for t in trajs if not t.correct]
    if not right or not wrong:
        return []
    ch, rj = max(right, key=prm_rank), min(wrong, key=prm_rank)
    return [make_pair(stage=1, problem=p, prompt=ctx.pair_prompt(p, None), chosen=ch, rejected=rj,
                      delimiter=ctx.delim, chosen_model=ctx.policy_name, rejected_model=ctx.policy_name,
                      config_hash=ctx.config_hash, conversational=ctx.conversational,
                      response_prefix=ctx.response_prefix, extra={"construction": "best_worst_of_n"})]


SAMPLES_DIR = "best_worst_of_n"
SCORED = "scored.jsonl"


def build_pairs(c: Construction, recs: dict[int, list[dict]], problems: Mapping[str, dict],
                ctx: PairContext | None, out_dir: Path | None = None) -> list[dict]:
    """Every pair of construction ``c`` before the filters, from the stage records ``{stage: [record]}`` (one
    per problem, in ``problems``); ``sphere`` returns the records' own pairs in stage order."""
    if c.name == "sphere":
        return [pr for s in (1, 2, 3) for r in recs.get(s, []) for pr in r["pairs"]]
    if ctx is None:
        raise ValueError(f"construction={c.name}: needs the pair prompt of a local generation run (runner=local)")
    out: list[dict] = []
    if c.name == "best_worst_of_n":
        path = Path(out_dir or ".") / SAMPLES_DIR / SCORED
        if not path.is_file():
            raise ValueError(f"construction=best_worst_of_n: {path} is missing (the scored samples are written "
                             "while the policy is loaded; rerun the same command to take them)")
        for s in read_jsonl_tolerant(path):
            if str(s["id"]) in problems:
                out.extend(best_worst_pair(s, problems[str(s["id"])], ctx))
        return out
    fn = first_wrong_step_pairs if c.name == "first_wrong_step" else siblings_pairs
    for r in recs.get(1, []):
        p = problems.get(str(r["problem_id"]))
        if p is not None:
            out.extend(fn(r, p, c, ctx))
    return out


# ------------------------------------------------------------------------------ samples and seeding
def sample_and_score(cfg: Any, c: Construction, backend: Any, scorer: Any, problems: list[dict], out_dir: Path,
                     model_name: str, family: dict, delim: str) -> Path:
    """best_worst_of_n: ``c.samples`` solutions per problem from the random-pairs control's sampler, each
    scored by the step scorer; written to ``out_dir/best_worst_of_n/scored.jsonl`` (atomically; the sampling
    itself resumes per problem through the evaluation harness)."""
    d = Path(out_dir) / SAMPLES_DIR
    scfg = OmegaConf.create({
        "controls": {"samples": int(c.samples)},
        "search": {"temperature": float(cfg.search.temperature), "top_p": float(cfg.search.get("top_p", 1.0))},
        "sampling": {"max_solution_tokens": int(cfg.sampling.max_solution_tokens)},
        "eval": {"verify_timeout_s": 5.0, "progress": None}, "seed": int(cfg.seed)})
    recs = sample_solutions(scfg, backend, problems, d, model_name, family)
    by_id = {str(p["id"]): p for p in problems}
    items, where = [], []
    for i, r in enumerate(recs):
        p = by_id.get(str(r["id"]))
        for j, text in enumerate(r.get("completions") or []):
            if p is not None and text.strip():
                items.append((p["problem"], text.split(delim)))
                where.append((i, j))
    scores = scorer.score(items) if items else []
    per: dict[int, list] = {i: [[] for _ in (r.get("completions") or [])] for i, r in enumerate(recs)}
    for (i, j), sc in zip(where, scores, strict=True):
        per[i][j] = [float(x) for x in sc]
    lines = [json.dumps({"id": r["id"], "completions": r.get("completions") or [],
                         "verdicts": r.get("verdicts") or [], "scores": per[i]}) + "\n" for i, r in enumerate(recs)]
    path = d / SCORED
    atomic_write_text(path, "".join(lines))
    return path


def seed_from(c: Construction, out_dir: Path, config_hash: str, signature: Callable[[], Mapping] | None = None
              ) -> int:
    """``construction.search_from=DIR``: copy DIR's stage logs (and tree snapshots) into ``out_dir`` when it has
    none yet, so the run builds its pairs from that search instead of searching again. The search must have
    run with this configuration: the records' config_hash, and, where DIR recorded one (`sphere run` does),
    its generate signature against ``signature()`` (the models' weight hashes included, so a later round's
    policy never reuses an earlier one's search). Returns the number of stage records copied."""
    if not c.search_from:
        return 0
    src = Path(str(c.search_from))
    if (src / "generate" / "stages").is_dir() and not (src / "stages").is_dir():
        src = src / "generate"
    if not (src / "stages").is_dir():
        raise ValueError(f"config construction.search_from={c.search_from}: no stages/ directory there (a "
                         "`sphere generate` directory or a `sphere run` round directory)")
    dst = Path(out_dir) / "stages"
    if any(dst.glob("*.jsonl")) and any(f.stat().st_size for f in dst.glob("*.jsonl")):
        return 0  # already seeded (or searched): resume as usual
    recs = read_stage_logs(src)
    hashes = {str(r.get("config_hash")) for d in recs.values() for r in d.values()}
    if hashes and hashes != {config_hash}:
        raise ValueError(f"config construction.search_from={c.search_from}: that search ran with another "
                         f"configuration (config_hash {sorted(hashes)}, this run {config_hash}); pair "
                         "constructions share a search only under the same model, data, search, scorer, "
                         "stages, prompt and seed")
    sig_file = src / "signature.json"
    if signature is not None and sig_file.is_file():
        try:
            old = (json.loads(sig_file.read_text()).get("generate") or {}).get("signature")
        except ValueError:
            old = None
        diffs = differences(old, flatten(signature())) if old is not None else []
        if diffs:
            shown = "; ".join(f"{k}: {a!r} there, {b!r} here" for k, a, b in diffs[:3])
            raise ValueError(f"config construction.search_from={c.search_from}: that search ran under other "
                             f"settings ({shown}{'; ...' if len(diffs) > 3 else ''})")
    dst.mkdir(parents=True, exist_ok=True)
    n = 0
    for f in sorted((src / "stages").glob("*.jsonl")):
        shutil.copyfile(f, dst / f.name)
        n += sum(1 for line in f.read_text().splitlines() if line.strip())
    if (src / "trees").is_dir():
        shutil.copytree(src / "trees", Path(out_dir) / "trees", dirs_exist_ok=True)
    if (src / SAMPLES_DIR).is_dir():
        shutil.copytree(src / SAMPLES_DIR, Path(out_dir) / SAMPLES_DIR, dirs_exist_ok=True)
    return n
