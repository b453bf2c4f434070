"""`sphere train`: DPO on a pairs.jsonl with TRL's ``DPOTrainer``; LoRA through PEFT by default.

    sphere train pairs=outputs/generate/.../pairs.jsonl                 # LoRA on the mini policy
    sphere train pairs=p.jsonl model=/ckpt/round1 train_opts=full       # full fine-tuning
    sphere train pairs=p.jsonl train.loss.type=ipo train.loss.beta=0.5  # IPO
    sphere train pairs=p.jsonl train.loss.label_smoothing=0.1           # cDPO
    sphere train pairs=p.jsonl train.loss.rpo_alpha=1.0                 # + SFT term on chosen (RPO)

Outputs in ``out_dir``: ``adapter/`` (LoRA only), ``merged/`` (a full float32 safetensors HF checkpoint with
its tokenizer, what vLLM and transformers load as the next policy; ``merged/DONE`` exists only when it is
complete), ``train_metrics.json`` and ``trainer_state.json`` (TRL's step count and log history). A finished
``out_dir`` is returned as is when its ``signature.json`` matches (recipe, base model and pairs hashes;
sphere/rundir/), and refused when it does not. While training, TRL checkpoints go to
``out_dir/trainer/checkpoint-<step>`` every ``train.save_steps`` optimizer steps (at most
``train.save_total_limit`` kept); a rerun after a crash resumes from the last complete one (model,
optimizer, scheduler and RNG states), so it ends after the same number of optimizer steps.

Checks (issue #28): a pair whose prompt + completion exceeds ``train.max_length`` is dropped, never cut
(``pairs_dropped_too_long``; all dropped = an error naming the longest pair); the warmup's first step
already trains (``sphere.train.trainer.shift_warmup``); train_metrics.json records the change of the trained
weights (``weight_change_rel`` = ||trained - base|| / ||base||, ``weight_change_max_abs``) and the DPO margin
on up to 64 training pairs after training (``margin_after``, ``margin_rose``; 0 before, by construction); a
training that left the weights unchanged is refused, nothing published. ``train.processes=N`` trains as N
data-parallel processes (sphere.train.distributed); 1 trains here on one device even with several GPUs.

Reference model: with LoRA it is the adapter-disabled base (one model in memory, TRL's PEFT path); with full
fine-tuning and ``precompute_ref`` the reference log-probs are computed once before training, so no second
copy of the model is kept either.

Loss mapping onto TRL 1.x (which dropped ``rpo_alpha`` and label smoothing in the sigmoid loss):

- ``sigmoid``: ``loss_type=["sigmoid"]`` (Rafailov et al. 2023).
- ``sigmoid`` + ``label_smoothing=e`` (cDPO, Mitchell 2023: ``-(1-e) logsig(bD) - e logsig(-bD)``):
  ``loss_type=["sigmoid", "robust"]``, ``loss_weights=[2(1-e), -(1-2e)]``. TRL's "robust" loss is
  ``[-(1-e) logsig(bD) + e logsig(-bD)] / (1-2e)``, so this weighted sum is exactly cDPO (see the test).
- ``ipo``: ``loss_type=["ipo"]`` (TRL normalises IPO by completion length).
- ``rpo_alpha=a > 0``: an extra ``"sft"`` term (mean NLL of the chosen tokens) with weight ``a``
  (RPO, Pang et al. 2024).
- every other TRL loss type by name (``apo_zero``, ``sigmoid_norm``, ``hinge``, ``robust``, ...), and a list of
  them as a mixture with ``train.loss.weights`` (TRL's ``loss_weights``); ``ld_alpha`` (LD-DPO),
  ``use_weighting`` (WPO), ``discopop_tau`` pass through (formulas: docs/experiments/objectives.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from sphere.io import atomic_write_json, atomic_write_text
from sphere.train.checkpoints import (  # moved out of this module (issue #18); the names stay importable here
    DONE,
    _clean_config,
    _copy_tokenizer,
    _is_done,
    _load_tokenizer,
    _publish,
    last_checkpoint,
    writing,
)
from sphere.train.config import (  # moved out of this module (issue #18); the names stay importable here
    dpo_config,
    loss_settings,
    resolve_train_cfg,
    validate_train_cfg,
)
from sphere.train.pairs import PairSet, load_pairs, render_chat_pairs
from sphere.train.trainer import MetricsLogger, _callbacks, _trainer_class

log = logging.getLogger("sphere.train")


# ------------------------------------------------------------------------------------------- helpers
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


def _finished(ckpt: Path) -> bool:
    """The checkpoint is the training's last step (a crash or a full disk while publishing): resuming from it
    would train one step more than ``max_steps`` (the HF loop checks the step count only after a step)."""
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
        return int(state["global_step"]) >= int(state["max_steps"]) > 0
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _restore_finished(trainer, ckpt: Path, prior: list[dict]):
    """The trained weights and state of a finished training from its last checkpoint, without training."""
    from transformers.trainer_callback import TrainerState
    from transformers.trainer_utils import TrainOutput

    log.info("train: %s is the training's last step; publishing it without training further", ckpt)
    trainer._load_from_checkpoint(str(ckpt))
    trainer.state = TrainerState.load_from_json(str(ckpt / "trainer_state.json"))
    step = int(trainer.state.global_step)
    return TrainOutput(step, _whole_loss_mean(prior, TrainOutput(step, 0.0, {}), step), {})


# --------------------------------------------------------------------------------------------- train
MARGIN_SAMPLE = 64  # training pairs the after-training DPO margin is measured on


def train_dpo(cfg_train: Any, policy_path: str | os.PathLike, pairs_path: str | os.PathLike,
              out_dir: str | os.PathLike, *, logger: MetricsLogger | None = None) -> Path:
    """Train the policy on the pairs with DPO and return the merged HF checkpoint directory.

    ``cfg_train``: the ``train`` node (conf/train_opts/lora.yaml lists every field; missing fields take the
    defaults in ``DEFAULTS``). ``policy_path``: a local HF model directory. ``pairs_path``: pairs.jsonl
    (``sphere.train.pairs.load_pairs`` rules). Writes ``out_dir/{adapter,merged,train_metrics.json}``;
    returns ``out_dir/merged`` straight away when it is already complete. ``train.processes=1`` trains in
    this process on one device (even with several GPUs visible); ``N > 1`` launches N data-parallel
    processes (sphere.train.distributed) and returns when rank 0 has published ``merged/``.
    """
    from sphere.rundir import check_or_record, train_signature

    out_dir = Path(out_dir)
    t = resolve_train_cfg(cfg_train)
    validate_train_cfg(t)
    pairs = load_pairs(pairs_path)
    policy_path = Path(policy_path)
    if not (policy_path / "config.json").is_file():
        raise FileNotFoundError(f"{policy_path}: not a Hugging Face model directory (no config.json)")
    # a finished (or half-trained) out_dir is reused only for the same recipe, base model and pairs
    check_or_record(out_dir, "train", train_signature(t, policy_path, pairs.path))
    if _is_done(out_dir):
        log.info("train: %s is complete, skipping training", out_dir / "merged")
        return out_dir / "merged"
    out_dir.mkdir(parents=True, exist_ok=True)
    show = {"auto": sys.stderr.isatty(), True: True, False: False, "true": True, "false": False}.get(
        t["progress"], None)
    if show is None:
        raise ValueError(f"train.progress={t['progress']!r}: allowed auto | true | false")
    # resume from the newest complete TRL checkpoint (decided here, once, before any rank starts)
    ckpt = last_checkpoint(out_dir / "trainer") if int(t["save_steps"]) > 0 else None
    if int(t["processes"]) > 1:
        from sphere.train.distributed import launch

        launch(t, policy_path, pairs, out_dir, logger=logger, show=show, ckpt=ckpt)
        if not _is_done(out_dir):
            raise RuntimeError(f"train: the {t['processes']} processes exited cleanly but "
                               f"{out_dir / 'merged'} is not complete (no DONE)")
        return out_dir / "merged"
    return _train(t, policy_path, pairs, out_dir, logger=logger, show=show, ckpt=ckpt)


def _tokenizer(policy_path: Path, pairs: PairSet, t: dict):
    tok = _load_tokenizer(policy_path, t)
    if pairs.conversational and not getattr(tok, "chat_template", None):
        raise ValueError(
            f"{pairs.path}: the pairs are conversational (lists of messages) but the tokenizer of "
            f"{policy_path} has no chat template; write plain-text prompts for this model family"
        )
    if tok.eos_token is None:
        raise ValueError(f"{policy_path}: tokenizer has no eos_token; DPO needs one to end completions")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _rows(pairs: PairSet, tok, policy_path: Path) -> tuple[list[dict], dict]:
    """The trainer's rows: conversational pairs as the text the policy generated them in (not TRL's
    re-rendering)."""
    if not pairs.conversational:
        return pairs.rows, {}
    rows, render = render_chat_pairs(pairs.rows, tok, str(pairs.path))
    if render["template_rewrites"]:
        log.warning("train: %s's chat template rewrites assistant turns (%d of %d pairs, e.g. it drops the "
                    "reasoning before </think>); training on the text the policy generated instead",
                    policy_path, render["template_rewrites"], len(rows))
    return rows, render


def _one_device(args) -> None:
    """One process trains on one device. With several GPUs visible and no launcher, the HF Trainer wraps the
    model in ``nn.DataParallel`` (TRL 1.16 refuses it; older TRL ran it); pin this process to
    ``args.device`` instead. ``train.processes=N`` is the way to use N GPUs."""
    if args.world_size == 1 and args.n_gpu > 1:
        log.info("train: %d GPUs visible, training on %s only (train.processes=%d uses that many, one "
                 "process each)", args.n_gpu, args.device, args.n_gpu)
        args._n_gpu = 1


def _train(t: dict, policy_path: Path, pairs: PairSet, out_dir: Path, *, logger: MetricsLogger | None,
           show: bool, ckpt: Path | None, data: tuple[Path, dict] | None = None,
           extra_callbacks: tuple = ()) -> Path:
    """The training itself, in this process: one process (``train.processes=1``) or one rank of N
    (``data``: the rows saved by the launcher, and their render stats). Every rank trains and measures the
    margin; rank 0 alone writes ``adapter/``, ``merged/``, train_metrics.json and DONE."""
    import torch
    from transformers import set_seed

    t = dict(t)
    if t["threads"]:
        torch.set_num_threads(int(t["threads"]))
    _quiet(show)
    t0 = time.perf_counter()
    set_seed(int(t["seed"]))  # LoRA initialisation: the same in every process and for any process count
    model, tok = _load(policy_path, pairs, t)
    mpe = getattr(model.config, "max_position_embeddings", None)
    if mpe and (t["max_length"] is None or int(t["max_length"]) > int(mpe)):
        # longer sequences would run past the positions the model was trained on (mini: 384)
        log.info("train: max_length %s -> %s (the model's max_position_embeddings)", t["max_length"], mpe)
        t["max_length"] = int(mpe)
    args = dpo_config(t, out_dir)
    _one_device(args)
    peft_config = _peft_config(t["lora"]) if t["lora"]["enabled"] else None
    history: list[dict] = []

    from datasets import Dataset, load_from_disk
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    if data is None:
        rows, render = _rows(pairs, tok, policy_path)
        dataset = Dataset.from_list(rows)
    else:  # saved to disk by the launcher: the ranks share its map caches (and the reference log-probs)
        dataset, render = load_from_disk(str(data[0])), data[1]

    Trainer = _trainer_class()
    Trainer.sphere_max_prompt_length = t["max_prompt_length"]
    Trainer.sphere_append_eos = bool(t["append_eos"])
    Trainer.sphere_source = str(pairs.path)
    # TRL's reference-log-prob precompute bar only listens to TQDM_DISABLE
    with _env(TQDM_DISABLE=None if show else "1"):
        trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tok,
                          peft_config=peft_config,
                          callbacks=[*_callbacks(logger, show, history), *extra_callbacks])
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    prep = {**trainer.sphere_prep_stats, **render}
    t_setup = time.perf_counter() - t0
    rank0 = trainer.is_world_process_zero()
    if ckpt is not None and rank0:
        log.info("train: resuming from %s", ckpt)
    prior = _prior_history(ckpt) if rank0 else []  # read now: the checkpoint rotation may remove ckpt
    if ckpt is not None and _finished(ckpt):
        result = _restore_finished(trainer, ckpt, prior)
    else:
        result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt is not None else None)
    t_train = time.perf_counter() - t0 - t_setup
    after = _margin_after(trainer)  # every rank: the evaluation is data-parallel too
    if not rank0:
        return out_dir / "merged"

    # ---- save (rank 0): adapter (LoRA) and merged weights into temporary dirs; they are published only when
    # the weights changed; DONE is written last, then the dirs are moved into place.
    trained = trainer.model
    # the weights this recipe trains, by their names in the merged checkpoint (the weight change is over them)
    trained_names = [n for n, p in trained.named_parameters() if p.requires_grad]
    tmp_adapter = out_dir / ".adapter.tmp"
    if peft_config is not None:
        from sphere.train.weights import lora_weight_names

        shutil.rmtree(tmp_adapter, ignore_errors=True)
        with writing(tmp_adapter, "the trained LoRA adapter"):
            trained.save_pretrained(tmp_adapter, safe_serialization=True)
            _copy_tokenizer(policy_path, tmp_adapter, t)
        trained_names = lora_weight_names(trained)
        trained = trained.merge_and_unload()
    trained = trained.to(torch.float32) if t["dtype"] == "float32" else trained
    trained.config.use_cache = True
    tmp = out_dir / ".merged.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(tmp, "the merged model (the trained policy)"):
        trained.save_pretrained(tmp, safe_serialization=True)
        _copy_tokenizer(policy_path, tmp, t)
        _clean_config(tmp, str(t["dtype"]))
    # a resumed training: the killed attempt's log history up to its checkpoint, then this attempt's, so
    # train_metrics.json describes the whole training (loss_first is step 1's), as an uninterrupted run's does
    ckpt_step = int(ckpt.name.rsplit("-", 1)[1]) if ckpt is not None else None
    metrics = _metrics(prior + history, result, pairs, t, prep, policy_path, peft_config is not None,
                       t_setup=t_setup, t_train=t_train, wall=time.perf_counter() - t0)
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
    metrics["processes"] = int(args.world_size)
    metrics["global_batch"] = int(t["batch_size"]) * int(t["grad_accum"]) * int(args.world_size)
    metrics.update(after)
    from sphere.train.weights import weight_change

    metrics.update(weight_change(policy_path, tmp, trained_names))
    metrics["margin_rose"] = metrics["margin_after"] is not None and metrics["margin_after"] > 0
    _check_trained(metrics, t, out_dir, tmp, tmp_adapter)
    atomic_write_json(out_dir / "train_metrics.json", metrics)
    import dataclasses

    atomic_write_text(out_dir / "trainer_state.json",
                      json.dumps(dataclasses.asdict(trainer.state), indent=2, sort_keys=True) + "\n")
    if peft_config is not None:
        _publish(tmp_adapter, out_dir / "adapter")
    atomic_write_text(tmp / DONE, json.dumps({"wall_s": metrics["wall_s"], "steps": metrics["steps"],
                                              "rank": int(args.process_index),
                                              "processes": int(args.world_size)}) + "\n")
    _publish(tmp, out_dir / "merged")
    log.info("train: published %s (%d steps, weight change %.3g, margin %.3g on %d training pairs)",
             out_dir / "merged", metrics["steps"], metrics["weight_change_rel"],
             metrics["margin_after"] if metrics["margin_after"] is not None else float("nan"),
             metrics["margin_pairs"])
    shutil.rmtree(out_dir / "trainer", ignore_errors=True)  # the checkpoints: merged/ is the result now
    if logger is not None:
        logger.log({f"train/final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))
                    and not isinstance(v, bool)}, step=metrics["steps"])
    return out_dir / "merged"


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


def _quiet(show: bool) -> None:
    """Keep library chatter down; no dataset progress bars unless the progress bar is on."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    if not show:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()  # "Loading weights" / "Writing model shards"


@contextlib.contextmanager
def _env(**kv: str | None):
    """Temporarily set environment variables (None = leave unchanged)."""
    old = {k: os.environ.get(k) for k in kv}
    try:
        for k, v in kv.items():
            if v is not None:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _load(policy_path: Path, pairs: PairSet, t: dict):
    import torch
    from transformers import AutoModelForCausalLM

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if t["dtype"] not in dtypes:
        raise ValueError(f"train.dtype={t['dtype']!r}: allowed {list(dtypes)}")
    tok = _tokenizer(policy_path, pairs, t)
    model = AutoModelForCausalLM.from_pretrained(policy_path, dtype=dtypes[t["dtype"]],
                                                 trust_remote_code=bool(t["trust_remote_code"]))
    return model, tok


def _peft_config(lora: dict):
    from peft import LoraConfig

    tm = lora["target_modules"]
    if isinstance(tm, str) and tm != "all-linear":
        tm = [tm]
    return LoraConfig(r=int(lora["r"]), lora_alpha=int(lora["alpha"]), lora_dropout=float(lora["dropout"]),
                      target_modules=tm if isinstance(tm, str) else list(tm), bias="none",
                      task_type="CAUSAL_LM")


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


# ----------------------------------------------------------------------------------------------- CLI
def _resolve_policy(cfg) -> Path:
    # a transfer experiment trains its target (as `sphere run` does), not the policy that generated the pairs
    name = str(cfg.model.get("train_target") or cfg.model.policy)
    try:
        from sphere.models import resolve_model
    except ImportError:
        p = Path(name)
        if (p / "config.json").is_file():
            return p
        raise SystemExit(
            f"model.policy={name!r}: sphere.models is not available to resolve it; pass a local HF model "
            "directory (model=/path/to/checkpoint)"
        ) from None
    return Path(resolve_model(name, cfg))


def main(cfg) -> float | None:
    """`sphere train`: ``cfg.pairs`` -> ``cfg.out_dir`` (default: the Hydra run dir)."""
    from hydra.core.hydra_config import HydraConfig

    out_dir = Path(cfg.out_dir) if cfg.get("out_dir") else Path(HydraConfig.get().runtime.output_dir)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("datasets", "transformers", "peft", "trl", "accelerate"):  # INFO chatter ("JAX available")
        logging.getLogger(name).setLevel(logging.WARNING)
    from sphere.loggers import make_logger
    from sphere.rundir import locked

    with locked(out_dir, "train"):  # out_dir=... outside the Hydra run dir: one writer there too
        logger = make_logger(cfg, out_dir, "train")
        try:
            merged = train_dpo(cfg.train, _resolve_policy(cfg), cfg.pairs, out_dir, logger=logger)
        finally:
            logger.finish()
    mpath = out_dir / "train_metrics.json"
    m = json.loads(mpath.read_text()) if mpath.is_file() else {}
    print(json.dumps({"merged": str(merged), **{k: m.get(k) for k in
                      ("pairs", "steps", "loss_first", "loss_final", "rewards_margins_final",
                       "rewards_accuracies_final", "wall_s")}}))
    return m.get("loss_final")
