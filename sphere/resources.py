"""Where the files sphere ships live: configs, the mini/stand-in models, the benchmark copies.

One rule for every command, independent of the working directory:

- a source checkout or an editable install reads them from the repository (``<repo>/conf``,
  ``<repo>/assets``, ``<repo>/data/benchmarks``);
- an installed wheel reads the copies packaged inside it (``site-packages/sphere/conf``,
  ``sphere/_bundle/assets``, ``sphere/_bundle/data/benchmarks``; see CMakeLists.txt's ``install`` rules).

Configs refer to them through the ``${sphere_resource:REL}`` resolver (e.g. ``paths.data_dir``), which
``register_resolvers()`` installs; ``sphere.cli`` calls it before Hydra composes anything.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

_PKG = Path(__file__).resolve().parent
_REPO = _PKG.parent

# relative resource path -> where it sits inside an installed wheel (relative to the package)
_PACKAGED = {"conf": "conf", "assets": "_bundle/assets", "data": "_bundle/data"}


class ResourceNotFoundError(FileNotFoundError):
    pass


class ModelNotFoundError(FileNotFoundError):
    """A model name or path that does not lead to a usable local model (re-exported by ``sphere.model_paths``)."""


def resource_path(rel: str, must_exist: bool = True) -> Path:
    """The shipped file or directory ``rel`` (``"assets/mini"``, ``"data/benchmarks"``, ``"conf"``).

    The repository copy wins when sphere runs from a checkout; otherwise the packaged copy."""
    rel = rel.strip("/")
    top, _, rest = rel.partition("/")
    cands = [_REPO / rel]
    if top in _PACKAGED:
        cands.append(_PKG / _PACKAGED[top] / rest if rest else _PKG / _PACKAGED[top])
    for c in cands:
        if c.exists():
            return c
    if must_exist:
        raise ResourceNotFoundError(
            f"sphere resource {rel!r} not found (looked in {', '.join(str(c) for c in cands)}); "
            "the installation is incomplete: reinstall sphere (`pip install sphere` or "
            "`bash scripts/setup.sh` in a checkout)"
        )
    return cands[-1]


def register_resolvers() -> None:
    """``${sphere_resource:data/benchmarks}`` -> absolute path of the shipped copy (idempotent)."""
    if not OmegaConf.has_resolver("sphere_resource"):
        OmegaConf.register_new_resolver("sphere_resource", lambda rel: str(resource_path(str(rel))))
