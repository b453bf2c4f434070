"""The orchestration layer: `sphere run` (the top of the import graph below ``cli``).

- ``rounds``: the round loop (self-evolution and transfer are two settings of one loop) and ``main``;
- ``plan``: what is checked before any model loads, and the dry run's plan;
- ``controls``: the per-round controls inside the loop (what they are: ``sphere.controls``);
- ``summary``: summary.json / summary.md (the paired statistics: ``sphere.evaluation.paired``).

Where generation and evaluation run is the runner seam's choice (``sphere.runners``), made once from ``cfg``.
"""
