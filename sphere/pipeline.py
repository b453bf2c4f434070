"""`sphere run`: the SPHERE self-evolution loop.

    sphere run                                   # the loop's check, CPU, ~10 min (experiment=loop_check)
    sphere run experiment=mini_honest            # the honest mini world with controls, ~42 min
    sphere run rounds=3 search=mcts              # any generate/train/eval override composes
    sphere run experiment=paper_qwen2_5_7b dry_run=true   # print the plan of the paper's setting

For round r = 0..R: evaluate policy_r; if r < R, generate pairs with policy_r (three stages), train
policy_{r+1} with DPO on them. One backend per policy serves both its evaluation and its generation.
Every piece resumes: evaluation per problem, generation per problem and stage, training per round
(DONE marker), so a rerun of the same command continues where a crash stopped it.

Outputs: ``round_<r>/{eval,generate,train}/`` and ``summary.json`` / ``summary.md`` rewritten after every
round: ``{"rounds": [{"round", "policy", "eval": {bench: {"accuracy", ...}}, "pairs_per_stage",
"wall_s"}, ...]}``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sphere.controls import enabled_controls, finish_controls, prepare_controls, validate_controls_config
from sphere.evaluation.settings import round_benchmarks  # noqa: F401 - also importable from here
from sphere.io import atomic_write_json, atomic_write_text


def _eval_round(cfg: DictConfig, backend: Any, rdir: Path, policy: str, logger: Any, r: int,
                family: dict | None = None) -> dict:
    from sphere.evaluation.harness import run_eval, settings_from_config
    from sphere.prompts import family_config

    # eval.n samples per problem (1 = greedy pass@1), not the search's sampling.n
    ev = OmegaConf.to_container(cfg.eval, resolve=True)
    samp = {**OmegaConf.to_container(cfg.sampling, resolve=True), "n": int(ev.pop("n", 1))}
    ecfg = OmegaConf.create({"sampling": samp, "seed": int(cfg.seed), **ev})
    res = run_eval(backend, round_benchmarks(cfg), rdir, data_dir=cfg.paths.data_dir,
                   limit=cfg.eval.limit, settings=settings_from_config(ecfg),
                   family_cfg=family or family_config(cfg),
                   model_name=policy, progress=cfg.eval.get("progress"))
    if logger is not None:
        logger.log({f"eval/{k}/accuracy": v["accuracy"] for k, v in res.items() if k != "meta"}, step=r)
        logger.log_artifact(rdir / "eval" / "results.json", f"eval-round{r}", "results")
    return {k: v for k, v in res.items() if k != "meta"}


def _round_config(cfg: DictConfig, policy: str, **top: Any) -> DictConfig:
    """``cfg`` resolved into a plain (non-struct) config with ``model.policy`` = this round's policy and the
    given top-level keys added (the eval-shaped keys of conf/eval.yaml for the Ray evaluation)."""
    from sphere.scale.ray_runner import plain_config

    plain = plain_config(cfg)
    plain["model"] = {**plain["model"], "policy": str(policy)}
    plain.update(top)
    return OmegaConf.create(plain)


def _eval_round_ray(cfg: DictConfig, rdir: Path, policy: str, logger: Any, r: int) -> dict:
    """This round's evaluation on Ray actors (sphere.scale.ray_runner.evaluate): the same files and numbers
    as ``_eval_round``; ``rdir/eval/ray_runner.json`` adds the actors' bookkeeping."""
    from sphere.scale.ray_runner import evaluate

    ev = OmegaConf.to_container(cfg.eval, resolve=True)
    samp = {**OmegaConf.to_container(cfg.sampling, resolve=True), "n": int(ev.pop("n", 1))}
    ev["benchmarks"] = round_benchmarks(cfg)
    ecfg = _round_config(cfg, policy, sampling=samp, reference_results=None, **ev)
    res = evaluate(ecfg, rdir)
    if logger is not None:
        logger.log({f"eval/{k}/accuracy": v["accuracy"] for k, v in res.items() if k != "meta"}, step=r)
        logger.log_artifact(rdir / "eval" / "results.json", f"eval-round{r}", "results")
    return {k: v for k, v in res.items() if k not in ("meta",)}


def _generate_ray(cfg: DictConfig, gdir: Path, policy: str) -> dict:
    """This round's three stages on Ray actors (sphere.scale.ray_runner.generate) -> the stats dict."""
    from sphere.scale.ray_runner import generate

    return generate(_round_config(cfg, policy), gdir)


def summary_markdown(rounds: list[dict], about: str | None = None) -> str:
    """The per-round table; accuracy change against round 0 in points. ``about`` (the experiment's ``about``
    field: what its world can and cannot show) and the verdicts read off the paired intervals come first."""
    if not rounds:
        return "# sphere run\n\n(no rounds finished)\n"
    benches = sorted({b for r in rounds for b in r.get("eval", {})})
    head = ["round", *[f"{b} acc" for b in benches], *[f"{b} Δ vs r0" for b in benches],
            "pairs s1/s2/s3", "wall s"]
    lines = ["# sphere run: summary", *verdict_markdown(rounds, about), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = rounds[0].get("eval", {})
    for r in rounds:
        ev = r.get("eval", {})
        acc = [f"{100 * ev[b]['accuracy']:.1f}%" if b in ev else "—" for b in benches]
        delta = []
        for b in benches:
            if b in ev and b in base:
                delta.append(f"{100 * (ev[b]['accuracy'] - base[b]['accuracy']):+.1f}")
            else:
                delta.append("—")
        pp = r.get("pairs_per_stage") or {}
        pairs = "/".join(str(pp.get(k, 0)) for k in ("1", "2", "3")) if pp else "—"
        lines.append("| " + " | ".join([str(r["round"]), *acc, *delta, pairs, f"{r['wall_s']:.0f}"]) + " |")
    lines += ["", "Accuracy: greedy pass@1 on the configured benchmarks; Δ in points against round 0. "
              "Pairs are the preference pairs generated with that round's policy's predecessor."]
    lines += paired_markdown(rounds)
    lines += controls_markdown(rounds)
    return "\n".join(lines) + "\n"


def _reading(c: dict, better: str = "better", worse: str = "worse") -> str:
    """How a paired interval reads: above zero, below zero, or not distinguishable from no change."""
    if c["ci_low"] > 0:
        return f"{better} (interval above zero)"
    if c["ci_high"] < 0:
        return f"{worse} (interval below zero)"
    return "no difference this run can detect (interval spans zero)"


def verdict_markdown(rounds: list[dict], about: str | None = None) -> list[str]:
    """"What this run shows": the experiment's ``about`` text, then one line per round and benchmark read off
    the paired intervals (the round against the policy it started from, SPHERE against each control); nothing
    when there is neither."""
    out: list[str] = []
    for r in rounds:
        rnd = r["round"]
        for b, v in sorted((r.get("paired") or {}).items()):
            c = v.get("vs_prev") or v.get("vs_r0")
            if c:
                out.append(f"- Round {rnd} against the policy it started from, {b} ({c['n']} problems): "
                           f"{100 * c['delta']:+.1f} points [{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}]: "
                           f"{_reading(c)}.")
        for name, ctl in (r.get("controls") or {}).items():
            for b, p in sorted((ctl.get("paired") or {}).items()):
                c = p.get("sphere_vs_control")
                if c:
                    out.append(f"- Round {rnd}, SPHERE against the control {_CONTROL_TITLES.get(name, name)}, {b}: "
                               f"{100 * c['delta']:+.1f} points [{100 * c['ci_low']:+.1f}, "
                               f"{100 * c['ci_high']:+.1f}]: "
                               f"{_reading(c, 'SPHERE better', 'the control better')}.")
    if not out and not about:
        return []
    head = ["", "## What this run shows", ""]
    if about:
        head += [" ".join(str(about).split()), ""]
    if out:
        head += ["Read off the paired 95% intervals below (same problems before and after):", "", *out]
    return head


def paired_markdown(rounds: list[dict]) -> list[str]:
    """The paired-interval table (rounds with ``paired``; see ``paired_changes``), or nothing."""
    rows = [(r["round"], b, k, c) for r in rounds for b, v in sorted((r.get("paired") or {}).items())
            for k, c in (("r0", v.get("vs_r0")), ("prev", v.get("vs_prev"))) if c]
    if not rows:
        return []
    out = ["", "Paired accuracy change over the same problems (95% percentile bootstrap over problems; "
           "McNemar's exact test on the problems that changed):", "",
           "| round | benchmark | vs | n | Δ points | 95% paired CI | gained/lost | McNemar p |",
           "|---|---|---|---|---|---|---|---|"]
    for rnd, b, k, c in rows:
        vs = "round 0" if k == "r0" else f"round {rnd - 1}"
        out.append(f"| {rnd} | {b} | {vs} | {c['n']} | {100 * c['delta']:+.1f} | "
                   f"[{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}] | {c['gained']}/{c['lost']} | "
                   f"{c['mcnemar_p']:.3g} |")
    return out


_CONTROL_TITLES = {"rft": "SFT on SPHERE's chosen solutions (RFT)",
                   "random_pairs": "DPO on random right/wrong samples"}


def controls_markdown(rounds: list[dict]) -> list[str]:
    """The per-round controls table (rounds with ``controls``; sphere/controls.py), or nothing."""
    rows = []
    for r in rounds:
        for name, c in (r.get("controls") or {}).items():
            for b, v in sorted((c.get("eval") or {}).items()):
                p = (c.get("paired") or {}).get(b, {})
                rows.append((r["round"], name, c.get("pairs", 0), b, v["accuracy"], p.get("vs_start"),
                             p.get("sphere_vs_control")))
    if not rows:
        return []

    def iv(x):
        if not x:
            return "—"
        return f"{100 * x['delta']:+.1f} [{100 * x['ci_low']:+.1f}, {100 * x['ci_high']:+.1f}]"

    out = ["", "Per-round controls: trained from the same start policy, on the same problems, with the same "
           "recipe, evaluated on the same problems (sphere/controls.py); Δ in points with the paired 95% CI:",
           "",
           "| round | control | pairs | benchmark | acc | Δ vs start policy | SPHERE − control |",
           "|---|---|---|---|---|---|---|"]
    for rnd, name, n, b, acc, vs, sv in rows:
        out.append(f"| {rnd} | {_CONTROL_TITLES.get(name, name)} | {n} | {b} | {100 * acc:.1f}% | {iv(vs)} | "
                   f"{iv(sv)} |")
    return out


def _first_verdicts(path: Path, keep: list[str] | None = None) -> dict[str, bool]:
    """Sample 0's verdict per problem id of the records at ``path``; ``keep``: only these ids (the problems
    this evaluation covers: an earlier attempt with a larger ``eval.limit`` left more records there)."""
    from sphere.io import read_jsonl_tolerant

    got = {str(rec["id"]): bool(rec["verdicts"][0]) for rec in read_jsonl_tolerant(path) if rec.get("verdicts")}
    if keep is None:
        return got
    return {i: got[i] for i in keep if i in got}


def evaluated_ids(cfg: DictConfig) -> dict[str, list[str]]:
    """benchmark key -> the ids of the problems each round evaluates (``eval.benchmarks`` within
    ``eval.limit``): every figure of the summary is computed over these problems only."""
    from sphere.data.benchmarks import benchmark_key, load_benchmark

    return {benchmark_key(b): [str(p["id"]) for p in load_benchmark(b, cfg.paths.data_dir, cfg.eval.limit)]
            for b in round_benchmarks(cfg)}


def paired_changes(out: Path, r: int, benches, ids: dict | None = None) -> dict:
    """Per benchmark, the paired accuracy change of round ``r`` against round 0 (``vs_r0``) and against round
    ``r - 1`` (``vs_prev``, from round 2 on), over the problems both rounds evaluated, from the per-problem
    records ``round_<r>/eval/<bench>.jsonl`` (sample 0 of each problem: the greedy answer when eval.n = 1).
    See ``sphere.evaluation.metrics.paired_accuracy_change``."""
    res: dict = {}
    for b in benches:
        keep = (ids or {}).get(b)
        cur = _first_verdicts(out / f"round_{r}" / "eval" / f"{b}.jsonl", keep)
        if not cur:
            continue
        entry = {}
        for key, q in (("vs_r0", 0), ("vs_prev", r - 1)):
            if q < 0 or (key == "vs_prev" and q == 0):
                continue
            c = _paired_over(cur, _first_verdicts(out / f"round_{q}" / "eval" / f"{b}.jsonl", keep), cur)
            if c:
                entry[key] = c
        if entry:
            res[b] = entry
    return res


def control_paired_changes(out: Path, r: int, name: str, benches, ids: dict | None = None) -> dict:
    """Per benchmark, control ``name`` of round ``r`` (trained from round ``r - 1``'s policy) against its
    start policy (``vs_start``: round ``r - 1``'s evaluation) and SPHERE's round ``r`` against the control
    (``sphere_vs_control``: positive = SPHERE better), over the same problems."""
    res: dict = {}
    for b in benches:
        keep = (ids or {}).get(b)
        ctrl = _first_verdicts(out / f"round_{r}" / "controls" / name / "eval" / f"{b}.jsonl", keep)
        start, sphere = (_first_verdicts(out / f"round_{q}" / "eval" / f"{b}.jsonl", keep) for q in (r - 1, r))
        entry = {k: c for k, c in (("vs_start", _paired_over(ctrl, start, ctrl)),
                                   ("sphere_vs_control", _paired_over(ctrl, ctrl, sphere))) if c}
        if entry:
            res[b] = entry
    return res


def _paired_over(order: dict, before: dict, after: dict) -> dict | None:
    """``paired_accuracy_change`` of ``before`` -> ``after`` over the problems both have, taken in ``order``'s
    order (the bootstrap is seeded, so the order is part of the result); None when they share none."""
    from sphere.evaluation.metrics import paired_accuracy_change

    ids = [i for i in order if i in before and i in after]
    return paired_accuracy_change([before[i] for i in ids], [after[i] for i in ids]) if ids else None


def plan(cfg: DictConfig) -> dict:
    """What a run would do, without loading any model (dry runs)."""
    from sphere.data.training import describe_source
    from sphere.generate.generator import count_problems, validate_generate_config
    from sphere.search.driver import estimate_backend_calls, validate_search_config
    from sphere.train.dpo import resolve_train_cfg

    validate_search_config(cfg.search)
    validate_generate_config(cfg)
    validate_run_config(cfg)
    resolve_train_cfg(cfg.train)  # unknown or bad train.* keys fail here, not after generation
    from sphere.budgets import check_length_budgets
    from sphere.memplan import check_memory_plan

    budgets = check_length_budgets(cfg)  # every length budget vs its window; refuses where not one step fits
    mem = check_memory_plan(cfg, budgets)  # refuses a plan that cannot fit hardware.gpu_memory_gb
    from sphere.scale.placement import check_placement

    placement = check_placement(cfg, mem)  # runner=ray: which GPU of the described cluster holds what
    n = count_problems(cfg.data, int(cfg.seed))
    est = estimate_backend_calls(n, cfg.search)
    return {
        "models": {"policy": str(cfg.model.policy), "small": str(cfg.model.small), "prm": str(cfg.model.prm),
                   "train_target": cfg.model.get("train_target")},
        "backend": str(cfg.backend.name),
        "prompt_family": str(cfg.prompt.name),
        "rounds": int(cfg.rounds),
        "problems": n,
        "data": OmegaConf.to_container(cfg.data.problems, resolve=True)
        if OmegaConf.is_config(cfg.data.problems) else str(cfg.data.problems),
        "data_source": describe_source(cfg.data),  # which pools data.problems reads, and why
        "stages": {"1": True, "2": bool(cfg.stages.stage2), "3": bool(cfg.stages.stage3)},
        "search": {"mode": str(cfg.search.mode), "E": int(cfg.search.expansions),
                   "E_small": int(cfg.search.expansions) * int(cfg.stages.small_expansions_factor),
                   "temperature": float(cfg.search.temperature), "max_depth": int(cfg.search.max_depth),
                   "pruning": str(cfg.search.pruning.policy), "batch_leaves": int(cfg.search.batch_leaves)},
        "scorer": str(cfg.scorer.name),
        "train": {"lora": bool(cfg.train.lora.enabled) if "lora" in cfg.train else None,
                  "loss": OmegaConf.to_container(cfg.train.loss, resolve=True) if "loss" in cfg.train else None},
        "eval": {"benchmarks": round_benchmarks(cfg), "limit": cfg.eval.limit},
        "controls": enabled_controls(cfg),
        "estimate_per_round_controls": _controls_estimate(cfg, n),
        "estimate_per_round_stage1": est,
        "length_budgets": budgets,
        "memory_plan": mem,
        "placement": placement,
    }


def _controls_estimate(cfg: DictConfig, n: int) -> dict:
    """What the per-round controls add to a round: each trains once and is evaluated once on the round's
    benchmarks; random_pairs first samples ``controls.samples`` full solutions per searched problem."""
    out = {}
    for name in enabled_controls(cfg):
        est = {"trainings": 1, "evaluations": len(round_benchmarks(cfg))}
        if name == "random_pairs":
            est["sampled_solutions"] = n * int(cfg.controls.get("samples", 4))
        out[name] = est
    return out


def validate_run_config(cfg: DictConfig) -> None:
    if int(cfg.rounds) < 0:
        raise ValueError(f"config rounds={cfg.rounds}: allowed an integer >= 0")
    if cfg.model.get("train_target") and int(cfg.rounds) != 1:
        raise ValueError(f"config rounds={cfg.rounds}: a transfer run (model.train_target set) has exactly 1 round")
    from sphere.data.benchmarks import benchmark_key, load_benchmark

    try:
        names = round_benchmarks(cfg)
    except ValueError as e:
        raise ValueError(f"config eval.benchmarks is empty: list at least one benchmark ({e})") from None
    for name in names:  # unknown or missing: fail before any work
        benchmark_key(name)
        load_benchmark(name, cfg.paths.data_dir, cfg.eval.limit)
    validate_controls_config(cfg)
    if enabled_controls(cfg):
        from sphere.runners import runner_name

        if runner_name(cfg) == "ray" or cfg.model.get("train_target"):
            why = ("runner=ray keeps the round's start policy inside its Ray actors, and the controls "
                   "sample from it (controls.random_pairs) and build their pairs with its tokenizer in the "
                   "driver process (sphere/controls.py prepare_controls)" if runner_name(cfg) == "ray" else
                   "they are part of the self-evolution loop, not of a transfer run (model.train_target)")
            raise ValueError(f"config controls: the per-round controls run with runner=local only: {why}; "
                             "turn them off (controls.rft=false controls.random_pairs=false) or use "
                             "runner=local")
    if int(cfg.rounds) > 0:  # the generate settings too, before round 0 spends time (issue #11)
        from sphere.generate.generator import validate_generate_config

        validate_generate_config(cfg)


def _show_eval(out: Path, rounds: list[dict], rec: dict, carry_s: float, what: str,
               about: str | None = None, ids: dict | None = None) -> None:
    """Print round ``rec``'s accuracy and write the summary with it now, not only after the next round's
    pairs are generated and trained (hours on the paper's setting)."""
    print(f"[sphere run] round {rec['round']} {what}: " + ", ".join(
        f"{b} {100 * v['accuracy']:.1f}%" for b, v in rec["eval"].items()), flush=True)
    _write_summary(out, [*rounds, {**rec, "wall_s": rec["eval_s"] + carry_s}], about, ids)


def _generate_local(cfg: DictConfig, r: int, out: Path, models: Any, policy: str, small: str | None,
                    problems: list[dict], logger: Any) -> tuple[dict, dict, float]:
    """Round ``r + 1``'s pairs from round ``r``'s open models, then the controls' pairs (they need the start
    policy's backend): ``(generate stats, {control: pairs.jsonl}, seconds spent on the controls)``."""
    from sphere.generate.generator import Generator
    from sphere.generate.local import log_generate_stats
    from sphere.progress import StageProgress
    from sphere.rundir import check_generate
    from sphere.verify import check_answers

    gdir = out / f"round_{r + 1}" / "generate"
    check_generate(cfg, gdir, policy, small)  # signature.json
    gen = Generator(cfg, gdir, logger=logger, policy_name=policy, small_name=small)
    with StageProgress(len(problems), f"round {r + 1} generate") as prog:
        gstats = gen.run(problems, models.policy(), models.scorer(), check_answers,
                         small_backend_factory=models.small if small else None, progress=prog.update)
    log_generate_stats(logger, gstats, gdir, step=r + 1)
    if not enabled_controls(cfg) or gstats["pairs_total"] == 0:
        return gstats, {}, 0.0
    t0 = time.perf_counter()
    fn, conv, prefix = gen.pair_prompt_fn(models.policy().tokenizer)
    ctrl_pairs = prepare_controls(cfg, r, backend=models.policy(), problems=problems, policy=policy,
                                  sphere_pairs=gdir / "pairs.jsonl",
                                  n_sphere_pairs=int(gstats["pairs_total"]), pair_prompt=fn,
                                  conversational=conv, response_prefix=prefix,
                                  out=out / f"round_{r + 1}" / "controls")
    return gstats, ctrl_pairs, time.perf_counter() - t0


def run(cfg: DictConfig, out: Path) -> dict:
    from sphere.generate.generator import load_problems
    from sphere.generate.local import log_generate_stats
    from sphere.lifecycle import Models
    from sphere.loggers import make_logger
    from sphere.models import resolve_model
    from sphere.rundir import check_generate
    from sphere.runners import runner_name
    from sphere.train.dpo import train_dpo

    validate_run_config(cfg)
    about = cfg.get("about")  # the experiment's own words on what it can show (summary.md's first section)
    ids = evaluated_ids(cfg)  # every figure of the summary over these problems (not a larger earlier attempt's)
    use_ray = runner_name(cfg) == "ray"
    target_name = cfg.model.get("train_target")
    if target_name:
        if use_ray:
            raise ValueError("runner=ray with model.train_target (a transfer run) is not supported: its pairs "
                             "are written with the target model's prompt and tokenizer (Generator pair_tok), "
                             "which the Ray workers do not build; use runner=local for transfer runs")
        return run_transfer(cfg, out, str(target_name))
    logger = make_logger(cfg, out, "run")
    summary_path = out / "summary.json"
    rounds: list[dict] = []
    earlier = _earlier_rounds(summary_path)  # a rerun into the same directory keeps what the work took
    try:
        t_prep = time.perf_counter()
        policy = str(resolve_model(str(cfg.model.policy), cfg))
        small = str(resolve_model(str(cfg.model.small), cfg)) if cfg.stages.stage3 else None
        prep_s = time.perf_counter() - t_prep
        problems = load_problems(cfg.data, int(cfg.seed))
        R = int(cfg.rounds)
        pending_pairs = None  # pairs that trained this round's policy (generated by the previous one)
        pending_controls = None  # controls trained from the previous round's policy (sphere/controls.py)
        carry_s = prep_s  # time that produced this round's policy: generate + train (round 0: model prep)
        for r in range(R + 1):
            t0 = time.perf_counter()
            rdir = out / f"round_{r}"
            rec: dict = {"round": r, "policy": policy, "pairs_per_stage": pending_pairs,
                         "policy_s": carry_s}
            if pending_controls is not None:  # {"controls": {name: ...}, "controls_s": seconds}
                rec.update(pending_controls)
                pending_controls = None
            gstats = None
            ctrl_pairs: dict = {}
            ctrl_s = 0.0
            if use_ray:  # runner=ray: this round's evaluation and generation on Ray actors
                rec["eval"] = _eval_round_ray(cfg, rdir, policy, logger, r)
                rec["eval_s"] = time.perf_counter() - t0
                _show_eval(out, rounds, rec, carry_s, "eval (ray)", about, ids)
                if r < R:
                    gdir = out / f"round_{r + 1}" / "generate"
                    check_generate(cfg, gdir, policy, small)  # signature.json
                    gstats = _generate_ray(cfg, gdir, policy)
                    log_generate_stats(logger, gstats, gdir, step=r + 1)
            else:  # one owner opens and closes this round's models (policy, small, PRM); all closed before DPO
                with Models(cfg, policy=policy, small=small) as models:
                    rec["eval"] = _eval_round(cfg, models.policy(), rdir, policy, logger, r)
                    rec["eval_s"] = time.perf_counter() - t0
                    _show_eval(out, rounds, rec, carry_s, "eval", about, ids)
                    if r < R:
                        gstats, ctrl_pairs, ctrl_s = _generate_local(cfg, r, out, models, policy, small,
                                                                     problems, logger)
            # a round's wall time: producing its policy (previous generate + train) and evaluating it
            rec["wall_s"] = rec["eval_s"] + carry_s
            gen_s = time.perf_counter() - t0 - rec["eval_s"] - ctrl_s  # controls are not SPHERE's time
            carry_s = 0.0
            if gstats is not None:
                pairs_path = out / f"round_{r + 1}" / "generate" / "pairs.jsonl"
                if gstats["pairs_total"] == 0:  # a clean stop, said in one line and in summary.json (issue #29)
                    rec["stopped"] = (f"round {r + 1}: generation produced no preference pairs ({pairs_path}); "
                                      f"nothing to train on, so the run stops after round {r}'s evaluation. "
                                      "Try more problems (data.mini_n / data.limit) or another search.")
                    print(f"sphere run: {rec['stopped']}", file=sys.stderr, flush=True)
                    _keep_earlier_timings(rec, earlier.get(r))
                    rounds.append(rec)
                    break
                t1 = time.perf_counter()
                start = policy
                policy = str(train_dpo(cfg.train, policy, pairs_path, out / f"round_{r + 1}" / "train",
                                       logger=_StepLogger(logger, r + 1)))
                carry_s = gen_s + (time.perf_counter() - t1)
                pending_pairs = gstats["pairs_per_stage"]
                if ctrl_pairs:  # the per-round controls: same start policy, problems, recipe and benchmarks
                    t_c = time.perf_counter()
                    ctrls = finish_controls(
                        cfg, r, start_policy=start, pairs=ctrl_pairs, out=out / f"round_{r + 1}" / "controls",
                        evaluate=lambda b, d, m, rr=r + 1: _eval_round(cfg, b, d, m, None, rr), logger=logger)
                    pending_controls = {"controls": ctrls, "controls_s": ctrl_s + time.perf_counter() - t_c}
            _keep_earlier_timings(rec, earlier.get(r))
            rounds.append(rec)
            _write_summary(out, rounds, about, ids)
        _write_summary(out, rounds, about, ids)
        if logger is not None:
            logger.log_artifact(summary_path, "summary", "results")
        return json.loads(summary_path.read_text())
    finally:
        logger.finish()


def run_transfer(cfg: DictConfig, out: Path, target_name: str) -> dict:
    """Transfer (the paper's Table 4 setting): the policy generates pairs once; ``model.train_target`` is
    evaluated before and after DPO on them. Round 0 and round 1 are the target's numbers."""
    from sphere.generate.generator import Generator, load_problems
    from sphere.lifecycle import Models
    from sphere.loggers import make_logger
    from sphere.models import resolve_model
    from sphere.prompts import load_family
    from sphere.rundir import check_generate
    from sphere.train.dpo import train_dpo
    from sphere.verify import check_answers

    logger = make_logger(cfg, out, "run")
    about, ids = cfg.get("about"), evaluated_ids(cfg)
    try:
        fam_name = cfg.model.get("train_target_family")
        fam = load_family(str(fam_name)) if fam_name else None
        policy = str(resolve_model(str(cfg.model.policy), cfg))
        target = str(resolve_model(target_name, cfg))
        small = str(resolve_model(str(cfg.model.small), cfg)) if cfg.stages.stage3 else None
        rounds: list[dict] = []
        t0 = time.perf_counter()
        with Models(cfg, policy=target) as tm:  # the target's own evaluation before training
            rounds.append({"round": 0, "policy": target,
                           "eval": _eval_round(cfg, tm.policy(), out / "round_0", target, logger, 0, fam)})
        rounds[0]["wall_s"] = time.perf_counter() - t0
        _write_summary(out, rounds, about, ids)
        t0 = time.perf_counter()
        gdir = out / "round_1" / "generate"
        check_generate(cfg, gdir, policy, small)  # signature.json (sphere/rundir/)
        # the pairs are written in the target's prompt (its family, its tokenizer's template): the prompt it is
        # trained on is the prompt it is evaluated with, not the generating policy's
        from sphere.prompts import family_config
        from sphere.train.checkpoints import _load_tokenizer

        target_tok = _load_tokenizer(Path(target), {"trust_remote_code": bool(cfg.model.get("trust_remote_code"))})
        with Models(cfg, policy=policy, small=small) as models:  # policy, small, PRM: closed before DPO
            gen = Generator(cfg, gdir, logger=logger, policy_name=policy, small_name=small,
                            pair_family=fam or family_config(cfg), pair_tokenizer=target_tok)
            gstats = gen.run(load_problems(cfg.data, int(cfg.seed)), models.policy(), models.scorer(),
                             check_answers, small_backend_factory=models.small if small else None)
        trained = str(train_dpo(cfg.train, target, gdir / "pairs.jsonl", out / "round_1" / "train",
                                logger=_StepLogger(logger, 1)))
        with Models(cfg, policy=trained) as tm:
            ev = _eval_round(cfg, tm.policy(), out / "round_1", trained, logger, 1, fam)
        rounds.append({"round": 1, "policy": trained, "generated_by": policy, "eval": ev,
                       "pairs_per_stage": gstats["pairs_per_stage"], "wall_s": time.perf_counter() - t0})
        _write_summary(out, rounds, about, ids)
        return json.loads((out / "summary.json").read_text())
    finally:
        logger.finish()


class _StepLogger:
    """Forwards train/* metrics to the run logger (round-tagged)."""

    def __init__(self, logger: Any, r: int):
        self.logger, self.r = logger, r

    def log(self, metrics: dict, step: int | None = None) -> None:
        if self.logger is not None:
            self.logger.log({**metrics, "train/round": self.r})


_TIMINGS = ("wall_s", "eval_s", "policy_s", "controls_s")


def _earlier_rounds(summary_path: Path) -> dict[int, dict]:
    """Round records of an earlier attempt in this run directory (its summary.json), by round."""
    try:
        return {int(r["round"]): r for r in json.loads(summary_path.read_text())["rounds"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _keep_earlier_timings(rec: dict, before: dict | None) -> None:
    """A rerun that reuses a finished round measures only the reuse (seconds); the round's recorded times stay
    those of the attempt that did the work (the longer of the two, for the same policy)."""
    if not before or before.get("policy") != rec.get("policy"):
        return
    for k in _TIMINGS:
        if isinstance(before.get(k), (int, float)) and before[k] > rec.get(k, 0.0):
            rec[k] = before[k]


def _write_summary(out: Path, rounds: list[dict], about: str | None = None, ids: dict | None = None) -> None:
    for rec in rounds:  # paired intervals against round 0 / the previous round (same problems)
        if rec.get("round", 0) > 0 and "paired" not in rec:
            rec["paired"] = paired_changes(out, int(rec["round"]), sorted(rec.get("eval") or {}), ids)
        for name, c in (rec.get("controls") or {}).items():
            if "paired" not in c:
                c["paired"] = control_paired_changes(out, int(rec["round"]), name,
                                                     sorted(c.get("eval") or {}), ids)
    atomic_write_json(out / "summary.json", {"rounds": rounds, **({"about": about} if about else {})})
    atomic_write_text(out / "summary.md", summary_markdown(rounds, about))


def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    out = Path(HydraConfig.get().runtime.output_dir)
    if cfg.dry_run:
        from sphere.budgets import format_budgets
        from sphere.memplan import format_plan

        p = plan(cfg)
        print(json.dumps(p, indent=2))  # stdout stays one JSON document (scripts parse it)
        print(format_budgets(p["length_budgets"]), file=sys.stderr)
        print(format_plan(p["memory_plan"]), file=sys.stderr)
        if str(cfg.runner.get("name", "local")) == "ray":
            from sphere.scale.placement import format_placement

            print(format_placement(p["placement"]), file=sys.stderr)
        return 0.0
    from sphere.budgets import check_length_budgets
    from sphere.memplan import check_memory_plan

    validate_run_config(cfg)  # the config's own errors first, named by their keys
    check_length_budgets(cfg)  # a step budget no window can take is refused before any model loads
    from sphere.scale.placement import check_placement

    check_placement(cfg, check_memory_plan(cfg))  # before any model loads (no-op without hardware.gpu_memory_gb)
    summary = run(cfg, out)
    last = summary["rounds"][-1]["eval"]
    print((out / "summary.md").read_text())
    return float(sum(v["accuracy"] for v in last.values()) / max(1, len(last)))
