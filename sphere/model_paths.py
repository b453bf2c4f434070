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
from typing import Any

from safetensors import safe_open

from sphere.mini import assets_dir, ensure_mini_model
from sphere.resources import ModelNotFoundError


class CorruptModelError(ValueError):
    """A model file exists but cannot be read (truncated or corrupt safetensors)."""


def check_weights(path: str | os.PathLike, what: str = "model") -> None:
    """Read the header of every ``*.safetensors`` file of a model directory (cheap: the header and the file
    size, no tensor data), so a truncated or corrupt file fails here, named, instead of as a bare
    ``SafetensorError: incomplete metadata`` deep inside model loading."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        return
    for f in files:
        try:
            with safe_open(str(f), framework="numpy"):
                pass
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: re-raised with the file named
            raise CorruptModelError(
                f"{what} weights {f} are unreadable ({type(e).__name__}: {e}): the file is truncated or "
                "corrupt (an interrupted copy, download or save?). Copy or download it again; for a "
                "checkpoint sphere wrote, delete its directory and rerun the command that made it."
            ) from None


def looks_like_path(s: str) -> bool:
    return s.startswith(("/", ".", "~")) or s.count("/") > 1


def check_model_dir(path: str | os.PathLike, what: str = "model") -> Path:
    """A local HF model directory, or a clear error naming the path and what is missing."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelNotFoundError(f"{what} path {str(p)!r} does not exist (expected a local HF model "
                                 f"directory with config.json, 'mini', or a hub name org/name)")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ModelNotFoundError(f"{what} path {str(p)!r} is not a HF model directory (no config.json)")
    check_weights(p, what)
    check_tokenizer(p, what)
    return p.resolve()


# Files one of which a model directory needs for its tokenizer: a fast tokenizer, a SentencePiece model, a
# BPE vocabulary (with merges.txt), a WordPiece vocabulary or a tiktoken file.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def check_tokenizer(p: Path, what: str = "model") -> None:
    """A model directory without tokenizer files failed deep in transformers ("install sentencepiece or
    tiktoken"): name the directory and the files it lacks (issue #29)."""
    if any((p / f).is_file() for f in TOKENIZER_FILES) or any(p.glob("*.tiktoken")):
        return
    raise ModelNotFoundError(
        f"{what} path {str(p)!r} has no tokenizer: none of {', '.join(TOKENIZER_FILES)} (or *.tiktoken) is "
        "there. Copy the tokenizer files (tokenizer.json and tokenizer_config.json) from the model this "
        "checkpoint was made from into that directory")


# --- stand-ins of the paper's models (sphere.standins.qwen2_5): name -> <repo>/assets/standin/<name>
STANDIN_NAMES = ("standin-qwen2_5", "standin-qwen2_5-small", "standin-qwen2_5-prm",  # sphere.standins.qwen2_5
                 "standin-phi4", "standin-phi4-mini", "standin-r1-distill",  # sphere.standins.families
                 "standin-r1-distill-small")


def standin_path(name: str) -> Path:
    """Where the shipped stand-in checkpoint ``name`` lives: ``<repo>/assets/standin/<name>`` (next to
    ``sphere.mini.assets_dir()``), whatever the working directory."""
    if name not in STANDIN_NAMES:
        raise ModelNotFoundError(f"stand-in model {name!r}: allowed {list(STANDIN_NAMES)}")
    return assets_dir().parent / "standin" / name
# --- end stand-ins


def model_files(name: str, filenames: tuple[str, ...]) -> tuple[dict[str, Path] | None, str]:
    """The files ``filenames`` of a model that are at hand, without loading or downloading weights:
    ``({filename: path}, where)`` (files the model does not have are left out) or ``(None, why not)`` when its
    files cannot be reached (a hub name offline and not in the local cache, a path that does not exist).
    A local directory or stand-in is read; a hub name ``org/name`` is looked up in the local Hugging Face
    cache, and fetched (those small files only) when the hub is reachable (``HF_HUB_OFFLINE`` unset)."""
    s = str(name).strip()
    if s in STANDIN_NAMES:
        s = str(standin_path(s))
    p = Path(s).expanduser()
    if p.is_dir():
        return {f: p / f for f in filenames if (p / f).is_file()}, f"directory {p}"
    if p.exists() or looks_like_path(s) or s.count("/") != 1:
        return None, f"{s!r} is not a local model directory"
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of transformers
        return None, "huggingface_hub is not installed"
    out: dict[str, Path] = {}
    cached = False
    for f in filenames:
        hit = try_to_load_from_cache(s, f)
        if isinstance(hit, str):
            out[f], cached = Path(hit), True
        elif hit is not None:  # the cache records that the repository has no such file
            cached = True
    if cached:
        return out, f"hub model {s} in the local cache"
    if offline:
        return None, f"hub model {s} is not in the local cache (HF_HUB_OFFLINE=1)"
    got = False
    for f in filenames:
        try:
            out[f] = Path(hf_hub_download(s, f))
            got = True
        except Exception:  # noqa: BLE001 - a missing file (404), no network, a gated repo: not at hand
            continue
    return (out, f"hub model {s}") if got else (None, f"hub model {s}: its files could not be fetched")


def resolve_model(name_or_path: str | os.PathLike, cfg=None) -> Path:
    """Return a local model directory for ``name_or_path`` (see module docstring)."""
    s = str(name_or_path).strip()
    if not s:
        raise ModelNotFoundError("model name is empty (config key model.policy / model.small / model.prm)")
    if s in ("mini", "mini-small"):
        p = Path(ensure_mini_model(cfg, which=s))
        check_weights(p, s)
        return p
    # --- stand-ins of the paper's models (conf/model/standin_*.yaml): shipped in <repo>/assets/standin/
    if s in STANDIN_NAMES:
        return check_model_dir(standin_path(s), what=f"stand-in model {s!r}")
    # --- end stand-ins
    p = Path(s).expanduser()
    if p.exists() or looks_like_path(s):
        return check_model_dir(p)
    if s.count("/") == 1:  # org/name on the hub
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        from huggingface_hub import snapshot_download  # heavy: ~1 s of imports (its hf_api)

        try:
            snap = Path(snapshot_download(s, local_files_only=offline))
        except Exception as e:  # noqa: BLE001 - re-raised with the name and the mode
            mode = "the local HF cache (HF_HUB_OFFLINE=1)" if offline else "the Hugging Face hub"
            raise ModelNotFoundError(f"model {s!r} not found in {mode}: {type(e).__name__}: {e}") from None
        check_weights(snap, s)
        return snap
    raise ModelNotFoundError(f"model {s!r}: not 'mini', not an existing directory, not a hub name org/name")


def load_tokenizer(name_or_path: str | os.PathLike, cfg=None) -> Any:
    """The tokenizer of a model (``resolve_model``'s directory), with ``model.trust_remote_code`` from ``cfg``
    (off by default)."""
    from transformers import AutoTokenizer  # heavy: only where a tokenizer is needed

    trust = bool(cfg is not None and cfg.get("model") is not None and cfg.model.get("trust_remote_code"))
    return AutoTokenizer.from_pretrained(resolve_model(name_or_path, cfg), trust_remote_code=trust)
