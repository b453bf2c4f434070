"""Batched tree search (see ``sphere.search.driver``)."""

from sphere.search.config import estimate_backend_calls, validate_search_config
from sphere.search.driver import SearchDriver
from sphere.search.types import SearchJob, SearchResult, SearchStats, Trajectory

__all__ = [
    "SearchDriver",
    "SearchJob",
    "SearchResult",
    "SearchStats",
    "Trajectory",
    "estimate_backend_calls",
    "validate_search_config",
]
