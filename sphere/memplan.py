"""GPU memory plan of a run: what each phase keeps resident on one GPU, and whether it fits.

``sphere run ... dry_run=true`` prints it; with ``hardware.gpu_memory_gb`` set, a plan that cannot fit is
refused (dry run and real run alike) with what does not fit and the settings that would make it fit.

Per model the weights come from its config (``config.json`` of a local directory, else the dimensions of the
known hub models below) times the dtype's bytes. A vLLM engine takes ``gpu_memory_utilization`` x the GPU
(weights, activations and its KV cache live inside that share; it must hold one sequence of the model's window,
min(backend.max_model_len, the model's own: ``KNOWN_WINDOWS`` / config.json)); a transformers model takes its
weights plus an activation estimate (a PRM's inputs: min(what the longest chain can reach, the PRM's window),
from the length budgets of sphere/budgets.py). Phases (sphere/lifecycle.py decides what is open when):

- ``generate``: evaluation and stages 1-2: the policy engine and the PRM;
- ``stage3``: the small model's engine and the PRM, plus the policy engine unless
  ``stages.close_policy_before_small``;
- ``train``: DPO alone (every engine is closed first): weights, LoRA or full-model optimiser state,
  checkpointed activations and the logits of chosen + rejected.

The estimates are first-order (documented per line); they are meant to catch a plan that cannot start, not
to replace a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sphere.budget_windows import generation_window, prm_window
from sphere.budgets import length_budgets
from sphere.modelinfo import model_shape  # the models' shapes and windows (known hub models, config.json)

GB = 1e9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}



def param_count(s: dict) -> int:
    """Decoder parameters: embeddings (+ untied LM head, or the PRM's score head), attention with GQA, SwiGLU
    MLP, two RMSNorms per layer and the final norm."""
    h, i, L, kv = s["h"], s["i"], s["layers"], s["kv"]
    hd = int(s.get("head_dim") or h // s["heads"])
    q = h * s["heads"] * hd
    attn = q + 2 * h * kv * hd + s["heads"] * hd * h + (q // h + 2 * kv * hd if s.get("bias") else 0)
    mlp = 3 * h * i
    per_layer = attn + mlp + 2 * h
    emb = s["vocab"] * h
    if s.get("prm"):
        head = h * h + h + 2 * h + 2
    else:
        head = 0 if s["tied"] else s["vocab"] * h
    return emb + L * per_layer + h + head


def kv_bytes_per_token(s: dict, dtype_bytes: int) -> int:
    hd = int(s.get("head_dim") or s["h"] // s["heads"])
    return 2 * s["layers"] * s["kv"] * hd * dtype_bytes


def _weights_gb(name: str, dtype: str) -> tuple[float | None, dict | None]:
    s = model_shape(name)
    if s is None:
        return None, None
    return param_count(s) * DTYPE_BYTES.get(str(dtype), 2) / GB, s


def _engine_item(what: str, name: str, dtype: str, frac: float, gpu_gb: float | None, max_len: int | None,
                 problems: list[str]) -> dict:
    w, s = _weights_gb(name, dtype)
    item = {"what": what, "model": name, "engine": "vllm", "gpu_memory_utilization": frac,
            "weights_gb": None if w is None else round(w, 2)}
    if gpu_gb:
        share = frac * gpu_gb
        item["gb"] = round(share, 2)
        if w is not None:
            kv_tok = kv_bytes_per_token(s, DTYPE_BYTES.get(str(dtype), 2))
            # vLLM needs the weights, ~1 GB of activations/workspace, and the KV cache of one full-length
            # sequence at least (it refuses to start otherwise)
            need_kv = kv_tok * int(max_len or 4096) / GB
            item["kv_cache_gb"] = round(share - w - 1.0, 2)
            item["kv_tokens"] = int(max(0.0, share - w - 1.0) * GB / kv_tok)
            if share < w + 1.0 + need_kv:
                problems.append(
                    f"{what} ({name}): its vLLM share {frac} x {gpu_gb:g} GB = {share:.1f} GB cannot hold the "
                    f"{w:.1f} GB of weights + ~1 GB workspace + {need_kv:.1f} GB KV cache for one "
                    f"{int(max_len or 4096)}-token sequence: raise its gpu_memory_utilization or lower "
                    "backend.max_model_len")
    else:
        item["gb"] = None
    return item


def _hf_item(what: str, name: str, dtype: str, batch: int, max_len: int | None) -> dict:
    w, s = _weights_gb(name, dtype)
    item = {"what": what, "model": name, "engine": "transformers", "weights_gb": None if w is None else round(w, 2)}
    if w is None:
        item["gb"] = None
        return item
    # a forward pass without grad: hidden states of one layer at a time + the KV cache of the batch
    toks = batch * int(max_len or 4096)
    act = toks * s["h"] * DTYPE_BYTES.get(str(dtype), 2) * 4 / GB
    item["activations_gb"] = round(act, 2)
    item["gb"] = round(w + act + 0.5, 2)
    return item


def _train_item(cfg: Any, name: str) -> dict:
    t = cfg.train
    dtype = str(t.get("dtype", "bfloat16"))
    w, s = _weights_gb(name, dtype)
    item = {"what": "DPO training", "model": name}
    if w is None:
        item["gb"] = None
        return item
    n = param_count(s)
    lora = bool(t.lora.enabled) if "lora" in t else False
    seqs = 2 * int(t.get("batch_size", 1))  # chosen + rejected of each pair, one micro-batch
    seq = int(t.get("max_length", 2048))
    if lora:
        r = int(t.lora.get("r", 16))
        trainable = s["layers"] * 4 * 2 * r * s["h"]  # q,k,v,o adapters (A and B), an upper-ish bound
        opt = trainable * (4 + 4 + 8) / GB  # fp32 master, grad, Adam moments
        item["lora_trainable_params"] = trainable
    else:
        opt = n * (4 + 4 + 8) / GB  # full fine-tuning: fp32 master weights, grads, Adam (no ZeRO)
    ckpt = bool(t.get("gradient_checkpointing", False))
    act_layers = 1 if ckpt else 8  # checkpointing keeps each layer's input; without, ~8 tensors per layer
    act = seqs * seq * s["h"] * 2 * s["layers"] * act_layers / GB
    logits = seqs * seq * s["vocab"] * 4 * 2 / GB  # fp32 logits and their gradient (policy; ref is no-grad)
    item.update({"weights_gb": round(w, 2), "optimizer_gb": round(opt, 2), "activations_gb": round(act, 2),
                 "logits_gb": round(logits, 2), "gb": round(w + opt + act + logits + 1.0, 2), "lora": lora})
    return item


def memory_plan(cfg: Any, budgets: dict | None = None) -> dict:
    """The plan dict (see the module docstring); ``fits`` is None without ``hardware.gpu_memory_gb``.

    Sequence lengths come from the length budgets (sphere/budgets.py; ``budgets`` = its dict, else computed
    without measuring prompts): an engine's KV cache holds one sequence of its window (min(backend.max_model_len,
    the model's own), as the backends clamp it) and a PRM input is at most min(what the longest chain can
    reach, the PRM's window)."""
    if budgets is None:
        budgets = length_budgets(cfg, measure=False)
    g = _Gpu.of(cfg, budgets.get("windows") or {})
    phases = _phases(cfg, g, budgets)
    out: dict = {"gpu_memory_gb": g.gpu_gb, "tensor_parallel_size": g.tp, "phases": {}}
    for ph, items in phases.items():
        out["phases"][ph] = {"items": items, "total_gb": _phase_total(cfg, ph, items, g)}
    if g.gpu_gb:
        for ph in ("generate", "stage3"):
            fr = [it["gpu_memory_utilization"] for it in phases.get(ph, []) if "gpu_memory_utilization" in it]
            if sum(fr) > 0.95:
                g.problems.append(f"phase {ph}: vLLM fractions {' + '.join(map(str, fr))} = {sum(fr):.2f} > 0.95 "
                                  "of one GPU: engines sharing a GPU must split it")
    out["fits"] = None if not g.gpu_gb else not g.problems
    out["problems"] = g.problems
    unknown = sorted({it["model"] for items in phases.values() for it in items if it.get("gb") is None
                      and it.get("weights_gb") is None})
    if unknown:
        out["unknown_models"] = unknown
    return out


@dataclass
class _Gpu:
    """The settings every item of the plan reads, and the problems found so far."""

    cfg: Any
    windows: dict
    gpu_gb: float | None
    tp: int
    dtype: str
    vllm: bool
    max_len: Any
    frac: float
    problems: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, cfg: Any, windows: dict) -> _Gpu:
        hw = cfg.get("hardware") or {}
        gpu_gb = hw.get("gpu_memory_gb")
        return cls(cfg, windows, float(gpu_gb) if gpu_gb else None,
                   int(cfg.backend.get("tensor_parallel_size", 1) or 1), str(cfg.model.get("dtype", "bfloat16")),
                   str(cfg.backend.name) == "vllm", cfg.backend.get("max_model_len"),
                   float(cfg.backend.get("gpu_memory_utilization", 0.85)))

    @property
    def per_gpu(self) -> float | None:
        return self.gpu_gb  # a tensor-parallel engine splits weights and KV across `tp` GPUs of this size

    def window_of(self, role: str, name: str) -> int | None:
        w = (self.windows.get(role) or {}).get("tokens")
        if w is None:
            w = generation_window(self.cfg, name).tokens
        return w or self.max_len

    def gen_engine(self, what: str, name: str, role: str) -> dict:
        n = self.window_of(role, name)
        tp, per_gpu = self.tp, self.per_gpu
        if self.vllm:
            it = _engine_item(what, name, self.dtype, self.frac, per_gpu * tp if per_gpu else None, n, self.problems)
            if it.get("gb") is not None:
                it["gb"] = round(it["gb"] / tp, 2)
        else:
            it = _hf_item(what, name, self.dtype, int(self.cfg.search.get("batch_leaves", 64)), n)
        it["max_len"] = n
        return it


def _phases(cfg: Any, g: _Gpu, budgets: dict) -> dict[str, list[dict]]:
    """The items each phase keeps resident: generate (policy, PRM), stage3, train."""
    phases: dict[str, list[dict]] = {"generate": [g.gen_engine("policy", str(cfg.model.policy), "policy")]}
    sc = cfg.scorer
    if str(sc.name) == "prm":
        phases["generate"].append(_prm_item(cfg, g, budgets))
    if bool(cfg.stages.stage3) and int(cfg.get("rounds", 1)) > 0:
        s3 = [g.gen_engine("small", str(cfg.model.small), "small")]
        if str(sc.name) == "prm":
            s3.append(dict(phases["generate"][1]))
        if not bool(cfg.stages.close_policy_before_small):
            s3.insert(0, dict(phases["generate"][0], what="policy (still open)"))
        phases["stage3"] = s3
    target = cfg.model.get("train_target") or cfg.model.policy
    if int(cfg.get("rounds", 1)) > 0:
        phases["train"] = [_train_item(cfg, str(target))]
    return phases


def _prm_item(cfg: Any, g: _Gpu, budgets: dict) -> dict:
    """The PRM: a vLLM engine of its own window, or transformers with inputs as long as a chain can reach."""
    sc = cfg.scorer
    prm_name = str(sc.model)
    prm_w = (g.windows.get("prm") or {}).get("tokens")
    if prm_w is None:
        pw = prm_window(cfg)
        prm_w = pw.tokens if pw is not None else None
    if str(sc.engine) == "vllm":
        # the PRM engine's own window (scorer.max_model_len or the PRM's max_position_embeddings), never
        # the policy backend's max_model_len
        prm_len = prm_w or sc.get("max_model_len") or 4096
        prm = _engine_item("PRM", prm_name, str(sc.get("dtype", g.dtype)), float(sc.gpu_memory_utilization),
                           g.per_gpu, prm_len, g.problems)
    else:
        # a PRM input: min(what the longest chain can reach, the PRM's window); a longer chain ends there
        reach = budgets.get("prm_input_max")
        prm_len = min(x for x in (reach, prm_w) if x) if (reach or prm_w) else 4096
        prm = _hf_item("PRM", prm_name, str(sc.get("dtype", g.dtype)), int(sc.get("batch_size", 16)), prm_len)
    prm["max_len"] = int(prm_len)
    return prm


def _phase_total(cfg: Any, ph: str, items: list[dict], g: _Gpu) -> float | None:
    """A phase's total (None when an item is unknown); over the GPU: a problem with the settings to change."""
    known = [it["gb"] for it in items if it.get("gb") is not None]
    total = round(sum(known), 2) if len(known) == len(items) else None
    gpu_gb = g.gpu_gb
    if gpu_gb and total is not None and total > gpu_gb:
        parts = " + ".join(f"{it['what']} {it['gb']:.1f} GB" for it in items)
        hint = {"generate": "lower backend.gpu_memory_utilization, or scorer.gpu_memory_utilization / "
                            "scorer.engine",
                "stage3": ("lower backend.gpu_memory_utilization or use a smaller PRM share"
                           if bool(cfg.stages.close_policy_before_small) else
                           "set stages.close_policy_before_small=true or lower backend.gpu_memory_utilization"),
                "train": "use LoRA (train_opts@train=lora), gradient_checkpointing, a smaller batch or "
                         "max_length, or more GPUs (conf/accelerate/)"}[ph]
        g.problems.append(f"phase {ph}: {parts} = {total:.1f} GB > {gpu_gb:g} GB per GPU: {hint}")
    return total


class MemoryPlanError(ValueError):
    pass


def check_memory_plan(cfg: Any, budgets: dict | None = None) -> dict:
    """The plan; raises ``MemoryPlanError`` listing what does not fit when ``hardware.gpu_memory_gb`` is set."""
    plan = memory_plan(cfg, budgets)
    if plan["fits"] is False:
        raise MemoryPlanError(
            f"the run does not fit hardware.gpu_memory_gb={plan['gpu_memory_gb']:g}:\n  - "
            + "\n  - ".join(plan["problems"])
            + "\n(`sphere run ... dry_run=true` prints the whole plan; hardware.gpu_memory_gb=null skips the check)"
        )
    return plan


def format_plan(plan: dict) -> str:
    lines = [f"GPU memory plan (per GPU{', ' + str(plan['gpu_memory_gb']) + ' GB' if plan['gpu_memory_gb'] else ''}):"]
    for ph, d in plan["phases"].items():
        tot = f"{d['total_gb']:.1f} GB" if d["total_gb"] is not None else "unknown"
        lines.append(f"  {ph}: {tot}")
        for it in d["items"]:
            gb = f"{it['gb']:.1f} GB" if it.get("gb") is not None else "?"
            extra = f" (vLLM share {it['gpu_memory_utilization']})" if "gpu_memory_utilization" in it else ""
            w = f", weights {it['weights_gb']:.1f} GB" if it.get("weights_gb") is not None else ""
            n = f", sequences up to {it['max_len']:,} tokens" if it.get("max_len") else ""
            lines.append(f"    - {it['what']}: {it.get('model', '')} {gb}{extra}{w}{n}")
    if plan["fits"] is not None:
        lines.append("  fits: yes" if plan["fits"] else "  fits: NO\n    " + "\n    ".join(plan["problems"]))
    return "\n".join(lines)
