"""The per-round controls inside the round loop: their pairs while the start policy is open, then their
training and evaluation after SPHERE's round has trained (what each control is, its recipe, its pairing and
its config checks: sphere/controls.py).

Files: ``round_<r+1>/controls/<name>/{pairs.jsonl, train/, eval/}`` (``random_pairs`` also
``samples/eval/problems.jsonl``: every sampled solution with its verdict). Every piece resumes like the
round itself: sampling and evaluation per problem, training by its DONE marker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from sphere.controls import (
    base_seed,
    control_seed,
    enabled_controls,
    random_pairs,
    rft_train_config,
    write_pairs,
)
from sphere.evaluation.settings import round_benchmarks
from sphere.generate.generator import Generator
from sphere.rundir import check_or_record
from sphere.runners import Runner
from sphere.train.dpo import train_dpo
from sphere.train.pairs_file import load_pairs


def controls_estimate(cfg: DictConfig, n: int) -> dict:
    """What the per-round controls add to a round: each trains once and is evaluated once on the round's
    benchmarks; random_pairs first samples ``controls.samples`` full solutions per searched problem."""
    out = {}
    for name in enabled_controls(cfg):
        est = {"trainings": 1, "evaluations": len(round_benchmarks(cfg))}
        if name == "random_pairs":
            est["sampled_solutions"] = n * int(cfg.controls.get("samples", 4))
        out[name] = est
    return out


def pair_prompt(cfg: DictConfig, gdir: Path, tokenizer: Any) -> tuple[Callable[[dict], Any], bool, str]:
    """How the round's generator wrote its pairs (``Generator.pair_prompt_fn``): the controls' pairs use the
    same prompt, format and response prefix."""
    return Generator(cfg, gdir).pair_prompt_fn(tokenizer)


def prepare_controls(cfg: DictConfig, r: int, *, sample: Callable[[Sequence[dict], Path], list[dict]],
                     problems: Sequence[dict], policy: str, sphere_pairs: Path, n_sphere_pairs: int,
                     pair_prompt: Callable[[dict], Any], conversational: bool, response_prefix: str,
                     out: Path) -> dict[str, Path]:
    """Round ``r + 1``'s control pairs, written while the start policy is open: ``{name: pairs.jsonl}``
    (``rft`` trains on SPHERE's own ``sphere_pairs``). ``sample(problems, out)``: the runner's sampling from
    the start policy (``Runner.sample``: in this process, or on the Ray actors)."""
    paths: dict[str, Path] = {}
    for name in enabled_controls(cfg):
        cdir = out / name
        if name == "rft":
            paths[name] = Path(sphere_pairs)
            continue
        # the pairing settings, checked before anything is sampled or written (a changed seed is refused here,
        # naming it, instead of rewriting pairs.jsonl under a model trained on the old pairs)
        check_or_record(cdir, "control_pairs", {"controls.seed": base_seed(cfg),
                                                "controls.samples": int(cfg.controls.get("samples", 4)),
                                                "max_pairs (SPHERE's pairs this round)": n_sphere_pairs},
                        outputs=["pairs.jsonl"])
        recs = sample(problems, cdir)
        pairs = random_pairs(recs, {str(p["id"]): p for p in problems}, max_pairs=n_sphere_pairs,
                             seed=control_seed(cfg, r), pair_prompt=pair_prompt,
                             conversational=conversational, response_prefix=response_prefix, model=policy)
        if not pairs:
            print(f"[sphere run] round {r + 1} control random_pairs: no problem has both a right and a wrong "
                  f"sample among {len(recs)} problems x {cfg.controls.get('samples', 4)} samples; skipped",
                  flush=True)
            continue
        paths[name] = write_pairs(cdir / "pairs.jsonl", pairs)
    return paths


def finish_controls(cfg: DictConfig, r: int, *, start_policy: str, pairs: dict[str, Path], out: Path,
                    runner: Runner, logger: Any = None) -> dict[str, dict]:
    """Train each control from ``start_policy`` on its pairs, evaluate it on the round's benchmarks (the
    ``runner``, as the round itself), and return ``{name: {"pairs", "model", "eval"}}`` for
    ``summary.json``."""
    res: dict[str, dict] = {}
    for name, pairs_path in pairs.items():
        cdir = out / name
        tcfg = rft_train_config(cfg.train, float(cfg.controls.get("rft_beta", 1e-4))) if name == "rft" \
            else cfg.train
        model = str(train_dpo(tcfg, start_policy, pairs_path, cdir / "train"))
        ev = {k: v for k, v in runner.evaluate(cfg, cdir, policy=model).items() if k != "meta"}
        res[name] = {"pairs": len(load_pairs(pairs_path).rows), "pairs_path": str(pairs_path), "model": model,
                     "eval": ev}
        print(f"[sphere run] round {r + 1} control {name}: " + ", ".join(
            f"{b} {100 * v['accuracy']:.1f}%" for b, v in ev.items()), flush=True)
        if logger is not None:
            logger.log({f"controls/{name}/{b}/accuracy": v["accuracy"] for b, v in ev.items()}, step=r + 1)
    return res
