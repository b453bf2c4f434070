"""Test and benchmark helpers that ship with the package (no hub access, ever).

``sphere.testing.tiny``: a tiny Llama policy model and a tiny Qwen2.5-Math-PRM-shaped reward model, built
locally in seconds and cached by recipe hash (``tiny_model_path()``, ``tiny_prm_path()``).
"""

from __future__ import annotations

__all__ = ["tiny_model_path", "tiny_prm_path"]


def tiny_model_path():
    from sphere.testing.tiny import tiny_model_path as f

    return f()


def tiny_prm_path():
    from sphere.testing.tiny import tiny_prm_path as f

    return f()
