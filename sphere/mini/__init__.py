"""The mini world: the embedded CPU default of `sphere run`.

- ``sphere.mini.world``: deterministic multi-step arithmetic word problems (benchmark "mini").
- ``sphere.mini.model`` / ``sphere.mini.pretrain``: the tiny Llama recipe (`sphere pretrain-mini`).
- ``ensure_mini_model(cfg, which)``: a local checkpoint directory for "mini" / "mini-small".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from sphere.mini.model import missing_files
from sphere.mini.pretrain import pretrain, sha256_file
from sphere.mini.world import (  # noqa: F401  (re-exported)
    MINI_PROMPT_TEMPLATE,
    STEP_DELIMITER,
    WorldSpec,
    format_prompt,
    generate_problems,
    load_mini_benchmark,
)
from sphere.resources import ModelNotFoundError, resource_path

log = logging.getLogger(__name__)

# which -> (recipe file conf/mini/<file>.yaml, checkpoint name)
RECIPES = {"policy": ("policy", "mini"), "small": ("small", "mini-small")}
# model names that resolve to a mini checkpoint (conf/model/mini.yaml: policy: mini, small: mini-small)
NAMES = {"mini": "policy", "mini-small": "small"}


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def assets_dir() -> Path:
    """Where shipped mini checkpoints live: ``<repo>/assets/mini`` in a checkout, the packaged copy in an
    installed wheel (``sphere.resources``)."""
    return resource_path("assets/mini", must_exist=False)


def load_recipe(which: str) -> dict:
    """The recipe mapping of ``which`` ("policy" | "small") from conf/mini/<which>.yaml."""
    if which not in RECIPES:
        raise ValueError(f"ensure_mini_model: which={which!r}; allowed: {sorted(RECIPES)}")
    path = resource_path("conf") / "mini" / f"{RECIPES[which][0]}.yaml"
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def verify_checkpoint(d: Path) -> list[str]:
    """Problems with a mini checkpoint directory (missing files, weights that do not match the sha256
    recorded in recipe.json); empty when it is usable."""
    if not d.is_dir():
        return [f"{d}: not a directory"]
    miss = missing_files(d)
    if miss:
        return [f"{d}: missing or empty {', '.join(miss)}"]
    try:
        rec = json.loads((d / "recipe.json").read_text())
    except (OSError, ValueError) as e:
        return [f"{d / 'recipe.json'}: unreadable ({e})"]
    want = rec.get("weights_sha256")
    if want and sha256_file(d / "model.safetensors") != want:
        return [
            f"{d / 'model.safetensors'}: sha256 differs from recipe.json weights_sha256 (corrupt or replaced)"
        ]
    return []


def _which_of(cfg, which: str | None) -> str:
    if which is None:
        return "policy"
    if which in NAMES:  # a model name ("mini", "mini-small")
        return NAMES[which]
    return which


def ensure_mini_model(cfg=None, which: str = "policy", progress: bool = True, build: bool = False) -> Path:
    """A local HF checkpoint directory of the mini ``which`` model ("policy"/"mini" or "small"/"mini-small").

    Returns the shipped ``assets/mini/<name>`` when it is complete and its weights match recipe.json;
    otherwise the cached ``<cfg.paths.cache_dir>/mini/<name>-<recipe hash>``, training it there first with
    the recipe of conf/mini/<which>.yaml. Training (15-25 minutes on 2 CPU cores) only happens with
    ``build=True``; otherwise a missing model is an error naming the command that builds it, never a silent
    long job. A half-written cache entry is never returned: training writes to a temporary directory that
    is renamed when complete."""
    which = _which_of(cfg, which)
    recipe = load_recipe(which)
    name = recipe["name"]
    shipped = assets_dir() / name
    problems = verify_checkpoint(shipped) if shipped.is_dir() else [f"{shipped}: not shipped"]
    if not problems:
        return shipped
    cache_root = None
    if cfg is not None:
        try:
            cache_root = Path(str(cfg.paths.cache_dir))
        except Exception:  # noqa: BLE001 - a cfg without paths (tests, scripts)
            cache_root = None
    if cache_root is None:
        cache_root = Path(os.environ.get("SPHERE_CACHE_DIR", Path.home() / ".cache" / "sphere"))
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    target = cache_root / "mini" / f"{name}-{key}"
    if target.is_dir() and not verify_checkpoint(target):
        return target
    if not build:
        raise ModelNotFoundError(
            f"the mini {which} model {name!r} is not usable ({'; '.join(problems)}) and not in the cache "
            f"({target}). Build it once (15-25 min on 2 CPU cores): "
            f"`sphere pretrain-mini mini={which} save_to={target}`"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        log.info("training the mini %s model (no shipped checkpoint) into %s", which, target)
        pretrain(recipe, tmp, progress=progress, evaluate_after=False)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
