"""`sphere bench prm`: PRM work per expansion, separate scoring vs the shared prefix (issue 34), side by side.

One expansion = E candidate steps after one prefix (system prompt, problem, earlier steps). For each model
(the stand-in PRM shipped in assets/, and a random-weight PRM of Qwen2.5-Math-PRM-7B's layer shapes cut to
``random_layers`` layers, built in memory from a config: no download) and each prefix length, every scoring
form (``off`` = each candidate its own row, ``kv``, ``packed``) scores the same items in its own child process,
one after another in this run, and reports: PRM tokens computed per expansion (padding included), wall per
expansion, peak memory of the scoring call (the process's VmHWM, reset with /proc/self/clear_refs after the
model is built, minus the resident size then: the scoring's own peak), and the max |score difference| against
``off``. Ratios are off / form, measured in the same run. Last stdout line: one JSON object.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from sphere.bench import emit
from sphere.model_paths import resolve_model

PROBLEM = "Ann has 12 coins. Ann gets 5, then gets 3, then gives 4 away. How many coins now?"
STEPS = ["First, 12 + 5 = 17.", "Then, 17 + 3 = 20.", "Next, 20 - 4 = 16.", "So Ann has 16 coins left.",
         "Check: 16 + 4 - 3 - 5 = 12, the start."]
CANDS = ["The answer is \\boxed{16}.", "So 16 + 1 = 17, and the answer is \\boxed{17}.",
         "Then 7 * 3 = 21.", "Hence the total is 16 coins.", "Check: 12 + 5 + 3 - 4 = 16.",
         "Wait, 17 + 3 = 21, so 21 - 4 = 17.", "So the answer is 16.", "Thus 12 - 4 = 8."]


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _random_prm(layers: int, vocab: int, seed: int):
    """Qwen2.5-Math-PRM-7B's layer shapes (hidden 3584, 28 heads, 4 KV heads, intermediate 18944) with
    ``layers`` layers and a small vocabulary, random weights, built in memory."""
    import torch
    from transformers import Qwen2Config

    from sphere.rewards.prm_model import QwenProcessRewardModel  # imports torch

    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
                      intermediate_size=18944, num_hidden_layers=layers, vocab_size=vocab,
                      max_position_embeddings=32768, rope_theta=1e6, num_labels=2)
    return QwenProcessRewardModel(cfg).eval().requires_grad_(False)


def _items(scorer, length: int, E: int, expansions: int) -> list[tuple[str, list[str]]]:
    """``expansions`` expansions of E candidates each, over prefixes of about ``length`` tokens."""
    out = []
    for x in range(expansions):
        steps: list[str] = []
        k = 0
        while len(scorer.build_ids(PROBLEM, steps + [CANDS[0]])) < length:
            steps.append(f"{STEPS[k % len(STEPS)]} (line {x}.{k})")
            k += 1
        out += [(PROBLEM, steps + [CANDS[(x + j) % len(CANDS)]]) for j in range(E)]
    return out


def child(args: dict) -> dict:
    """One (model, length, form) measurement in this process."""
    import torch

    from sphere.rewards.prm import PRMScorer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    sc = PRMScorer(None, resolve_model("standin-qwen2_5-prm", None), engine="transformers", device="cpu",
                   shared_prefix=args["form"], batch_size=int(args["batch_size"]))
    if args["model"] == "random7b":
        sc._model = _random_prm(int(args["random_layers"]), len(sc.tokenizer) + 4, int(args["seed"]))
        sc.max_length = 32768
    window_extended = False
    if args["model"] != "random7b" and int(args["length"]) > sc.max_length and args.get("past_window"):
        sc.max_length = int(args["length"]) + 256  # RoPE goes on; trained on <= the window (said in the row)
        window_extended = True
    items = _items(sc, int(args["length"]), int(args["E"]), int(args["expansions"]))
    rows = [sc.build_ids(p, s) for p, s in items]
    if max(map(len, rows)) > sc.max_length:
        return {"skipped": f"rows of {max(map(len, rows))} tokens > the model's window {sc.max_length}"}
    sc.score([(PROBLEM, [CANDS[0]])] * 2)  # warm-up (a short item: kernels, allocator), not counted
    base = sc.stats()
    rss0 = _rss_kib()
    hwm_ok = _reset_hwm()
    t0 = time.perf_counter()
    scores = sc.score(items)
    wall = time.perf_counter() - t0
    peak = _hwm_kib() - rss0 if hwm_ok else None
    st = sc.stats()
    n = int(args["expansions"])
    return {"tokens_per_expansion": (st["tokens_computed"] - base["tokens_computed"]) / n,
            "row_tokens_per_expansion": (st["tokens"] - base["tokens"]) / n,
            "wall_s_per_expansion": wall / n, "peak_mib": None if peak is None else peak / 1024,
            "forward_passes": st["forward_passes"] - base["forward_passes"],
            "prefix_tokens": int(sum(min(len(r) for r in rows[i: i + int(args["E"])]) for i in
                                     range(0, len(rows), int(args["E"]))) / n),
            "window_extended": window_extended, "scores": scores}


def _run_child(args: dict) -> dict:
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-m", "sphere.bench.prm", "--child", json.dumps(args)],
                         capture_output=True, text=True, env=env)
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"sphere bench prm: child {args['model']}/{args['length']}/{args['form']} "
                           f"failed: {tail[0]}")
    return json.loads(lines[-1])


def bench(cfg: Any) -> dict:
    forms = ["off" if f is False else str(f) for f in cfg.forms]  # YAML reads a bare off as false
    if "off" not in forms:
        raise ValueError(f"forms={forms}: must include off (the separate-scoring reference)")
    bad = [f for f in forms if f not in ("off", "kv", "packed")]
    if bad:
        raise ValueError(f"forms: {bad[0]!r} unknown; allowed off | kv | packed")
    rows = []
    for model in cfg.models:
        if str(model) not in ("standin", "random7b"):
            raise ValueError(f"models: {model!r} unknown; allowed standin | random7b")
        for length in cfg.lengths:
            got = {}
            for form in forms:
                got[form] = _run_child({"model": str(model), "length": int(length), "form": form,
                                        "E": int(cfg.E), "expansions": int(cfg.expansions),
                                        "batch_size": int(cfg.batch_size), "random_layers": int(cfg.random_layers),
                                        "seed": int(cfg.seed), "past_window": bool(cfg.standin_past_window)})
                if "skipped" in got[form]:
                    break
            if "skipped" in got["off"]:
                rows.append({"model": str(model), "length": int(length), "skipped": got["off"]["skipped"]})
                continue
            ref = got["off"]
            row = {"model": str(model), "length": int(length), "prefix_tokens": ref["prefix_tokens"],
                   "E": int(cfg.E), "past_trained_window": ref["window_extended"]}
            for form in forms:
                g = got[form]
                row[form] = {k: g[k] for k in ("tokens_per_expansion", "wall_s_per_expansion", "peak_mib",
                                               "forward_passes")}
                if form != "off":
                    row[form]["max_abs_diff"] = max(abs(a - b) for x, y in zip(ref["scores"], g["scores"])
                                                    for a, b in zip(x, y))
                    row[form]["token_ratio"] = ref["tokens_per_expansion"] / g["tokens_per_expansion"]
                    row[form]["wall_ratio"] = ref["wall_s_per_expansion"] / g["wall_s_per_expansion"]
            rows.append(row)
    return {"bench": "prm", "omp_threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0),
            "E": int(cfg.E), "expansions_per_call": int(cfg.expansions), "batch_size": int(cfg.batch_size),
            "rows": rows}


def _table(res: dict) -> None:
    t = Table(title=f"PRM work per expansion (E={res['E']}), separate (off) vs shared prefix")
    for c in ("model", "prefix", "form", "tokens/exp", "wall s/exp", "peak MiB", "token ratio", "wall ratio",
              "max |diff|"):
        t.add_column(c, justify="right")
    for r in res["rows"]:
        if "skipped" in r:
            t.add_row(r["model"], str(r["length"]), "-", r["skipped"], "", "", "", "", "")
            continue
        for form in ("off", "kv", "packed"):
            if form not in r:
                continue
            g = r[form]
            t.add_row(r["model"], str(r["prefix_tokens"]), form, f"{g['tokens_per_expansion']:.0f}",
                      f"{g['wall_s_per_expansion']:.3f}",
                      "-" if g["peak_mib"] is None else f"{g['peak_mib']:.0f}",
                      f"{g.get('token_ratio', 1.0):.2f}", f"{g.get('wall_ratio', 1.0):.2f}",
                      f"{g.get('max_abs_diff', 0.0):.1e}")
    Console(file=sys.stdout).print(t)  # results on stdout (progress and logs on stderr), before emit()'s JSON


def main(cfg: Any) -> float:
    try:
        res = bench(cfg)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"sphere bench prm: {e}") from None
    _table(res)
    emit(res)
    kv = [r["kv"]["token_ratio"] for r in res["rows"] if "kv" in r]
    return float(min(kv)) if kv else 0.0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))), flush=True)
