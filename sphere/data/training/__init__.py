"""The paper's training pools: NuminaMath-CoT and MetaMathQA, sampled, decontaminated, from local files only.

SPHERE (arXiv 2503.04813) samples ~20K problems from NuminaMath and MetaMath. Neither dataset has an answer
column, so the generic ``hf:`` loader cannot read them; this module can:

- ``NuminaMath-CoT`` (columns ``source, problem, solution, messages``): gold = the content of the LAST
  ``\\boxed{...}`` / ``\\fbox{...}`` of ``solution`` (brace-balanced, ``sphere.verify.extract.last_boxed``).
  A last box that is unbalanced or empty means no gold: the row is dropped (never an earlier box).
- ``MetaMathQA`` (``type, query, original_question, response``): gold = the text after the last
  ``The answer is:`` of ``response`` (to the end of that line).

Rows without a gold answer are dropped and counted. Files: parquet, JSONL, a JSON list (MetaMathQA-395K.json),
a directory of them (a hub snapshot: files with ``train`` in the name, else all), or ``hf:OWNER/NAME`` when
that dataset is already in the local hub cache. Nothing is ever downloaded; a missing file is an error that
names the pool and how to provide it.

Sampling (``sample_training``): ``n`` problems split over the pools by ``mix`` (largest-remainder quotas),
each pool walked in a seeded random order, taking rows that have a gold answer, are not duplicates (of an
earlier sampled problem, normalised text) and are not contaminated, until its quota is met. Deterministic in
(files, n, mix, seed, decontamination settings), and independent of batch sizes. The returned manifest
records the seed, mix, quotas, sampled ids and every drop count.

Decontamination (``Decontaminator``) against the six evaluation benchmarks (MATH-500, GSM8K test, AIME
2024/2025, AMC 2023, OlympiadBench): problems are normalised (NFKC, lower case, LaTeX spacing commands
removed, ``\\dfrac`` = ``\\frac``) and split into words (runs of letters/digits, so whitespace, case and
punctuation do not matter). A training problem is contaminated when it shares a run of
``k = min(n, len(train), len(bench))`` consecutive words with a benchmark problem (n = 13 by default, the
GPT-3 / Llama practice): a shared 13-gram for long problems, whole-problem containment either way for
shorter ones, and an exact normalised match for problems under ``MIN_WINDOW_TOKENS`` words. Windows are
64-bit polynomial hashes in NumPy over the concatenated token streams (one pass per window length), and
every hit is confirmed on the words themselves, so a hash collision cannot drop a problem.

The code lives in four modules, this package keeps every name importable as ``sphere.data.training.<name>``:
``pools`` (schemas, gold answers, files), ``decontamination`` (``Decontaminator``), ``sampling``
(``quotas``, ``sample_training``) and ``sources`` (the ``data.training`` config glue: ``load_source``,
``count_source``, ``describe_source``, ``require_training``: a paper run refuses, in one line, to start
without its pools unless ``data.training.fallback`` is set).
"""

from __future__ import annotations

from sphere.data.training.decontamination import (
    BACKGROUND,
    BACKGROUND_DF,
    DEFAULT_NGRAM,
    MAX_BENCHMARK_DF,
    MIN_WINDOW_TOKENS,
    Decontaminator,
    Match,
    load_decontaminator,
    normalize_words,
)
from sphere.data.training.pools import (
    ANSWER_MARKER,
    GOLD,
    MAX_GOLD_CHARS,
    POOLS,
    SUPPORTED_SUFFIXES,
    PoolSchema,
    count_boxed,
    metamath_gold,
    numina_gold,
    pool_available,
    read_pool,
    resolve_pool_path,
)
from sphere.data.training.sampling import quotas, sample_training
from sphere.data.training.sources import (
    FALLBACK_OVERRIDE,
    TRAINING_SOURCE,
    MissingPoolsError,
    count_source,
    describe_source,
    is_training_source,
    load_source,
    missing_pools_error,
    require_training,
    sample_from_config,
    training_available,
)

__all__ = [
    "ANSWER_MARKER",
    "BACKGROUND",
    "BACKGROUND_DF",
    "DEFAULT_NGRAM",
    "FALLBACK_OVERRIDE",
    "Decontaminator",
    "GOLD",
    "MAX_BENCHMARK_DF",
    "MAX_GOLD_CHARS",
    "MIN_WINDOW_TOKENS",
    "Match",
    "MissingPoolsError",
    "POOLS",
    "PoolSchema",
    "SUPPORTED_SUFFIXES",
    "TRAINING_SOURCE",
    "count_boxed",
    "count_source",
    "describe_source",
    "is_training_source",
    "load_decontaminator",
    "load_source",
    "metamath_gold",
    "missing_pools_error",
    "normalize_words",
    "numina_gold",
    "pool_available",
    "quotas",
    "read_pool",
    "require_training",
    "resolve_pool_path",
    "sample_from_config",
    "sample_training",
    "training_available",
]
