"""The mini model's training (``train``): the digit-level tokenizer, the training problems (with the
recipe's planted slips, hard examples and drills), TRL's SFTTrainer with the plain causal-LM loss, on CPU,
single-threaded and deterministic (``deterministic``); the checkpoint saved ready to serve. The command and
the measurement are sphere.mini.pretrain."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from sphere.io import atomic_write_json
from sphere.mini.examples import drill_examples, hard_examples
from sphere.mini.model import build_model, n_params, train_tokenizer
from sphere.mini.world import WorldSpec, format_prompt, generate_problems, plant_slips, training_problems

# Context advertised in the saved config.json. The model uses RoPE (no position parameters), so this only
# sizes caches; backends default to max_model_len=2048 (VLLMBackendSettings, sphere/schema_groups.py) and
# vLLM refuses a max_model_len above the config's. Training sequences are <= model.max_position_embeddings of
# the recipe.
SERVE_CONTEXT = 2048


def serving_config(config) -> None:
    """Make a trained mini config ready to serve: KV cache on, SERVE_CONTEXT positions."""
    config.use_cache = True
    config.max_position_embeddings = max(int(config.max_position_embeddings), SERVE_CONTEXT)


def portable_tokenizer_config(d: Path) -> None:
    """transformers 5 saves ``tokenizer_class: TokenizersBackend``, which transformers 4.x (and so some
    vLLM installs) cannot resolve; ``PreTrainedTokenizerFast`` loads the same tokenizer.json in both."""
    p = Path(d) / "tokenizer_config.json"
    cfg = json.loads(p.read_text())
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        atomic_write_json(p, cfg)


@contextlib.contextmanager
def deterministic(threads: int):
    """Single-threaded deterministic torch for the duration (restored afterwards): the same recipe on the
    same machine gives bit-identical weights. Different CPUs/torch builds may differ in the last bits."""
    import torch

    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def progress_bar(total: int, desc: str):
    return Progress(
        TextColumn(f"[bold]{desc}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        transient=False,
    )


def _tokenize_examples(tokenizer, probs: list[dict], max_length: int) -> dict:
    """input_ids (prompt + solution + EOS) and labels (-100 on the prompt: completion-only loss),
    batch-tokenised. SFTTrainer's own preparation (per-example tokenise/label/truncate maps) is skipped:
    it costs more CPU than the training of a model this small."""
    prompts = [format_prompt(p["problem"]) for p in probs]
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    full = tokenizer(
        [q + p["solution"] for q, p in zip(prompts, probs, strict=False)], add_special_tokens=False
    )["input_ids"]
    ids, mask = [], []
    for a, b, p in zip(p_ids, full, probs, strict=False):
        if b[: len(a)] != a:  # the prompt must end on a token boundary (see MINI_PROMPT_TEMPLATE)
            raise ValueError(f"mini tokenizer: prompt of {p['id']} is not a token prefix of prompt+solution")
        if len(b) + 1 > max_length:
            raise ValueError(
                f"mini recipe: {p['id']} has {len(b) + 1} tokens > "
                f"model.max_position_embeddings={max_length}; "
                "raise it or lower the world's max_steps"
            )
        ids.append(b + [tokenizer.eos_token_id])
        mask.append([-100] * len(a) + b[len(a) :] + [tokenizer.eos_token_id])
    return {"input_ids": ids, "labels": mask}


def _plain_loss_sft_trainer():
    from trl import SFTTrainer

    class PlainLossSFTTrainer(SFTTrainer):
        """SFTTrainer with the model's own causal-LM loss (mean over the non -100 labels) instead of TRL's
        fused, tiled LM-head kernel: on CPU with a 640-token vocabulary the fused kernel (which also computes
        entropy and top-1 metrics) costs ~4x the plain loss and more than the rest of the model (measured:
        0.14 s vs 0.03 s per 32x140-token batch), so the loss is the same and the step twice as fast."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs.get("attention_mask"),
                labels=inputs["labels"],
            )
            return (out.loss, out) if return_outputs else out.loss

    return PlainLossSFTTrainer


def train(recipe: dict, out_dir: Path, progress: bool = True, snapshots: tuple[int, ...] = (),
          stop_after: int | None = None, log_every: int | None = None) -> dict:
    """Train the mini model of ``recipe`` into ``out_dir`` (HF checkpoint). Returns training stats.

    ``snapshots``: also save the model after these steps to ``out_dir/step-<k>`` (with a constant LR
    schedule, step-k of a long run equals a run with ``max_steps=k``: how max_steps was chosen).
    ``stop_after``: stop after this many optimizer steps, schedule unchanged, and save: the weights are
    exactly the full run's at that step (the reproducibility check CI runs instead of a full rebuild).
    ``log_every``: log the training loss (``loss_curve``) every that many steps (default ``max_steps // 20``;
    logging does not change the weights)."""
    import datasets

    datasets.disable_progress_bars()
    out_dir = Path(out_dir)
    world = WorldSpec.from_mapping(recipe["world"])
    tr = recipe["train"]
    threads = int(tr.get("threads", 1))
    t0 = time.time()
    with deterministic(threads):
        # The tokenizer depends only on its own block (seed, texts, vocab), so every recipe with the
        # same block (policy and small) shares one tokenizer.
        tokenizer = _tokenizer(recipe["tokenizer"], world)
        probs = _training_set(recipe, world)
        max_len = int(recipe["model"]["max_position_embeddings"])
        ds = datasets.Dataset.from_dict(_tokenize_examples(tokenizer, probs, max_len))
        model = build_model(recipe["model"], tokenizer, int(recipe["seed"]))
        cfg = _sft_config(recipe, out_dir, max_len, log_every)
        losses: list[tuple[int, float]] = []
        _PlainLossSFTTrainer = _plain_loss_sft_trainer()
        desc = f"pretrain {recipe['name']}" if progress else None
        cb = _callback(cfg.max_steps, desc, stop_after, snapshots, out_dir, tokenizer, losses)
        trainer = _PlainLossSFTTrainer(
            model=model, args=cfg, train_dataset=ds, processing_class=tokenizer, callbacks=[cb]
        )
        trainer.train()
        model = trainer.model
        _save(model, tokenizer, out_dir)
    return {
        "train_seconds": round(time.time() - t0, 1),
        "n_params": n_params(model),
        "vocab_size": len(tokenizer),
        "loss_curve": losses,
    }


def _tokenizer(tcfg: dict, world: WorldSpec):
    """The digit-level tokenizer, trained on its own block's texts (seed, count, vocabulary)."""
    tok_probs = generate_problems(
        int(tcfg["n_texts"]),
        int(tcfg["seed"]),
        id_prefix="mini-tok",
        **{**world.to_dict(), "ops": world.ops},
    )
    tok_texts = [format_prompt(p["problem"]) + p["solution"] for p in tok_probs]
    return train_tokenizer(tok_texts, int(tcfg["vocab_size"]))


def _training_set(recipe: dict, world: WorldSpec) -> list[dict]:
    """The training problems: the world's, with the recipe's planted slips, hard examples and drills."""
    tr = recipe["train"]
    slip = float(tr.get("slip_rate", 0.0))
    kinds = tuple(tr.get("slip_kinds", ("carry",)))
    probs = training_problems(int(tr["n_problems"]), int(recipe["seed"]), world)
    probs = plant_slips(probs, slip, int(recipe["seed"]) + 13, world.max_value, kinds)
    probs += hard_examples(tr, world, int(recipe["seed"]))  # optional (train.hard_n); none by default
    probs += drill_examples(
        int(tr.get("n_drills", 0)), int(tr.get("drill_equations", 8)), int(recipe["seed"]) + 1, world,
        slip_rate=slip, slip_kinds=kinds,
    )
    return probs


def _sft_config(recipe: dict, out_dir: Path, max_len: int, log_every: int | None = None):
    from trl import SFTConfig

    tr = recipe["train"]
    return SFTConfig(
        output_dir=str(out_dir / "_trainer"),
        max_steps=int(tr["max_steps"]),
        per_device_train_batch_size=int(tr["batch_size"]),
        gradient_accumulation_steps=1,
        learning_rate=float(tr["learning_rate"]),
        lr_scheduler_type=str(tr["lr_scheduler"]),
        warmup_steps=int(tr["warmup_steps"]),
        weight_decay=float(tr["weight_decay"]),
        max_grad_norm=float(tr["max_grad_norm"]),
        adam_beta2=float(tr.get("adam_beta2", 0.999)),
        seed=int(recipe["seed"]),
        data_seed=int(recipe["seed"]),
        use_cpu=True,
        bf16=False,
        fp16=False,
        completion_only_loss=True,
        max_length=max_len,
        dataset_kwargs={"skip_prepare_dataset": True},  # already tokenised with labels (see above)
        logging_steps=log_every or max(1, int(tr["max_steps"]) // 20),
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataset_num_proc=None,
    )


def _callback(max_steps: int, desc: str | None, stop_after: int | None, snapshots: tuple[int, ...],
              out_dir: Path, tokenizer, losses: list[tuple[int, float]]):
    """The trainer callback: progress bar (``desc``: its title, None = no bar), ``stop_after``, the step
    snapshots and the loss curve (appended to ``losses``)."""
    from transformers import TrainerCallback

    class _Cb(TrainerCallback):
        def __init__(self):
            self.bar = progress_bar(max_steps, desc) if desc is not None else None
            self.task = None

        def on_train_begin(self, args, state, control, **kw):
            if self.bar:
                self.bar.start()
                self.task = self.bar.add_task("", total=args.max_steps, info="")

        def on_step_end(self, args, state, control, model=None, **kw):
            if stop_after is not None and state.global_step >= stop_after:
                control.should_training_stop = True
            if state.global_step in snapshots and model is not None:
                model.save_pretrained(out_dir / f"step-{state.global_step}", safe_serialization=True)
                tokenizer.save_pretrained(out_dir / f"step-{state.global_step}")
            if self.bar:
                self.bar.update(self.task, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append((state.global_step, float(logs["loss"])))
                if self.bar:
                    self.bar.update(self.task, info=f"loss {logs['loss']:.3f}")

        def on_train_end(self, args, state, control, **kw):
            if self.bar:
                self.bar.stop()

    return _Cb()


def _save(model, tokenizer, out_dir: Path) -> None:
    """The trained checkpoint, ready to serve (KV cache on, SERVE_CONTEXT positions, portable tokenizer)."""
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True  # the Trainer turns the KV cache off for training
    serving_config(model.config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    portable_tokenizer_config(out_dir)
    shutil.rmtree(out_dir / "_trainer", ignore_errors=True)
