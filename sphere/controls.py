"""Per-round controls of `sphere run` (issue #20): what SPHERE's search and pairs add over simpler recipes.

Each control starts from the same policy as the SPHERE round, uses the same training problems and the same
training recipe (``train``), and is evaluated on the same benchmarks, so its accuracy is compared with
SPHERE's over the same problems (paired intervals in ``summary.json`` / ``summary.md``):

- ``rft``: rejection-sampling fine-tuning on SPHERE's chosen solutions only. The round's own pairs, trained
  with the DPO term switched off (``train.loss.beta`` set to ``controls.rft_beta``, tiny: the sigmoid DPO
  loss's gradient scales with beta) and the RPO NLL term on the chosen solution on (``rpo_alpha``, 1.0 when
  the recipe has none): supervised fine-tuning on the chosen solutions. It separates "the search found right
  solutions" from "the contrast with a wrong one teaches something".
- ``random_pairs``: DPO (the round's recipe) on randomly paired right and wrong samples: ``controls.samples``
  full solutions per searched problem sampled from the start policy at the search temperature (no tree, no
  scorer), one uniformly random right and one random wrong solution per problem that has both; when that
  gives more pairs than SPHERE's round, a random subset of the same size. It separates "the pairs come from
  a scored tree search" from "any right/wrong pair would do".

A control is a baseline of one round: round r's controls start from round r's policy (SPHERE's), they do
not continue as chains of their own. This module holds what a control is (config checks, the RFT recipe, the
sampler, the random pairing); the round loop runs them (sphere/loop/controls.py: their pairs while the start
policy is open, their training and evaluation after the round's). ``sample_solutions`` stays down here because
the ``best_worst_of_n`` construction (sphere/generate/constructions.py) samples with it too.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sphere.evaluation.harness import run_eval
from sphere.evaluation.settings import EvalSettings
from sphere.io import atomic_write_text, read_jsonl_tolerant

CONTROLS = ("rft", "random_pairs")


def enabled_controls(cfg: DictConfig) -> list[str]:
    """The controls switched on in ``cfg.controls`` (none when the node is absent), in a fixed order."""
    node = cfg.get("controls")
    if node is None or not OmegaConf.is_dict(node):
        return []
    return [name for name in CONTROLS if bool(node.get(name, False))]


def validate_controls_config(cfg: DictConfig) -> None:
    """Refuse unknown ``controls`` keys and bad values before any work, naming the field and what is
    allowed."""
    node = cfg.get("controls")
    if node is None:
        return
    allowed = {*CONTROLS, "samples", "rft_beta", "seed"}
    if not OmegaConf.is_dict(node):
        raise ValueError(f"config controls={node!r}: allowed a mapping of {sorted(allowed)} (e.g. "
                         "controls.rft=true controls.random_pairs=true)")
    unknown = sorted(set(node.keys()) - allowed)
    if unknown:
        raise ValueError(f"config controls: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    for name in CONTROLS:
        v = node.get(name, False)
        if not isinstance(v, bool):
            raise ValueError(f"config controls.{name}={v!r}: allowed true or false")
    samples = node.get("samples", 4)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise ValueError(f"config controls.samples={samples!r}: allowed an integer >= 2 (solutions sampled "
                         "per problem; a random pair needs a right and a wrong one)")
    seed = node.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"config controls.seed={seed!r}: allowed an integer or null (null = the run's seed)")
    beta = node.get("rft_beta", 1e-4)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < float(beta) <= 0.01:
        raise ValueError(f"config controls.rft_beta={beta!r}: allowed a number in (0, 0.01] (the DPO term's "
                         "weight in the SFT-on-chosen control; tiny switches it off)")


def rft_train_config(train: DictConfig, rft_beta: float) -> DictConfig:
    """The round's training recipe turned into SFT on the chosen solutions: DPO beta tiny, RPO NLL term on."""
    t = OmegaConf.to_container(train, resolve=True)
    loss = dict(t.get("loss") or {})
    loss["beta"] = float(rft_beta)
    if not loss.get("rpo_alpha"):
        loss["rpo_alpha"] = 1.0
    t["loss"] = loss
    return OmegaConf.create(t)


def random_pairs(records: Sequence[dict], problems: dict[str, dict], *, max_pairs: int | None, seed: int,
                 pair_prompt: Callable[[dict], Any], conversational: bool = False,
                 response_prefix: str = "", model: str = "") -> list[dict]:
    """Pairs from sampled solutions: per problem with at least one right and one wrong sample, one uniformly
    random right (chosen) and one uniformly random wrong (rejected); then at most ``max_pairs`` of them, a
    uniformly random subset (``None``: all). ``records``: the evaluation harness's per-problem records
    (``id``, ``completions``, ``verdicts``). Deterministic in ``seed``; problems are taken in ``records``
    order."""
    rng = random.Random(seed)
    out: list[dict] = []
    for rec in records:
        pid = str(rec["id"])
        texts, verdicts = rec.get("completions") or [], rec.get("verdicts") or []
        right = sorted({t for t, v in zip(texts, verdicts, strict=False) if v and t.strip()})
        wrong = sorted({t for t, v in zip(texts, verdicts, strict=False) if not v and t.strip()})
        if not right or not wrong or pid not in problems:
            continue
        c, r = rng.choice(right), rng.choice(wrong)
        if conversational:
            chosen: Any = [{"role": "assistant", "content": response_prefix + c}]
            rejected: Any = [{"role": "assistant", "content": response_prefix + r}]
        else:
            chosen, rejected = c, r
        out.append({"prompt": pair_prompt(problems[pid]), "chosen": chosen, "rejected": rejected,
                    "problem_id": pid, "source": problems[pid].get("source", ""), "chosen_correct": True,
                    "rejected_correct": False, "chosen_model": model, "rejected_model": model,
                    "route": "random_pair"})
    if max_pairs is not None and len(out) > max_pairs:
        keep = sorted(rng.sample(range(len(out)), max_pairs))
        out = [out[i] for i in keep]
    return out


def write_pairs(path: Path, pairs: Sequence[dict]) -> Path:
    atomic_write_text(path, "".join(json.dumps(p) + "\n" for p in pairs))
    return path


def write_sample_problems(out: Path, problems: Sequence[dict]) -> Path:
    """``out/problems.jsonl``: the searched problems as a benchmark file the evaluation harness samples from
    (rewritten only when they changed, so a rerun resumes per problem)."""
    out.mkdir(parents=True, exist_ok=True)
    bench = out / "problems.jsonl"
    rows = "".join(json.dumps({"id": p["id"], "problem": p["problem"], "answer": p["answer"],
                               "source": p.get("source", "")}) + "\n" for p in problems)
    if not bench.is_file() or bench.read_text() != rows:
        atomic_write_text(bench, rows)
    return bench


def sample_settings(cfg: DictConfig) -> EvalSettings:
    """How the random-pairs control samples: ``controls.samples`` full solutions per problem at the search's
    temperature and top_p, up to ``sampling.max_solution_tokens``, seeded by the run's seed."""
    return EvalSettings(n=int(cfg.controls.get("samples", 4)), temperature=float(cfg.search.temperature),
                        top_p=float(cfg.search.get("top_p", 1.0)),
                        max_tokens=int(cfg.sampling.max_solution_tokens), seed=int(cfg.seed),
                        resume=True, verify_timeout_s=float(cfg.eval.get("verify_timeout_s", 5.0)))


def read_samples(out: Path) -> list[dict]:
    """The per-problem records the sampling wrote (``out/samples/eval/problems.jsonl``), each with its
    samples and their verdicts."""
    return list(read_jsonl_tolerant(out / "samples" / "eval" / "problems.jsonl"))


def sample_solutions(cfg: DictConfig, backend: Any, problems: Sequence[dict], out: Path, model_name: str,
                     family: dict) -> list[dict]:
    """``sample_settings`` solutions per problem from ``backend`` in this process, graded against each
    problem's answer (the evaluation harness on ``out/problems.jsonl``; resumes per problem). Returns the
    per-problem records. (With ``runner=ray`` the actors sample the same file: sphere.runners.)"""
    bench = write_sample_problems(out, problems)
    run_eval(backend, [str(bench)], out / "samples", settings=sample_settings(cfg), family_cfg=family,
             model_name=model_name, progress=cfg.eval.get("progress"))
    return read_samples(out)


def base_seed(cfg: DictConfig) -> int:
    """``controls.seed``, else the run's seed."""
    seed = cfg.controls.get("seed")
    return int(cfg.seed) if seed is None else int(seed)


def control_seed(cfg: DictConfig, round_: int) -> int:
    """The pairing seed of round ``round_`` + 1's random-pairs control (``controls.seed``, else the run's)."""
    return base_seed(cfg) * 1000 + int(round_)
