"""The stand-in family's recipe (``RECIPE``, names, directories) and the small helpers every build step
shares (deterministic torch, the build log, the prompt family, the mini world, source checkpoints, the
learning-rate schedule). ``sphere.standins.qwen2_5`` (the build), ``reward_model`` and ``measure`` import
it; it imports none of them (issue: one import cycle in sphere.standins)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from sphere.mini import assets_dir, verify_checkpoint
from sphere.mini.training import deterministic
from sphere.mini.world import WorldSpec
from sphere.model_paths import standin_path as _standin_path
from sphere.prompts import load_family

RECIPE_VERSION = 1

# model name -> (role, directory name under assets/standin)
NAMES = {
    "standin-qwen2_5": "policy",
    "standin-qwen2_5-small": "small",
    "standin-qwen2_5-prm": "prm",
}
DIR_OF = {v: k for k, v in NAMES.items()}

RECIPE = {
    "version": RECIPE_VERSION,
    "seed": 0,
    "family": "qwen2_5",  # conf/prompt/<family>.yaml: the chat prompt the models are trained on
    "world": {},  # sphere.mini.world.WorldSpec defaults (the mini benchmark's world)
    "policy": {
        "source": "mini",  # assets/mini/<source>: the Llama converted to Qwen2
        "intermediate_size": None,  # None = keep the MLP width
        "n_problems": 6000,
        "reflection_share": 0.15,  # share of examples in the stage-2 reflection prompt
        "n_drills": 0,  # arithmetic drills in chat form (sphere.mini.pretrain.drill_examples)
        "slip_rate": 0.9,  # planted misconception of the source recipe (conf/mini/policy.yaml)
        "slip_kinds": ["divide"],
        "steps": 400,
        "batch_size": 16,
        "lr": 2e-3,
        "warmup": 20,
    },
    "small": {
        "source": "mini-small",
        "intermediate_size": 64,  # narrower MLP than the policy's 256
        "n_problems": 6000,
        "reflection_share": 0.0,
        "n_drills": 0,
        "slip_rate": 0.0,  # conf/mini/small.yaml has no planted slips
        "slip_kinds": ["divide"],
        "steps": 300,
        "batch_size": 16,
        "lr": 2e-3,
        "warmup": 20,
    },
    "prm": {
        "base": "policy",  # body initialised from the fine-tuned stand-in policy
        "extra_layers": 2,  # transformer layers added on top of the policy's (identity at init)
        "n_problems": 8000,  # one (right, corrupted) pair of PRM inputs per problem
        "steps": 2000,  # measured: 800 steps -> pairwise 0.71, 2000 -> 0.82 (held-out dev pairs)
        "batch_size": 8,  # pairs per step (16 sequences)
        "lr": 5e-4,  # the policy's layers
        "new_lr": 3e-3,  # the added layers
        "head_lr": 3e-3,  # the score head
        "pair_weight": 1.0,  # Bradley-Terry loss weight (plus the pointwise loss on every step tag)
        "warmup": 20,
    },
    "eval": {"n": 200, "pass_k": 8, "temperature": 0.8, "max_new_tokens": 160, "batch_size": 200,
             "prm_n": 300},
}


# ---------------------------------------------------------------------------------------------- paths
def assets_root() -> Path:
    """``<repo>/assets/standin`` (next to ``assets/mini``)."""
    return _standin_path(DIR_OF["policy"]).parent


def standin_path(name: str) -> Path:
    """The shipped stand-in checkpoint ``name`` (``standin-qwen2_5``, ``standin-qwen2_5-small``,
    ``standin-qwen2_5-prm``; the roles ``policy`` / ``small`` / ``prm`` work too)."""
    return _standin_path(DIR_OF.get(name, name))


# ------------------------------------------------------------------------------------------ utilities
def _deterministic():
    """Single-threaded deterministic torch for the duration (the mini pretraining's own guard)."""
    return deterministic(1)


def _log(msg: str) -> None:
    print(f"standin: {msg}", file=sys.stderr, flush=True)


def _family() -> dict:
    return load_family(RECIPE["family"])


def _world():
    return WorldSpec.from_mapping(RECIPE["world"])


def _mini_source(name: str) -> Path:
    d = assets_dir() / name
    bad = verify_checkpoint(d)
    if bad:
        raise FileNotFoundError(f"stand-in build: source checkpoint {d} unusable: {'; '.join(bad)}")
    return d


def _lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * t))


