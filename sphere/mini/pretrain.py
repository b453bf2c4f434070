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

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path

from sphere.io import atomic_write_json

from sphere.mini.examples import (  # noqa: F401 - re-exported: grading and training-data helpers
    DRILL_PROBLEM,
    boxed_answer,
    drill_examples,
    equation_slips,
    hard_examples,
    hard_world,
    is_correct,
)

# Context advertised in the saved config.json. The model uses RoPE (no position parameters), so this only
# sizes caches; backends default to max_model_len=2048 (conf/backend/vllm.yaml) and vLLM refuses a
# max_model_len above the config's. Training sequences are <= model.max_position_embeddings of the recipe.
SERVE_CONTEXT = 2048


def serving_config(config) -> None:
    """Make a trained mini config ready to serve: KV cache on, SERVE_CONTEXT positions."""
    config.use_cache = True
    config.max_position_embeddings = max(int(config.max_position_embeddings), SERVE_CONTEXT)


def portable_tokenizer_config(d: Path) -> None:
    """transformers 5 saves ``tokenizer_class: TokenizersBackend``, which transformers 4.x (and so some
    vLLM installs) cannot resolve; ``PreTrainedTokenizerFast`` loads the same tokenizer.json in both."""
    p = Path(d) / "tokenizer_config.json"
    cfg = json.loads(p.read_text())
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        atomic_write_json(p, cfg)


def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _deterministic(threads: int):
    """Single-threaded deterministic torch for the duration (restored afterwards): the same recipe on the
    same machine gives bit-identical weights. Different CPUs/torch builds may differ in the last bits."""
    import torch

    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def _progress(total: int, desc: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn(f"[bold]{desc}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        transient=False,
    )


def _tokenize_examples(tokenizer, probs: list[dict], max_length: int) -> dict:
    """input_ids (prompt + solution + EOS) and labels (-100 on the prompt: completion-only loss),
    batch-tokenised. SFTTrainer's own preparation (per-example tokenise/label/truncate maps) is skipped:
    it costs more CPU than the training of a model this small."""
    from sphere.mini.world import format_prompt

    prompts = [format_prompt(p["problem"]) for p in probs]
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    full = tokenizer(
        [q + p["solution"] for q, p in zip(prompts, probs, strict=False)], add_special_tokens=False
    )["input_ids"]
    ids, mask = [], []
    for a, b, p in zip(p_ids, full, probs, strict=False):
        if b[: len(a)] != a:  # the prompt must end on a token boundary (see MINI_PROMPT_TEMPLATE)
            raise ValueError(f"mini tokenizer: prompt of {p['id']} is not a token prefix of prompt+solution")
        if len(b) + 1 > max_length:
            raise ValueError(
                f"mini recipe: {p['id']} has {len(b) + 1} tokens > "
                f"model.max_position_embeddings={max_length}; "
                "raise it or lower the world's max_steps"
            )
        ids.append(b + [tokenizer.eos_token_id])
        mask.append([-100] * len(a) + b[len(a) :] + [tokenizer.eos_token_id])
    return {"input_ids": ids, "labels": mask}


def _plain_loss_sft_trainer():
    from trl import SFTTrainer

    class PlainLossSFTTrainer(SFTTrainer):
        """SFTTrainer with the model's own causal-LM loss (mean over the non -100 labels) instead of TRL's
        fused, tiled LM-head kernel: on CPU with a 640-token vocabulary the fused kernel (which also computes
        entropy and top-1 metrics) costs ~4x the plain loss and more than the rest of the model (measured:
        0.14 s vs 0.03 s per 32x140-token batch), so the loss is the same and the step twice as fast."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs.get("attention_mask"),
                labels=inputs["labels"],
            )
            return (out.loss, out) if return_outputs else out.loss

    return PlainLossSFTTrainer


def train(recipe: dict, out_dir: Path, progress: bool = True, snapshots: tuple[int, ...] = (),
          stop_after: int | None = None) -> dict:
    """Train the mini model of ``recipe`` into ``out_dir`` (HF checkpoint). Returns training stats.

    ``snapshots``: also save the model after these steps to ``out_dir/step-<k>`` (with a constant LR
    schedule, step-k of a long run equals a run with ``max_steps=k``: how max_steps was chosen).
    ``stop_after``: stop after this many optimizer steps, schedule unchanged, and save: the weights are
    exactly the full run's at that step (the reproducibility check CI runs instead of a full rebuild)."""
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import SFTConfig

    from sphere.mini.model import build_model, n_params, train_tokenizer
    from sphere.mini.world import (WorldSpec, format_prompt, generate_problems, plant_slips,
                                   training_problems)

    datasets.disable_progress_bars()
    out_dir = Path(out_dir)
    world = WorldSpec.from_mapping(recipe["world"])
    tcfg, tr = recipe["tokenizer"], recipe["train"]
    threads = int(tr.get("threads", 1))
    t0 = time.time()
    with _deterministic(threads):
        # The tokenizer depends only on its own block (seed, texts, vocab), so every recipe with the
        # same block (policy and small) shares one tokenizer.
        tok_probs = generate_problems(
            int(tcfg["n_texts"]),
            int(tcfg["seed"]),
            id_prefix="mini-tok",
            **{**world.to_dict(), "ops": world.ops},
        )
        tok_texts = [format_prompt(p["problem"]) + p["solution"] for p in tok_probs]
        tokenizer = train_tokenizer(tok_texts, int(tcfg["vocab_size"]))

        slip = float(tr.get("slip_rate", 0.0))
        kinds = tuple(tr.get("slip_kinds", ("carry",)))
        probs = training_problems(int(tr["n_problems"]), int(recipe["seed"]), world)
        probs = plant_slips(probs, slip, int(recipe["seed"]) + 13, world.max_value, kinds)
        probs += hard_examples(tr, world, int(recipe["seed"]))  # optional (train.hard_n); none by default
        probs += drill_examples(
            int(tr.get("n_drills", 0)), int(tr.get("drill_equations", 8)), int(recipe["seed"]) + 1, world,
            slip_rate=slip, slip_kinds=kinds,
        )
        max_len = int(recipe["model"]["max_position_embeddings"])
        ds = datasets.Dataset.from_dict(_tokenize_examples(tokenizer, probs, max_len))
        model = build_model(recipe["model"], tokenizer, int(recipe["seed"]))
        cfg = SFTConfig(
            output_dir=str(out_dir / "_trainer"),
            max_steps=int(tr["max_steps"]),
            per_device_train_batch_size=int(tr["batch_size"]),
            gradient_accumulation_steps=1,
            learning_rate=float(tr["learning_rate"]),
            lr_scheduler_type=str(tr["lr_scheduler"]),
            warmup_steps=int(tr["warmup_steps"]),
            weight_decay=float(tr["weight_decay"]),
            max_grad_norm=float(tr["max_grad_norm"]),
            adam_beta2=float(tr.get("adam_beta2", 0.999)),
            seed=int(recipe["seed"]),
            data_seed=int(recipe["seed"]),
            use_cpu=True,
            bf16=False,
            fp16=False,
            completion_only_loss=True,
            max_length=max_len,
            dataset_kwargs={"skip_prepare_dataset": True},  # already tokenised with labels (see above)
            logging_steps=max(1, int(tr["max_steps"]) // 20),
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            dataloader_num_workers=0,
            dataset_num_proc=None,
        )
        losses: list[tuple[int, float]] = []
        _PlainLossSFTTrainer = _plain_loss_sft_trainer()

        class _Cb(TrainerCallback):
            def __init__(self):
                self.bar = _progress(cfg.max_steps, f"pretrain {recipe['name']}") if progress else None
                self.task = None

            def on_train_begin(self, args, state, control, **kw):
                if self.bar:
                    self.bar.start()
                    self.task = self.bar.add_task("", total=args.max_steps, info="")

            def on_step_end(self, args, state, control, model=None, **kw):
                if stop_after is not None and state.global_step >= stop_after:
                    control.should_training_stop = True
                if state.global_step in snapshots and model is not None:
                    model.save_pretrained(out_dir / f"step-{state.global_step}", safe_serialization=True)
                    tokenizer.save_pretrained(out_dir / f"step-{state.global_step}")
                if self.bar:
                    self.bar.update(self.task, completed=state.global_step)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    losses.append((state.global_step, float(logs["loss"])))
                    if self.bar:
                        self.bar.update(self.task, info=f"loss {logs['loss']:.3f}")

            def on_train_end(self, args, state, control, **kw):
                if self.bar:
                    self.bar.stop()

        trainer = _PlainLossSFTTrainer(
            model=model, args=cfg, train_dataset=ds, processing_class=tokenizer, callbacks=[_Cb()]
        )
        trainer.train()
        model = trainer.model
        model.eval()
        out_dir.mkdir(parents=True, exist_ok=True)
        model.config.use_cache = True  # the Trainer turns the KV cache off for training
        serving_config(model.config)
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        portable_tokenizer_config(out_dir)
        import shutil

        shutil.rmtree(out_dir / "_trainer", ignore_errors=True)
    del torch
    return {
        "train_seconds": round(time.time() - t0, 1),
        "n_params": n_params(model),
        "vocab_size": len(tokenizer),
        "loss_curve": losses,
    }


def evaluate(
    model_dir: str | Path, ev: dict, world: dict | None = None, progress: bool = True, threads: int = 1
) -> dict:
    """Greedy accuracy and pass@k on ``ev.n`` problems of the held-out ``ev.split`` with plain
    ``model.generate`` (batched, left-padded). Sampling uses top_k=0 (pure temperature sampling, like
    vLLM's default) and a fixed torch seed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sphere.mini.world import format_prompt, load_mini_benchmark

    if ev.get("world"):  # evaluate on another world than the recipe's (easy-to-hard: the harder one)
        from sphere.mini.world import WorldSpec

        world = hard_world(WorldSpec.from_mapping(world), ev["world"])
    probs = load_mini_benchmark(str(ev["split"]), int(ev["n"]), world)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    prompts = [format_prompt(p["problem"]) for p in probs]
    bs, k = int(ev["batch_size"]), int(ev["pass_k"])
    max_new = int(ev["max_new_tokens"])
    t0 = time.time()

    def run(texts: list[str], sample: bool, desc: str) -> list[str]:
        outs: list[str] = []
        bar = _progress(len(texts), desc) if progress else None
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

    with _deterministic(threads):
        greedy = run(prompts, False, "eval greedy")
        torch.manual_seed(int(ev["seed"]))
        sampled = run([p for p in prompts for _ in range(k)], True, f"eval T={ev['temperature']} x{k}")
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
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg.mini, resolve=True)


def main(cfg) -> dict:
    """Hydra entry (conf/pretrain_mini.yaml)."""
    from hydra.core.hydra_config import HydraConfig

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
