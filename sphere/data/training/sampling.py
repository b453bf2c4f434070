"""Seeded sampling of the training pools (moved out of sphere/data/training/, issue #18): ``quotas`` (``n``
split by the mix, largest remainder) and ``sample_training`` (each pool walked in a seeded order, rows without
gold, duplicates and contaminated problems dropped and counted, until its quota is met; returns the problems
and the manifest)."""

from __future__ import annotations

import hashlib
import logging
import math
import os

import numpy as np

from sphere.data.training.decontamination import (
    _MASK,
    DEFAULT_NGRAM,
    MIN_WINDOW_TOKENS,
    Decontaminator,
    load_decontaminator,
    normalize_words,
)
from sphere.data.training.pools import GOLD, POOLS, count_boxed, read_pool

log = logging.getLogger("sphere.data.training")  # the logger name of the module before the split (issue #18)


# ---------------------------------------------------------------------------------------------- sampling
def quotas(n: int, mix: dict[str, float]) -> dict[str, int]:
    """Split ``n`` by the weights of ``mix`` (largest remainder; ties in mix order). Sums to ``n``."""
    w = {k: float(v) for k, v in mix.items()}
    bad = {k: v for k, v in w.items() if not (v >= 0 and math.isfinite(v))}
    if bad:
        raise ValueError(f"data.training.mix: weights must be finite and >= 0, got {bad}")
    total = sum(w.values())
    if total <= 0:
        raise ValueError(f"data.training.mix: at least one weight must be > 0, got {dict(mix)}")
    raw = {k: n * v / total for k, v in w.items()}
    q = {k: int(math.floor(x)) for k, x in raw.items()}
    left = n - sum(q.values())
    for k in sorted(raw, key=lambda k: -(raw[k] - q[k]))[:left]:  # sorted() is stable: ties keep mix order
        q[k] += 1
    return q


def _seed_for(seed: int, pool: str) -> np.random.Generator:
    salt = int.from_bytes(hashlib.sha256(pool.encode()).digest()[:8], "little")
    return np.random.default_rng([int(seed) & _MASK, salt])


def sample_training(
    pools: dict[str, str],
    *,
    n: int | None,
    mix: dict[str, float],
    seed: int,
    decontaminate: bool = True,
    ngram: int = DEFAULT_NGRAM,
    data_dir: str | os.PathLike | None = None,
    decontaminator: Decontaminator | None = None,
    batch: int = 4096,
    keys: dict[str, str] | None = None,
) -> tuple[list[dict], dict]:
    """Sample ``n`` problems (None = every usable row) from ``pools`` (pool name -> file spec), split by
    ``mix``.

    Returns ``(problems, manifest)``. Problems carry ``id`` (``<pool>-<row>``), ``problem``, ``answer``,
    ``solution``, ``source`` (dataset title), ``origin`` (NuminaMath source / MetaMathQA type), ``row``,
    ``n_boxed`` (NuminaMath) or ``original_question`` (MetaMathQA), in a seeded shuffled order (so
    ``data.limit`` keeps the mix). The manifest records seed, mix, quotas, per-pool drop counts, the
    contaminated problems per benchmark and the sampled ids. ``keys``: the config key naming each pool's path,
    for error messages (default ``data.training.<pool>``)."""
    active, q = _quotas_of(pools, n, mix)
    decon = None
    if decontaminate:
        decon = decontaminator or load_decontaminator(data_dir, ngram)
    acc = _Sampled(decon)
    per_pool: dict[str, dict] = {}
    out: list[dict] = []
    for pool in active:
        key = (keys or {}).get(pool)
        got, per_pool[pool] = _sample_pool(pool, pools[pool], key, q[pool], seed, batch, acc)
        out.extend(got)
    order = _seed_for(seed, "__order__").permutation(len(out)).tolist()
    out = [out[i] for i in order]
    manifest = {
        "kind": "sphere.training_sample",
        "seed": int(seed),
        "n_requested": None if n is None else int(n),
        "n": len(out),
        "mix": {k: float(v) for k, v in mix.items()},
        "quotas": q,
        "decontamination": {
            "enabled": bool(decontaminate),
            "ngram": int(decon.n) if decon else int(ngram),
            "min_tokens": int(decon.min_tokens) if decon else MIN_WINDOW_TOKENS,
            "benchmarks": dict(decon.benchmark_sizes) if decon else {},
            "dropped_per_benchmark": acc.per_bench,
            "dropped": acc.dropped,
        },
        "pools": per_pool,
        "ids": [p["id"] for p in out],
    }
    return out, manifest


def _quotas_of(pools: dict[str, str], n: int | None, mix: dict[str, float]) -> tuple[dict[str, float], dict]:
    """(the pools of weight > 0, each one's quota: None = every usable row), refused where they do not
    match."""
    unknown = [k for k in list(mix) + list(pools) if k not in POOLS]
    if unknown:
        raise ValueError(f"data.training: unknown pool(s) {sorted(set(unknown))}; allowed {', '.join(POOLS)}")
    active = {k: float(v) for k, v in mix.items() if float(v) > 0}
    if n is not None and int(n) < 0:
        raise ValueError(f"data.training.n={n}: allowed null or an integer >= 0")
    q = quotas(int(n), active) if n is not None else {k: None for k in active}
    missing = [k for k in active if k not in pools]
    if missing:
        raise ValueError(f"data.training.mix names {missing} but no path is configured for it")
    return active, q


class _Sampled:
    """What the pools share while they are sampled: the decontaminator, the normalised problems kept so far
    (duplicates across pools drop), and the contaminated problems dropped (per benchmark, and each one)."""

    def __init__(self, decon: Decontaminator | None):
        self.decon = decon
        self.seen: set[str] = set()
        self.per_bench = {name: 0 for name in (decon.benchmark_sizes if decon else {})}
        self.dropped: list[dict] = []


def _sample_pool(pool: str, spec: str, key: str | None, want: int | None, seed: int, batch: int,
                 acc: _Sampled) -> tuple[list[dict], dict]:
    """One pool's problems in its seeded order until ``want``, and its manifest entry (drop counts)."""
    schema = POOLS[pool]
    cols, files = read_pool(spec, pool, key)
    rows = len(cols["problem"])
    perm = _seed_for(seed, pool).permutation(rows)
    st = {"path": str(spec), "files": [str(f) for f in files], "rows": rows, "quota": want,
          "examined": 0, "sampled": 0, "dropped_no_answer": 0, "dropped_malformed": 0,
          "dropped_duplicate": 0, "dropped_contaminated": 0}
    got: list[dict] = []
    for b0 in range(0, rows, batch):
        if want is not None and len(got) >= want:
            break
        _sample_batch(pool, cols, perm[b0:b0 + batch].tolist(), want, acc, st, got)
    st["sampled"] = len(got)
    if want is not None and len(got) < want:
        st["shortfall"] = want - len(got)
        log.warning("%s: only %d usable problems for a quota of %d (%s)", schema.title, len(got), want,
                    st)
    return got, st


def _sample_batch(pool: str, cols: dict, idx: list[int], want: int | None, acc: _Sampled, st: dict,
                  got: list[dict]) -> None:
    """Rows ``idx`` of a pool, in order, into ``got`` (until ``want``): each dropped when malformed, without a
    gold answer, contaminated or a duplicate, counted in ``st``."""
    schema, decon = POOLS[pool], acc.decon
    golds = [GOLD[pool](cols["text"][i]) for i in idx]
    probs = [cols["problem"][i] for i in idx]
    ok = [isinstance(p, str) and p.strip() != "" for p in probs]
    checks = [g is not None and o for g, o in zip(golds, ok, strict=True)]
    hits = decon.find([p for p, c in zip(probs, checks, strict=True) if c]) if decon else []
    hit_iter = iter(hits)
    for i, g, p, o, c in zip(idx, golds, probs, ok, checks, strict=True):
        if want is not None and len(got) >= want:
            break
        m = next(hit_iter) if (c and decon) else None
        st["examined"] += 1
        if not o:
            st["dropped_malformed"] += 1
            continue
        if g is None:
            st["dropped_no_answer"] += 1
            continue
        if m is not None:
            st["dropped_contaminated"] += 1
            acc.per_bench[m.benchmark] = acc.per_bench.get(m.benchmark, 0) + 1
            acc.dropped.append({"id": f"{pool}-{i}", "benchmark": m.benchmark,
                                "benchmark_id": m.benchmark_id, "rule": m.rule})
            continue
        key = " ".join(normalize_words(p))
        if key in acc.seen:
            st["dropped_duplicate"] += 1
            continue
        acc.seen.add(key)
        text = cols["text"][i]
        rec = {"id": f"{pool}-{i}", "problem": p, "answer": g, "solution": text,
               "source": schema.title, "origin": cols["origin"][i], "row": i}
        if pool == "numina":
            rec["n_boxed"] = count_boxed(text)
        for c in schema.extra:
            if cols[c][i] is not None:
                rec[c] = cols[c][i]
        got.append(rec)
