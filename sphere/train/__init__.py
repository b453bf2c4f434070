"""DPO training (`sphere train`): ``train_dpo`` (TRL DPOTrainer, LoRA via PEFT) and pairs.jsonl checking."""

from sphere.train.pairs_file import PairSet, load_pairs

__all__ = ["PairSet", "load_pairs", "train_dpo"]


def __getattr__(name: str):
    # Lazy: importing sphere.train must not import torch/trl (the CLI lists commands without them).
    if name == "train_dpo":
        from sphere.train.dpo import train_dpo

        return train_dpo
    raise AttributeError(name)
