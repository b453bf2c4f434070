"""sphere: self-evolving preference data for multi-step math reasoning (SPHERE, arXiv 2503.04813).

Layout: ``sphere.engine`` (C++ MCTS forest + pure-Python reference), ``sphere.backends`` (vLLM,
transformers, OpenAI-compatible HTTP), ``sphere.verify`` (answer checking), ``sphere.rewards`` (step
scorers), ``sphere.evaluation``, ``sphere.generate`` (the three SPHERE stages), ``sphere.train`` (DPO),
``sphere.loop`` (the self-evolution loop, `sphere run`). The console entry point is ``sphere.cli:main``.
"""

__version__ = "0.1.0"


def _register_resolvers() -> None:
    # `${sphere_resource:...}` in the configs must resolve in every process that reads a config (the CLI,
    # tests composing configs, Ray workers), so it is registered on import.
    try:
        from sphere.resources import register_resolvers
    except ImportError:  # pragma: no cover - omegaconf missing: nothing reads configs then
        return
    try:
        register_resolvers()
    except ImportError:  # pragma: no cover
        pass


_register_resolvers()


def _register_settings() -> None:
    # The settings' defaults (sphere/schema.py) are nodes of Hydra's ConfigStore that conf/ composes over
    # (`- /settings/search@_here_`), so every process composing sphere's configs needs them: registered on import.
    try:
        from sphere.schema import register
    except ImportError:  # pragma: no cover
        return
    try:
        register()
    except ImportError:  # pragma: no cover - hydra missing: nothing composes configs then
        pass


_register_settings()
