"""Scale-out: Ray actors for `sphere generate` / `sphere eval` (``runner=ray``), see ray_runner.py and
docs/scaling.md. Nothing here imports ray at package import time."""
