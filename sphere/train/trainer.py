"""The TRL pieces of `sphere train` (sphere.train.dpo): the ``MetricsLogger`` protocol, the callbacks that
log the trainer's metrics and draw the progress bar, and ``SphereDPOTrainer`` (``_trainer_class``), TRL's
``DPOTrainer`` with prompt truncation and the EOS policy applied to the tokenised pairs."""

from __future__ import annotations

import sys
from typing import Protocol


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
