"""Tokenizer and weights of the stand-ins: the mini models' vocabulary and Llama weights in the shapes of the
paper's models (``sphere.standins.qwen2_5`` builds the Qwen2.5 family with it, ``families`` the
phi-4 and R1 ones).

Owns the Qwen2.5 tokenizer conventions (ChatML specials, the PRM's step tag, whole-phrase tokens for fixed
prompt sentences, the real chat templates in ``templates/``), ``build_tokenizer`` (the mini vocabulary in
Qwen2's text pipeline plus a family's specials and template) and the exact conversions of a mini Llama
(``llama_state``: embeddings grown for the added tokens, MLP optionally narrowed; ``convert_llama``: the
same function as a ``Qwen2ForCausalLM``).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers

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


def chat_template() -> str:
    return QWEN2_5_TEMPLATE.read_text()


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

    The defaults make the Qwen2.5 family's tokenizer; ``sphere.standins.families`` passes other
    ``specials`` (special tokens appended in order), ``eos``/``pad``, a chat ``template`` (text) and
    ``words`` (non-special added tokens such as R1's ``<think>``, appended after the phrase tokens)."""
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

    src_cfg = AutoConfig.from_pretrained(str(src), trust_remote_code=False)
    llama = LlamaForCausalLM.from_pretrained(str(src), dtype=torch.float32, trust_remote_code=False)
    sd = {k: v.detach().clone() for k, v in llama.state_dict().items()}
    base = AutoTokenizer.from_pretrained(str(src), trust_remote_code=False)
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
