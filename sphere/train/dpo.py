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

import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig

from sphere.io import atomic_write_json, atomic_write_text
from sphere.loggers import make_logger
from sphere.rundir import check_or_record, locked, train_signature
from sphere.train.checkpoints import (
    DONE,
    _clean_config,
    _copy_tokenizer,
    _is_done,
    _publish,
    last_checkpoint,
    writing,
)
from sphere.train.distributed import launch
from sphere.train.loading import _env, _load, _one_device, _peft_config, _quiet, _rows
from sphere.train.metrics import (
    _check_trained,
    _margin_after,
    _metrics,
    _prior_history,
    _resumed,
    _whole_loss_mean,
)
from sphere.train.pairs_file import PairSet, load_pairs
from sphere.train.train_config import dpo_config, resolve_train_cfg, validate_train_cfg
from sphere.train.trainer import MetricsLogger, _callbacks, _trainer_class
from sphere.train.weights import lora_weight_names, weight_change

log = logging.getLogger("sphere.train")


# ----------------------------------------------------------------------------------- finished checkpoints
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
def train_dpo(cfg_train: Any, policy_path: str | os.PathLike, pairs_path: str | os.PathLike,
              out_dir: str | os.PathLike, *, logger: MetricsLogger | None = None) -> Path:
    """Train the policy on the pairs with DPO and return the merged HF checkpoint directory.

    ``cfg_train``: the ``train`` node (conf/train_opts/lora.yaml lists every field; missing fields take the
    defaults in ``DEFAULTS``). ``policy_path``: a local HF model directory. ``pairs_path``: pairs.jsonl
    (``sphere.train.pairs_file.load_pairs`` rules). Writes ``out_dir/{adapter,merged,train_metrics.json}``;
    returns ``out_dir/merged`` straight away when it is already complete. ``train.processes=1`` trains in
    this process on one device (even with several GPUs visible); ``N > 1`` launches N data-parallel
    processes (sphere.train.distributed) and returns when rank 0 has published ``merged/``.
    """
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
        launch(t, policy_path, pairs, out_dir, logger=logger, show=show, ckpt=ckpt)
        if not _is_done(out_dir):
            raise RuntimeError(f"train: the {t['processes']} processes exited cleanly but "
                               f"{out_dir / 'merged'} is not complete (no DONE)")
        return out_dir / "merged"
    return _train(t, policy_path, pairs, out_dir, logger=logger, show=show, ckpt=ckpt)


def _train(t: dict, policy_path: Path, pairs: PairSet, out_dir: Path, *, logger: MetricsLogger | None,
           show: bool, ckpt: Path | None, data: tuple[Path, dict] | None = None,
           extra_callbacks: tuple = ()) -> Path:
    """The training itself, in this process: one process (``train.processes=1``) or one rank of N
    (``data``: the rows saved by the launcher, and their render stats). Every rank trains and measures the
    margin; rank 0 alone writes ``adapter/``, ``merged/``, train_metrics.json and DONE."""
    import torch

    t = dict(t)
    if t["threads"]:
        torch.set_num_threads(int(t["threads"]))
    _quiet(show)
    t0 = time.perf_counter()
    history: list[dict] = []
    trainer, args, lora, prep = _setup(
        t, policy_path, pairs, out_dir, show=show, data=data,
        callbacks=lambda: [*_callbacks(logger, show, history), *extra_callbacks])
    t_setup = time.perf_counter() - t0
    rank0 = trainer.is_world_process_zero()
    result, prior = _fit(trainer, ckpt, rank0)
    t_train = time.perf_counter() - t0 - t_setup
    after = _margin_after(trainer)  # every rank: the evaluation is data-parallel too
    if not rank0:
        return out_dir / "merged"

    tmp, tmp_adapter, trained_names = _save_weights(trainer, t, policy_path, out_dir, lora)
    metrics = _metrics(prior + history, result, pairs, t, prep, policy_path, lora,
                       t_setup=t_setup, t_train=t_train, wall=time.perf_counter() - t0)
    _resumed(metrics, ckpt, out_dir, prior, history, result)
    metrics["processes"] = int(args.world_size)
    metrics["global_batch"] = int(t["batch_size"]) * int(t["grad_accum"]) * int(args.world_size)
    metrics.update(after)
    metrics.update(weight_change(policy_path, tmp, trained_names))
    metrics["margin_rose"] = metrics["margin_after"] is not None and metrics["margin_after"] > 0
    _check_trained(metrics, t, out_dir, tmp, tmp_adapter)
    _write_and_publish(trainer, args, metrics, out_dir, tmp, tmp_adapter if lora else None)
    if logger is not None:
        logger.log({f"train/final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))
                    and not isinstance(v, bool)}, step=metrics["steps"])
    return out_dir / "merged"


def _setup(t: dict, policy_path: Path, pairs: PairSet, out_dir: Path, *, show: bool,
           data: tuple[Path, dict] | None, callbacks):
    """Seed, model, tokenizer, ``DPOConfig``, dataset and trainer, in this order (the seed fixes the LoRA
    initialisation). Returns (trainer, args, LoRA on, the pair preparation stats)."""
    from datasets import Dataset, load_from_disk
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

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
                          peft_config=peft_config, callbacks=callbacks())
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer, args, peft_config is not None, {**trainer.sphere_prep_stats, **render}


def _fit(trainer, ckpt: Path | None, rank0: bool):
    """Train (from ``ckpt`` when resuming), or restore a checkpoint that is the last step. Returns TRL's
    ``TrainOutput`` and the killed attempt's log history (rank 0)."""
    if ckpt is not None and rank0:
        log.info("train: resuming from %s", ckpt)
    prior = _prior_history(ckpt) if rank0 else []  # read now: the checkpoint rotation may remove ckpt
    if ckpt is not None and _finished(ckpt):
        result = _restore_finished(trainer, ckpt, prior)
    else:
        result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt is not None else None)
    return result, prior


def _save_weights(trainer, t: dict, policy_path: Path, out_dir: Path, lora: bool):
    """Rank 0: the adapter (LoRA) and the merged weights into temporary dirs; they are published only when the
    weights changed (``_write_and_publish``). Returns (the merged tmp dir, the adapter tmp dir, the trained
    weights' names in the merged checkpoint: the weight change is over them)."""
    import torch

    trained = trainer.model
    trained_names = [n for n, p in trained.named_parameters() if p.requires_grad]
    tmp_adapter = out_dir / ".adapter.tmp"
    if lora:
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
    return tmp, tmp_adapter, trained_names


def _write_and_publish(trainer, args, metrics: dict, out_dir: Path, tmp: Path,
                       tmp_adapter: Path | None) -> None:
    """Rank 0, after the checks: train_metrics.json, trainer_state.json, ``adapter/`` (LoRA), DONE last into
    the merged dir, then ``merged/``; the TRL checkpoints go (merged/ is the result now)."""
    atomic_write_json(out_dir / "train_metrics.json", metrics)
    atomic_write_text(out_dir / "trainer_state.json",
                      json.dumps(dataclasses.asdict(trainer.state), indent=2, sort_keys=True) + "\n")
    if tmp_adapter is not None:
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


# ----------------------------------------------------------------------------------------------- CLI
def _resolve_policy(cfg) -> Path:
    # a transfer experiment trains its target (as `sphere run` does), not the policy that generated the pairs
    name = str(cfg.model.get("train_target") or cfg.model.policy)
    try:  # optional here: without it a local model directory still trains (the fallback below)
        from sphere.model_paths import resolve_model
    except ImportError:
        p = Path(name)
        if (p / "config.json").is_file():
            return p
        raise SystemExit(
            f"model.policy={name!r}: sphere.model_paths is not available to resolve it; pass a local HF model "
            "directory (model=/path/to/checkpoint)"
        ) from None
    return Path(resolve_model(name, cfg))


def main(cfg) -> float | None:
    """`sphere train`: ``cfg.pairs`` -> ``cfg.out_dir`` (default: the Hydra run dir)."""
    out_dir = Path(cfg.out_dir) if cfg.get("out_dir") else Path(HydraConfig.get().runtime.output_dir)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("datasets", "transformers", "peft", "trl", "accelerate"):  # INFO chatter ("JAX available")
        logging.getLogger(name).setLevel(logging.WARNING)
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
