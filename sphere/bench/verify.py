"""`sphere bench verify`: answer-checking throughput on a realistic mix, and the pathological set.

    sphere bench verify                      # 2 workers, 5 s hard timeout, 3000 checks
    sphere bench verify workers=4 n_checks=10000

The mix is built from the real MATH-500 and GSM8K test reference solutions (model-like completions):
- ``same``: a solution against its own gold (mostly decided by the cheap parent-side comparison);
- ``equivalent``: the solution with its boxed / #### answer rewritten to an equal but different form
  (integers ``n`` -> ``(n-1)+1`` or ``\\frac{2n}{2}``, decided by the exact arithmetic fast path; other
  scalars ``a`` -> ``1\\cdot(a)``, which only math-verify can confirm);
- ``other``: the solution against another problem's (different) gold.
Timed twice: with the parent fast path (production) and with every check sent to the workers. Then each
pathological input is checked; a "hang" is a call that took longer than timeout + restart margin.
Prints a table and, last, one JSON object; result.json lands in the Hydra run dir.
"""

from __future__ import annotations

import os
import random
import re
import time
from pathlib import Path

from sphere.bench import emit, metrics_table
from sphere.verify import Verifier, extract_answer, normalize_answer
from sphere.verify.extract import balanced_from
from sphere.verify.validate import PATHOLOGICAL_INPUTS, load_rows

# Seconds a pathological call may exceed its timeout (worker restart after a kill) before it is a hang.
_RESTART_MARGIN_S = 20.0


def _rewrite_equivalent(solution: str, gold: str) -> str | None:
    """The solution with its final answer replaced by an equal expression of a different form."""
    g = gold.strip()
    if re.fullmatch(r"-?\d+", g):
        alt = f"({int(g) - 1})+1" if int(g) % 2 else f"\\frac{{{2 * int(g)}}}{{2}}"
    elif len(g) < 200 and not re.search(r"[,=]|\\text|\\in|\\begin|\\cup|^[(\[]", g):
        alt = f"1\\cdot ({g})"  # scalars only: "1*(a, b)" or "1*(y = x)" would not be equal
    else:
        return None
    i = solution.rfind("\\boxed{")
    if i >= 0:
        got = balanced_from(solution, i + len("\\boxed"))
        return None if got is None else solution[:i] + "\\boxed{" + alt + "}" + solution[got[1] :]
    j = solution.rfind("####")
    if j >= 0:
        return solution[:j] + "#### " + alt
    return None


def build_mix(rows: list[dict], n: int, shares: dict, seed: int) -> list[tuple[str, str, bool]]:
    """``n`` (completion, gold, expected verdict) triples drawn from ``rows`` with the given shares."""
    rng = random.Random(seed)
    kinds = list(shares)
    weights = [float(shares[k]) for k in kinds]
    out: list[tuple[str, str, bool]] = []
    while len(out) < n:
        kind = rng.choices(kinds, weights)[0]
        r = rows[rng.randrange(len(rows))]
        if kind == "same":
            out.append((r["solution"], r["answer"], True))
        elif kind == "equivalent":
            alt = _rewrite_equivalent(r["solution"], r["answer"])
            if alt is not None:
                out.append((alt, r["answer"], True))
        elif kind == "other":
            o = rows[rng.randrange(len(rows))]
            if normalize_answer(o["answer"]) != normalize_answer(r["answer"]):
                out.append((r["solution"], o["answer"], False))
        else:
            raise ValueError(f"bench_verify.mix: unknown kind {kind!r}; allowed: same, equivalent, other")
    return out


def _proc_cpu_s(pids: list[int]) -> float:
    """User+system CPU seconds of live processes (Linux /proc; 0 elsewhere)."""
    tot = 0.0
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            tot += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return tot


def _timed(v: Verifier, mix, batch: int, fast: bool) -> tuple[float, float, list[bool]]:
    """(wall seconds, CPU seconds of parent + workers, verdicts)."""
    got: list[bool] = []
    pids = v.worker_pids()
    c0 = time.process_time() + _proc_cpu_s(pids)
    t0 = time.perf_counter()
    for i in range(0, len(mix), batch):
        got += v.check_many([(c, g) for c, g, _ in mix[i : i + batch]], fast_path=fast)
    wall = time.perf_counter() - t0
    return wall, time.process_time() + _proc_cpu_s(pids) - c0, got


def bench(cfg) -> dict:
    rows = [r for name in cfg.benchmarks for r in load_rows(cfg.paths.data_dir, name)]
    mix = build_mix(rows, int(cfg.n_checks), dict(cfg.mix), int(cfg.seed))
    want = [e for _, _, e in mix]
    res: dict = {"bench": "verify", "workers": int(cfg.workers), "timeout_s": float(cfg.timeout_s),
                 "n_checks": len(mix), "batch": int(cfg.batch), "benchmarks": list(cfg.benchmarks)}
    with Verifier(workers=cfg.workers, timeout_s=cfg.timeout_s, chunk_size=cfg.chunk_size,
                  memory_limit_mb=cfg.memory_limit_mb) as v:
        v.check_many([(c, g) for c, g, _ in mix[: 4 * cfg.workers]], fast_path=False)  # start + warm up
        s0 = v.stats()
        dt, cpu, got = _timed(v, mix, int(cfg.batch), True)
        s1 = v.stats()
        res["checks_per_s"] = round(len(mix) / dt, 1)
        # CPU seconds per check (parent + workers): load-independent; on a shared machine the wall-clock
        # figure above also depends on what else runs (see loadavg_1m).
        res["checks_per_cpu_s"] = round(len(mix) / max(cpu, 1e-9), 1)
        res["fast_path_share"] = round((s1["fast_decided"] - s0["fast_decided"]) / len(mix), 3)
        res["cache_hit_share"] = round((s1["cache_hits"] - s0["cache_hits"]) / len(mix), 3)
        res["worker_share"] = round((s1["worker_checks"] - s0["worker_checks"]) / len(mix), 3)
        agree = sum(a == b for a, b in zip(got, want, strict=True))
        res["agreement_with_expected"] = round(agree / len(mix), 4)
        dt2, cpu2, got2 = _timed(v, mix, int(cfg.batch), False)
        res["checks_per_s_workers_only"] = round(len(mix) / dt2, 1)
        res["checks_per_cpu_s_workers_only"] = round(len(mix) / max(cpu2, 1e-9), 1)
        res["fast_vs_workers_disagreements"] = sum(a != b for a, b in zip(got, got2, strict=True))
        res["mix_timeouts"] = v.stats()["timeouts"] - s0["timeouts"]
        res["disagreements"] = [
            {"gold": g[:80], "extracted": (extract_answer(c) or "")[:80], "expected": e, "got": a}
            for (c, g, e), a in zip(mix, got, strict=True) if a != e
        ][:20]
        # pathological inputs, one call each, at the configured timeout
        t_max, hangs = 0.0, 0
        sp0 = v.stats()
        for text in PATHOLOGICAL_INPUTS:
            t0 = time.perf_counter()
            ok = v.check_many([(text, "5")], fast_path=False)[0]
            dt_p = time.perf_counter() - t0
            t_max = max(t_max, dt_p)
            hangs += int(dt_p > cfg.timeout_s + _RESTART_MARGIN_S or ok)
        sp1 = v.stats()
        res["pathological_n"] = len(PATHOLOGICAL_INPUTS)
        res["pathological_max_s"] = round(t_max, 2)
        res["pathological_timeouts"] = sp1["timeouts"] - sp0["timeouts"]
        res["pathological_hard_kills"] = sp1["hard_kills"] - sp0["hard_kills"]
        res["hangs"] = hangs
        res["timeouts"] = sp1["timeouts"]
        res["restarts"] = sp1["restarts"]
    res["loadavg_1m"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    res["cpu_count"] = os.cpu_count()
    res["target_checks_per_s"] = 500
    res["meets_target"] = res["checks_per_s"] >= 500
    return res


def _table(res: dict) -> None:
    metrics_table(
        f"sphere bench verify ({res['workers']} workers, {res['n_checks']} checks)", res,
        ("checks_per_s", "checks_per_cpu_s", "checks_per_s_workers_only", "checks_per_cpu_s_workers_only",
         "fast_path_share", "cache_hit_share", "worker_share", "agreement_with_expected",
         "fast_vs_workers_disagreements", "mix_timeouts", "pathological_max_s", "pathological_timeouts",
         "hangs", "timeouts", "restarts", "loadavg_1m"),
    )


def main(cfg) -> float:
    res = bench(cfg)
    _table(res)
    emit(res)
    return float(res["checks_per_s"])
