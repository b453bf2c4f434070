"""sphere: self-evolving preference data for multi-step math reasoning (SPHERE, arXiv 2503.04813).

Layout: ``sphere.engine`` (C++ MCTS forest + pure-Python reference), ``sphere.backends`` (vLLM,
transformers, OpenAI-compatible HTTP), ``sphere.verify`` (answer checking), ``sphere.rewards`` (step
scorers), ``sphere.evaluation``, ``sphere.generate`` (the three SPHERE stages), ``sphere.train`` (DPO),
``sphere.pipeline`` (the self-evolution loop). The console entry point is ``sphere.cli:main``.
"""

__version__ = "0.1.0"
