"""`sphere run`: the SPHERE self-evolution loop, and the transfer run as one setting of the same loop.

    sphere run                                   # the loop's check, CPU, ~10 min (experiment=loop_check)
    sphere run experiment=mini_honest            # the honest mini world with controls, ~42 min
    sphere run rounds=3 search=mcts              # any generate/train/eval override composes
    sphere run experiment=paper_qwen2_5_7b dry_run=true   # print the plan of the paper's setting

For round r = 0..R: evaluate model_r; if r < R, generate pairs (three stages), train model_{r+1} from model_r
with DPO on them. Self-evolution: model_0 is the policy and each round's model generates its own pairs (one
open set of models serves the round's evaluation, its generation and its controls). Transfer
(``model.train_target``, the paper's Table 4, one round): model_0 is the target, the policy generates the
pairs, written in the target's prompt (``Arms``). Where the work runs is the runner's business
(sphere/runners.py, ``runner=``); the loop does not ask. Every piece resumes: evaluation per problem,
generation per problem and stage, training per round (DONE marker), so a rerun of the same command continues
where a crash stopped it.

Outputs: ``round_<r>/{eval,generate,train,controls}/`` and ``summary.json`` / ``summary.md`` rewritten after
every round (sphere/loop/summary.py).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sphere.controls import enabled_controls
from sphere.data.problems import load_problems
from sphere.evaluation.paired import evaluated_ids
from sphere.loggers import make_logger
from sphere.loop.controls import finish_controls, pair_prompt, prepare_controls
from sphere.loop.plan import preflight, print_plan, validate_run_config
from sphere.loop.summary import earlier_rounds, keep_earlier_timings, show_eval, write_summary
from sphere.model_paths import load_tokenizer, resolve_model
from sphere.prompts import family_config, load_family
from sphere.rundir import check_generate
from sphere.runners import Runner, make_runner
from sphere.train.dpo import train_dpo


@dataclass(frozen=True)
class Arms:
    """Who plays which part in the loop."""

    start: str  # model_0: evaluated at round 0, trained every round (the policy; a transfer's target)
    small: str | None  # stage 3's small model (None: stage 3 off)
    generator: str | None = None  # None: each round's model generates its pairs; else this one (transfer)
    family: dict | None = None  # the trained model's prompt family (None: the config's)
    pair_family: dict | None = None  # the pairs' prompt (None: the generator's own)
    pair_tokenizer: Any = None  # the tokenizer whose chat template the pairs use (None: the generator's)


def arms(cfg: DictConfig) -> Arms:
    """The models of this run, resolved to local directories."""
    policy = str(resolve_model(str(cfg.model.policy), cfg))
    small = str(resolve_model(str(cfg.model.small), cfg)) if cfg.stages.stage3 else None
    target_name = cfg.model.get("train_target")
    if not target_name:
        return Arms(start=policy, small=small)
    # the pairs are written in the target's prompt (its family, its tokenizer's template): the prompt it is
    # trained on is the prompt it is evaluated with, not the generating policy's
    fam_name = cfg.model.get("train_target_family")
    fam = load_family(str(fam_name)) if fam_name else None
    target = str(resolve_model(str(target_name), cfg))
    tok = load_tokenizer(target, cfg)
    return Arms(start=target, small=small, generator=policy, family=fam,
                pair_family=fam or family_config(cfg), pair_tokenizer=tok)


class _StepLogger:
    """Forwards train/* metrics to the run logger (round-tagged)."""

    def __init__(self, logger: Any, r: int):
        self.logger, self.r = logger, r

    def log(self, metrics: dict, step: int | None = None) -> None:
        if self.logger is not None:
            self.logger.log({**metrics, "train/round": self.r})


@dataclass
class _Carry:
    """What a round hands the next: the model it trained, the pairs and controls that trained it, and the
    seconds that produced it (generate + train; round 0: resolving the models)."""

    model: str
    seconds: float
    pairs: dict | None = None
    controls: dict | None = None  # {"controls": {name: ...}, "controls_s": seconds}


@dataclass
class _Generated:
    stats: dict | None = None  # generate_stats.json of round r + 1's pairs (None: the last round)
    control_pairs: dict | None = None  # {control: pairs.jsonl}
    control_s: float = 0.0  # seconds the controls' pairs took (not SPHERE's time)


class RoundLoop:
    """The rounds of one `sphere run` into ``out``."""

    def __init__(self, cfg: DictConfig, out: Path, runner: Runner, logger: Any):
        self.cfg, self.out, self.runner, self.logger = cfg, out, runner, logger
        self.about = cfg.get("about")  # the experiment's own words on what it can show (summary.md first)
        self.ids = evaluated_ids(cfg)  # every figure of the summary over these problems only
        self.earlier = earlier_rounds(out / "summary.json")  # a rerun keeps what the work took
        self.last = int(cfg.rounds)
        self.rounds: list[dict] = []
        self.arms: Arms | None = None
        self.problems: list[dict] = []

    def run(self) -> dict:
        t = time.perf_counter()
        self.arms = arms(self.cfg)
        carry = _Carry(model=self.arms.start, seconds=time.perf_counter() - t)
        self.problems = load_problems(self.cfg.data, int(self.cfg.seed))
        for r in range(self.last + 1):
            if not self._round(r, carry):
                break
        self._write()
        if self.logger is not None:
            self.logger.log_artifact(self.out / "summary.json", "summary", "results")
        return json.loads((self.out / "summary.json").read_text())

    def _write(self) -> None:
        write_summary(self.out, self.rounds, self.about, self.ids)

    def _round(self, r: int, carry: _Carry) -> bool:
        """Round ``r``: evaluate ``carry.model``, generate the next round's pairs, train; False: stop here."""
        t0 = time.perf_counter()
        rec: dict = {"round": r, "policy": carry.model, "pairs_per_stage": carry.pairs,
                     "policy_s": carry.seconds}
        if self.arms.generator and r > 0:
            rec["generated_by"] = self.arms.generator
        if carry.controls is not None:
            rec.update(carry.controls)
            carry.controls = None
        gen = self._eval_and_generate(r, rec, carry)
        # a round's wall time: producing its model (previous generate + train) and evaluating it
        rec["wall_s"] = rec["eval_s"] + carry.seconds
        gen_s = time.perf_counter() - t0 - rec["eval_s"] - gen.control_s  # the controls are not SPHERE's time
        carry.seconds = 0.0
        go_on = gen.stats is None or self._train(r, rec, gen, gen_s, carry)
        keep_earlier_timings(rec, self.earlier.get(r))
        self.rounds.append(rec)
        if go_on:
            self._write()
        return go_on

    def _eval_and_generate(self, r: int, rec: dict, carry: _Carry) -> _Generated:
        """Round ``r``'s evaluation, then (before the last round) the next round's pairs, on open models: the
        round's own when it generates them, the generator's after them otherwise."""
        t0 = time.perf_counter()
        own = self.arms.generator is None
        with self.runner.open(self.cfg, carry.model, self.arms.small) as models:
            rec["eval"] = self._evaluate(models, r, carry.model)
            rec["eval_s"] = time.perf_counter() - t0
            show_eval(self.out, self.rounds, rec, carry.seconds, "eval" + self.runner.tag, self.about,
                      self.ids)
            if r < self.last and own:
                return self._generate(models, r, carry.model)
        if r == self.last:
            return _Generated()
        with self.runner.open(self.cfg, self.arms.generator, self.arms.small) as models:
            return self._generate(models, r, self.arms.generator)

    def _evaluate(self, models: Any, r: int, model: str) -> dict:
        rdir = self.out / f"round_{r}"
        res = self.runner.evaluate(self.cfg, rdir, models=models, policy=model, family=self.arms.family)
        if self.logger is not None:
            self.logger.log({f"eval/{k}/accuracy": v["accuracy"] for k, v in res.items() if k != "meta"},
                            step=r)
            self.logger.log_artifact(rdir / "eval" / "results.json", f"eval-round{r}", "results")
        return {k: v for k, v in res.items() if k != "meta"}

    def _generate(self, models: Any, r: int, generator: str) -> _Generated:
        """Round ``r + 1``'s pairs from ``generator``'s open models, then the controls' pairs (they need the
        start policy's backend)."""
        cfg, gdir = self.cfg, self.out / f"round_{r + 1}" / "generate"
        check_generate(cfg, gdir, generator, self.arms.small)  # signature.json (sphere/rundir/)
        stats = self.runner.generate(cfg, gdir, models=models, policy=generator, small=self.arms.small,
                                     problems=self.problems, logger=self.logger, step=r + 1,
                                     label=f"round {r + 1} generate", pair_family=self.arms.pair_family,
                                     pair_tokenizer=self.arms.pair_tokenizer)
        if not enabled_controls(cfg) or stats["pairs_total"] == 0:
            return _Generated(stats)
        t0 = time.perf_counter()
        fn, conv, prefix = pair_prompt(cfg, gdir, self.runner.tokenizer(cfg, models=models, policy=generator))

        def sample(problems: Sequence[dict], out: Path) -> list[dict]:
            return self.runner.sample(cfg, out, models=models, policy=generator, problems=problems)

        paths = prepare_controls(cfg, r, sample=sample, problems=self.problems, policy=generator,
                                 sphere_pairs=gdir / "pairs.jsonl", n_sphere_pairs=int(stats["pairs_total"]),
                                 pair_prompt=fn, conversational=conv, response_prefix=prefix,
                                 out=self.out / f"round_{r + 1}" / "controls")
        return _Generated(stats, paths, time.perf_counter() - t0)

    def _train(self, r: int, rec: dict, gen: _Generated, gen_s: float, carry: _Carry) -> bool:
        """Train round ``r + 1``'s model (and the controls) from ``carry.model``; False when there is nothing
        to train on (a clean stop, said in one line and in summary.json, issue #29)."""
        nxt = self.out / f"round_{r + 1}"
        pairs_path = nxt / "generate" / "pairs.jsonl"
        if gen.stats["pairs_total"] == 0:
            rec["stopped"] = (f"round {r + 1}: generation produced no preference pairs ({pairs_path}); "
                              f"nothing to train on, so the run stops after round {r}'s evaluation. "
                              "Try more problems (data.mini_n / data.limit) or another search.")
            print(f"sphere run: {rec['stopped']}", file=sys.stderr, flush=True)
            return False
        t1 = time.perf_counter()
        start = carry.model
        carry.model = str(train_dpo(self.cfg.train, start, pairs_path, nxt / "train",
                                    logger=_StepLogger(self.logger, r + 1)))
        carry.seconds = gen_s + (time.perf_counter() - t1)
        carry.pairs = gen.stats["pairs_per_stage"]
        if gen.control_pairs:  # the per-round controls: same start policy, problems, recipe and benchmarks
            t_c = time.perf_counter()
            ctrls = finish_controls(self.cfg, r, start_policy=start, pairs=gen.control_pairs,
                                    out=nxt / "controls", runner=self.runner, logger=self.logger)
            carry.controls = {"controls": ctrls, "controls_s": gen.control_s + time.perf_counter() - t_c}
        return True


def run(cfg: DictConfig, out: Path) -> dict:
    """The rounds into ``out``; the final summary.json."""
    validate_run_config(cfg)
    runner = make_runner(cfg)
    logger = make_logger(cfg, out, "run")
    try:
        return RoundLoop(cfg, out, runner, logger).run()
    finally:
        logger.finish()


def main(cfg: DictConfig) -> float:
    """Hydra entry of `sphere run`: the dry run's plan, or the rounds; the last round's mean accuracy."""
    out = Path(HydraConfig.get().runtime.output_dir)
    if cfg.dry_run:
        print_plan(cfg)
        return 0.0
    preflight(cfg)
    summary = run(cfg, out)
    last = summary["rounds"][-1]["eval"]
    print((out / "summary.md").read_text())
    return float(sum(v["accuracy"] for v in last.values()) / max(1, len(last)))
