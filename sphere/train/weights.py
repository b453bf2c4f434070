"""What training did to the weights (issue #28 item 8): ``weight_change`` compares the published checkpoint
with the base model tensor by tensor, streaming from the safetensors files (no second model in memory), and
``lora_weight_names`` names the base weights a LoRA adapter changes once merged."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path

from safetensors import safe_open

CHUNK = 1 << 24  # elements per float32 chunk (64 MiB)


def _files(d: Path) -> list[Path]:
    st = sorted(d.glob("*.safetensors"))
    return st if st else sorted(p for p in d.glob("*.bin") if "training_args" not in p.name)


class _Tensors:
    """key -> tensor of a model directory (safetensors opened lazily; .bin shards loaded whole)."""

    def __init__(self, d: Path, stack: ExitStack):
        self.where: dict[str, object] = {}
        for f in _files(d):
            if f.suffix == ".safetensors":
                h = stack.enter_context(safe_open(str(f), framework="pt"))
                for k in h.keys():
                    self.where[k] = h
            else:
                import torch

                sd = torch.load(f, map_location="cpu", weights_only=True)
                for k in sd:
                    self.where[k] = sd
        if not self.where:
            raise FileNotFoundError(f"{d}: no *.safetensors or *.bin weights")

    def __getitem__(self, k: str):
        h = self.where[k]
        return h[k] if isinstance(h, dict) else h.get_tensor(k)


def _chunks(a, b) -> Iterator[tuple]:
    fa, fb = a.reshape(-1), b.reshape(-1)
    for i in range(0, fa.numel(), CHUNK):
        yield fa[i:i + CHUNK].float(), fb[i:i + CHUNK].float()


def weight_change(base: Path, new: Path, names: Iterable[str] | None = None) -> dict:
    """Relative L2 change ``||new - base|| / ||base||`` and the largest absolute change over the tensors in
    ``names`` (the trained ones; None or no match = every tensor the two checkpoints share), the base cast to
    the published dtype first."""
    with ExitStack() as stack:
        b, n = _Tensors(Path(base), stack), _Tensors(Path(new), stack)
        common = [k for k in n.where if k in b.where]
        wanted = [k for k in common if names is not None and k in set(names)]
        keys, scope = (wanted, "trained") if wanted else (common, "all")
        sq_d = sq_b = 0.0
        max_abs, changed, elems = 0.0, 0, 0
        for k in keys:
            tb, tn = b[k], n[k]
            if tuple(tb.shape) != tuple(tn.shape):
                continue
            # the base as training saw it (loaded in train.dtype): a float32 base published in bfloat16
            # differs by the cast alone, which is no training
            tb = tb.to(tn.dtype)
            diff_here = False
            for cb, cn in _chunks(tb, tn):
                d = cn - cb
                sq_d += float((d.double() ** 2).sum())
                sq_b += float((cb.double() ** 2).sum())
                m = float(d.abs().max()) if d.numel() else 0.0
                max_abs = max(max_abs, m)
                diff_here |= m > 0
            changed += diff_here
            elems += tb.numel()
    return {"weight_change_rel": math.sqrt(sq_d) / math.sqrt(sq_b) if sq_b > 0 else float(sq_d > 0),
            "weight_change_max_abs": max_abs, "weight_change_tensors": changed,
            "weight_change_tensors_compared": len(keys), "weight_change_params": elems,
            "weight_change_scope": scope}


def lora_weight_names(peft_model) -> list[str]:
    """The merged checkpoint's names of the weights a LoRA adapter changes (``...q_proj.weight``)."""
    out = []
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            base = name
            for prefix in ("base_model.model.",):
                if base.startswith(prefix):
                    base = base[len(prefix):]
            out.append(base + ".weight")
    return out


