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
not continue as chains of their own. Files: ``round_<r+1>/controls/<name>/{pairs.jsonl, train/, eval/}``
(``random_pairs`` also ``samples/eval/problems.jsonl``: every sampled solution with its verdict). Every piece
resumes like the round itself: sampling and evaluation per problem, training by its DONE marker.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sphere.io import atomic_write_text

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


def sample_solutions(cfg: DictConfig, backend: Any, problems: Sequence[dict], out: Path, model_name: str,
                     family: dict) -> list[dict]:
    """``controls.samples`` full solutions per problem from ``backend`` at the search temperature, graded
    against each problem's answer (the evaluation harness on ``out/problems.jsonl``; resumes per problem).
    Returns the per-problem records."""
    from sphere.evaluation.harness import run_eval
    from sphere.evaluation.settings import EvalSettings
    from sphere.io import read_jsonl_tolerant

    out.mkdir(parents=True, exist_ok=True)
    bench = out / "problems.jsonl"
    rows = "".join(json.dumps({"id": p["id"], "problem": p["problem"], "answer": p["answer"],
                               "source": p.get("source", "")}) + "\n" for p in problems)
    if not bench.is_file() or bench.read_text() != rows:
        atomic_write_text(bench, rows)
    settings = EvalSettings(n=int(cfg.controls.get("samples", 4)), temperature=float(cfg.search.temperature),
                            top_p=float(cfg.search.get("top_p", 1.0)),
                            max_tokens=int(cfg.sampling.max_solution_tokens), seed=int(cfg.seed),
                            resume=True, verify_timeout_s=float(cfg.eval.get("verify_timeout_s", 5.0)))
    run_eval(backend, [str(bench)], out / "samples", settings=settings, family_cfg=family,
             model_name=model_name, progress=cfg.eval.get("progress"))
    return list(read_jsonl_tolerant(out / "samples" / "eval" / "problems.jsonl"))


def _base_seed(cfg: DictConfig) -> int:
    seed = cfg.controls.get("seed")
    return int(cfg.seed) if seed is None else int(seed)


def control_seed(cfg: DictConfig, round_: int) -> int:
    """The pairing seed of round ``round_`` + 1's random-pairs control (``controls.seed``, else the run's)."""
    return _base_seed(cfg) * 1000 + int(round_)


def prepare_controls(cfg: DictConfig, r: int, *, backend: Any, problems: Sequence[dict], policy: str,
                     sphere_pairs: Path, n_sphere_pairs: int, pair_prompt: Callable[[dict], Any],
                     conversational: bool, response_prefix: str, out: Path) -> dict[str, Path]:
    """Round ``r + 1``'s control pairs, written while the start policy's backend is open:
    ``{name: pairs.jsonl}`` (``rft`` trains on SPHERE's own ``sphere_pairs``)."""
    from sphere.prompts import family_config
    from sphere.rundir import check_or_record

    paths: dict[str, Path] = {}
    for name in enabled_controls(cfg):
        cdir = out / name
        if name == "rft":
            paths[name] = Path(sphere_pairs)
            continue
        # the pairing settings, checked before anything is sampled or written (a changed seed is refused here,
        # naming it, instead of rewriting pairs.jsonl under a model trained on the old pairs)
        check_or_record(cdir, "control_pairs", {"controls.seed": _base_seed(cfg),
                                                "controls.samples": int(cfg.controls.get("samples", 4)),
                                                "max_pairs (SPHERE's pairs this round)": n_sphere_pairs},
                        outputs=["pairs.jsonl"])
        recs = sample_solutions(cfg, backend, problems, cdir, policy, family_config(cfg))
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
                    evaluate: Callable[[Any, Path, str], dict], logger: Any = None) -> dict[str, dict]:
    """Train each control from ``start_policy`` on its pairs, evaluate it (``evaluate(backend, dir, model)``),
    and return ``{name: {"pairs", "model", "eval"}}`` for ``summary.json``."""
    from sphere.lifecycle import Models
    from sphere.train.dpo import train_dpo
    from sphere.train.pairs import load_pairs

    res: dict[str, dict] = {}
    for name, pairs_path in pairs.items():
        cdir = out / name
        tcfg = rft_train_config(cfg.train, float(cfg.controls.get("rft_beta", 1e-4))) if name == "rft" \
            else cfg.train
        model = str(train_dpo(tcfg, start_policy, pairs_path, cdir / "train"))
        with Models(cfg, policy=model) as m:
            ev = evaluate(m.policy(), cdir, model)
        res[name] = {"pairs": len(load_pairs(pairs_path).rows), "pairs_path": str(pairs_path), "model": model,
                     "eval": ev}
        print(f"[sphere run] round {r + 1} control {name}: " + ", ".join(
            f"{b} {100 * v['accuracy']:.1f}%" for b, v in ev.items()), flush=True)
        if logger is not None:
            logger.log({f"controls/{name}/{b}/accuracy": v["accuracy"] for b, v in ev.items()}, step=r + 1)
    return res
