"""Keys added with ``+`` under a sphere config group (issue #29).

Hydra refuses ``search.expansion=3`` (no such key) and its hint says to add ``+``; ``+search.expansion=3``
then composes, and since nothing reads ``expansion`` the run goes on with ``search.expansions=5``. A ``+``
override only composes when the key is absent, so under a group whose keys are fixed by its YAML every
``+`` key is a typo: ``check_added_keys`` refuses it in one line naming the nearest known key (difflib).

Groups that take extra keys on purpose are left open (``OPEN``); ``train`` checks its own keys
(``sphere.train.train_config.resolve_train_cfg``) and ``controls`` too (``sphere.controls``).
"""

from __future__ import annotations

import difflib
from typing import Any

from omegaconf import OmegaConf

# Groups whose keys are fixed by conf/ (and, for search / sampling / data / stages / eval, the schemas of
# sphere/schema.py): an added key is read by nothing.
CLOSED = ("search", "scorer", "stages", "filters", "data", "eval", "sampling", "runner")
# Open on purpose: backend (extra keys are the backend class's keyword arguments: `+backend.token=...` for
# a server; the class refuses one it does not take), logger (`+logger.api_key=...`, and W&B settings passed
# through), model (a model's own settings), prompt, hydra, and the top level (`+secret_token=...`,
# `+experiment=X`).
OPEN = ("backend", "logger", "model", "prompt", "hydra")


def _keys(node: Any, prefix: str) -> list[str]:
    out = []
    if OmegaConf.is_dict(node):
        for k in node.keys():
            full = f"{prefix}.{k}"
            out.append(full)
            child = node._get_node(k)
            if OmegaConf.is_dict(child):
                out += _keys(child, full)
    return out


def check_added_keys(cfg: Any, args: list[str]) -> None:
    """Raise ValueError for an override ``+G.KEY=V`` with G in ``CLOSED`` (``++`` sets a key whether or
    not it exists and is left alone); the message names the nearest key G has."""
    for a in args:
        if not a.startswith("+") or a.startswith("++") or "=" not in a:
            continue
        key = a[1:].split("=", 1)[0]
        group = key.split(".", 1)[0]
        if "." not in key or group not in CLOSED:
            continue
        node = OmegaConf.select(cfg, group, default=None)
        if not OmegaConf.is_dict(node):
            continue
        known = [k for k in _keys(node, group) if k != key and not k.startswith(key + ".")]
        near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"did you mean {near[0]}?" if near else f"known keys: {', '.join(k for k in known if k.count('.') == 1)}"
        raise ValueError(f"config +{key}: {group} has no key {key.split('.', 1)[1]!r}; {hint} "
                         f"(`+` adds a key nothing reads here; set an existing key without `+`)")
