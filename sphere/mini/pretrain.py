"""`sphere pretrain-mini`: train a mini model from scratch on CPU and measure it.

    sphere pretrain-mini                          # the policy recipe (conf/mini/policy.yaml)
    sphere pretrain-mini mini=small               # the weaker stage-3 model (conf/mini/small.yaml)
    sphere pretrain-mini save_to=assets/mini/mini # (re)build a shipped checkpoint
    sphere pretrain-mini eval_only=assets/mini/mini   # only measure an existing checkpoint

Recipe: generate training problems (sphere.mini.world), train the digit-level tokenizer, build a tiny
Llama, SFT it with TRL's SFTTrainer (completion-only loss on the reference solution, CPU, float32,
one thread, deterministic algorithms), then evaluate on the held-out test split: greedy accuracy and
pass@k of T-sampling, with batched left-padded ``model.generate``. Answers are integers, so a
completion is correct iff its last ``\\boxed{...}`` equals the gold answer exactly. The last line
printed is one JSON object with the figures; the checkpoint dir gets ``recipe.json`` (recipe, seed,
metrics, sha256 of the weights).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from sphere.io import atomic_write_json
from sphere.mini.examples import (
    boxed_answer,
    equation_slips,
    hard_world,
    is_correct,
)
from sphere.mini.training import (
    deterministic,
    progress_bar,
    train,
)
from sphere.mini.world import WorldSpec, format_prompt, load_mini_benchmark


def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def evaluate(
    model_dir: str | Path, ev: dict, world: dict | None = None, progress: bool = True, threads: int = 1
) -> dict:
    """Greedy accuracy and pass@k on ``ev.n`` problems of the held-out ``ev.split`` with plain
    ``model.generate`` (batched, left-padded). Sampling uses top_k=0 (pure temperature sampling, like
    vLLM's default) and a fixed torch seed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if ev.get("world"):  # evaluate on another world than the recipe's (easy-to-hard: the harder one)
        world = hard_world(WorldSpec.from_mapping(world), ev["world"])
    probs = load_mini_benchmark(str(ev["split"]), int(ev["n"]), world)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    prompts = [format_prompt(p["problem"]) for p in probs]
    k = int(ev["pass_k"])
    t0 = time.time()
    with deterministic(threads):
        greedy = _generate(model, tok, prompts, ev, False, "eval greedy", progress)
        torch.manual_seed(int(ev["seed"]))
        sampled = _generate(model, tok, [p for p in prompts for _ in range(k)], ev, True,
                            f"eval T={ev['temperature']} x{k}", progress)
    return _metrics(probs, greedy, sampled, ev, k, t0)


def _generate(model, tok, texts: list[str], ev: dict, sample: bool, desc: str, progress: bool) -> list[str]:
    """Completions of ``texts`` in batches of ``ev.batch_size``: greedy, or sampled at ``ev.temperature``."""
    import torch

    bs, max_new = int(ev["batch_size"]), int(ev["max_new_tokens"])
    outs: list[str] = []
    bar = progress_bar(len(texts), desc) if progress else None
    if bar:
        bar.start()
        task = bar.add_task("", total=len(texts), info="")
    for i in range(0, len(texts), bs):
        enc = tok(texts[i : i + bs], return_tensors="pt", padding=True)
        with torch.inference_mode():
            gen = model.generate(
                **enc,
                max_new_tokens=max_new,
                do_sample=sample,
                temperature=float(ev["temperature"]) if sample else None,
                top_k=0 if sample else None,
                top_p=1.0 if sample else None,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        outs += tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        if bar:
            bar.update(task, completed=len(outs))
    if bar:
        bar.stop()
    return outs


def _metrics(probs: list[dict], greedy: list[str], sampled: list[str], ev: dict, k: int, t0: float) -> dict:
    """Greedy accuracy, pass@k, sampled accuracy, the greedy equations' error rate, three examples."""
    g_ok = [is_correct(c, p["answer"]) for c, p in zip(greedy, probs, strict=False)]
    s_ok = [is_correct(c, probs[i // k]["answer"]) for i, c in enumerate(sampled)]
    pass_k = [any(s_ok[i * k : (i + 1) * k]) for i in range(len(probs))]
    eqs = [equation_slips(c) for c in greedy]
    n_eq, n_bad = sum(e[0] for e in eqs), sum(e[1] for e in eqs)
    return {
        "n": len(probs),
        "split": str(ev["split"]),
        "greedy_accuracy": sum(g_ok) / len(probs),
        f"pass@{k}": sum(pass_k) / len(probs),
        "sampled_accuracy": sum(s_ok) / len(s_ok),
        "temperature": float(ev["temperature"]),
        "greedy_equations": n_eq,
        "greedy_equation_error_rate": n_bad / max(1, n_eq),
        "greedy_boxed_rate": sum(boxed_answer(c) is not None for c in greedy) / len(probs),
        "eval_seconds": round(time.time() - t0, 1),
        "examples": [
            {"id": p["id"], "gold": p["answer"], "greedy": c}
            for p, c in zip(probs[:3], greedy[:3], strict=False)
        ],
    }


def pretrain(recipe: dict, out_dir: str | Path, progress: bool = True, evaluate_after: bool = True) -> dict:
    """Train + evaluate; writes ``out_dir/recipe.json`` and returns it."""
    out_dir = Path(out_dir)
    stats = train(recipe, out_dir, progress=progress)
    metrics = evaluate(out_dir, recipe["eval"], recipe["world"], progress=progress) if evaluate_after else {}
    return write_record(recipe, out_dir, stats, metrics)


def write_record(recipe: dict, out_dir: Path, stats: dict, metrics: dict) -> dict:
    """Write ``out_dir/recipe.json``: the recipe, its seed, the measured figures, training stats, the sha256
    of the weights and the library versions. Returns it."""
    out_dir = Path(out_dir)
    import torch
    import transformers
    import trl

    rec = {
        "name": recipe["name"],
        "seed": recipe["seed"],
        "recipe": recipe,
        "metrics": {k: v for k, v in metrics.items() if k != "examples"},
        "examples": metrics.get("examples", []),
        "train": stats,
        "weights_sha256": sha256_file(out_dir / "model.safetensors"),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
        },
        "command": "sphere pretrain-mini mini="
        + {"mini": "policy", "mini-small": "small", "mini-honest": "honest"}.get(recipe["name"], "?"),
    }
    atomic_write_json(out_dir / "recipe.json", rec)
    return rec


def recipe_from_cfg(cfg) -> dict:
    return OmegaConf.to_container(cfg.mini, resolve=True)


def main(cfg) -> dict:
    """Hydra entry (conf/pretrain_mini.yaml)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    recipe = recipe_from_cfg(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.eval_only:
        d = Path(str(cfg.eval_only))
        metrics = evaluate(d, recipe["eval"], recipe["world"], progress=bool(cfg.progress))
        out = {"model": str(d), **{k: v for k, v in metrics.items() if k != "examples"}}
        atomic_write_json(run_dir / "metrics.json", out)
        print(json.dumps(out))
        return out
    out_dir = Path(str(cfg.save_to)) if cfg.save_to else run_dir / recipe["name"]
    rec = pretrain(recipe, out_dir, progress=bool(cfg.progress))
    out = {"model": str(out_dir), **rec["metrics"], "train_seconds": rec["train"]["train_seconds"]}
    atomic_write_json(run_dir / "metrics.json", out)
    for ex in rec["examples"][:1]:
        print(f"example ({ex['id']}, gold {ex['gold']}):\n{ex['greedy']}\n")
    print(json.dumps(out))
    return out
