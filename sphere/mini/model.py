"""The mini model family: a digit-level byte-BPE tokenizer trained locally with `tokenizers`, and a tiny
Llama (transformers' LlamaForCausalLM) built from a config mapping.

Digits are split one per token (a space before a number stays with its first digit) so arithmetic is
learnable by a tiny model; everything else is byte-level BPE (GPT-2 style), so any text round-trips
and vLLM's incremental detokenizer works. There is no BOS: sequences start with the prompt's first
token; ``<|endoftext|>`` is EOS and padding.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab_size: int):
    """A ``PreTrainedTokenizerFast`` trained on ``texts`` (deterministic for the same texts)."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # one piece per digit; a space before a number stays with its first digit (" 4", "8")
            pre_tokenizers.Split(Regex(r" ?\d"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=None)
    fast.padding_side = "left"  # generation pads on the left
    fast.model_max_length = 1024
    return fast


def build_model(arch: dict, tokenizer, seed: int):
    """A freshly initialised ``LlamaForCausalLM`` from ``arch`` (conf/mini/*.yaml `model`)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = int(arch["hidden_size"])
    heads = int(arch["num_attention_heads"])
    if hidden % heads or hidden // heads < 32:
        raise ValueError(
            f"mini model: hidden_size/num_attention_heads = {hidden}/{heads} must divide evenly into a "
            "head_dim >= 32 (vLLM's CPU attention needs it)"
        )
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=int(arch["intermediate_size"]),
        num_hidden_layers=int(arch["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=int(arch["max_position_embeddings"]),
        rope_theta=float(arch.get("rope_theta", 10000.0)),
        tie_word_embeddings=bool(arch.get("tie_word_embeddings", True)),
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=float(arch.get("initializer_range", 0.02)),
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "recipe.json",
)


def missing_files(d: Path) -> list[str]:
    """Files of a mini checkpoint directory that are absent or empty."""
    return [f for f in REQUIRED_FILES if not (d / f).is_file() or (d / f).stat().st_size == 0]
