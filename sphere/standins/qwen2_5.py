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
``standin_path(name)`` finds them, ``sphere.model_paths.resolve_model`` resolves the names.

Usage::

    python -m sphere.standins.qwen2_5 OUT_DIR            # build + measure (~10 min on one core)
    python -m sphere.standins.qwen2_5 OUT_DIR --no-eval  # build only
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import tokenizers

from sphere.mini.examples import drill_examples
from sphere.mini.pretrain import sha256_file
from sphere.mini.world import plant_slips, training_problems
from sphere.prompts import build_reflection_text, header_text
from sphere.standins.convert import (  # noqa: F401 - re-exported: the build's public pieces
    ENDOFTEXT,
    IM_END,
    IM_START,
    NEW_SPECIAL_TOKENS,
    PHRASE_TOKENS,
    PRM_SYSTEM,
    QWEN2_5_TEMPLATE,
    QWEN2_PRETOKENIZE_REGEX,
    QWEN_DEFAULT_SYSTEM,
    STEP_TAG,
    TEMPLATES_DIR,
    build_tokenizer,
    chat_template,
    convert_llama,
    llama_state,
    load_converted,
    qwen2_config,
    save_tokenizer,
)
from sphere.standins.measure import evaluate_policy
from sphere.standins.recipe import (  # noqa: F401 - re-exported: the recipe and its helpers
    DIR_OF,
    NAMES,
    RECIPE,
    RECIPE_VERSION,
    _deterministic,
    _family,
    _log,
    _lr_at,
    _mini_source,
    _world,
    assets_root,
    standin_path,
)
from sphere.standins.reward_model import build_prm, corrupt_steps, evaluate_prm, save_prm


# ------------------------------------------------------------------------------------ chat-form data
def _corrupt_attempt(solution: str, rng: random.Random) -> str:
    """A flawed copy of a solution for reflection prompts: one equation gets a wrong result, later steps
    continue from it, the boxed answer follows."""
    steps = corrupt_steps(solution.split("\n\n"), rng, force=True)[0]
    return "\n\n".join(steps)


def chat_examples(tok, problems: list[dict], fam: dict, reflection_share: float, rng: random.Random,
                  end: str = IM_END) -> list[tuple[list[int], int]]:
    """(ids, prompt length) per problem: the chat prompt (``sphere.prompts``) + solution + ``<|im_end|>``."""
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



def sft(model, pools: list[list[tuple[list[int], int]]], steps: int, batch_size: int, lr: float, warmup: int,
        seed: int, pad_id: int, what: str = "sft", stop_after: int | None = None) -> list[float]:
    """Completion-only causal-LM fine-tuning (AdamW, warmup + cosine), plain torch, one thread. Each batch
    comes from one pool (examples of similar length: little padding), pools drawn in proportion to size.
    ``stop_after``: stop after that many steps with the schedule of ``steps`` (a prefix of the full run)."""
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
    for step in range(steps if stop_after is None else min(steps, stop_after)):
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


# --------------------------------------------------------------------------------------------- build
def _train_causal(role: str, tok, fam: dict, seed: int, out: Path, stop_after: int | None = None) -> dict:
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
        drills = drill_examples(int(r["n_drills"]), 8, seed + 1, world, slip_rate=float(r["slip_rate"]),
                                slip_kinds=tuple(r["slip_kinds"]))
        pools.append(chat_examples(tok, drills, fam, 0.0, random.Random(seed + 6)))
    losses = sft(model, pools, int(r["steps"]), int(r["batch_size"]), float(r["lr"]), int(r["warmup"]), seed,
                 tok.pad_token_id, what=role, stop_after=stop_after)
    save_causal_lm(model, tok, out)
    return {"train_seconds": round(time.time() - t0, 1), "final_loss": round(sum(losses[-20:]) / 20, 4),
            "n_params": sum(p.numel() for p in model.parameters()), "source": str(r["source"]),
            "loss_curve": losses}


def write_record(out: Path, role: str, stats: dict, metrics: dict, seed: int) -> dict:
    import torch
    import transformers

    rec = {
        "name": DIR_OF[role], "role": role, "seed": seed, "recipe": RECIPE,
        "command": "python -m sphere.standins.qwen2_5 OUT_DIR",
        "train": stats, "metrics": metrics,
        "weights_sha256": sha256_file(out / "model.safetensors"),
        "chat_template": "sphere/standins/templates/qwen2_5_instruct.jinja (Qwen/Qwen2.5-7B-Instruct)",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__},
    }
    (out / "recipe.json").write_text(json.dumps(rec, indent=1) + "\n")
    return rec


def build(out_dir: str | os.PathLike, seed: int | None = None, evaluate: bool = True,
          steps_scale: float = 1.0, stop_after: int | None = None) -> dict:
    """Build policy, small and PRM into ``out_dir/<name>``; ``steps_scale`` < 1 = a quick smoke build.
    ``stop_after``: every training loop stops after that many steps, schedules unchanged: a prefix of the
    full build, bit for bit (what CI checks against tests/data/build_prefix_digests.json)."""
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
            stats[role] = _train_causal(role, tok, fam, seed, out / DIR_OF[role], stop_after=stop_after)
        _log("building prm")
        t0 = time.time()
        r = RECIPE["prm"]
        probs = training_problems(int(r["n_problems"]), seed + 31, _world())
        model, cfg, losses = build_prm(out / DIR_OF["policy"], tok, probs, r, seed, stop_after=stop_after)
        save_prm(model, cfg, tok, out / DIR_OF["prm"])
        stats["prm"] = {"train_seconds": round(time.time() - t0, 1),
                        "final_loss": round(sum(losses[-20:]) / 20, 4),
                        "n_params": sum(p.numel() for p in model.parameters()), "loss_curve": losses}
    # every step's training loss, returned (the prefix check compares them), not written to recipe.json
    curves = {DIR_OF[role]: stats[role].pop("loss_curve") for role in ("policy", "small", "prm")}
    build_seconds = round(time.time() - t_all, 1)
    for role in ("policy", "small", "prm"):
        d = out / DIR_OF[role]
        metrics = {}
        if evaluate:
            _log(f"evaluating {role}")
            if role == "prm":
                from sphere.rewards.prm import PRMScorer  # imports torch

                metrics = evaluate_prm(PRMScorer(None, model_path=d, engine="transformers"))
            else:
                metrics = evaluate_policy(d)
        stats[role]["build_seconds_total"] = build_seconds
        summary[role] = write_record(d, role, stats[role], metrics, seed)["metrics"]
        _log(f"{role}: {json.dumps({k: v for k, v in summary[role].items() if k != 'example'})}")
    summary["build_seconds"] = build_seconds
    summary["loss_curves"] = curves
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sphere.standins.qwen2_5", description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--no-eval", action="store_true", help="build only (no measurements in recipe.json)")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="scale every step count (smoke builds)")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    res = build(a.out_dir, a.seed, evaluate=not a.no_eval, steps_scale=a.steps_scale)
    print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "example"} if isinstance(v, dict) else v)
                      for k, v in res.items() if k != "loss_curves"}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
