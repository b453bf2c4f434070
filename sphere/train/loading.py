"""What a DPO training starts from (sphere.train.dpo, and the launcher of sphere.train.distributed): the
tokenizer and model of the policy, the trainer's rows, the LoRA config, one device per process, and quieter
libraries. torch, transformers, datasets and peft are imported inside the functions (the CLI lists commands
without them)."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from sphere.train.checkpoints import _load_tokenizer
from sphere.train.pairs_file import PairSet, render_chat_pairs

log = logging.getLogger("sphere.train")


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

