"""The `train` node of `sphere train` (sphere.train.dpo): ``DEFAULTS`` of every ``train.*`` field,
``resolve_train_cfg`` (merge over the defaults, unknown keys are errors), ``validate_train_cfg`` (range
checks before any model loads), ``loss_settings`` (``train.loss`` onto TRL 1.x ``loss_type`` /
``loss_weights``, see the sphere.train.dpo docstring) and ``dpo_config`` (the ``trl.DPOConfig``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

# TRL 1.x DPOTrainer's loss types (trl.DPOConfig.loss_type); a list of them is a mixture (loss_weights)
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
SMOOTHED = ("robust", "exo_pair", "aot", "aot_unpaired")  # the types TRL reads label_smoothing in


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
    "loss": {"type": "sigmoid", "weights": None, "beta": 0.1, "label_smoothing": 0.0, "rpo_alpha": 0.0,
             "ld_alpha": None, "use_weighting": False, "discopop_tau": 0.05},
    "lr": 5e-4, "epochs": 2, "max_steps": -1, "batch_size": 8, "grad_accum": 1,
    "max_length": 512, "max_prompt_length": None, "append_eos": True,
    "warmup_ratio": 0.1, "scheduler": "cosine", "weight_decay": 0.0, "max_grad_norm": 1.0,
    "precompute_ref": True, "seed": 0, "threads": None, "progress": "auto", "logging_steps": 1,
    "dtype": "float32", "trust_remote_code": False, "device": "auto", "gradient_checkpointing": False,
    "save_steps": 50, "save_total_limit": 1, "processes": 1,
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


def _num(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError(f"train.loss.{key}={v!r}: expected a number")
    try:
        return float(v)
    except ValueError:
        raise ValueError(f"train.loss.{key}={v!r}: expected a number") from None


def loss_settings(loss: Mapping) -> dict:
    """``train.loss`` -> the DPOConfig loss fields (``loss_type``, ``loss_weights``, ``label_smoothing``,
    ``beta``, ``ld_alpha``, ``use_weighting``, ``discopop_tau``). ``type``: one of TRL's loss types or a list
    (a mixture, ``weights`` one per type, null = 1 each); ``type=sigmoid`` with ``label_smoothing`` > 0 is cDPO
    (``sigmoid`` + ``robust`` weighted, exact; sphere.train.dpo docstring); ``rpo_alpha`` adds that weight of
    TRL's ``sft`` term. Every error names the key and what is allowed."""
    raw = loss.get("type", "sigmoid")
    if isinstance(raw, str):
        types = [raw.lower()]
    elif isinstance(raw, (list, tuple)) and raw and all(isinstance(x, str) for x in raw):
        types = [str(x).lower() for x in raw]
    else:
        raise ValueError(f"train.loss.type={raw!r}: allowed one of {list(LOSS_TYPES)} or a non-empty list of "
                         "them (a mixture)")
    for t in types:
        if t not in LOSS_TYPES:
            raise ValueError(f"train.loss.type={t!r}: allowed {' | '.join(LOSS_TYPES)} (TRL's DPO losses) or a "
                             "list of them (cDPO = sigmoid + label_smoothing)")
    if len(set(types)) != len(types):
        raise ValueError(f"train.loss.type={types}: a loss type appears twice; give it one weight instead")
    wraw = loss.get("weights")
    if wraw is None:
        weights = [1.0] * len(types)
    else:
        if not isinstance(wraw, (list, tuple)) or len(wraw) != len(types):
            raise ValueError(f"train.loss.weights={wraw!r}: allowed null or a list of {len(types)} number(s), one "
                             f"per train.loss.type {types}")
        weights = [_num("weights", w) for w in wraw]
    beta = _num("beta", loss.get("beta", 0.1))
    eps = _num("label_smoothing", loss.get("label_smoothing", 0.0) or 0.0)
    alpha = _num("rpo_alpha", loss.get("rpo_alpha", 0.0) or 0.0)
    if not beta > 0:
        raise ValueError(f"train.loss.beta={beta}: must be > 0")
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"train.loss.label_smoothing={eps}: must be in [0, 0.5)")
    cdpo = eps > 0 and types == ["sigmoid"]
    if eps > 0 and not cdpo and not set(types) & set(SMOOTHED):
        raise ValueError(f"train.loss.label_smoothing={eps} applies to type=sigmoid alone (cDPO) or to "
                         f"{' | '.join(SMOOTHED)}, not {raw!r}")
    if "exo_pair" in types and eps == 0:
        raise ValueError("train.loss.type=exo_pair needs train.loss.label_smoothing > 0 (the EXO paper: 1e-3)")
    if alpha < 0:
        raise ValueError(f"train.loss.rpo_alpha={alpha}: must be >= 0 (0 disables the SFT term)")
    ld = loss.get("ld_alpha")
    if ld is not None:
        ld = _num("ld_alpha", ld)
        if not 0.0 <= ld <= 1.0:
            raise ValueError(f"train.loss.ld_alpha={ld}: allowed null (off) or [0, 1] (LD-DPO: 1 = plain DPO)")
    tau = _num("discopop_tau", loss.get("discopop_tau", 0.05))
    if not tau > 0:
        raise ValueError(f"train.loss.discopop_tau={tau}: must be > 0")
    uw = loss.get("use_weighting", False)
    if not isinstance(uw, bool):
        raise ValueError(f"train.loss.use_weighting={uw!r}: allowed true or false")
    if cdpo:
        types, weights = ["sigmoid", "robust"], [2.0 * (1.0 - eps), -(1.0 - 2.0 * eps)]
    if alpha > 0:
        if "sft" in types:  # the rft control sets rpo_alpha on any recipe: it adds to a mixture's own sft term
            weights[types.index("sft")] += alpha
        else:
            types, weights = [*types, "sft"], [*weights, alpha]
    return {
        "loss_type": types,
        "loss_weights": None if weights == [1.0] else weights,
        "label_smoothing": eps,
        "beta": beta,
        "ld_alpha": ld,
        "use_weighting": uw,
        "discopop_tau": tau,
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
    processes = t["processes"]
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"train.processes={processes!r}: must be an integer >= 1 (1 = this process, one "
                         "device; N = N data-parallel processes, one device each)")
    loss_settings(t["loss"])


def dpo_config(t: dict, out_dir: Path):
    """The ``trl.DPOConfig`` for a resolved train config ``t`` (see ``resolve_train_cfg``)."""
    from trl import DPOConfig

    validate_train_cfg(t)
    save_steps, save_limit = int(t["save_steps"]), int(t["save_total_limit"])
    use_cpu = _use_cpu(str(t["device"]))
    dist = {}
    if int(t["processes"]) > 1:  # one process per device (sphere.train.distributed launches them)
        # every LoRA / full-FT parameter gets a gradient each step: DDP need not search for unused ones (and
        # that search breaks with gradient checkpointing)
        dist = {"ddp_backend": "gloo" if use_cpu else "nccl", "ddp_find_unused_parameters": False}
    return DPOConfig(
        output_dir=str(out_dir / "trainer"),
        per_device_train_batch_size=int(t["batch_size"]),
        per_device_eval_batch_size=int(t["batch_size"]),  # the after-training margin (sphere.train.dpo)
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
        **dist,
        **loss_settings(t["loss"]),
    )
