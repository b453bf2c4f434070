"""What sphere knows of a model without loading it: its shape and its window, from the ``config.json`` of a local
directory (a shipped stand-in, the mini models, or the local Hugging Face cache: nothing is downloaded), else
from the tables of the paper's hub models below. The memory plan (sphere/memplan.py) and the length budgets
(sphere/budgets.py) both read these; they live below both so neither imports the other's facts."""

from __future__ import annotations

import json
from pathlib import Path

from sphere.model_paths import STANDIN_NAMES, resolve_model

# Dimensions of the hub models the experiment configs name, from each model's config.json on the Hugging Face
# hub (hidden, intermediate, layers, attention heads, KV heads, vocab, tied embeddings, q/k/v bias, head).
# Used only when the model is not a local directory (dry runs before the weights are downloaded).
KNOWN_SHAPES: dict[str, dict] = {
    "Qwen/Qwen2.5-7B-Instruct": dict(h=3584, i=18944, layers=28, heads=28, kv=4, vocab=152064, tied=False,
                                     bias=True),
    "Qwen/Qwen2.5-3B-Instruct": dict(h=2048, i=11008, layers=36, heads=16, kv=2, vocab=151936, tied=True,
                                     bias=True),
    "Qwen/Qwen2.5-1.5B-Instruct": dict(h=1536, i=8960, layers=28, heads=12, kv=2, vocab=151936, tied=True,
                                       bias=True),
    "Qwen/Qwen2.5-Math-7B-Instruct": dict(h=3584, i=18944, layers=28, heads=28, kv=4, vocab=152064, tied=False,
                                          bias=True),
    "Qwen/Qwen2.5-Math-1.5B-Instruct": dict(h=1536, i=8960, layers=28, heads=12, kv=2, vocab=151936, tied=True,
                                            bias=True),
    "Qwen/Qwen2.5-Math-PRM-7B": dict(h=3584, i=18944, layers=28, heads=28, kv=4, vocab=152064, tied=False,
                                     bias=True, prm=True),
    "microsoft/phi-4": dict(h=5120, i=17920, layers=40, heads=40, kv=10, vocab=100352, tied=False, bias=False),
    "microsoft/Phi-4-mini-instruct": dict(h=3072, i=8192, layers=32, heads=24, kv=8, vocab=200064, tied=True,
                                          bias=False),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": dict(h=3584, i=18944, layers=28, heads=28, kv=4, vocab=152064,
                                                    tied=False, bias=True),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": dict(h=1536, i=8960, layers=28, heads=12, kv=2, vocab=151936,
                                                      tied=False, bias=True),
}


def shape_from_config(c: dict) -> dict:
    c = c.get("text_config", c)
    arch = (c.get("architectures") or [""])[0]
    return dict(h=int(c["hidden_size"]), i=int(c["intermediate_size"]), layers=int(c["num_hidden_layers"]),
                heads=int(c["num_attention_heads"]), kv=int(c.get("num_key_value_heads") or c["num_attention_heads"]),
                vocab=int(c["vocab_size"]), tied=bool(c.get("tie_word_embeddings", False)),
                bias=c.get("model_type") == "qwen2", prm="ProcessRewardModel" in arch,
                head_dim=c.get("head_dim"))


# Context windows (``max_position_embeddings`` of each config.json on the hub) of the same models, for the
# length budgets of a dry run (sphere/budgets.py) and the memory plan; used only when the model is not local.
KNOWN_WINDOWS: dict[str, int] = {
    "Qwen/Qwen2.5-7B-Instruct": 32768,
    "Qwen/Qwen2.5-3B-Instruct": 32768,
    "Qwen/Qwen2.5-1.5B-Instruct": 32768,
    "Qwen/Qwen2.5-Math-7B-Instruct": 4096,
    "Qwen/Qwen2.5-Math-1.5B-Instruct": 4096,
    "Qwen/Qwen2.5-Math-PRM-7B": 4096,
    "microsoft/phi-4": 16384,
    "microsoft/Phi-4-mini-instruct": 131072,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": 131072,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": 131072,
}


def local_model_dir(name: str) -> Path | None:
    """The local directory of ``name``: a directory, a shipped name (stand-ins, the mini models), or a hub id
    whose snapshot is already in the local Hugging Face cache (never downloads); None otherwise."""
    s = str(name)
    if s in (*STANDIN_NAMES, "mini", "mini-small"):  # names of shipped local models
        try:
            return Path(resolve_model(s))
        except (FileNotFoundError, ValueError):
            return None
    p = Path(s).expanduser()
    if (p / "config.json").is_file():
        return p
    if s.count("/") == 1 and not p.exists() and not s.startswith((".", "/", "~")):
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(s, "config.json")
        except Exception:  # noqa: BLE001 - no cache, a bad id: not local
            return None
        if isinstance(hit, str) and Path(hit).is_file():
            return Path(hit).parent
    return None


def model_config(name: str) -> dict | None:
    """``config.json`` of ``name`` when it is local (see ``local_model_dir``); None otherwise."""
    d = local_model_dir(name)
    if d is None or not (d / "config.json").is_file():
        return None
    try:
        return json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return None


def model_shape(name: str) -> dict | None:
    """The shape of a local model directory (its config.json) or of a known hub model; None if unknown."""
    c = model_config(name)
    if c is not None:
        try:
            return shape_from_config(c)
        except (KeyError, ValueError, TypeError):
            return None
    return dict(KNOWN_SHAPES[name]) if name in KNOWN_SHAPES else None


def model_window(name: str) -> tuple[int | None, str]:
    """(``max_position_embeddings``, where it came from) of a local model or a known hub model; (None,
    "unknown") otherwise."""
    c = model_config(name)
    if c is not None:
        v = c.get("text_config", c).get("max_position_embeddings")
        if isinstance(v, int) and v > 0:
            return v, "config.json"
    if name in KNOWN_WINDOWS:
        return KNOWN_WINDOWS[name], "hub config.json, known"
    return None, "unknown"
