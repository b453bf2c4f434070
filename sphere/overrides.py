"""Keys added with ``+`` under a sphere config group (issue #29).

Hydra refuses ``search.expansion=3`` (no such key) and its hint says to add ``+``; ``+search.expansion=3``
then composes, and since nothing reads ``expansion`` the run goes on with ``search.expansions=5``. A ``+``
override only composes when the key is absent, so under a group whose keys are fixed by its YAML every
``+`` key is a typo: ``check_added_keys`` refuses it in one line naming the nearest known key (difflib).

Groups that take extra keys on purpose are left open (``OPEN``), except that under one with typed options
(``TYPED_OPEN``: backend, logger, sphere/schema_groups.py; model, prompt, sphere/schema_models.py) a ``+`` key
spelled like a key the group has (``+backend.max_concurency=3``, ``+model.trust_remote_cod=true``) is refused
as the typo it is, while a new name (``+backend.token=...``, ``+logger.api_key=...``,
``+model.extra_eval_benchmarks=[mini]``) still passes. ``train`` checks its own keys
(``sphere.train.train_config.resolve_train_cfg``).
"""

from __future__ import annotations

import difflib
from typing import Any

from omegaconf import OmegaConf

# Groups whose keys are fixed by conf/ and the schemas of sphere/schema.py: an added key is read by nothing.
CLOSED = ("search", "scorer", "stages", "filters", "data", "eval", "sampling", "runner", "controls",
          "construction")
# Open on purpose: backend (extra keys are the backend class's keyword arguments: `+backend.token=...` for
# a server; the class refuses one it does not take), logger (`+logger.api_key=...`, and W&B settings passed
# through), model (a model's own settings; keys only some files write: `+model.extra_eval_benchmarks=[mini]`,
# `+model.train_target_family=F`), prompt (a family's extra keys), hydra, and the top level
# (`+secret_token=...`, `+experiment=X`).
OPEN = ("backend", "logger", "model", "prompt", "hydra")
# Open groups with typed options: a `+` key whose name is this close to the name of a key the group has
# (difflib ratio) is a typo of it (max_concurency: 0.97, projct: 0.92); vLLM's keyword arguments read further
# from every field (data_parallel_size vs tensor_parallel_size: 0.79, max_num_batched_tokens: 0.59).
TYPED_OPEN = ("backend", "logger", "model", "prompt")
TYPO_CUTOFF = 0.85


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


def _near_name(key: str, known: list[str]) -> list[str]:
    """The key of ``known`` (at ``key``'s depth) whose last name is ``TYPO_CUTOFF``-like ``key``'s, if any."""
    leaf = key.rsplit(".", 1)[1]
    ratios = [(difflib.SequenceMatcher(None, leaf, k.rsplit(".", 1)[1]).ratio(), k) for k in known
              if k.count(".") == key.count(".")]
    best = max(ratios, default=(0.0, ""))
    return [best[1]] if best[0] >= TYPO_CUTOFF else []


def check_added_keys(cfg: Any, args: list[str]) -> None:
    """Raise ValueError for an override ``+G.KEY=V`` with G in ``CLOSED``, or in ``TYPED_OPEN`` with KEY a
    near miss of a key G has (``++`` sets a key whether or not it exists and is left alone); the message names
    the nearest key G has."""
    for a in args:
        if not a.startswith("+") or a.startswith("++") or "=" not in a:
            continue
        key = a[1:].split("=", 1)[0]
        group = key.split(".", 1)[0]
        if "." not in key or group not in (*CLOSED, *TYPED_OPEN):
            continue
        node = OmegaConf.select(cfg, group, default=None)
        if not OmegaConf.is_dict(node):
            continue
        known = [k for k in _keys(node, group) if k != key and not k.startswith(key + ".")]
        if group in TYPED_OPEN:  # only a near miss of a key it has: another name is a keyword argument
            near = _near_name(key, known)
            if not near:
                continue
        else:
            near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"did you mean {near[0]}?" if near else f"known keys: {', '.join(k for k in known if k.count('.') == 1)}"
        raise ValueError(f"config +{key}: {group} has no key {key.split('.', 1)[1]!r}; {hint} "
                         f"(`+` adds a key nothing reads here; set an existing key without `+`)")
