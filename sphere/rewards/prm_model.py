"""``QwenProcessRewardModel``: the Qwen2.5-Math-PRM architecture (``Qwen2ForProcessRewardModel``) in plain
PyTorch, which transformers has no class for: the config's base model (``AutoModel``) plus the ``score`` head
(``Linear(h, h), ReLU, Linear(h, num_labels)``), loaded from the checkpoint's safetensors directly (no remote
code). Importing this module imports torch (the class derives from ``torch.nn.Module``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _torch_nn():
    import torch.nn as nn

    return nn


class QwenProcessRewardModel(_torch_nn().Module):
    """Qwen2.5-Math-PRM architecture in plain PyTorch: body (AutoModel of the config) + ``score`` head."""

    def __init__(self, config):
        super().__init__()
        import torch.nn as nn
        from transformers import AutoModel

        self.config = config
        self.model = AutoModel.from_config(config)
        h, k = config.hidden_size, int(getattr(config, "num_labels", 2) or 2)
        self.score = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, k))

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        """Logits ``[B, T, labels]``; ``past_key_values`` (a transformers ``Cache``) is filled or read in place
        (the shared-prefix scoring of sphere/rewards/shared_prefix.py)."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=past_key_values, use_cache=use_cache).last_hidden_state
        return self.score(hidden)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype=None,
                        trust_remote_code: bool = False) -> QwenProcessRewardModel:
        import torch
        from safetensors.torch import load_file
        from transformers import AutoConfig

        path = Path(path)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = cls(config)
        index = path / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
            "model.safetensors"]
        state: dict[str, Any] = {}
        for f in files:
            if not (path / f).is_file():
                raise FileNotFoundError(f"PRM checkpoint {path}: weight file {f} missing")
            state.update(load_file(str(path / f)))
        state = {k: v for k, v in state.items() if not k.startswith("lm_head.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
        if missing or unexpected:
            raise ValueError(f"PRM checkpoint {path}: does not match the Qwen PRM layout "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        if dtype is not None:
            model.to(dtype)
        return model.eval().requires_grad_(False) if isinstance(model, torch.nn.Module) else model
