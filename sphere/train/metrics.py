"""train_metrics.json of `sphere train` (sphere.train.dpo): the summary of the logged metrics, the log
history a resumed training continues from, the DPO margin on the training pairs after training, and the
refusal to publish a training that left the weights unchanged."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

from sphere.train.pairs_file import PairSet
from sphere.train.train_config import loss_settings

log = logging.getLogger("sphere.train")

MARGIN_SAMPLE = 64  # training pairs the after-training DPO margin is measured on


def _summary(history: list[dict], key: str) -> tuple[float | None, float | None]:
    """(first, final) of a logged metric; final = mean over the last 10% of logged steps (>= 1 step)."""
    vals = [h[key] for h in history if key in h and "train_runtime" not in h]
    if not vals:
        return None, None
    tail = vals[-max(1, len(vals) // 10):]
    return vals[0], sum(tail) / len(tail)


def _prior_history(ckpt: Path | None) -> list[dict]:
    """The log history of the attempt that wrote ``ckpt`` (its ``trainer_state.json``), up to the checkpoint's
    step: the records a resumed training continues from (the killed attempt's later records are redone)."""
    if ckpt is None:
        return []
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("train: cannot read the log history of %s (%s); train_metrics.json covers this attempt "
                    "only", ckpt, e)
        return []
    step = int(state.get("global_step") or 0)
    out = []
    for h in state.get("log_history") or []:
        rec = {k: float(v) for k, v in h.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if "step" in rec and 0 < rec["step"] <= step and "train_runtime" not in rec:
            rec["step"] = int(rec["step"])
            out.append(rec)
    return out


def _whole_loss_mean(prior: list[dict], result, ckpt_step: int) -> float:
    """The mean training loss over every optimizer step of a resumed training: TRL's ``training_loss`` covers
    only this attempt's steps (after ``ckpt_step``); the killed attempt's logged losses (each the mean over
    the steps since the previous log) cover the steps before it."""
    done = int(result.global_step) - ckpt_step
    total, covered, prev = float(result.training_loss) * done, done, 0
    for h in prior:
        if "loss" in h:
            total += h["loss"] * (h["step"] - prev)
            covered += h["step"] - prev
            prev = h["step"]
    return total / covered if covered else float(result.training_loss)


def _margin_after(trainer) -> dict:
    """The DPO implicit-reward margin beta * (log-ratio of chosen - log-ratio of rejected) and the reward
    accuracy on (up to ``MARGIN_SAMPLE`` of) the training pairs, after training. Before training the policy is
    the reference, so the margin is 0 by construction; TRL's own evaluation computes it (same definitions as
    the train/rewards/* curves, reference log-probs as in training)."""
    ds = trainer.train_dataset
    k = min(len(ds), MARGIN_SAMPLE)
    trainer.eval_dataset = ds.select(range(k))
    m = trainer.evaluate()
    trainer.eval_dataset = None
    return {"margin_after": m.get("eval_rewards/margins"),
            "reward_accuracy_after": m.get("eval_rewards/accuracies"), "margin_pairs": k}


def _check_trained(metrics: dict, t: dict, out_dir: Path, *tmps: Path) -> None:
    """Refuse to publish a training that left the weights as they were (the untrained policy would go on as
    the trained one, rc 0); warn when the margin on the training pairs did not rise."""
    if metrics["weight_change_max_abs"] == 0:
        for d in tmps:
            shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(out_dir / "trainer", ignore_errors=True)
        raise RuntimeError(
            f"train: not publishing {out_dir / 'merged'}: its weights equal the base model's after "
            f"{metrics['steps']} optimizer step(s) at train.lr={t['lr']} (train.dtype={t['dtype']}): the "
            "updates were too small for the weights' precision (a bfloat16 merge rounds away LoRA updates "
            "below ~0.4% of a weight). Train more steps (more pairs, a smaller batch), raise train.lr, or "
            "use train.dtype=float32")
    if not metrics["margin_rose"]:
        log.warning("train: WARNING: the DPO margin on %d training pairs is %.4g after training (0 before): "
                    "the training did not move the policy towards the chosen solutions (weight change %.3g; "
                    "train_metrics.json margin_rose=false)", metrics["margin_pairs"],
                    float("nan") if metrics["margin_after"] is None else metrics["margin_after"],
                    metrics["weight_change_rel"])


def _metrics(history, result, pairs: PairSet, t, prep, policy_path, lora: bool, *, t_setup, t_train, wall):
    out: dict[str, Any] = {
        "pairs": len(pairs), "pairs_by_stage": {str(k): v for k, v in sorted(pairs.stages.items())},
        "pairs_kept": prep.get("kept"), "pairs_dropped_too_long": prep.get("dropped_too_long"),
        "pairs_dropped_empty": prep.get("dropped_empty"),
        "longest_pair_tokens": prep.get("longest_pair_tokens"),
        "longest_kept_pair_tokens": prep.get("longest_kept_pair_tokens"),
        "prompts_truncated": prep.get("prompts_truncated"),
        "max_length": t["max_length"], "completions_with_eos": prep.get("completions_with_eos"),
        "chat_template_rewrites": prep.get("template_rewrites"),
        "steps": int(result.global_step), "train_loss_mean": float(result.training_loss),
        "lora": lora, "loss": loss_settings(t["loss"]), "lr": float(t["lr"]), "epochs": float(t["epochs"]),
        "policy": str(policy_path), "setup_s": round(t_setup, 3), "train_s": round(t_train, 3),
        "wall_s": round(wall, 3),
    }
    for key in ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected",
                "logps/chosen", "logps/rejected", "grad_norm"):
        first, final = _summary(history, key)
        name = key.replace("/", "_")
        out[f"{name}_first"] = first
        out[f"{name}_final"] = final
    if out["loss_final"] is not None and not math.isfinite(out["loss_final"]):
        raise FloatingPointError(f"train: final DPO loss is {out['loss_final']} (diverged); lower train.lr")
    return out


def _resumed(metrics: dict, ckpt: Path | None, out_dir: Path, prior: list[dict], history: list[dict],
             result) -> None:
    """A resumed training: the killed attempt's log history up to its checkpoint, then this attempt's, so
    train_metrics.json describes the whole training (loss_first is step 1's), as an uninterrupted run's does."""
    ckpt_step = int(ckpt.name.rsplit("-", 1)[1]) if ckpt is not None else None
    metrics["resumed_from_step"] = ckpt_step
    metrics["resumed"] = None if ckpt is None else {
        "checkpoint": str(ckpt.relative_to(out_dir)) if ckpt.is_relative_to(out_dir) else str(ckpt),
        "step": ckpt_step,
        "log_history": (f"steps 1-{ckpt_step} from the killed attempt's {ckpt.name}/trainer_state.json "
                        f"({len(prior)} records), " + (
                            f"steps {ckpt_step + 1}-{metrics['steps']} from this attempt ({len(history)} records)"
                            if metrics["steps"] > ckpt_step else
                            "none from this attempt (the checkpoint was the last step: published, not trained)")),
        "times": "setup_s, train_s and wall_s are this attempt's"}
    if ckpt is not None:
        metrics["train_loss_mean"] = _whole_loss_mean(prior, result, ckpt_step)
