"""The TRL pieces of `sphere train` (sphere.train.dpo): the ``MetricsLogger`` protocol, the callbacks that
log the trainer's metrics and draw the progress bar, and ``SphereDPOTrainer`` (``_trainer_class``), TRL's
``DPOTrainer`` with prompt truncation and the EOS policy applied to the tokenised pairs."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Protocol

from tqdm.auto import tqdm

from sphere.train.checkpoints import writing

log = logging.getLogger("sphere.train")


class MetricsLogger(Protocol):
    """What ``train_dpo`` needs from an experiment logger (W&B wrapper, a test double, ...)."""

    def log(self, metrics: dict[str, float], step: int | None = None) -> None: ...


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
            mpl, keep_eos, max_len = self.sphere_max_prompt_length, self.sphere_append_eos, args.max_length
            n_in = len(dataset)
            # TRL's own length handling is off while tokenising (it would drop a prompt that max_prompt_length
            # shortens below); the length rule below replaces it. The collator keeps its copy of max_length,
            # but after the filter no sequence reaches it, so it never cuts anything.
            args.max_length = None
            try:
                ds = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            finally:
                args.max_length = max_len
            eos_id = self._tokenizer.eos_token_id
            ds, cut = _cut_prompts_and_eos(ds, mpl, keep_eos, eos_id, dataset_name)
            ds, n_nonempty, too_long, longest, shortest = _drop_empty_and_long(ds, max_len)
            with_eos, kept_longest = _kept_stats(ds, eos_id)
            self.sphere_prep_stats = {"prompts_truncated": cut, "dropped": n_in - len(ds),
                                      "dropped_too_long": too_long, "dropped_empty": n_in - n_nonempty,
                                      "kept": len(ds), "completions_with_eos": with_eos,
                                      "longest_pair_tokens": longest,
                                      "longest_kept_pair_tokens": kept_longest}
            _check_kept(len(ds), n_in, too_long, longest, shortest, max_len, self.sphere_source,
                        args.process_index)
            return ds

        def _save_checkpoint(self, model, trial):
            """TRL's checkpoint; a full disk while writing it is one error naming the checkpoint directory
            (safetensors and torch.save name no file)."""
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            step = self.state.global_step
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
            with writing(folder, "a training checkpoint (weights, optimizer, scheduler and RNG states; every "
                                 "train.save_steps steps)"):
                return super()._save_checkpoint(model, trial)

        def create_scheduler(self, num_training_steps, optimizer=None):
            """HF's scheduler, with every warmup step moved one step earlier: HF's linear warmup gives the
            first optimizer step lr 0, so a run of <= warmup steps published the base weights (issue #28
            item 8)."""
            made = self.lr_scheduler is None
            sched = super().create_scheduler(num_training_steps, optimizer)
            if made:
                shift_warmup(sched, self.args.get_warmup_steps(num_training_steps))
            return sched

    return SphereDPOTrainer


def _cut_prompts_and_eos(ds, mpl: int | None, keep_eos: bool, eos_id, dataset_name: str):
    """The tokenised pairs with a prompt over ``max_prompt_length`` cut to its end and, without the EOS policy,
    the completions' final EOS removed. Returns (dataset, prompts cut)."""
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
    return ds, cut


def _drop_empty_and_long(ds, max_len: int | None):
    """The pairs with an empty completion dropped, then those over ``max_len`` tokens. Returns (dataset, pairs
    left after the first filter, pairs dropped as too long, the longest and the shortest pair's tokens)."""
    ds = ds.filter(lambda ex: len(ex["chosen_ids"]) > 0 and len(ex["rejected_ids"]) > 0)
    n_nonempty = len(ds)
    # A pair longer than max_length is dropped, never cut: TRL keeps the start of a long sequence, so
    # the answer and the end-of-turn token would be lost and DPO would teach the policy to stop
    # mid-solution (issue #28 item 5).
    triples = zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"], strict=True)
    lengths = [len(p) + max(len(c), len(r)) for p, c, r in triples]
    longest, shortest = max(lengths, default=0), min(lengths, default=0)
    too_long = sum(1 for n in lengths if max_len is not None and n > max_len)
    if too_long:
        ds = ds.filter(lambda ex: len(ex["prompt_ids"])
                       + max(len(ex["chosen_ids"]), len(ex["rejected_ids"])) <= max_len)
    return ds, n_nonempty, too_long, longest, shortest


def _kept_stats(ds, eos_id) -> tuple[int, int]:
    """Of the kept pairs: (the completions ending in EOS, the longest pair's tokens)."""
    with_eos = sum(1 for k in ("chosen_ids", "rejected_ids") for ids in ds[k]
                   if ids and ids[-1] == eos_id)
    kept_longest = max((len(p) + max(len(c), len(r)) for p, c, r in
                        zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"], strict=True)),
                       default=0)
    return with_eos, kept_longest


def _check_kept(kept: int, n_in: int, too_long: int, longest: int, shortest: int, max_len: int | None,
                source: str, process_index: int) -> None:
    """No pair left: one error naming the longest and shortest pair; some dropped as too long: a warning,
    once (rank 0)."""
    if kept == 0:
        raise ValueError(
            f"{source}: every pair was dropped: none of the {n_in} fits train.max_length="
            f"{max_len} tokens (longest pair {longest} tokens prompt + completion, shortest "
            f"{shortest}); "
            "raise train.max_length (up to the model's max_position_embeddings) or set "
            "train.max_prompt_length"
        )
    if too_long and process_index == 0:  # once, not once per rank
        log.warning("train: dropped %d of %d pairs longer than train.max_length=%d tokens (longest "
                    "%d): a pair is never cut (that loses the answer and the end-of-turn token); "
                    "raise train.max_length to keep them", too_long, n_in, max_len, longest)


def shift_warmup(sched, warmup_steps: int) -> None:
    """Make the (linear) warmup of a ``LambdaLR`` schedule start above zero: step ``s < warmup_steps`` gets
    the factor ``(s + 1) / W`` (1/W, 2/W, ..., 1: HF's warmup one step earlier) instead of HF's ``s / W``, so
    its first step trains; later steps keep HF's factor. Refuses a schedule whose first step would still run
    at lr 0."""
    from torch.optim.lr_scheduler import LambdaLR

    w = int(warmup_steps)
    if w > 0:
        if not isinstance(sched, LambdaLR):
            raise ValueError(f"train.scheduler: {type(sched).__name__} with warmup is not supported (its "
                             "first step may run at lr 0); use cosine, linear or constant_with_warmup")

        def shifted(f):
            return lambda step: (step + 1) / w if step < w else f(step)

        sched.lr_lambdas = [shifted(f) for f in sched.lr_lambdas]
        lrs = [base * f(sched.last_epoch) for base, f in zip(sched.base_lrs, sched.lr_lambdas, strict=True)]
        for group, lr in zip(sched.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        sched._last_lr = lrs
    first = [g["lr"] for g in sched.optimizer.param_groups]
    if sched.last_epoch == 0 and not all(lr > 0 for lr in first):
        raise ValueError(f"train: the first optimizer step would run at lr {first} (train.scheduler with "
                         f"{w} warmup steps); it would not train")
