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
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from sphere.io import atomic_write_json, atomic_write_text
from sphere.train.pairs import PairSet, load_pairs, render_chat_pairs

log = logging.getLogger("sphere.train")

LOSS_TYPES = ("sigmoid", "ipo")
DONE = "DONE"


class MetricsLogger(Protocol):
    """What ``train_dpo`` needs from an experiment logger (W&B wrapper, a test double, ...)."""

    def log(self, metrics: dict[str, float], step: int | None = None) -> None: ...


# ------------------------------------------------------------------------------------------- config
def _plain(cfg: Any) -> dict:
    """A DictConfig / Mapping as a resolved plain dict."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    if isinstance(cfg, Mapping):
        return {k: _plain(v) if isinstance(v, Mapping) else v for k, v in cfg.items()}
    raise TypeError(f"train config must be a mapping (got {type(cfg).__name__})")


# Defaults of every `train.*` field (conf/train_opts/lora.yaml documents them); missing keys fall back here
# so the pipeline can pass a partial config.
DEFAULTS: dict[str, Any] = {
    "lora": {"enabled": True, "r": 32, "alpha": 64, "dropout": 0.0, "target_modules": "all-linear"},
    "loss": {"type": "sigmoid", "beta": 0.1, "label_smoothing": 0.0, "rpo_alpha": 0.0},
    "lr": 5e-4, "epochs": 2, "max_steps": -1, "batch_size": 8, "grad_accum": 1,
    "max_length": 512, "max_prompt_length": None, "append_eos": True,
    "warmup_ratio": 0.1, "scheduler": "cosine", "weight_decay": 0.0, "max_grad_norm": 1.0,
    "precompute_ref": True, "seed": 0, "threads": None, "progress": "auto", "logging_steps": 1,
    "dtype": "float32", "trust_remote_code": False, "device": "auto", "gradient_checkpointing": False,
    "save_steps": 50, "save_total_limit": 1,
}


def resolve_train_cfg(cfg_train: Any) -> dict:
    """Merge ``cfg_train`` over ``DEFAULTS``; unknown keys are an error naming the key."""
    user = _plain(cfg_train) if cfg_train is not None else {}
    out: dict[str, Any] = {}
    for k, v in user.items():
        if k not in DEFAULTS:
            raise ValueError(f"train.{k}: unknown training option; allowed: {sorted(DEFAULTS)}")
    for k, d in DEFAULTS.items():
        v = user.get(k, d)
        if isinstance(d, dict):
            v = dict(v or {})
            for kk in v:
                if kk not in d:
                    raise ValueError(f"train.{k}.{kk}: unknown option; allowed: {sorted(d)}")
            v = {**d, **v}
        out[k] = v
    return out


def loss_settings(loss: Mapping) -> dict:
    """``train.loss`` -> DPOConfig fields ``loss_type``, ``loss_weights``, ``label_smoothing``, ``beta``."""
    typ = str(loss.get("type", "sigmoid")).lower()
    beta = float(loss.get("beta", 0.1))
    eps = float(loss.get("label_smoothing", 0.0) or 0.0)
    alpha = float(loss.get("rpo_alpha", 0.0) or 0.0)
    if typ not in LOSS_TYPES:
        raise ValueError(
            f"train.loss.type={typ!r}: allowed {list(LOSS_TYPES)} (cDPO = sigmoid + label_smoothing)")
    if not beta > 0:
        raise ValueError(f"train.loss.beta={beta}: must be > 0")
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"train.loss.label_smoothing={eps}: must be in [0, 0.5)")
    if eps > 0 and typ != "sigmoid":
        raise ValueError(f"train.loss.label_smoothing={eps} only applies to type=sigmoid (cDPO), not {typ!r}")
    if alpha < 0:
        raise ValueError(f"train.loss.rpo_alpha={alpha}: must be >= 0 (0 disables the SFT term)")
    if typ == "sigmoid" and eps > 0:
        types, weights = ["sigmoid", "robust"], [2.0 * (1.0 - eps), -(1.0 - 2.0 * eps)]
    else:
        types, weights = [typ], [1.0]
    if alpha > 0:
        types, weights = [*types, "sft"], [*weights, alpha]
    return {
        "loss_type": types,
        "loss_weights": None if weights == [1.0] else weights,
        "label_smoothing": eps,
        "beta": beta,
    }


def _use_cpu(device: str) -> bool:
    import torch

    if device == "cpu":
        return True
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA device is visible; allowed: auto | cpu | cuda")
        return False
    if device != "auto":
        raise ValueError(f"train.device={device!r}: allowed auto | cpu | cuda")
    return not torch.cuda.is_available()


def validate_train_cfg(t: dict) -> None:
    """Range checks of a resolved train config, before any model loads or output is written."""
    if t["batch_size"] < 1 or t["grad_accum"] < 1:
        raise ValueError(
            f"train.batch_size={t['batch_size']}, train.grad_accum={t['grad_accum']}: must be >= 1")
    if not t["lr"] > 0:
        raise ValueError(f"train.lr={t['lr']}: must be > 0")
    if t["max_length"] is not None and int(t["max_length"]) < 8:
        raise ValueError(f"train.max_length={t['max_length']}: must be >= 8 tokens or null (no truncation)")
    max_steps, epochs = int(t["max_steps"]), float(t["epochs"])
    if max_steps == 0 or max_steps < -1:
        raise ValueError(f"train.max_steps={max_steps}: allowed -1 (train for train.epochs) or >= 1")
    if max_steps == -1 and not epochs > 0:
        raise ValueError(f"train.epochs={t['epochs']}: must be > 0 (or set train.max_steps >= 1); zero "
                         "epochs would publish the untrained policy as the trained one")
    if not 0.0 <= float(t["warmup_ratio"]) < 1.0:
        raise ValueError(f"train.warmup_ratio={t['warmup_ratio']}: must be in [0, 1)")
    if float(t["weight_decay"]) < 0 or not float(t["max_grad_norm"]) > 0:
        raise ValueError(f"train.weight_decay={t['weight_decay']}, train.max_grad_norm={t['max_grad_norm']}: "
                         "must be >= 0 and > 0")
    if t["max_prompt_length"] is not None and int(t["max_prompt_length"]) < 1:
        raise ValueError(f"train.max_prompt_length={t['max_prompt_length']}: must be >= 1 or null (no limit)")
    if int(t["logging_steps"]) < 1:
        raise ValueError(f"train.logging_steps={t['logging_steps']}: must be >= 1")
    save_steps, save_limit = int(t["save_steps"]), int(t["save_total_limit"])
    if save_steps < 0:
        raise ValueError(f"train.save_steps={save_steps}: must be >= 0 (0 = no checkpoints, no resume)")
    if save_limit < 1:
        raise ValueError(f"train.save_total_limit={save_limit}: must be >= 1 (checkpoints kept on disk)")
    loss_settings(t["loss"])


def dpo_config(t: dict, out_dir: Path):
    """The ``trl.DPOConfig`` for a resolved train config ``t`` (see ``resolve_train_cfg``)."""
    from trl import DPOConfig

    validate_train_cfg(t)
    save_steps, save_limit = int(t["save_steps"]), int(t["save_total_limit"])
    use_cpu = _use_cpu(str(t["device"]))
    return DPOConfig(
        output_dir=str(out_dir / "trainer"),
        per_device_train_batch_size=int(t["batch_size"]),
        gradient_accumulation_steps=int(t["grad_accum"]),
        learning_rate=float(t["lr"]),
        num_train_epochs=float(t["epochs"]),
        max_steps=int(t["max_steps"]),
        lr_scheduler_type=str(t["scheduler"]),
        warmup_steps=float(t["warmup_ratio"]),  # a float in [0, 1) is a ratio of the total steps
        weight_decay=float(t["weight_decay"]),
        max_grad_norm=float(t["max_grad_norm"]),
        max_length=None if t["max_length"] is None else int(t["max_length"]),
        precompute_ref_log_probs=bool(t["precompute_ref"]),
        precompute_ref_batch_size=4 * int(t["batch_size"]),  # no gradients: bigger batches are cheap
        seed=int(t["seed"]),
        logging_steps=int(t["logging_steps"]),
        # Speed on small CPU machines: no activation recomputation (unless asked, for big models on GPU), no
        # eval, no worker processes, no mixed precision (CPU float32). Checkpoints every save_steps optimizer
        # steps (the last save_total_limit kept) so a crashed run resumes instead of starting over.
        gradient_checkpointing=bool(t["gradient_checkpointing"]),
        eval_strategy="no",
        save_strategy="steps" if save_steps > 0 else "no",
        save_steps=max(1, save_steps),
        save_total_limit=save_limit,
        dataloader_num_workers=0,
        bf16=False,
        fp16=False,
        use_cpu=use_cpu,
        report_to="none",  # metrics go through our callback to the configured logger
        disable_tqdm=True,  # our own progress bar (one line, no per-step dict dumps)
        **loss_settings(t["loss"]),
    )


# ---------------------------------------------------------------------------------------- callbacks
def _callbacks(logger: MetricsLogger | None, show_progress: bool, history: list[dict]):
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        """Trainer logs -> ``history`` and ``logger.log({"train/<name>": value}, step=global_step)``."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs:
                return
            rec = {k: float(v) for k, v in logs.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
            rec["step"] = state.global_step
            history.append(rec)
            if logger is not None:
                logger.log({f"train/{k}": v for k, v in rec.items() if k != "step"}, step=state.global_step)

    class ProgressBar(TrainerCallback):
        """A tqdm bar with loss / reward margin / accuracy in its postfix."""

        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, desc="dpo", dynamic_ncols=True, file=sys.stderr)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.4f}",
                                     margin=f"{logs.get('rewards/margins', 0):.3f}",
                                     acc=f"{logs.get('rewards/accuracies', 0):.2f}", refresh=False)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    cbs = [MetricsCallback()]
    if show_progress:
        cbs.append(ProgressBar())
    return cbs


def _trainer_class():
    from trl import DPOTrainer

    class SphereDPOTrainer(DPOTrainer):
        """DPOTrainer + prompt truncation (``max_prompt_length``) and the EOS policy on tokenised data."""

        sphere_max_prompt_length: int | None = None
        sphere_append_eos: bool = True
        sphere_prep_stats: dict = {}
        sphere_source: str = "pairs"  # the pairs file, for error messages

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            ds = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            mpl, keep_eos = self.sphere_max_prompt_length, self.sphere_append_eos
            eos_id = self._tokenizer.eos_token_id
            n_before = len(ds)
            cut = sum(1 for n in ds["prompt_ids"] if mpl is not None and len(n) > mpl)

            def fix(ex):
                if mpl is not None and len(ex["prompt_ids"]) > mpl:
                    # keep the end of the prompt: the partial solution next to the completion matters most
                    ex["prompt_ids"] = ex["prompt_ids"][-mpl:]
                if not keep_eos:
                    for k in ("chosen_ids", "rejected_ids"):
                        if len(ex[k]) > 1 and ex[k][-1] == eos_id:
                            ex[k] = ex[k][:-1]
                return ex

            if mpl is not None or not keep_eos:
                ds = ds.map(fix, desc=f"sphere: prompt truncation / EOS policy ({dataset_name})")
            ds = ds.filter(lambda ex: len(ex["chosen_ids"]) > 0 and len(ex["rejected_ids"]) > 0)
            with_eos = sum(1 for k in ("chosen_ids", "rejected_ids") for ids in ds[k]
                           if ids and ids[-1] == eos_id)
            self.sphere_prep_stats = {"prompts_truncated": cut, "dropped": n_before - len(ds),
                                      "kept": len(ds), "completions_with_eos": with_eos}
            if len(ds) == 0:
                raise ValueError(
                    f"{self.sphere_source}: every pair was dropped: the prompts alone fill "
                    f"train.max_length={args.max_length} tokens; raise train.max_length or set "
                    "train.max_prompt_length"
                )
            return ds

    return SphereDPOTrainer


# ------------------------------------------------------------------------------------------- helpers
def _summary(history: list[dict], key: str) -> tuple[float | None, float | None]:
    """(first, final) of a logged metric; final = mean over the last 10% of logged steps (>= 1 step)."""
    vals = [h[key] for h in history if key in h and "train_runtime" not in h]
    if not vals:
        return None, None
    tail = vals[-max(1, len(vals) // 10):]
    return vals[0], sum(tail) / len(tail)


def _clean_config(merged: Path, dtype: str) -> None:
    """Strip training leftovers from the saved config so vLLM/transformers load it as a plain model."""
    p = merged / "config.json"
    cfg = json.loads(p.read_text())
    for k in ("peft_config", "adapter_config", "_name_or_path", "quantization_config"):
        cfg.pop(k, None)
    cfg["use_cache"] = True
    cfg["dtype"] = dtype
    cfg.pop("torch_dtype", None)
    atomic_write_text(p, json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def last_checkpoint(trainer_dir: Path) -> Path | None:
    """The newest complete TRL checkpoint (``checkpoint-<step>`` holding ``trainer_state.json``, which the
    Trainer writes after the weights, optimizer and RNG states). Newer incomplete ones (a kill while
    saving) are removed, so the resumed run's checkpoint rotation starts clean."""
    if not trainer_dir.is_dir():
        return None
    found = []
    for p in trainer_dir.iterdir():
        name, _, step = p.name.rpartition("-")
        if p.is_dir() and name == "checkpoint" and step.isdigit():
            found.append((int(step), p))
    for _, p in sorted(found, reverse=True):
        if (p / "trainer_state.json").is_file():
            return p
        log.warning("train: removing incomplete checkpoint %s (killed while saving)", p)
        shutil.rmtree(p, ignore_errors=True)
    return None


def _is_done(out_dir: Path) -> bool:
    m = out_dir / "merged"
    return (m / DONE).is_file() and (m / "config.json").is_file()


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished directory into place (replacing a stale one)."""
    for f in tmp.iterdir():  # mkstemp-based writers leave 0600; checkpoints are meant to be shared
        if f.is_file():
            f.chmod(0o644)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


# --------------------------------------------------------------------------------------------- train
def train_dpo(cfg_train: Any, policy_path: str | os.PathLike, pairs_path: str | os.PathLike,
              out_dir: str | os.PathLike, *, logger: MetricsLogger | None = None) -> Path:
    """Train the policy on the pairs with DPO and return the merged HF checkpoint directory.

    ``cfg_train``: the ``train`` node (conf/train_opts/lora.yaml lists every field; missing fields take the
    defaults in ``DEFAULTS``). ``policy_path``: a local HF model directory. ``pairs_path``: pairs.jsonl
    (``sphere.train.pairs.load_pairs`` rules). Writes ``out_dir/{adapter,merged,train_metrics.json}``;
    returns ``out_dir/merged`` straight away when it is already complete.
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

    import torch

    if t["threads"]:
        torch.set_num_threads(int(t["threads"]))
    show = {"auto": sys.stderr.isatty(), True: True, False: False, "true": True, "false": False}.get(
        t["progress"], None)
    if show is None:
        raise ValueError(f"train.progress={t['progress']!r}: allowed auto | true | false")
    _quiet(show)

    t0 = time.perf_counter()
    model, tok = _load(policy_path, pairs, t)
    mpe = getattr(model.config, "max_position_embeddings", None)
    if mpe and (t["max_length"] is None or int(t["max_length"]) > int(mpe)):
        # longer sequences would run past the positions the model was trained on (mini: 384)
        log.info("train: max_length %s -> %s (the model's max_position_embeddings)", t["max_length"], mpe)
        t["max_length"] = int(mpe)
    args = dpo_config(t, out_dir)
    peft_config = _peft_config(t["lora"]) if t["lora"]["enabled"] else None
    history: list[dict] = []

    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    rows, render = pairs.rows, {}
    if pairs.conversational:  # as the text the policy generated them in (not TRL's re-rendering)
        rows, render = render_chat_pairs(pairs.rows, tok, str(pairs.path))
        if render["template_rewrites"]:
            log.warning("train: %s's chat template rewrites assistant turns (%d of %d pairs, e.g. it drops the "
                        "reasoning before </think>); training on the text the policy generated instead",
                        policy_path, render["template_rewrites"], len(rows))

    Trainer = _trainer_class()
    Trainer.sphere_max_prompt_length = t["max_prompt_length"]
    Trainer.sphere_append_eos = bool(t["append_eos"])
    Trainer.sphere_source = str(pairs.path)
    # TRL's reference-log-prob precompute bar only listens to TQDM_DISABLE
    with _env(TQDM_DISABLE=None if show else "1"):
        trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, peft_config=peft_config,
                          callbacks=_callbacks(logger, show, history))
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    prep = {**trainer.sphere_prep_stats, **render}
    t_setup = time.perf_counter() - t0
    ckpt = last_checkpoint(out_dir / "trainer") if int(t["save_steps"]) > 0 else None
    if ckpt is not None:
        log.info("train: resuming from %s", ckpt)
    result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt is not None else None)
    t_train = time.perf_counter() - t0 - t_setup

    # ---- save: adapter (LoRA), then merged weights; DONE is written last, then the dir is published.
    trained = trainer.model
    if peft_config is not None:
        tmp = out_dir / ".adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        trained.save_pretrained(tmp, safe_serialization=True)
        _copy_tokenizer(policy_path, tmp, t)
        _publish(tmp, out_dir / "adapter")
        trained = trained.merge_and_unload()
    trained = trained.to(torch.float32) if t["dtype"] == "float32" else trained
    trained.config.use_cache = True
    tmp = out_dir / ".merged.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trained.save_pretrained(tmp, safe_serialization=True)
    _copy_tokenizer(policy_path, tmp, t)
    _clean_config(tmp, str(t["dtype"]))
    metrics = _metrics(history, result, pairs, t, prep, policy_path, peft_config is not None,
                       t_setup=t_setup, t_train=t_train, wall=time.perf_counter() - t0)
    metrics["resumed_from_step"] = int(ckpt.name.rsplit("-", 1)[1]) if ckpt is not None else None
    atomic_write_json(out_dir / "train_metrics.json", metrics)
    import dataclasses

    atomic_write_text(out_dir / "trainer_state.json",
                      json.dumps(dataclasses.asdict(trainer.state), indent=2, sort_keys=True) + "\n")
    atomic_write_text(tmp / DONE, json.dumps({"wall_s": metrics["wall_s"], "steps": metrics["steps"]}) + "\n")
    _publish(tmp, out_dir / "merged")
    shutil.rmtree(out_dir / "trainer", ignore_errors=True)  # the checkpoints: merged/ is the result now
    if logger is not None:
        logger.log({f"train/final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))
                    and not isinstance(v, bool)}, step=metrics["steps"])
    return out_dir / "merged"


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
    trc = bool(t["trust_remote_code"])
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
    model = AutoModelForCausalLM.from_pretrained(policy_path, dtype=dtypes[t["dtype"]], trust_remote_code=trc)
    return model, tok


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")


def _copy_tokenizer(policy_path: Path, dst: Path, t: dict) -> None:
    """The policy's tokenizer files, byte for byte (a load/save round trip adds keys such as
    ``local_files_only``, and the trainer's copy may have gained a pad token)."""
    found = [f for f in TOKENIZER_FILES if (policy_path / f).is_file()]
    if "tokenizer_config.json" not in found:
        _load_tokenizer(policy_path, t).save_pretrained(dst)
        return
    for f in found:
        shutil.copyfile(policy_path / f, dst / f)


def _load_tokenizer(policy_path: Path, t: dict):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(policy_path, trust_remote_code=bool(t["trust_remote_code"]))


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
        "pairs_kept": prep.get("kept"), "prompts_truncated": prep.get("prompts_truncated"),
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
    name = str(cfg.model.policy)
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
