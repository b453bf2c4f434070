"""The `train` node of `sphere train` (sphere.train.dpo): ``DEFAULTS`` of every ``train.*`` field (read from
sphere.schema_train.TrainSettings, where each field's type, default, range and doc are written),
``resolve_train_cfg`` (merge over the defaults, unknown keys are errors), ``validate_train_cfg`` (range
checks before any model loads), ``loss_settings`` (``train.loss`` onto TRL 1.x ``loss_type`` /
``loss_weights``, see the sphere.train.dpo docstring) and ``dpo_config`` (the ``trl.DPOConfig``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sphere.schema import check_node, defaults
from sphere.schema_train import TrainSettings

# TRL 1.x DPOTrainer's loss types (trl.DPOConfig.loss_type); a list of them is a mixture (loss_weights)
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
SMOOTHED = ("robust", "exo_pair", "aot", "aot_unpaired")  # the types TRL reads label_smoothing in


def _plain(cfg: Any) -> dict:
    """A DictConfig / Mapping as a resolved plain dict."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    if isinstance(cfg, Mapping):
        return {k: _plain(v) if isinstance(v, Mapping) else v for k, v in cfg.items()}
    raise TypeError(f"train config must be a mapping (got {type(cfg).__name__})")


def _defaults() -> dict[str, Any]:
    return defaults(TrainSettings, alone=True)


# Every `train.*` field with its default, read from sphere.schema_train.TrainSettings (the one place they are written;
# `seed` and `trust_remote_code`, interpolations in a composed config, take their base values 0 and false here).
DEFAULTS: dict[str, Any] = _defaults()
_LOSS_DEFAULTS: dict[str, Any] = DEFAULTS["loss"]


def resolve_train_cfg(cfg_train: Any) -> dict:
    """Merge ``cfg_train`` over ``DEFAULTS`` (sphere.schema_train.TrainSettings); unknown keys are an error naming
    the key. A partial config (the pipeline's, a test's) takes the dataclass defaults for what it leaves out."""
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
    raw = loss.get("type", _LOSS_DEFAULTS["type"])
    types = _loss_types(raw)
    weights = _loss_weights(loss.get("weights", _LOSS_DEFAULTS["weights"]), types)
    beta = _num("beta", loss.get("beta", _LOSS_DEFAULTS["beta"]))
    eps = _num("label_smoothing", loss.get("label_smoothing", _LOSS_DEFAULTS["label_smoothing"]) or 0.0)
    alpha = _num("rpo_alpha", loss.get("rpo_alpha", _LOSS_DEFAULTS["rpo_alpha"]) or 0.0)
    cdpo = _check_beta_smoothing_alpha(beta, eps, alpha, types, raw)
    ld, tau, uw = _loss_extras(loss)
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


def _loss_types(raw) -> list[str]:
    """``train.loss.type`` (a name or a list of names) -> the lower-cased TRL loss types, each once."""
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
    return types


def _loss_weights(wraw, types: list[str]) -> list[float]:
    """``train.loss.weights``: null = 1 per type, else one number per type."""
    if wraw is None:
        return [1.0] * len(types)
    if not isinstance(wraw, (list, tuple)) or len(wraw) != len(types):
        raise ValueError(f"train.loss.weights={wraw!r}: allowed null or a list of {len(types)} number(s), one "
                         f"per train.loss.type {types}")
    return [_num("weights", w) for w in wraw]


def _check_beta_smoothing_alpha(beta: float, eps: float, alpha: float, types: list[str], raw) -> bool:
    """Checks ``beta``, ``label_smoothing`` and ``rpo_alpha`` against the loss types; returns whether the recipe
    is cDPO (``type=sigmoid`` with ``label_smoothing`` > 0)."""
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
    return cdpo


def _loss_extras(loss: Mapping) -> tuple[float | None, float, bool]:
    """(``ld_alpha``, ``discopop_tau``, ``use_weighting``), checked."""
    ld = loss.get("ld_alpha", _LOSS_DEFAULTS["ld_alpha"])
    if ld is not None:
        ld = _num("ld_alpha", ld)
        if not 0.0 <= ld <= 1.0:
            raise ValueError(f"train.loss.ld_alpha={ld}: allowed null (off) or [0, 1] (LD-DPO: 1 = plain DPO)")
    tau = _num("discopop_tau", loss.get("discopop_tau", _LOSS_DEFAULTS["discopop_tau"]))
    if not tau > 0:
        raise ValueError(f"train.loss.discopop_tau={tau}: must be > 0")
    uw = loss.get("use_weighting", _LOSS_DEFAULTS["use_weighting"])
    if not isinstance(uw, bool):
        raise ValueError(f"train.loss.use_weighting={uw!r}: allowed true or false")
    return ld, tau, uw

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
    """Checks of a resolved train config, before any model loads or output is written: every field's type and
    range from sphere.schema_train.TrainSettings (``ConfigTypeError``, a ValueError naming the full key), then the
    rules between fields, and the loss (``loss_settings``)."""
    check_node(TrainSettings, t, "train.")
    max_steps, epochs = int(t["max_steps"]), float(t["epochs"])
    if max_steps == 0:
        raise ValueError(f"train.max_steps={max_steps}: allowed -1 (train for train.epochs) or >= 1")
    if max_steps == -1 and not epochs > 0:
        raise ValueError(f"train.epochs={t['epochs']}: must be > 0 (or set train.max_steps >= 1); zero "
                         "epochs would publish the untrained policy as the trained one")
    processes = t["processes"]
    if isinstance(processes, bool) or not isinstance(processes, int):
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
