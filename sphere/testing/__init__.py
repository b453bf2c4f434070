"""Test and benchmark helpers that ship with the package (no hub access, ever).

``sphere.testing.tiny``: a tiny Llama policy model and a tiny Qwen2.5-Math-PRM-shaped reward model, built
locally in seconds and cached by recipe hash (``tiny_model_path()``, ``tiny_prm_path()``).
"""

from __future__ import annotations

from sphere.testing.tiny import tiny_model_path, tiny_prm_path

__all__ = ["tiny_model_path", "tiny_prm_path"]
