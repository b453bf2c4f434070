"""Stand-in models with the shape of the SPHERE paper's models, built locally in minutes (no hub, ever).

The paper's setting (``experiment=paper_qwen2_5_7b``) needs a Qwen2.5-Instruct policy, a smaller model of
the same family and a Qwen2.5-Math-PRM. ``build(out_dir)`` makes a family of that shape that a CPU runs:

- **tokenizer** (shared by all three): the mini world's digit-level byte-BPE vocabulary
  (``assets/mini/mini``) in Qwen2's text pipeline (NFC, Qwen2's pre-tokenizer regex, byte level: what
  transformers' ``Qwen2Tokenizer`` installs for any ``model_type=qwen2``), plus Qwen2.5's ChatML special
  tokens (``<|endoftext|>`` = pad, ``<|im_start|>``, ``<|im_end|>`` = chat EOS), the PRM's step tag
  ``<extra_0>`` and a few whole-phrase tokens for the fixed prompt sentences (``PHRASE_TOKENS``), with the
  real Qwen2.5-Instruct chat template (``templates/qwen2_5_instruct.jinja``, see ``templates/SOURCES.md``).
  Mini-world text gets exactly the ids the mini models were trained on (see ``build_tokenizer``).
- **policy** ``standin-qwen2_5``: ``Qwen2ForCausalLM`` (head_dim 32, q/k/v biases). It starts as an exact
  conversion of the shipped mini policy (a Llama; Qwen2 = Llama + q/k/v biases, zero biases give the same
  function), gets embeddings for the new tokens, and is fine-tuned briefly on mini-world problems in chat
  form: the prompt ``sphere.prompts.header_text`` renders for the ``qwen2_5`` family (default system
  message, user = problem + "\\n" + instruction, generation prompt), the answer = the solution's steps
  joined by "\\n\\n", the last step ``The answer is \\boxed{N}.``, then ``<|im_end|>``. A share of the
  examples uses the family's stage-2 reflection prompt (a flawed attempt, then a solution). The training
  solutions keep the mini policy's planted misconception (conf/mini/policy.yaml ``slip_kinds``), so the
  stand-in errs like the mini policy: greedy is often wrong, sampling often right.
- **small** ``standin-qwen2_5-small``: the shipped mini-small converted the same way with a 4x narrower
  MLP (the intermediate neurons of largest weight-norm product kept), fine-tuned the same way (no
  reflection prompts, no planted misconception: conf/mini/small.yaml has none).
- **PRM** ``standin-qwen2_5-prm``: ``Qwen2ForProcessRewardModel`` (a Qwen2 body + ``score = Linear(h,h),
  ReLU, Linear(h,2)``). The body is the fine-tuned policy's (Qwen2.5-Math-PRM is also initialised from its
  policy model) plus two layers that start as the identity; it is trained on pairs that share a correct
  prefix, one continued with the right next step and one with that step corrupted (``corrupt_steps``: a
  wrong result, a forgotten carry, the divide-as-multiply misconception, a wrongly copied running total, a
  wrong boxed answer), with a pointwise loss on every step tag plus a pairwise (Bradley-Terry) loss on the
  last one, in the Qwen PRM input format (system = the math instruction, user = problem, assistant = steps
  each followed by ``<extra_0>``, chat-templated). ``sphere.rewards.prm.PRMScorer`` loads it with
  transformers and with vLLM. A 2-layer, 64-wide model judges arithmetic only roughly: it catches the
  misconception reliably and other errors well above chance but far from always (recipe.json ``metrics``).

Everything is single-threaded, deterministic torch (the same machine and library versions give the same
bytes; ``recipe.json`` records the sha256 of each ``model.safetensors``). Shipped in ``assets/standin/``;
``standin_path(name)`` finds them, ``sphere.models.resolve_model`` resolves the names.

Usage::

    python -m sphere.testing.standin OUT_DIR            # build + measure (~10 min on one core)
    python -m sphere.testing.standin OUT_DIR --no-eval  # build only
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import time
from pathlib import Path

RECIPE_VERSION = 1
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
QWEN2_5_TEMPLATE = TEMPLATES_DIR / "qwen2_5_instruct.jinja"
STEP_TAG = "<extra_0>"
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
NEW_SPECIAL_TOKENS = [IM_START, IM_END, STEP_TAG]  # appended after the mini vocabulary, in this order
PRM_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# transformers' Qwen2Tokenizer pre-tokenizer (= Qwen2.5's tokenizer.json): digits one per piece, spaces apart.
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                           r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Fixed prompt sentences added as ordinary (non-special) whole-phrase tokens. The mini BPE vocabulary was
# trained on mini-world text only and spells each in ~55 tokens; as one token each the chat prompt of a
# mini problem is ~57 tokens instead of ~170, so the problem stays near the solution as in the mini
# models' training prompt (and every sequence is cheaper). They only change how these exact strings tokenize.
PHRASE_TOKENS = [
    QWEN_DEFAULT_SYSTEM,
    PRM_SYSTEM,  # = the qwen2_5 family's instruction and the PRM's system message
    "Here is an attempted solution:",  # the stage-2 reflection prompt (conf/prompt/qwen2_5.yaml)
    "This attempt contains a mistake. Find the first incorrect step and write a corrected solution.",
]

# model name -> (role, directory name under assets/standin)
NAMES = {
    "standin-qwen2_5": "policy",
    "standin-qwen2_5-small": "small",
    "standin-qwen2_5-prm": "prm",
}
DIR_OF = {v: k for k, v in NAMES.items()}

RECIPE = {
    "version": RECIPE_VERSION,
    "seed": 0,
    "family": "qwen2_5",  # conf/prompt/<family>.yaml: the chat prompt the models are trained on
    "world": {},  # sphere.mini.world.WorldSpec defaults (the mini benchmark's world)
    "policy": {
        "source": "mini",  # assets/mini/<source>: the Llama converted to Qwen2
        "intermediate_size": None,  # None = keep the MLP width
        "n_problems": 6000,
        "reflection_share": 0.15,  # share of examples in the stage-2 reflection prompt
        "n_drills": 0,  # arithmetic drills in chat form (sphere.mini.pretrain.drill_examples)
        "slip_rate": 0.9,  # planted misconception of the source recipe (conf/mini/policy.yaml)
        "slip_kinds": ["divide"],
        "steps": 400,
        "batch_size": 16,
        "lr": 2e-3,
        "warmup": 20,
    },
    "small": {
        "source": "mini-small",
        "intermediate_size": 64,  # narrower MLP than the policy's 256
        "n_problems": 6000,
        "reflection_share": 0.0,
        "n_drills": 0,
        "slip_rate": 0.0,  # conf/mini/small.yaml has no planted slips
        "slip_kinds": ["divide"],
        "steps": 300,
        "batch_size": 16,
        "lr": 2e-3,
        "warmup": 20,
    },
    "prm": {
        "base": "policy",  # body initialised from the fine-tuned stand-in policy
        "extra_layers": 2,  # transformer layers added on top of the policy's (identity at init)
        "n_problems": 8000,  # one (right, corrupted) pair of PRM inputs per problem
        "steps": 2000,  # measured: 800 steps -> pairwise 0.71, 2000 -> 0.82 (held-out dev pairs)
        "batch_size": 8,  # pairs per step (16 sequences)
        "lr": 5e-4,  # the policy's layers
        "new_lr": 3e-3,  # the added layers
        "head_lr": 3e-3,  # the score head
        "pair_weight": 1.0,  # Bradley-Terry loss weight (plus the pointwise loss on every step tag)
        "warmup": 20,
    },
    "eval": {"n": 200, "pass_k": 8, "temperature": 0.8, "max_new_tokens": 160, "batch_size": 200,
             "prm_n": 300},
}


# ---------------------------------------------------------------------------------------------- paths
def assets_root() -> Path:
    """``<repo>/assets/standin`` (next to ``assets/mini``)."""
    from sphere.models import standin_path as _p

    return _p(DIR_OF["policy"]).parent


def standin_path(name: str) -> Path:
    """The shipped stand-in checkpoint ``name`` (``standin-qwen2_5``, ``standin-qwen2_5-small``,
    ``standin-qwen2_5-prm``; the roles ``policy`` / ``small`` / ``prm`` work too)."""
    from sphere.models import standin_path as _p

    return _p(DIR_OF.get(name, name))


def chat_template() -> str:
    return QWEN2_5_TEMPLATE.read_text()


# ------------------------------------------------------------------------------------------ utilities
def _deterministic():
    """Single-threaded deterministic torch for the duration (the mini pretraining's own guard)."""
    from sphere.mini.pretrain import _deterministic as deterministic

    return deterministic(1)


def _log(msg: str) -> None:
    print(f"standin: {msg}", file=sys.stderr, flush=True)


def _family() -> dict:
    from sphere.prompts import load_family

    return load_family(RECIPE["family"])


def _world():
    from sphere.mini.world import WorldSpec

    return WorldSpec.from_mapping(RECIPE["world"])


def _mini_source(name: str) -> Path:
    from sphere.mini import assets_dir, verify_checkpoint

    d = assets_dir() / name
    bad = verify_checkpoint(d)
    if bad:
        raise FileNotFoundError(f"stand-in build: source checkpoint {d} unusable: {'; '.join(bad)}")
    return d


# ------------------------------------------------------------------------------------------ tokenizer
def build_tokenizer(src: Path, specials: list[str] | None = None, eos: str = IM_END, pad: str = ENDOFTEXT,
                    template: str | None = None, words: list[str] | None = None):
    """The mini tokenizer in Qwen2's text pipeline + ChatML specials + step tag + phrase tokens, chat EOS
    ``<|im_end|>``, the Qwen2.5-Instruct chat template.

    transformers 5 loads every ``model_type=qwen2`` tokenizer as ``Qwen2Tokenizer``, which installs Qwen2's
    normaliser (NFC), pre-tokenizer (digits one per piece, the space before a number a piece of its own)
    and byte-level decoder whatever tokenizer.json says; the saved tokenizer uses exactly that pipeline, so
    every loader (transformers, vLLM, the build) tokenises the same way. The mini tokenizer spells a number
    " 14" as ``Ġ1 4`` (space and first digit one token), which that pre-tokenizer cannot produce: its
    ``Ġ1``..``Ġ9`` vocabulary entries become the added tokens " 1".." 9" (same ids; added tokens are
    matched before pre-tokenization), so mini-world text gets exactly the ids the mini models were trained
    on and the converted models start from the mini models' accuracy.

    The defaults make the Qwen2.5 family's tokenizer; ``sphere.testing.standin_families`` passes other
    ``specials`` (special tokens appended in order), ``eos``/``pad``, a chat ``template`` (text) and
    ``words`` (non-special added tokens such as R1's ``<think>``, appended after the phrase tokens)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    data = json.loads((src / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    digits = [d for d in "0123456789" if "\u0120" + d in vocab]
    for d in digits:
        vocab[" " + d] = vocab.pop("\u0120" + d)
    gone = [["\u0120", d] for d in digits]  # the merges that made them
    data["model"]["merges"] = [m for m in data["model"]["merges"]
                               if (m.split(" ") if isinstance(m, str) else list(m)) not in gone]
    bt = Tokenizer.from_str(json.dumps(data))
    bt.normalizer = normalizers.NFC()
    bt.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bt.decoder = decoders.ByteLevel()
    bt.add_tokens([AddedToken(" " + d, special=False, normalized=False) for d in digits])
    tok = PreTrainedTokenizerFast(tokenizer_object=bt, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT,
                                  bos_token=None)
    base = len(tok)
    if tok.convert_tokens_to_ids(ENDOFTEXT) != 0:
        raise ValueError(f"{src}: expected <|endoftext|> = id 0")
    specials = list(NEW_SPECIAL_TOKENS if specials is None else specials)
    words = list(words or [])
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.add_tokens([AddedToken(p, special=False, normalized=False) for p in PHRASE_TOKENS + words])
    ids = tok.convert_tokens_to_ids(specials + PHRASE_TOKENS + words)
    if ids != list(range(base, base + len(specials) + len(PHRASE_TOKENS) + len(words))):
        raise ValueError(f"added tokens got ids {ids}, expected {base}..")
    tok.eos_token = eos
    tok.pad_token = pad
    tok.chat_template = chat_template() if template is None else template
    tok.model_max_length = 2048
    tok.padding_side = "left"
    return tok


def save_tokenizer(tok, out: Path) -> None:
    tok.save_pretrained(str(out))
    p = out / "tokenizer_config.json"
    cfg = json.loads(p.read_text())
    for k in ("is_local", "local_files_only"):
        cfg.pop(k, None)
    if cfg.get("tokenizer_class") == "TokenizersBackend":  # loadable by transformers 4.x / vLLM too
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    p.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------ Llama -> Qwen2
def qwen2_config(src_cfg, tok, intermediate_size: int | None = None, **extra):
    from transformers import Qwen2Config

    heads = int(src_cfg.num_attention_heads)
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=int(src_cfg.hidden_size),
        intermediate_size=int(intermediate_size or src_cfg.intermediate_size),
        num_hidden_layers=int(src_cfg.num_hidden_layers), num_attention_heads=heads,
        num_key_value_heads=int(src_cfg.num_key_value_heads), head_dim=int(src_cfg.hidden_size) // heads,
        hidden_act=src_cfg.hidden_act, max_position_embeddings=2048, rms_norm_eps=float(src_cfg.rms_norm_eps),
        rope_theta=float((getattr(src_cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)),
        tie_word_embeddings=bool(src_cfg.tie_word_embeddings), use_sliding_window=False,
        bos_token_id=tok.convert_tokens_to_ids(ENDOFTEXT), eos_token_id=tok.convert_tokens_to_ids(IM_END),
        pad_token_id=tok.convert_tokens_to_ids(ENDOFTEXT), attention_dropout=0.0, use_cache=True,
        torch_dtype="float32", **extra,
    )
    return cfg


def llama_state(src: Path, tok, intermediate_size: int | None = None):
    """``(source config, Llama state dict)`` of the mini model at ``src`` with embedding rows for the tokens
    ``tok`` adds after the mini vocabulary (a special token: the mean row; an ordinary added token such as
    a phrase: the mean row of its pieces under the mini tokenizer) and, with ``intermediate_size``, the MLP
    narrowed to the neurons of largest ``|gate| * |up| * |down|`` weight norm product."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    src_cfg = AutoConfig.from_pretrained(str(src))
    llama = LlamaForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    sd = {k: v.detach().clone() for k, v in llama.state_dict().items()}
    base = AutoTokenizer.from_pretrained(str(src))
    n_base = sd["model.embed_tokens.weight"].shape[0]
    special = set(tok.all_special_tokens)
    added = [tok.convert_ids_to_tokens(i) for i in range(n_base, len(tok))]
    if len(base) != n_base or len(tok) <= n_base:
        raise ValueError(f"tokenizer of {len(tok)} tokens does not extend {src}")
    pieces = {t: base(t, add_special_tokens=False)["input_ids"] for t in added if t not in special}

    def grow(w):
        rows = [w[pieces[t]].mean(0) if t in pieces else w.mean(0) for t in added]
        return torch.cat([w, torch.stack(rows)])

    sd["model.embed_tokens.weight"] = grow(sd["model.embed_tokens.weight"])
    if not src_cfg.tie_word_embeddings:
        sd["lm_head.weight"] = grow(sd["lm_head.weight"])
    else:
        sd.pop("lm_head.weight", None)
    if intermediate_size and intermediate_size < src_cfg.intermediate_size:
        for i in range(int(src_cfg.num_hidden_layers)):
            p = f"model.layers.{i}"
            g, u, d = (sd[f"{p}.mlp.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
            score = g.norm(dim=1) * u.norm(dim=1) * d.norm(dim=0)
            keep = torch.sort(torch.topk(score, intermediate_size).indices).values
            sd[f"{p}.mlp.gate_proj.weight"] = g[keep].clone()
            sd[f"{p}.mlp.up_proj.weight"] = u[keep].clone()
            sd[f"{p}.mlp.down_proj.weight"] = d[:, keep].clone()
    return src_cfg, sd


def load_converted(model, sd: dict, what: str):
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = bool(model.config.tie_word_embeddings)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"{what} conversion: missing {missing}, unexpected {unexpected}")
    if tied:
        model.tie_weights()
    return model


def convert_llama(src: Path, tok, intermediate_size: int | None = None, eos: str = IM_END, bos: str = ENDOFTEXT):
    """``Qwen2ForCausalLM`` computing what the Llama at ``src`` computes (zero q/k/v biases), grown and
    narrowed as ``llama_state`` says."""
    import torch
    from transformers import Qwen2ForCausalLM

    src_cfg, sd = llama_state(src, tok, intermediate_size)
    cfg = qwen2_config(src_cfg, tok, intermediate_size)
    cfg.bos_token_id, cfg.eos_token_id = tok.convert_tokens_to_ids(bos), tok.convert_tokens_to_ids(eos)
    for i in range(cfg.num_hidden_layers):
        for n in ("q_proj", "k_proj", "v_proj"):
            w = sd[f"model.layers.{i}.self_attn.{n}.weight"]
            sd[f"model.layers.{i}.self_attn.{n}.bias"] = torch.zeros(w.shape[0])
    return load_converted(Qwen2ForCausalLM(cfg), sd, "Llama -> Qwen2")


# ------------------------------------------------------------------------------------ chat-form data
def _corrupt_attempt(solution: str, rng: random.Random) -> str:
    """A flawed copy of a solution for reflection prompts: one equation gets a wrong result, later steps
    continue from it, the boxed answer follows."""
    steps = corrupt_steps(solution.split("\n\n"), rng, force=True)[0]
    return "\n\n".join(steps)


def chat_examples(tok, problems: list[dict], fam: dict, reflection_share: float, rng: random.Random,
                  end: str = IM_END) -> list[tuple[list[int], int]]:
    """(ids, prompt length) per problem: the chat prompt (``sphere.prompts``) + solution + ``<|im_end|>``."""
    from sphere.prompts import build_reflection_text, header_text

    heads = []
    for p in problems:
        if reflection_share and rng.random() < reflection_share:
            attempt = _corrupt_attempt(p["solution"], rng).split("\n\n")
            heads.append(build_reflection_text(tok, p["problem"], attempt, fam))
        else:
            heads.append(header_text(tok, p["problem"], fam))
    h_ids = tok(heads, add_special_tokens=False)["input_ids"]
    f_ids = tok([h + p["solution"] + end for h, p in zip(heads, problems, strict=True)],
                add_special_tokens=False)["input_ids"]
    out = []
    for a, full, p in zip(h_ids, f_ids, problems, strict=True):
        if full[: len(a)] != a:
            raise ValueError(f"{p['id']}: the chat prompt is not a token prefix of prompt + solution")
        out.append((full, len(a)))
    return out


def _lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    import math

    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * t))


def sft(model, pools: list[list[tuple[list[int], int]]], steps: int, batch_size: int, lr: float, warmup: int,
        seed: int, pad_id: int, what: str = "sft") -> list[float]:
    """Completion-only causal-LM fine-tuning (AdamW, warmup + cosine), plain torch, one thread. Each batch
    comes from one pool (examples of similar length: little padding), pools drawn in proportion to size."""
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    pools = [list(p) for p in pools if p]
    orders = [rng.sample(range(len(p)), len(p)) for p in pools]
    pos = [0] * len(pools)
    sizes = [len(p) for p in pools]
    losses = []
    model.train()
    for step in range(steps):
        k = rng.choices(range(len(pools)), weights=sizes)[0]
        if pos[k] + batch_size > len(orders[k]):
            rng.shuffle(orders[k])
            pos[k] = 0
        batch = [pools[k][i] for i in orders[k][pos[k]: pos[k] + batch_size]]
        pos[k] += batch_size
        width = max(len(ids) for ids, _ in batch)
        x = torch.full((len(batch), width), pad_id, dtype=torch.long)
        y = torch.full((len(batch), width), -100, dtype=torch.long)
        m = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (ids, n_prompt) in enumerate(batch):  # right padding for training
            x[i, : len(ids)] = torch.tensor(ids)
            m[i, : len(ids)] = 1
            y[i, n_prompt: len(ids)] = torch.tensor(ids[n_prompt:])
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, warmup, lr)
        loss = model(input_ids=x, attention_mask=m, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.item()))
        if step % 100 == 0 or step == steps - 1:
            _log(f"{what} step {step}/{steps} loss {losses[-1]:.3f}")
    model.eval()
    return losses


def save_causal_lm(model, tok, out: Path) -> None:
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True
    im_end, eot = tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)
    # Qwen2.5-Instruct's generation config: chat EOS <|im_end|> and <|endoftext|>; no sampling defaults
    # (sphere always passes its own sampling parameters).
    model.generation_config = GenerationConfig(bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot)
    model.save_pretrained(str(out), safe_serialization=True)
    save_tokenizer(tok, out)


# --------------------------------------------------------------------------------------- PRM data
_EQ_STEP = re.compile(r"^(?P<head>.*?)(?P<a>\d+) (?P<op>[-+*/]) (?P<b>\d+) = (?P<c>\d+)(?P<tail>\.?)$")


def _exact(op: str, a: int, b: int) -> int | None:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a // b if b and a % b == 0 else None


def corrupt_steps(steps: list[str], rng: random.Random, force: bool = False) -> tuple[list[str], list[bool]]:
    """A copy of the (correct) ``steps`` with at most one planted error and per-step labels: a step is
    correct iff it and all earlier steps are. Errors: a wrong result (small offset, a forgotten carry of
    10, the divide-as-multiply misconception), a wrong running total copied into the next equation, a
    boxed answer that is not the last result. Later equations continue from the written values."""
    eq_idx = [i for i, s in enumerate(steps) if _EQ_STEP.match(s)]
    if not force and rng.random() >= 0.5 or not eq_idx:
        return list(steps), [True] * len(steps)
    kind = rng.choice(["offset", "offset", "carry", "misconception", "copy", "answer"])
    where = rng.choice(eq_idx)
    if kind == "copy" and where == eq_idx[0]:
        kind = "offset"
    out, ok, total, bad = [], [], None, False
    for i, s in enumerate(steps):
        m = _EQ_STEP.match(s)
        if m is None:
            if "\\boxed{" in s and total is not None:
                val = total
                if kind == "answer" and not bad:
                    val = total + rng.choice([-10, -2, -1, 1, 2, 10])
                    val = val if val > 0 else total + 1
                    bad = True
                s = re.sub(r"\\boxed\{[^{}]*\}", "\\\\boxed{" + str(val) + "}", s)
            out.append(s)
            ok.append(not bad)
            continue
        a, op, b = int(m["a"]), m["op"], int(m["b"])
        if total is not None:  # continue from the written running total
            a = total
        if i == where and kind == "copy":
            a = a + rng.choice([-10, -3, -2, -1, 1, 2, 3, 10])
            a = max(a, 1)
            bad = True
        c = _exact(op, a, b)
        if c is None:  # an inexact division after an earlier error: write the integer quotient
            c = a // b
        if i == where and kind in ("offset", "carry", "misconception"):
            if kind == "misconception" and op == "/":
                c = a * b
            elif kind == "carry":
                c = c + rng.choice([-10, 10])
            else:
                c = c + rng.choice([-3, -2, -1, 1, 2, 3])
            if c == _exact(op, a, b):
                c += 1
            c = c if c >= 0 else _exact(op, a, b) + 1
            bad = True
        total = c
        out.append(f"{m['head']}{a} {op} {b} = {c}{m['tail']}")
        ok.append(not bad)
    return out, ok


def prm_text(tok, problem: str, steps: list[str]) -> str:
    msgs = [{"role": "system", "content": PRM_SYSTEM}, {"role": "user", "content": problem},
            {"role": "assistant", "content": STEP_TAG.join(steps) + STEP_TAG}]
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)


def build_prm(policy_dir: Path, tok, problems: list[dict], r: dict, seed: int):
    """A ``QwenProcessRewardModel`` with the policy's body, trained on step correctness."""
    import torch
    from transformers import AutoConfig

    from sphere.rewards.prm import QwenProcessRewardModel

    pcfg = AutoConfig.from_pretrained(str(policy_dir))
    extra = int(r.get("extra_layers", 0))
    pcfg.num_hidden_layers = int(pcfg.num_hidden_layers) + extra
    cfg = qwen2_config(pcfg, tok, num_labels=2)
    cfg.architectures = ["Qwen2ForProcessRewardModel"]
    cfg.tie_word_embeddings = False
    torch.manual_seed(seed)
    model = QwenProcessRewardModel(cfg)
    from safetensors.torch import load_file

    body = {k[len("model."):]: v for k, v in load_file(str(policy_dir / "model.safetensors")).items()
            if k.startswith("model.")}
    missing, unexpected = model.model.load_state_dict(body, strict=False)
    n_old = cfg.num_hidden_layers - extra
    added = tuple(f"layers.{i}." for i in range(n_old, cfg.num_hidden_layers))
    missing = [k for k in missing if not k.startswith(added)]
    if missing or unexpected:
        raise RuntimeError(f"PRM body from {policy_dir}: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():  # added layers start as the identity (zero output projections)
        for i in range(n_old, cfg.num_hidden_layers):
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    rng = random.Random(seed + 1)
    data = prm_pair_examples(tok, problems, rng)
    pad = tok.convert_tokens_to_ids(ENDOFTEXT)
    new = [p for i in range(n_old, cfg.num_hidden_layers) for p in model.model.layers[i].parameters()]
    new_ids = {id(p) for p in new}
    old = [p for p in model.model.parameters() if id(p) not in new_ids]
    groups = [(old, float(r["lr"])), (new, float(r.get("new_lr", r["lr"]))),
              (list(model.score.parameters()), float(r["head_lr"]))]
    groups = [(ps, lr) for ps, lr in groups if ps]
    opt = torch.optim.AdamW([{"params": ps, "lr": lr} for ps, lr in groups], weight_decay=0.0)
    base_lrs = [lr for _, lr in groups]
    order = list(range(len(data)))
    rng.shuffle(order)
    pos, losses, bs = 0, [], int(r["batch_size"])
    steps = int(r["steps"])
    model.train()
    for step in range(steps):
        if pos + bs > len(order):
            rng.shuffle(order)
            pos = 0
        rows = [row for i in order[pos: pos + bs] for row in data[i]]  # good, bad, good, bad, ...
        pos += bs
        width = max(len(ids) for ids, _ in rows)
        x = torch.full((len(rows), width), pad, dtype=torch.long)
        m = torch.zeros((len(rows), width), dtype=torch.long)
        y = torch.full((len(rows), width), -100, dtype=torch.long)
        last = torch.zeros(len(rows), dtype=torch.long)
        for i, (ids, tp) in enumerate(rows):
            x[i, : len(ids)] = torch.tensor(ids)
            m[i, : len(ids)] = 1
            y[i, tp] = 1
            if i % 2:
                y[i, tp[-1]] = 0
            last[i] = tp[-1]
        for g, base in zip(opt.param_groups, base_lrs, strict=True):
            g["lr"] = _lr_at(step, steps, int(r["warmup"]), base)
        logits = model(x, m)
        # pointwise: every step tag (the prefix steps are correct, the last one is right or wrong) ...
        point = torch.nn.functional.cross_entropy(logits.reshape(-1, 2), y.reshape(-1), ignore_index=-100)
        # ... and pairwise (Bradley-Terry): the right last step above its corrupted twin (same prefix)
        z = logits[torch.arange(len(rows)), last]
        margin = (z[:, 1] - z[:, 0]).view(-1, 2)
        pair = torch.nn.functional.softplus(margin[:, 1] - margin[:, 0]).mean()
        loss = point + float(r.get("pair_weight", 1.0)) * pair
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(pair.item()))
        if step % 50 == 0 or step == steps - 1:
            _log(f"prm step {step}/{steps} loss {float(loss.item()):.3f} pair {losses[-1]:.3f}")
    model.eval()
    return model, cfg, losses


def prm_pair_examples(tok, problems: list[dict], rng: random.Random):
    """Per problem a pair of PRM inputs ((ids, tag positions) right, (ids, tag positions) wrong): the
    solution's steps up to a random step j, and the same with step j corrupted (``corrupt_steps``)."""
    tag = tok.convert_tokens_to_ids(STEP_TAG)
    texts, n_steps = [], []
    for p in problems:
        steps = p["solution"].split("\n\n")
        bad, ok = corrupt_steps(steps, rng, force=True)
        if all(ok):
            continue
        j = ok.index(False)
        texts += [prm_text(tok, p["problem"], steps[: j + 1]), prm_text(tok, p["problem"], bad[: j + 1])]
        n_steps.append(j + 1)
    rows = []
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        rows.append((ids, [i for i, t in enumerate(ids) if t == tag]))
    for k, n in enumerate(n_steps):
        if len(rows[2 * k][1]) != n or len(rows[2 * k + 1][1]) != n:
            raise ValueError(f"PRM example {k}: step tags do not match its {n} steps")
    return [(rows[2 * k], rows[2 * k + 1]) for k in range(len(n_steps))]


def save_prm(model, cfg, tok, out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(out))
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    save_tokenizer(tok, out)


# ------------------------------------------------------------------------------------------ evaluation
def heldout_problems(n: int, split: str = "test") -> list[dict]:
    from sphere.mini.world import load_mini_benchmark

    return load_mini_benchmark(split, n, RECIPE["world"])


def evaluate_policy(model_dir: Path, n: int | None = None, pass_k: int | None = None,
                    temperature: float | None = None, seed: int = 0) -> dict:
    """Greedy accuracy and pass@k (T-sampling, top_p 1, no top_k) on ``n`` held-out mini problems in chat
    form (``sphere.prompts`` header of the ``qwen2_5`` family), with plain ``model.generate``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sphere.mini.pretrain import is_correct
    from sphere.prompts import header_text

    ev = RECIPE["eval"]
    n = int(n or ev["n"])
    k = int(ev["pass_k"] if pass_k is None else pass_k)
    temp = float(temperature or ev["temperature"])
    probs = heldout_problems(n)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    fam = _family()
    prompts = [header_text(tok, p["problem"], fam) for p in probs]
    eos = model.generation_config.eos_token_id
    bs = int(ev["batch_size"])

    def run(texts, sample):
        outs = []
        for i in range(0, len(texts), bs):
            enc = tok(texts[i: i + bs], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                gen = model.generate(**enc, max_new_tokens=int(ev["max_new_tokens"]), do_sample=sample,
                                     temperature=temp if sample else None, top_k=0 if sample else None,
                                     top_p=1.0 if sample else None, pad_token_id=tok.pad_token_id,
                                     eos_token_id=eos)
            outs += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=False)
        return outs

    t0 = time.time()
    with _deterministic():
        greedy = run(prompts, False)
        res = {"n": n}
        g_ok = [is_correct(c, p["answer"]) for c, p in zip(greedy, probs, strict=True)]
        res["greedy_accuracy"] = sum(g_ok) / n
        res["greedy_ends_im_end"] = sum(IM_END in c for c in greedy) / n
        if k:
            torch.manual_seed(seed)
            sampled = run([q for q in prompts for _ in range(k)], True)
            s_ok = [is_correct(c, probs[i // k]["answer"]) for i, c in enumerate(sampled)]
            res[f"pass@{k}"] = sum(any(s_ok[i * k:(i + 1) * k]) for i in range(n)) / n
            res["sampled_accuracy"] = sum(s_ok) / len(s_ok)
            res["temperature"] = temp
            mixed = sum(0 < sum(s_ok[i * k:(i + 1) * k]) < k for i in range(n))
            res["share_mixed"] = mixed / n  # problems with both right and wrong samples
    res["eval_seconds"] = round(time.time() - t0, 1)
    res["example"] = greedy[0]
    return res


def prm_pairs(tok, n: int, seed: int = 0) -> list[tuple[str, list[str], list[str]]]:
    """Held-out pairs (problem, prefix + correct step, prefix + corrupted step): same problem, same correct
    prefix, the step at a random equation position correct vs with a planted error."""
    rng = random.Random(seed)
    out = []
    for p in heldout_problems(n, "dev"):
        steps = p["solution"].split("\n\n")
        while True:
            bad, ok = corrupt_steps(steps, rng, force=True)
            if False in ok:
                break
        j = ok.index(False)
        out.append((p["problem"], steps[: j + 1], bad[: j + 1]))
    return out


def evaluate_prm(scorer, n: int | None = None) -> dict:
    """Pairwise accuracy (correct step scored above its corrupted twin, same prefix) and AUROC of the last
    step's score over all those steps. ``scorer``: anything with ``score(items)`` (PRMScorer)."""
    n = int(n or RECIPE["eval"]["prm_n"])
    pairs = prm_pairs(None, n)
    items = [(q, good) for q, good, _ in pairs] + [(q, bad) for q, _, bad in pairs]
    t0 = time.time()
    scores = scorer.score(items)
    last = [s[-1] for s in scores]
    good, bad = last[:n], last[n:]
    pair_acc = sum((g > b) + 0.5 * (g == b) for g, b in zip(good, bad, strict=True)) / n
    auc = sum((g > b) + 0.5 * (g == b) for g in good for b in bad) / (n * n)
    return {"n_pairs": n, "pairwise_accuracy": round(pair_acc, 4), "auroc": round(auc, 4),
            "mean_correct": round(sum(good) / n, 4), "mean_corrupted": round(sum(bad) / n, 4),
            "seconds": round(time.time() - t0, 1)}


# --------------------------------------------------------------------------------------------- build
def _train_causal(role: str, tok, fam: dict, seed: int, out: Path) -> dict:
    from sphere.mini.world import plant_slips, training_problems

    r = RECIPE[role]
    t0 = time.time()
    src = _mini_source(r["source"])
    model = convert_llama(src, tok, r["intermediate_size"])
    world = _world()
    probs = training_problems(int(r["n_problems"]), seed + (11 if role == "policy" else 23), world)
    probs = plant_slips(probs, float(r["slip_rate"]), seed + 13, world.max_value, tuple(r["slip_kinds"]))
    ex = chat_examples(tok, probs, fam, float(r["reflection_share"]), random.Random(seed + 5))
    pools = [[e for e in ex if len(e[0]) <= 160], [e for e in ex if len(e[0]) > 160]]  # reflection prompts
    if r.get("n_drills"):
        from sphere.mini.pretrain import drill_examples

        drills = drill_examples(int(r["n_drills"]), 8, seed + 1, world, slip_rate=float(r["slip_rate"]),
                                slip_kinds=tuple(r["slip_kinds"]))
        pools.append(chat_examples(tok, drills, fam, 0.0, random.Random(seed + 6)))
    losses = sft(model, pools, int(r["steps"]), int(r["batch_size"]), float(r["lr"]), int(r["warmup"]), seed,
                 tok.pad_token_id, what=role)
    save_causal_lm(model, tok, out)
    return {"train_seconds": round(time.time() - t0, 1), "final_loss": round(sum(losses[-20:]) / 20, 4),
            "n_params": sum(p.numel() for p in model.parameters()), "source": str(r["source"])}


def write_record(out: Path, role: str, stats: dict, metrics: dict, seed: int) -> dict:
    import tokenizers
    import torch
    import transformers

    from sphere.mini.pretrain import sha256_file

    rec = {
        "name": DIR_OF[role], "role": role, "seed": seed, "recipe": RECIPE,
        "command": "python -m sphere.testing.standin OUT_DIR",
        "train": stats, "metrics": metrics,
        "weights_sha256": sha256_file(out / "model.safetensors"),
        "chat_template": "sphere/testing/templates/qwen2_5_instruct.jinja (Qwen/Qwen2.5-7B-Instruct)",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__},
    }
    (out / "recipe.json").write_text(json.dumps(rec, indent=1) + "\n")
    return rec


def build(out_dir: str | os.PathLike, seed: int | None = None, evaluate: bool = True,
          steps_scale: float = 1.0) -> dict:
    """Build policy, small and PRM into ``out_dir/<name>``; ``steps_scale`` < 1 = a quick smoke build."""
    from sphere.mini.world import training_problems

    seed = int(RECIPE["seed"] if seed is None else seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if steps_scale != 1.0:
        for role in ("policy", "small", "prm"):
            RECIPE[role] = {**RECIPE[role], "steps": max(2, int(RECIPE[role]["steps"] * steps_scale))}
    t_all = time.time()
    summary = {}
    with _deterministic():
        tok = build_tokenizer(_mini_source("mini"))
        fam = _family()
        stats = {}
        for role in ("policy", "small"):
            _log(f"building {role}")
            stats[role] = _train_causal(role, tok, fam, seed, out / DIR_OF[role])
        _log("building prm")
        t0 = time.time()
        r = RECIPE["prm"]
        probs = training_problems(int(r["n_problems"]), seed + 31, _world())
        model, cfg, losses = build_prm(out / DIR_OF["policy"], tok, probs, r, seed)
        save_prm(model, cfg, tok, out / DIR_OF["prm"])
        stats["prm"] = {"train_seconds": round(time.time() - t0, 1),
                        "final_loss": round(sum(losses[-20:]) / 20, 4),
                        "n_params": sum(p.numel() for p in model.parameters())}
    build_seconds = round(time.time() - t_all, 1)
    for role in ("policy", "small", "prm"):
        d = out / DIR_OF[role]
        metrics = {}
        if evaluate:
            _log(f"evaluating {role}")
            if role == "prm":
                from sphere.rewards.prm import PRMScorer

                metrics = evaluate_prm(PRMScorer(None, model_path=d, engine="transformers"))
            else:
                metrics = evaluate_policy(d)
        stats[role]["build_seconds_total"] = build_seconds
        summary[role] = write_record(d, role, stats[role], metrics, seed)["metrics"]
        _log(f"{role}: {json.dumps({k: v for k, v in summary[role].items() if k != 'example'})}")
    summary["build_seconds"] = build_seconds
    return summary


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m sphere.testing.standin", description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--no-eval", action="store_true", help="build only (no measurements in recipe.json)")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="scale every step count (smoke builds)")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    res = build(a.out_dir, a.seed, evaluate=not a.no_eval, steps_scale=a.steps_scale)
    print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "example"} if isinstance(v, dict) else v)
                      for k, v in res.items()}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
