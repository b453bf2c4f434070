"""Batched tree search (see ``sphere.search.driver``)."""

from sphere.search.driver import (
    SearchDriver,
    SearchJob,
    SearchResult,
    SearchStats,
    Trajectory,
    estimate_backend_calls,
    validate_search_config,
)

__all__ = [
    "SearchDriver",
    "SearchJob",
    "SearchResult",
    "SearchStats",
    "Trajectory",
    "estimate_backend_calls",
    "validate_search_config",
]
