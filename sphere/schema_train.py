"""The typed ``train`` settings (sphere.schema): the DPO recipe of ``train_opts``, its loss and its LoRA
adapter; each field's type, default, range and doc."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from sphere.schema_fields import _f, _sub


# ============================================================================================== train
@dataclass
class LoraSettings:
    enabled: bool = _f(True, "LoRA adapter; the reference is the adapter-disabled base (one model in memory)")
    r: int = _f(32, "LoRA rank", ge=1)
    alpha: float = _f(64, "LoRA scaling numerator (effective scale alpha / r)", gt=0)
    dropout: float = _f(0.0, "LoRA dropout (TRL disables model dropout during DPO anyway)", ge=0, lt=1)
    target_modules: Any = _f("all-linear", "\"all-linear\" (every linear layer but the LM head) or a list of "
                             "module names")


@dataclass
class LossSettings:
    """The loss: TRL's DPOTrainer computes it (formulas: docs/experiments/objectives.md). ``train.loss.type=ipo``,
    a mixture ``train.loss.type=[sigmoid,sft] train.loss.weights=[1.0,0.5]``; sphere.train.train_config.loss_settings
    checks the cross-field rules."""

    type: Any = _f("sigmoid", "one of TRL's DPO losses: sigmoid (DPO) | ipo | hinge | robust | exo_pair | nca_pair "
                   "| bco_pair | sppo_hard | aot | aot_unpaired | apo_zero | apo_down | discopop | sft | "
                   "sigmoid_norm (length-normalised DPO); or a list of them (a mixture, with weights)")
    weights: Any = _f(None, "a mixture's weights, one per type (TRL loss_weights); null = 1 each")
    beta: float = _f(0.1, "KL strength beta (IPO: the tau of the IPO paper)", gt=0)
    label_smoothing: float = _f(0.0, "[0, 0.5): with type=sigmoid alone it is cDPO (assumed label-flip "
                                "probability); robust | exo_pair | aot | aot_unpaired read it as TRL does "
                                "(exo_pair needs > 0)", ge=0, lt=0.5)
    rpo_alpha: float = _f(0.0, "weight of an SFT (NLL) term on the chosen completion (RPO; TRL's sft); 0 = off",
                          ge=0)
    ld_alpha: Optional[float] = _f(None, "LD-DPO: weight of the tokens past the shorter completion's length, "
                                   "[0, 1]; null = off", ge=0, le=1)
    use_weighting: bool = _f(False, "WPO: weight each pair by the policy's length-normalised probability of "
                             "both sides")
    discopop_tau: float = _f(0.05, "discopop: the temperature of its log-ratio modulation", gt=0)


@dataclass
class TrainSettings:
    """The DPO recipe, composed under ``train`` (``train_opts@train``: lora, the default, or full;
    conf/train_opts/), read by sphere.train.dpo.train_dpo through sphere.train.train_config.resolve_train_cfg. The
    defaults are the LoRA recipe. Mini-world numbers measured on 300 correct-vs-corrupted pairs with the tiny
    test Llama (hidden 64): LoRA lr 2e-3 with plain DPO collapsed the policy (chosen log-prob -16 -> -94,
    garbage generations); 5e-4 kept it intact (-16 -> -19). rpo_alpha > 0 keeps the chosen likelihood from
    falling."""

    lora: LoraSettings = _sub(LoraSettings, "LoRA through PEFT (lora.enabled=false: full fine-tuning)")
    loss: LossSettings = _sub(LossSettings, "the DPO loss")
    lr: float = _f(5e-4, "peak learning rate (AdamW); full fine-tuning wants ~10x less than LoRA", gt=0)
    epochs: float = _f(2, "passes over the pairs (> 0 unless max_steps >= 1: validate_train_cfg)", ge=0)
    max_steps: int = _f(-1, "> 0: stop after this many optimizer steps (overrides epochs); -1 = epochs", ge=-1)
    batch_size: int = _f(8, "pairs per micro-batch (each pair = 2 sequences)", ge=1)
    grad_accum: int = _f(1, "micro-batches per optimizer step", ge=1)
    max_length: Optional[int] = _f(512, "tokens of prompt + completion; a longer pair is dropped (never cut) and "
                                   "counted in train_metrics.json (pairs_dropped_too_long); null = the model's "
                                   "max_position_embeddings", ge=8)
    max_prompt_length: Optional[int] = _f(None, "prompts longer than this keep their last tokens; null = no limit",
                                          ge=1)
    append_eos: bool = _f(True, "end plain-text completions with EOS (full solutions); false for step-level pairs")
    warmup_ratio: float = _f(0.1, "linear warmup, as a fraction of the total optimizer steps (rounded up); its "
                             "first step already trains (lr/W, 2lr/W, ..., lr), so even a 1-step run changes the "
                             "weights", ge=0, lt=1)
    scheduler: str = _f("cosine", "transformers lr scheduler: cosine | linear | constant | constant_with_warmup ...")
    weight_decay: float = _f(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = _f(1.0, "gradient clipping", gt=0)
    precompute_ref: bool = _f(True, "reference log-probs computed once before training (one forward per pair)")
    seed: int = _f("${seed}", "data order and LoRA init", alone=0)
    threads: Optional[int] = _f(None, "torch intra-op threads; null = leave as is (OMP_NUM_THREADS)", ge=1)
    progress: Any = _f("auto", "progress bar: auto (only on a terminal) | true | false")
    logging_steps: int = _f(1, "log train/* metrics every this many optimizer steps", ge=1)
    dtype: str = _f("float32", "training and merged-checkpoint dtype: float32 (CPU) | bfloat16 | float16",
                    choices=("float32", "bfloat16", "float16"))
    trust_remote_code: bool = _f("${model.trust_remote_code}", "passed to from_pretrained; only true when a "
                                 "config says so", alone=False)
    device: str = _f("auto", "auto (CUDA when visible, else CPU) | cpu | cuda", choices=("auto", "cpu", "cuda"))
    gradient_checkpointing: bool = _f(False, "recompute activations in backward: less memory, ~30% slower (7B on "
                                      "GPU: true)")
    save_steps: int = _f(50, "TRL checkpoint every this many optimizer steps; a rerun after a crash resumes from "
                         "the last one (same step count as an uninterrupted run); 0 = none (a rerun starts over)",
                         ge=0)
    save_total_limit: int = _f(1, "checkpoints kept on disk (each: weights + optimizer state, ~3x the model for "
                               "full FT)", ge=1)
    processes: int = _f(1, "1: train in this process on ONE device, even with several GPUs visible. N > 1: N "
                        "data-parallel processes (torchrun; NCCL, one GPU each; gloo on CPU), rank 0 writes "
                        "merged/. batch_size is per process: global batch = processes x batch_size x grad_accum",
                        ge=1)
