"""Shared by both engines: `EngineConfig` and the argument converters (same errors for C++ and Python)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

RULES = {"uct": 0, "puct": 1}
FPUS = {"parent": 0, "value": 1, "inf": 2, "const": 3}
PRUNINGS = {"none": 0, "minmax": 1, "topk": 2, "threshold": 3}
PATH_BY = {"visits": 0, "value": 1, "reward": 2}

# Node flag bits (csrc/forest.hpp). Bits are only ever set, never cleared, until reset().
TERMINAL, EXPANDED, PRUNED_EXPAND, PRUNED_SUBTREE, EXHAUSTED = 1, 2, 4, 8, 16
PRUNED = PRUNED_EXPAND | PRUNED_SUBTREE


@dataclass(frozen=True)
class EngineConfig:
    """Selection, virtual loss and pruning settings of a forest (both engines).

    The exact formulas are in ``csrc/forest.hpp``; in short, with VL = ``virtual_loss`` and
    L = ``virtual_loss_value``, a child with ``visits`` N, ``inflight`` I and value sum W has
    ``N_eff = N + VL*I`` and ``Q = (W + VL*I*L) / N_eff`` (or the FPU when ``N_eff == 0``).
    PUCT: ``Q + c*prior*sqrt(P_eff)/(1+N_eff)``; UCT: ``Q + c*sqrt(ln(max(P_eff,1))/N_eff)``, and an
    unvisited child scores its FPU. Ties go to the lowest child index.
    """

    rule: str = "puct"  # "uct" | "puct"
    c: float = 1.25  # exploration constant (c_uct or c_puct), >= 0
    virtual_loss: float = 1.0  # weight of one in-flight descent, counted as visits worth `virtual_loss_value`
    virtual_loss_value: float = 0.0  # the pessimistic value an in-flight visit counts as (0 for rewards in [0,1])
    fpu: str | float = "parent"  # "parent" | "value" | "inf" | "const" (uses fpu_value) | a number (= const)
    fpu_value: float = 0.0  # FPU for fpu="const"
    fpu_reduction: float = 0.0  # fpu="parent": parent's mean value minus this
    q_norm: bool = False  # min-max normalise Q per tree over the mean values seen by backup (MuZero)
    max_depth: int = 12  # children created at this depth are terminal automatically (1..32767)
    pruning: str = "none"  # "none" | "minmax" | "topk" | "threshold", applied in expand() on child rewards
    prune_k: int = 2  # topk: children kept (>= 1)
    prune_tau: float = 0.0  # threshold: drop reward < tau (or < best sibling - tau when prune_relative)
    prune_relative: bool = False  # threshold relative to the best sibling's reward

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"EngineConfig.rule={self.rule!r}: allowed {sorted(RULES)}")
        if isinstance(self.fpu, str):
            if self.fpu not in FPUS:
                raise ValueError(f"EngineConfig.fpu={self.fpu!r}: allowed {sorted(FPUS)} or a number")
        elif isinstance(self.fpu, bool) or not isinstance(self.fpu, (int, float)) or not math.isfinite(self.fpu):
            raise ValueError(f"EngineConfig.fpu={self.fpu!r}: allowed {sorted(FPUS)} or a finite number")
        if self.pruning not in PRUNINGS:
            raise ValueError(f"EngineConfig.pruning={self.pruning!r}: allowed {sorted(PRUNINGS)}")
        for name in ("c", "virtual_loss", "virtual_loss_value", "fpu_value", "fpu_reduction", "prune_tau"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"EngineConfig.{name}={v!r}: must be a finite number")
        if self.c < 0 or self.virtual_loss < 0:
            raise ValueError(f"EngineConfig: c={self.c} and virtual_loss={self.virtual_loss} must be >= 0")
        if not isinstance(self.max_depth, int) or not 1 <= self.max_depth <= 32767:
            raise ValueError(f"EngineConfig.max_depth={self.max_depth!r}: allowed integers 1..32767")
        if not isinstance(self.prune_k, int) or self.prune_k < 1:
            raise ValueError(f"EngineConfig.prune_k={self.prune_k!r}: allowed integers >= 1")

    @property
    def fpu_mode(self) -> str:
        return self.fpu if isinstance(self.fpu, str) else "const"

    @property
    def fpu_const(self) -> float:
        return float(self.fpu_value if isinstance(self.fpu, str) else self.fpu)

    @classmethod
    def from_mapping(cls, m) -> EngineConfig:
        """Build from a dict / DictConfig, ignoring keys that are not fields."""
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: m[k] for k in names if k in m})


def _arr(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        if a.ndim == 0 and a.size == 1 and not isinstance(x, np.ndarray):
            raise ValueError(f"{name} must be a 1-D array, got a scalar")
        raise ValueError(f"{name} must be a 1-D array, got shape {a.shape}")
    return a


def as_int(x, name: str, dtype) -> np.ndarray:
    """Integer 1-D array of `dtype` (int32 ids, int64 payloads). Lists and other integer dtypes are cast
    when every value fits; floats and bools are rejected."""
    a = _arr(x, name)
    if a.size == 0:
        return np.zeros(0, dtype)
    if a.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers ({np.dtype(dtype).name}), got dtype {a.dtype}")
    if a.dtype != dtype:
        info = np.iinfo(dtype)
        if a.min() < info.min or a.max() > info.max:
            raise ValueError(f"{name} has values outside the {np.dtype(dtype).name} range")
        a = a.astype(dtype)
    return np.ascontiguousarray(a)


def as_f32(x, name: str) -> np.ndarray:
    """float32 1-D array (ints and float64 are converted, with float32 rounding)."""
    a = _arr(x, name)
    if a.size == 0:
        return np.zeros(0, np.float32)
    if a.dtype.kind not in "fiu":
        raise ValueError(f"{name} must hold numbers (float32), got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.float32)


def as_flag(x, name: str) -> np.ndarray:
    """uint8 1-D array of 0/1 (bool or integer input)."""
    a = _arr(x, name)
    if a.size == 0:
        return np.zeros(0, np.uint8)
    if a.dtype.kind not in "biu":
        raise ValueError(f"{name} must hold booleans (uint8 0/1), got dtype {a.dtype}")
    if a.dtype.kind != "b" and (a.min() < 0 or a.max() > 1):
        raise ValueError(f"{name} must hold 0 or 1")
    return np.ascontiguousarray(a, dtype=np.uint8)


def as_index(x, name: str) -> int:
    """A single node id as a Python int in the int32 range."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise ValueError(f"{name} must be an integer node id, got {type(x).__name__}")
    v = int(x)
    if not -(2**31) <= v < 2**31:
        raise IndexError(f"{name}={v} is not a node id")
    return v


def as_count(x, name: str) -> int:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {type(x).__name__}")
    v = int(x)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    if v >= 2**31:
        raise ValueError(f"{name} must be < 2^31, got {v}")
    return v


def path_by(by: str) -> str:
    if by not in PATH_BY:
        raise ValueError(f"by={by!r}: allowed {sorted(PATH_BY)}")
    return by
