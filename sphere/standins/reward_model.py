"""The stand-in PRM (``standin-qwen2_5-prm``): its training data, its build and its measurement.

Owns what ``sphere.standins.qwen2_5`` needs to make a Qwen2.5-Math-PRM-shaped process reward model: planted
step errors (``corrupt_steps``: a wrong result, a forgotten carry, the divide-as-multiply misconception, a
wrongly copied running total, a wrong boxed answer), the PRM input format (``prm_text``: system = the math
instruction, user = problem, assistant = steps each followed by ``<extra_0>``), training (``build_prm``:
the policy's body plus identity-initialised layers and the two-class head, pointwise + pairwise loss) and
the held-out pairwise accuracy / AUROC (``evaluate_prm``). The recipe lives in ``standin.RECIPE["prm"]``.
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

from sphere.mini.world import apply_op
from sphere.standins.convert import ENDOFTEXT, PRM_SYSTEM, STEP_TAG, qwen2_config, save_tokenizer
from sphere.standins.measure import heldout_problems
from sphere.standins.recipe import RECIPE, _log, _lr_at

_EQ_STEP = re.compile(r"^(?P<head>.*?)(?P<a>\d+) (?P<op>[-+*/]) (?P<b>\d+) = (?P<c>\d+)(?P<tail>\.?)$")


def _exact(op: str, a: int, b: int) -> int | None:
    """The mini world's arithmetic (``sphere.mini.world.apply_op``); None for a division that is not exact."""
    if op == "/" and not (b and a % b == 0):
        return None
    return apply_op(op, a, b)


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


def build_prm(policy_dir: Path, tok, problems: list[dict], r: dict, seed: int, stop_after: int | None = None):
    """A ``QwenProcessRewardModel`` with the policy's body, trained on step correctness. ``stop_after``:
    stop after that many steps with the full schedule (a bit-exact prefix of the full build)."""
    import torch

    model, cfg, n_old = _prm_from_policy(policy_dir, tok, r, seed)
    rng = random.Random(seed + 1)
    data = prm_pair_examples(tok, problems, rng)
    pad = tok.convert_tokens_to_ids(ENDOFTEXT)
    opt, base_lrs = _prm_optimizer(model, cfg, n_old, r)
    order = list(range(len(data)))
    rng.shuffle(order)
    pos, losses, bs = 0, [], int(r["batch_size"])
    steps = int(r["steps"])
    model.train()
    for step in range(steps if stop_after is None else min(steps, stop_after)):
        if pos + bs > len(order):
            rng.shuffle(order)
            pos = 0
        rows = [row for i in order[pos: pos + bs] for row in data[i]]  # good, bad, good, bad, ...
        pos += bs
        for g, base in zip(opt.param_groups, base_lrs, strict=True):
            g["lr"] = _lr_at(step, steps, int(r["warmup"]), base)
        loss, pair = _prm_loss(model, rows, pad, float(r.get("pair_weight", 1.0)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(pair.item()))
        if step % 50 == 0 or step == steps - 1:
            _log(f"prm step {step}/{steps} loss {float(loss.item()):.3f} pair {losses[-1]:.3f}")
    model.eval()
    return model, cfg, losses


def _prm_from_policy(policy_dir: Path, tok, r: dict, seed: int):
    """(the PRM with the policy's layers plus ``r.extra_layers`` identity layers, its config, the policy's
    layer count)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from sphere.rewards.prm_model import QwenProcessRewardModel  # imports torch

    pcfg = AutoConfig.from_pretrained(str(policy_dir), trust_remote_code=False)
    extra = int(r.get("extra_layers", 0))
    pcfg.num_hidden_layers = int(pcfg.num_hidden_layers) + extra
    cfg = qwen2_config(pcfg, tok, num_labels=2)
    cfg.architectures = ["Qwen2ForProcessRewardModel"]
    cfg.tie_word_embeddings = False
    torch.manual_seed(seed)
    model = QwenProcessRewardModel(cfg)
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
    return model, cfg, n_old


def _prm_optimizer(model, cfg, n_old: int, r: dict):
    """AdamW with three learning rates: the policy's layers, the added layers, the score head."""
    import torch

    new = [p for i in range(n_old, cfg.num_hidden_layers) for p in model.model.layers[i].parameters()]
    new_ids = {id(p) for p in new}
    old = [p for p in model.model.parameters() if id(p) not in new_ids]
    groups = [(old, float(r["lr"])), (new, float(r.get("new_lr", r["lr"]))),
              (list(model.score.parameters()), float(r["head_lr"]))]
    groups = [(ps, lr) for ps, lr in groups if ps]
    opt = torch.optim.AdamW([{"params": ps, "lr": lr} for ps, lr in groups], weight_decay=0.0)
    return opt, [lr for _, lr in groups]


def _prm_loss(model, rows: list, pad: int, pair_weight: float):
    """(loss, pairwise part) of one batch of (right, corrupted) rows."""
    import torch

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
    logits = model(x, m)
    # pointwise: every step tag (the prefix steps are correct, the last one is right or wrong) ...
    point = torch.nn.functional.cross_entropy(logits.reshape(-1, 2), y.reshape(-1), ignore_index=-100)
    # ... and pairwise (Bradley-Terry): the right last step above its corrupted twin (same prefix)
    z = logits[torch.arange(len(rows)), last]
    margin = (z[:, 1] - z[:, 0]).view(-1, 2)
    pair = torch.nn.functional.softplus(margin[:, 1] - margin[:, 0]).mean()
    return point + pair_weight * pair, pair


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
