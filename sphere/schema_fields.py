"""The fields of sphere's typed settings (sphere.schema): each carries its default and, in ``metadata``, its
doc and range."""

from __future__ import annotations

from dataclasses import field
from typing import Any

# metadata keys: doc (what the setting does), ge / gt / le / lt (numeric bounds), choices (allowed values),
# word (how a range message words the allowed values), alone (the value of an interpolated default, such as
# ``${seed}``, for a partial config read outside a composed one: ``defaults(cls, alone=True)``)


def _f(default: Any, doc: str, **meta: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc, **meta})
    return field(default=default, metadata={"doc": doc, **meta})


def _name(doc: str) -> Any:
    """An option's ``name``: no default; its file (conf/<group>/<option>.yaml) writes it (it picks the dataclass)."""
    return _given(doc)


def _given(doc: str, **meta: Any) -> Any:
    """A field with no default: a node has it only where its file (or an override) writes it."""
    return field(metadata={"doc": doc, **meta})


def _sub(cls: type, doc: str) -> Any:
    return field(default_factory=cls, metadata={"doc": doc})
