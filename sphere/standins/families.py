"""Stand-ins of the paper's other model families: phi-4 and the DeepSeek-R1 distills (no hub, ever).

``sphere.standins.qwen2_5`` builds the Qwen2.5 family (policy, small model, PRM). The sibling experiments need
models that look like theirs to every part of the code, so this module builds, with the same recipe (the
mini models converted, fine-tuned briefly on mini-world problems in the family's chat form):

- **phi-4** (``conf/model/standin_phi4.yaml``, ``experiment=paper_phi4`` / ``transfer_phi4``):
  ``standin-phi4`` is a ``Phi3ForCausalLM`` (fused ``qkv_proj`` / ``gate_up_proj``, no biases) with
  microsoft/phi-4's tokenizer conventions and its exact chat template (``<|im_start|>user<|im_sep|>...``;
  EOS ``<|im_end|>``, pad ``<|dummy_85|>``); ``standin-phi4-mini`` (the stage-3 small model) is a narrower
  ``Phi3ForCausalLM`` with **its own tokenizer** and Phi-4-mini-instruct's template (``<|user|>...<|end|>``):
  its tokenizer's EOS is ``<|endoftext|>`` while turns end with ``<|end|>``, which, as in the real model,
  only its ``generation_config.json`` lists as a stop token. Policy and small model therefore render
  different prompts and tokenize differently, as phi-4 and Phi-4-mini do.
- **DeepSeek-R1 distills** (``conf/model/standin_deepseek_r1.yaml``,
  ``experiment=paper_deepseek_r1_distill_qwen_7b``): ``standin-r1-distill`` and ``standin-r1-distill-small``
  are ``Qwen2ForCausalLM`` models sharing a tokenizer with R1's tokens (``<｜begin▁of▁sentence｜>`` added in
  front of every encoding, as the distills' tokenizer does, ``<｜end▁of▁sentence｜>`` = EOS = pad,
  ``<｜User｜>``, ``<｜Assistant｜>``, ``<think>``, ``</think>``) and the distills' current chat template,
  whose generation prompt ends with ``<think>\\n``. They answer in R1's format: the steps (blank-line
  separated) inside the thinking block, then ``</think>``, then the answer again after it.

The PRM of every family is the Qwen stand-in PRM (``standin-qwen2_5-prm``), as in the paper (Qwen2.5-Math-PRM
scores every policy). The templates are the exact texts in ``tests/fixtures/chat_templates/`` (sources and
licences in its SOURCES.md), copied into ``sphere/standins/templates/``. Partial rotary embeddings
(Phi-4-mini) and tied embeddings are not reproduced: the stand-ins keep the mini models' geometry.

Usage::

    python -m sphere.standins.families OUT_DIR [--family phi4|r1] [--no-eval]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import tokenizers
from tokenizers import processors

from sphere.mini.examples import is_correct
from sphere.mini.pretrain import sha256_file
from sphere.mini.world import plant_slips, training_problems
from sphere.prompts import encode, header_text, load_family
from sphere.standins import qwen2_5 as base
from sphere.standins.measure import heldout_problems

BOS_R1, EOS_R1 = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

# name -> how it is built. "source": the mini checkpoint converted; "tokenizer": the key of TOKENIZERS.
MODELS = {
    "standin-phi4": {"family": "phi4", "role": "policy", "arch": "phi3", "source": "mini", "tokenizer": "phi4",
                     "intermediate_size": None, "stands_in_for": "microsoft/phi-4"},
    "standin-phi4-mini": {"family": "phi4", "role": "small", "arch": "phi3", "source": "mini-small",
                          "tokenizer": "phi4_mini", "intermediate_size": 64,
                          "stands_in_for": "microsoft/Phi-4-mini-instruct"},
    "standin-r1-distill": {"family": "deepseek_r1", "role": "policy", "arch": "qwen2", "source": "mini",
                           "tokenizer": "r1", "intermediate_size": None,
                           "stands_in_for": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"},
    "standin-r1-distill-small": {"family": "deepseek_r1", "role": "small", "arch": "qwen2", "source": "mini-small",
                                 "tokenizer": "r1", "intermediate_size": 64,
                                 "stands_in_for": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"},
}
FAMILY_MODELS = {"phi4": ["standin-phi4", "standin-phi4-mini"],
                 "r1": ["standin-r1-distill", "standin-r1-distill-small"]}

# tokenizer conventions of the real models (special tokens in order, EOS, pad, BOS, template file; "gen_eos":
# the generation config's stop tokens; "auto_bos": the tokenizer puts BOS in front of every encoding)
TOKENIZERS = {
    "phi4": {"specials": ["<|im_start|>", "<|im_sep|>", "<|im_end|>", "<|dummy_85|>"], "eos": "<|im_end|>",
             "pad": "<|dummy_85|>", "bos": "<|endoftext|>", "template": "microsoft-phi-4.jinja",
             "gen_eos": ["<|im_end|>"], "auto_bos": False, "words": []},
    "phi4_mini": {"specials": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "eos": "<|endoftext|>",
                  "pad": "<|endoftext|>", "bos": "<|endoftext|>", "template": "microsoft-Phi-4-mini-instruct.jinja",
                  "gen_eos": ["<|endoftext|>", "<|end|>"], "auto_bos": False, "words": []},
    "r1": {"specials": [BOS_R1, EOS_R1, "<｜User｜>", "<｜Assistant｜>"], "eos": EOS_R1, "pad": EOS_R1,
           "bos": BOS_R1, "template": "deepseek-ai-DeepSeek-R1-Distill-Qwen.jinja", "gen_eos": [EOS_R1],
           "auto_bos": True, "words": ["<think>", "</think>"]},
}

RECIPE = {
    "version": 1,
    "seed": 0,
    "policy": {"n_problems": 6000, "reflection_share": 0.15, "slip_rate": 0.9, "slip_kinds": ["divide"],
               "steps": 400, "batch_size": 16, "lr": 2e-3, "warmup": 20},
    "small": {"n_problems": 6000, "reflection_share": 0.0, "slip_rate": 0.0, "slip_kinds": ["divide"],
              "steps": 300, "batch_size": 16, "lr": 2e-3, "warmup": 20},
    "eval": {"n": 200, "pass_k": 0},
}


def template_text(name: str) -> str:
    return (base.TEMPLATES_DIR / name).read_text()


def build_family_tokenizer(key: str):
    """The mini vocabulary in Qwen2's text pipeline (``standin.build_tokenizer``) with family ``key``'s
    tokens, EOS, pad and chat template; R1's puts its BOS in front of every encoding."""
    t = TOKENIZERS[key]
    tok = base.build_tokenizer(base._mini_source("mini"), specials=t["specials"], eos=t["eos"], pad=t["pad"],
                               template=template_text(t["template"]), words=t["words"])
    tok.bos_token = t["bos"]
    if t["auto_bos"]:
        bos_id = tok.convert_tokens_to_ids(t["bos"])
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{t['bos']} $A", pair=f"{t['bos']} $A $B", special_tokens=[(t["bos"], bos_id)])
    return tok


def answer_text(family: str, solution: str) -> str:
    """The assistant text after the generation prompt: the solution's steps; R1 distills think first (the
    prompt ends with ``<think>\\n``), close the block and state the answer again."""
    if family == "deepseek_r1":
        return solution + "\n</think>\n\n" + solution.split("\n\n")[-1]
    return solution


def phi3_config(src_cfg, tok, intermediate_size: int | None, t: dict):
    from transformers import Phi3Config

    heads = int(src_cfg.num_attention_heads)
    return Phi3Config(
        vocab_size=len(tok), hidden_size=int(src_cfg.hidden_size),
        intermediate_size=int(intermediate_size or src_cfg.intermediate_size),
        num_hidden_layers=int(src_cfg.num_hidden_layers), num_attention_heads=heads,
        num_key_value_heads=int(src_cfg.num_key_value_heads), hidden_act=src_cfg.hidden_act,
        max_position_embeddings=2048, original_max_position_embeddings=2048,
        rms_norm_eps=float(src_cfg.rms_norm_eps),
        rope_theta=float((getattr(src_cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)),
        partial_rotary_factor=1.0, tie_word_embeddings=bool(src_cfg.tie_word_embeddings), sliding_window=None,
        bos_token_id=tok.convert_tokens_to_ids(t["bos"]), eos_token_id=tok.convert_tokens_to_ids(t["eos"]),
        pad_token_id=tok.convert_tokens_to_ids(t["pad"]), resid_pdrop=0.0, embd_pdrop=0.0,
        attention_dropout=0.0, use_cache=True, torch_dtype="float32",
    )


def convert(spec: dict, tok):
    """The mini model ``spec["source"]`` as ``spec["arch"]``, computing the same function (Phi3: q/k/v and
    gate/up fused; Qwen2: zero q/k/v biases)."""
    import torch
    from transformers import Phi3ForCausalLM

    t = TOKENIZERS[spec["tokenizer"]]
    src = base._mini_source(spec["source"])
    if spec["arch"] == "qwen2":
        return base.convert_llama(src, tok, spec["intermediate_size"], eos=t["eos"], bos=t["bos"])
    src_cfg, sd = base.llama_state(src, tok, spec["intermediate_size"])
    cfg = phi3_config(src_cfg, tok, spec["intermediate_size"], t)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        sd[f"{p}.self_attn.qkv_proj.weight"] = torch.cat(
            [sd.pop(f"{p}.self_attn.{n}_proj.weight") for n in ("q", "k", "v")])
        sd[f"{p}.mlp.gate_up_proj.weight"] = torch.cat(
            [sd.pop(f"{p}.mlp.{n}_proj.weight") for n in ("gate", "up")])
    return base.load_converted(Phi3ForCausalLM(cfg), sd, "Llama -> Phi3")


def save(model, tok, spec: dict, out: Path) -> None:
    from transformers import GenerationConfig

    t = TOKENIZERS[spec["tokenizer"]]
    out.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True
    ids = [tok.convert_tokens_to_ids(x) for x in t["gen_eos"]]
    model.generation_config = GenerationConfig(bos_token_id=tok.convert_tokens_to_ids(t["bos"]),
                                               eos_token_id=ids if len(ids) > 1 else ids[0],
                                               pad_token_id=tok.convert_tokens_to_ids(t["pad"]))
    model.save_pretrained(str(out), safe_serialization=True)
    base.save_tokenizer(tok, out)
    if t["auto_bos"]:  # as the distills' tokenizer_config.json says (LlamaTokenizerFast, add_bos_token)
        p = out / "tokenizer_config.json"
        cfg = json.loads(p.read_text())
        cfg["add_bos_token"] = True
        p.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def train_one(name: str, tok, seed: int, out: Path) -> dict:
    spec = MODELS[name]
    r = RECIPE[spec["role"]]
    t0 = time.time()
    model = convert(spec, tok)
    world = base._world()
    fam = load_family(spec["family"])
    probs = training_problems(int(r["n_problems"]), seed + (11 if spec["role"] == "policy" else 23), world)
    probs = plant_slips(probs, float(r["slip_rate"]), seed + 13, world.max_value, tuple(r["slip_kinds"]))
    probs = [{**p, "solution": answer_text(spec["family"], p["solution"])} for p in probs]
    turn_end = TOKENIZERS[spec["tokenizer"]]["gen_eos"][-1]  # the template's end of an assistant turn
    ex = base.chat_examples(tok, probs, fam, float(r["reflection_share"]), random.Random(seed + 5), end=turn_end)
    short = sorted(len(e[0]) for e in ex)[len(ex) // 2] * 3 // 2  # reflection prompts in their own pool
    pools = [[e for e in ex if len(e[0]) <= short], [e for e in ex if len(e[0]) > short]]
    losses = base.sft(model, pools, int(r["steps"]), int(r["batch_size"]), float(r["lr"]), int(r["warmup"]),
                      seed, tok.pad_token_id, what=name)
    save(model, tok, spec, out)
    return {"train_seconds": round(time.time() - t0, 1), "final_loss": round(sum(losses[-20:]) / 20, 4),
            "n_params": sum(p.numel() for p in model.parameters()), "source": spec["source"]}


def evaluate(model_dir: Path, family: str, n: int) -> dict:
    """Greedy accuracy on ``n`` held-out mini problems in the family's chat form (plain ``generate``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                 trust_remote_code=False).eval()
    fam = load_family(family)
    probs = heldout_problems(n)
    ok, ends, t0 = 0, 0, time.time()
    eos = model.generation_config.eos_token_id
    with base._deterministic():
        for p in probs:
            ids = encode(tok, header_text(tok, p["problem"], fam), fam)
            with torch.inference_mode():
                g = model.generate(torch.tensor([ids]), max_new_tokens=224, do_sample=False, eos_token_id=eos,
                                   pad_token_id=tok.pad_token_id)
            text = tok.decode(g[0, len(ids):], skip_special_tokens=False)
            ok += is_correct(text, p["answer"])
            ends += g[0, -1].item() in (eos if isinstance(eos, list) else [eos])
    return {"n": n, "greedy_accuracy": ok / n, "greedy_ends_eos": ends / n, "eval_seconds": round(time.time() - t0, 1),
            "example": text}


def build(out_dir: str | os.PathLike, families: list[str] | None = None, evaluate_n: int | None = None,
          seed: int | None = None) -> dict:
    """Build the stand-ins of ``families`` (``phi4``, ``r1``; default both) into ``out_dir/<name>``."""
    import torch
    import transformers

    seed = int(RECIPE["seed"] if seed is None else seed)
    out = Path(out_dir)
    n_eval = int(RECIPE["eval"]["n"] if evaluate_n is None else evaluate_n)
    summary = {}
    for fam_key in families or list(FAMILY_MODELS):
        for name in FAMILY_MODELS[fam_key]:
            spec = MODELS[name]
            with base._deterministic():
                tok = build_family_tokenizer(spec["tokenizer"])
                base._log(f"building {name}")
                stats = train_one(name, tok, seed, out / name)
            metrics = evaluate(out / name, spec["family"], n_eval) if n_eval else {}
            rec = {"name": name, "role": spec["role"], "stands_in_for": spec["stands_in_for"],
                   "architecture": spec["arch"], "seed": seed, "recipe": {**RECIPE, "model": spec,
                                                                           "tokenizer": TOKENIZERS[spec["tokenizer"]]},
                   "command": "python -m sphere.standins.families OUT_DIR", "train": stats,
                   "metrics": metrics, "weights_sha256": sha256_file(out / name / "model.safetensors"),
                   "chat_template": f"sphere/standins/templates/{TOKENIZERS[spec['tokenizer']]['template']}",
                   "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                "tokenizers": tokenizers.__version__}}
            (out / name / "recipe.json").write_text(json.dumps(rec, indent=1, ensure_ascii=False) + "\n")
            summary[name] = {k: v for k, v in metrics.items() if k != "example"} | {"train_s": stats["train_seconds"]}
            base._log(f"{name}: {json.dumps(summary[name])}")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sphere.standins.families",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--family", action="append", choices=sorted(FAMILY_MODELS),
                    help="build only this family (repeatable; default: all)")
    ap.add_argument("--no-eval", action="store_true", help="build only (no measurements in recipe.json)")
    ap.add_argument("--eval-n", type=int, default=None, help="held-out problems for the greedy accuracy")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    res = build(a.out_dir, a.family, 0 if a.no_eval else a.eval_n)
    print(json.dumps(res, ensure_ascii=False))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
