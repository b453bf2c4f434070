"""Problem sets for generation (``data.problems``): the mini world, the shipped MATH/GSM8K train splits, local
JSONL files, NuminaMath / MetaMathQA pools (sphere/data/training/) and ``hf:`` datasets where a hub is
reachable. ``load_problems(data_cfg, seed)`` returns the problem dicts (id, problem, answer, source...);
``count_problems`` counts them from local files only (dry runs)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sphere.data import training
from sphere.data.benchmarks import load_problems_jsonl
from sphere.data.selection import NAMED, sources
from sphere.mini.world import training_problems


def load_problems(dcfg: Any, seed: int) -> list[dict]:
    """Problems for generation from ``data.problems``: one source or a list of sources, each ``mini`` (the
    mini world's training split), a shipped set (``math_train``, ``gsm8k_train``), a local JSONL path, or
    ``hf:NAME[:SPLIT]`` where a hub is reachable. ``data.limit`` caps the total."""
    limit = None if dcfg.limit is None else int(dcfg.limit)
    if limit is not None and limit < 1:  # the key to blame, not data.problems (issue #29)
        raise ValueError(f"config data.limit={limit}: no problem would be used; allowed a positive integer "
                         "(the most problems) or null (all of data.problems)")
    out: list[dict] = []
    for src in sources(dcfg):
        left = None if limit is None else max(0, limit - len(out))
        if left == 0:
            break
        out.extend(load_source(src, dcfg, seed, left))
    return out


def count_problems(dcfg: Any, seed: int) -> int:
    """Number of problems ``load_problems`` would return, reading local files only (for dry runs)."""
    limit = None if dcfg.limit is None else int(dcfg.limit)
    n = 0
    for src in sources(dcfg):
        if src == "mini":
            n += int(dcfg.mini_n)
        elif src.startswith("hf:"):
            n += int(dcfg.get("hf_expected_size") or 0)
        elif src == "training" or src.startswith(("numina:", "metamath:")):  # sphere/data/training/
            n += training.count_source(src, dcfg, seed, load=load_source, count=count_problems)
        else:
            path = Path(str(dcfg.data_dir)) / NAMED[src] if src in NAMED else Path(src)
            if not path.is_file():
                raise FileNotFoundError(f"config data.problems: {path} not found")
            with open(path, "rb") as f:
                n += sum(1 for line in f if line.strip())
    return n if limit is None else min(n, limit)


def load_source(src: str, dcfg: Any, seed: int, limit: int | None) -> list[dict]:
    if src == "mini":
        n = int(dcfg.mini_n) if limit is None else min(int(dcfg.mini_n), limit)
        return training_problems(n, seed=int(dcfg.mini_seed) + seed)
    if src == "training" or src.startswith(("numina:", "metamath:")):  # NuminaMath / MetaMathQA pools
        return training.load_source(src, dcfg, seed, limit, load=load_source)
    if src in NAMED:
        return load_problems_jsonl(Path(str(dcfg.data_dir)) / NAMED[src], limit=limit)
    if src.startswith("hf:"):
        import datasets

        name, _, split = src[3:].partition(":")
        try:
            ds = datasets.load_dataset(name, split=split or "train")
        except (ConnectionError, OSError) as e:  # offline (HF_HUB_OFFLINE=1) or no network, not in the cache
            off = " (HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") else ""
            raise FileNotFoundError(
                f"config data.problems={src}: the dataset {name!r} is neither reachable{off} nor in the local "
                f"Hugging Face cache ({type(e).__name__}). Download it once where the hub is reachable, or "
                "export it to a .jsonl (id, problem, answer) and pass its path") from None
        pf, af = str(dcfg.hf_problem_field), str(dcfg.hf_answer_field)
        out = []
        for i, r in enumerate(ds):
            if limit is not None and i >= limit:
                break
            out.append({"id": f"{name}-{i}", "problem": str(r[pf]), "answer": str(r[af]), "source": name})
        return out
    return load_problems_jsonl(src, limit=limit)


# ---------------------------------------------------------------------------------------------- records
