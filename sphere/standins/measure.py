"""Measuring the stand-in policies: the held-out mini problems and greedy accuracy / pass@k in chat form
(``evaluate_policy``), what each ``recipe.json`` of ``sphere.standins.qwen2_5`` records."""

from __future__ import annotations

import time
from pathlib import Path

from sphere.mini.examples import is_correct
from sphere.mini.world import load_mini_benchmark
from sphere.prompts import header_text
from sphere.standins.convert import IM_END
from sphere.standins.recipe import RECIPE, _deterministic, _family


def heldout_problems(n: int, split: str = "test") -> list[dict]:
    return load_mini_benchmark(split, n, RECIPE["world"])


def evaluate_policy(model_dir: Path, n: int | None = None, pass_k: int | None = None,
                    temperature: float | None = None, seed: int = 0) -> dict:
    """Greedy accuracy and pass@k (T-sampling, top_p 1, no top_k) on ``n`` held-out mini problems in chat
    form (``sphere.prompts`` header of the ``qwen2_5`` family), with plain ``model.generate``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ev = RECIPE["eval"]
    n = int(n or ev["n"])
    k = int(ev["pass_k"] if pass_k is None else pass_k)
    temp = float(temperature or ev["temperature"])
    probs = heldout_problems(n)
    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                 trust_remote_code=False).eval()
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
