"""What an eval record was made with (moved out of sphere/evaluation/harness.py, issue #18):
``record_signature`` (the ``sig`` of each record: model, backend, prompt, checker, sampling), ``checker_info``
and ``prompt_info`` (the versions that define a verdict and a prompt), ``eval_signature`` (signature.json of
an eval directory) and ``reuse_records`` (the finished records a resumed run may keep)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import sphere.prompts as p
import sphere.verify as v
from sphere.evaluation.settings import EvalSettings
from sphere.io import read_jsonl_tolerant
from sphere.rundir import SignatureMismatch, mismatch_message, model_fingerprint


def _by_content(sig_parts: Mapping) -> dict:
    """``sig_parts`` with a model that is a local directory named by its content (``dir sha256:...``), not by
    its path: a run directory moved or copied elsewhere (its round checkpoints with it) still resumes, and
    another model at the same path does not (issue #29)."""
    out = dict(sig_parts)
    model = out.get("model")
    if model:
        fp = model_fingerprint(model)
        if fp.get("sha256") and "name" not in fp:
            out["model"] = f"dir sha256:{fp['sha256']}"
    return out


def record_signature(sig_parts: Mapping, settings: EvalSettings) -> str:
    """The signature each eval record carries (model, backend, prompt, checker, sampling): a resumed run reuses
    only records with the same one. The Ray driver computes it with this function too. A local model
    directory counts by its content, not its path (``_by_content``)."""
    return _sha({**_by_content(sig_parts), "sampling": asdict(settings.sampling_params())})


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _pkg_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def checker_info() -> dict:
    """Versions that define a verdict: sphere.verify's own version tag (if it has one) and math-verify."""
    return {
        "module": "sphere.verify",
        "version": getattr(v, "CHECKER_VERSION", None) or getattr(v, "__version__", None),
        "math_verify": _pkg_version("math-verify"),
        "sympy": _pkg_version("sympy"),
    }


def prompt_info(family_cfg: Mapping | None) -> dict:
    if family_cfg is None:
        return {"family": None, "sha256_16": None}
    return {
        "family": family_cfg.get("name"),
        "version": getattr(p, "PROMPT_VERSION", None),
        "sha256_16": _sha(dict(family_cfg)),
    }


def reuse_records(path: Path, records: list[dict], sig: str, mode: str = "auto") -> dict[str, dict]:
    """Finished records of ``path`` for ``records`` (by id). A record written with other settings (its
    ``sig``) is refused in mode auto, with the shared signature-mismatch message (sphere/rundir/), and
    reused in mode force."""
    ids = {r["id"] for r in records}
    done: dict[str, dict] = {}
    for k, rec in enumerate(read_jsonl_tolerant(path), 1):
        if rec.get("sig") != sig and mode != "force":
            raise SignatureMismatch(mismatch_message(
                f"{path}: record {k}", "eval",
                [("sig (model, backend, prompt, checker, sampling)", rec.get("sig"), sig)]))
        if rec["id"] in ids:
            done[rec["id"]] = rec
    return done


def eval_signature(sig_parts: Mapping, settings: EvalSettings) -> dict:
    """signature.json content of an eval directory: what each record's ``sig`` hashes (model name, backend,
    prompt family, checker versions, sampling) plus the model's weights hash when it is a local directory
    or the mini model (sphere/rundir/)."""
    out = {**_by_content(sig_parts), "sampling": asdict(settings.sampling_params())}
    fp = model_fingerprint(sig_parts.get("model", "")) if sig_parts.get("model") else {}
    if fp.get("sha256"):
        out["model_sha256"] = fp["sha256"]
    return out
