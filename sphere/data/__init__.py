"""Benchmark registry and problem loaders (docs/ARCHITECTURE.md, "Problem record").

``load_benchmark(name, data_dir, limit)`` returns problem records ``{"id", "problem", "answer",
"solution"?, "source"?, ...}`` for a registered benchmark name (``math500``, ``gsm8k``, ``aime24``,
``aime25``, ``amc23``, ``olympiadbench``, ``mini``, ...) or for any local JSONL file with ``id``,
``problem``, ``answer``.
"""

from __future__ import annotations

from sphere.data.benchmarks import (
    BENCHMARKS,
    PAPER_BENCHMARKS,
    BenchmarkSpec,
    benchmark_key,
    default_data_dir,
    load_benchmark,
    load_problems_jsonl,
)

__all__ = [
    "BENCHMARKS",
    "PAPER_BENCHMARKS",
    "BenchmarkSpec",
    "benchmark_key",
    "default_data_dir",
    "load_benchmark",
    "load_problems_jsonl",
]
