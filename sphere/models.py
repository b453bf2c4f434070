"""Model names -> local directories.

``resolve_model(name_or_path, cfg)``:
- ``"mini"`` / ``"mini-small"``: the mini-world policy / small model, built or cached on first use by
  ``sphere.mini.ensure_mini_model(cfg, which)``;
- an existing local directory with a ``config.json``: returned as is;
- a path-like value (absolute, ``./``, ``~``) that does not exist: fails at once, naming the path;
- a hub name (``Qwen/Qwen2.5-Math-7B-Instruct``): looked up in the local Hugging Face cache only when
  ``HF_HUB_OFFLINE=1``; otherwise downloaded by ``huggingface_hub.snapshot_download``.
"""

from __future__ import annotations

import os
from pathlib import Path


class ModelNotFoundError(FileNotFoundError):
    pass


def _looks_like_path(s: str) -> bool:
    return s.startswith(("/", ".", "~")) or s.count("/") > 1


def check_model_dir(path: str | os.PathLike, what: str = "model") -> Path:
    """A local HF model directory, or a clear error naming the path and what is missing."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelNotFoundError(f"{what} path {str(p)!r} does not exist (expected a local HF model "
                                 f"directory with config.json, 'mini', or a hub name org/name)")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ModelNotFoundError(f"{what} path {str(p)!r} is not a HF model directory (no config.json)")
    return p.resolve()


def resolve_model(name_or_path: str | os.PathLike, cfg=None) -> Path:
    """Return a local model directory for ``name_or_path`` (see module docstring)."""
    s = str(name_or_path).strip()
    if not s:
        raise ModelNotFoundError("model name is empty (config key model.policy / model.small / model.prm)")
    if s in ("mini", "mini-small"):
        from sphere.mini import ensure_mini_model  # lazy: the mini world is optional at import time

        return Path(ensure_mini_model(cfg, which=s))
    p = Path(s).expanduser()
    if p.exists() or _looks_like_path(s):
        return check_model_dir(p)
    if s.count("/") == 1:  # org/name on the hub
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(s, local_files_only=offline))
        except Exception as e:  # noqa: BLE001 - re-raised with the name and the mode
            mode = "the local HF cache (HF_HUB_OFFLINE=1)" if offline else "the Hugging Face hub"
            raise ModelNotFoundError(f"model {s!r} not found in {mode}: {type(e).__name__}: {e}") from None
    raise ModelNotFoundError(f"model {s!r}: not 'mini', not an existing directory, not a hub name org/name")
