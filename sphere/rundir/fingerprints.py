"""What a run directory's signature is made of (sphere.rundir): content hashes of files and model
directories (``file_sha256``, cached for big files; ``model_dir_sha256``; ``model_fingerprint``), the data's
signature, and the per-command signatures of `sphere generate` (``generate_signature``, ``check_generate``)
and `sphere train` (``train_signature``)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

import sphere.model_paths as _models
from sphere.data.selection import NAMED as _NAMED, sources as _sources
from sphere.io import atomic_write_json
from sphere.model_paths import resolve_model
from sphere.rundir.resume import _plain, check_or_record

_HASH_CACHE_MIN = 16 * 1024 * 1024  # files at least this big are cached by (path, size, mtime, inode)
_mem_hashes: dict[tuple, str] = {}
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".model", ".tiktoken")
MODEL_FILE_NAMES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                    "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
                    "model.safetensors.index.json", "pytorch_model.bin.index.json")


def _cache_file() -> Path:
    root = os.environ.get("SPHERE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sphere")
    return Path(root) / "file_sha256.json"


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes; big files are cached by (real path, size, mtime, inode)."""
    p = Path(path)
    st = p.stat()
    ident = (os.path.realpath(p), st.st_size, st.st_mtime_ns, st.st_ino)
    if ident in _mem_hashes:
        return _mem_hashes[ident]
    disk: dict = {}
    cache = _cache_file()
    if st.st_size >= _HASH_CACHE_MIN:
        with contextlib.suppress(OSError, ValueError):
            disk = json.loads(cache.read_text())
        hit = disk.get(ident[0])
        if isinstance(hit, dict) and [hit.get("size"), hit.get("mtime_ns"), hit.get("ino")] == list(ident[1:]):
            _mem_hashes[ident] = str(hit["sha256"])
            return _mem_hashes[ident]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    _mem_hashes[ident] = digest
    if st.st_size >= _HASH_CACHE_MIN:
        disk[ident[0]] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "sha256": digest}
        with contextlib.suppress(OSError):
            atomic_write_json(cache, disk)
    return digest


def model_dir_sha256(path: str | os.PathLike) -> str:
    """One sha256 over a model directory's weights, config and tokenizer files (names and contents)."""
    d = Path(path)
    h = hashlib.sha256()
    for f in sorted(d.iterdir(), key=lambda q: q.name):
        if f.is_file() and (f.name in MODEL_FILE_NAMES or f.suffix in MODEL_FILE_SUFFIXES):
            h.update(f"{f.name}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def _is_pathlike(s: str) -> bool:  # the rule of sphere.model_paths.resolve_model
    return s.startswith(("/", ".", "~")) or s.count("/") > 1 or Path(s).expanduser().exists()


def model_fingerprint(name_or_path: Any, cfg: Any = None) -> dict:
    """``{"name": ..., "sha256": ...}`` of a model: local directories by content only (a moved checkpoint
    is the same model), ``mini``/``mini-small`` by name and content, hub names by name (not downloaded)."""
    s = str(name_or_path).strip()
    if s in ("mini", "mini-small") or s in getattr(_models, "STANDIN_NAMES", ()):  # shipped, resolved locally
        try:
            return {"name": s, "sha256": model_dir_sha256(resolve_model(s, cfg))}
        except Exception:  # noqa: BLE001 - the command's own model loading reports it
            return {"name": s}
    if _is_pathlike(s):
        p = Path(s).expanduser()
        if (p / "config.json").is_file():
            return {"sha256": model_dir_sha256(p)}
        return {"name": s}  # resolve_model names what is missing when the command loads it
    return {"name": s}


# -------------------------------------------------------------------------------- per-command signatures
def _node(cfg: Any, key: str) -> Any:
    return _plain(OmegaConf.select(cfg, key, default=None))


def data_signature(dcfg: Any) -> dict:
    """What ``load_problems`` reads: the ``data`` settings (but its ``data_dir`` path) and the sha256 of
    every local file among the sources (shipped sets and JSONL paths); ``mini`` and ``hf:`` sources are
    named by their settings."""
    conf = {k: v for k, v in (_plain(dcfg) or {}).items() if k != "data_dir"}
    files = {}
    for src in _sources(dcfg):
        path = Path(str(dcfg.data_dir)) / _NAMED[src] if src in _NAMED else Path(src)
        if src in _NAMED or (src != "mini" and not src.startswith("hf:") and path.is_file()):
            files[src if src in _NAMED else path.name] = file_sha256(path) if path.is_file() else "<missing>"
    return {"config": conf, "files_sha256": files}


GENERATE_IGNORED = {"stages": ("close_policy_before_small",)}  # memory management, not outputs
# The `sampling` settings `sphere generate` reads (the search samples its steps with search.*): the token budget
# of a full solution (construction=best_worst_of_n's samples). The others are in sphere.rundir.resume.REMOVED_KEYS,
# so a run directory recorded with them still resumes.
GENERATE_SAMPLING = ("max_solution_tokens",)


def generate_signature(cfg: Any, policy: Any = None, small: Any = None) -> dict:
    """Everything that determines `sphere generate`'s outputs (pairs, stage logs): the models (names and
    weight hashes; ``policy``/``small`` override ``model.policy``/``model.small``, as in `sphere run`), the
    data, search, scorer (and its PRM's hash), stages, filters, prompt, the sampling settings it reads
    (``GENERATE_SAMPLING``), backend kind and seed.
    Paths, logging, workers and the engine implementation (C++ and Python build identical trees) are
    not part of it."""
    stages = dict(_node(cfg, "stages") or {})
    for k in GENERATE_IGNORED["stages"]:
        stages.pop(k, None)
    models = {"policy": model_fingerprint(policy if policy is not None else cfg.model.policy, cfg)}
    if stages.get("stage3", True):
        models["small"] = model_fingerprint(small if small is not None else cfg.model.small, cfg)
    scorer = dict(_node(cfg, "scorer") or {})
    if scorer.get("name") == "prm" and scorer.get("model"):
        models["prm"] = model_fingerprint(scorer["model"], cfg)
    return {
        "model": models,
        "data": data_signature(cfg.data),
        "search": _node(cfg, "search"),
        "scorer": scorer,
        "stages": stages,
        "filters": _node(cfg, "filters"),
        "prompt": _node(cfg, "prompt"),
        "sampling": {k: v for k, v in (_node(cfg, "sampling") or {}).items() if k in GENERATE_SAMPLING},
        "backend": {"name": _node(cfg, "backend.name"), "dtype": _node(cfg, "backend.dtype")},
        "seed": _node(cfg, "seed"),
    }


def check_generate(cfg: Any, out: str | os.PathLike, policy: Any = None, small: Any = None) -> str:
    """``check_or_record`` for a generate directory (call before any model loads)."""
    return check_or_record(out, "generate", generate_signature(cfg, policy, small))


# DPO recipe keys that change how training runs or reports, not what it produces
TRAIN_IGNORED = ("threads", "progress", "logging_steps", "save_steps", "save_total_limit")


def train_signature(t: Mapping, policy_path: str | os.PathLike, pairs_path: str | os.PathLike) -> dict:
    """`sphere train`'s outputs are determined by the resolved DPO recipe, the base model's content and the
    pairs file's content."""
    recipe = {k: v for k, v in _plain(dict(t)).items() if k not in TRAIN_IGNORED}
    return {"train": recipe, "base_model": model_fingerprint(policy_path),
            "pairs_sha256": file_sha256(pairs_path)}
