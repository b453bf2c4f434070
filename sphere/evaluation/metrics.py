"""Evaluation metrics: Wilson interval, unbiased pass@k, majority vote (maj@k), per-benchmark summary.

References: Wilson (1927) score interval; pass@k estimator of Chen et al. 2021 (Codex, arXiv 2107.03374,
eq. 1, numerically stable product form); maj@k (self-consistency, Wang et al. 2022, arXiv 2203.11171).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np


def wilson_ci(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``correct / n`` (95% by default).

    Unlike the normal approximation it stays inside [0, 1] and is sensible at 0/n and n/n.
    ``n == 0`` -> (0.0, 1.0) (no information).
    """
    if n < 0 or correct < 0 or correct > n:
        raise ValueError(f"wilson_ci: need 0 <= correct <= n, got correct={correct}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # Exact ends at 0/n and n/n (the closed form leaves ~1e-17 of rounding there).
    lo = 0.0 if correct == 0 else min(p, max(0.0, centre - half))
    hi = 1.0 if correct == n else max(p, min(1.0, centre + half))
    return lo, hi


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from ``n`` samples of which ``c`` are correct (Chen et al. 2021):
    ``1 - C(n-c, k) / C(n, k)``, computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``."""
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


_WS = re.compile(r"\s+")


def normalize_answer(ans: str | None) -> str | None:
    r"""Grouping key for majority voting: whitespace removed, ``\left``/``\right``, ``\!``, ``$`` and a
    trailing period dropped, ``\dfrac``/``\tfrac`` -> ``\frac``. A string key, not a semantic one: two
    answers the checker would call equal but that differ as strings (``0.5`` vs ``\frac12``) vote
    separately. None (no answer extracted) never wins a vote."""
    if ans is None:
        return None
    s = _WS.sub("", ans)
    for a, b in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("$", ""), ("\\dfrac", "\\frac"),
                 ("\\tfrac", "\\frac")):
        s = s.replace(a, b)
    s = s.rstrip(".")
    return s or None


def majority_vote(answers: Sequence[str | None]) -> int | None:
    """Index of a representative sample of the most frequent (normalised) extracted answer; ties go to
    the answer seen first. None when no sample has an answer."""
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, a in enumerate(answers):
        key = normalize_answer(a)
        if key is None:
            continue
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    if not counts:
        return None
    best = max(counts, key=lambda k: (counts[k], -first[k]))
    return first[best]


def pass_ks(n_samples: int) -> list[int]:
    """The k values reported for ``n_samples`` samples: 1, powers of two below n, and n."""
    ks = {1, n_samples}
    k = 2
    while k < n_samples:
        ks.add(k)
        k *= 2
    return sorted(ks)


def summarize(records: Sequence[dict], n_samples: int) -> dict:
    """Per-benchmark summary from per-problem records (``verdicts``: list[bool] of length n_samples,
    ``extracted``: list[str|None], ``finish``: list[str]).

    ``correct``/``accuracy``/``ci95_*`` score sample 0 of each problem (the greedy answer when
    n_samples == 1; with sampling, one random sample per problem, an unbiased pass@1 estimate whose
    Wilson interval over problems is valid). With ``n_samples = K > 1`` also ``pass@1`` (mean over all K
    samples), ``pass@k`` for k in ``pass_ks(K)`` and ``maj@K``.
    """
    n = len(records)
    correct = sum(1 for r in records if r["verdicts"][0])
    lo, hi = wilson_ci(correct, n)
    out: dict = {
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else 0.0,
        "ci95_low": lo,
        "ci95_high": hi,
        "samples": n_samples,
        "no_answer": sum(1 for r in records if r["extracted"][0] is None),
        "truncated": sum(1 for r in records if r["finish"][0] == "length"),
        # prompt longer than the backend's context window: not generated, graded wrong
        "overflow": sum(1 for r in records if r["finish"][0] == "overflow"),
    }
    if n_samples > 1 and n:
        for k in pass_ks(n_samples):
            out[f"pass@{k}"] = sum(pass_at_k(n_samples, sum(r["verdicts"]), k) for r in records) / n
        maj_correct = sum(1 for r in records if r.get("maj_verdict"))
        out[f"maj@{n_samples}"] = maj_correct / n
        out[f"maj@{n_samples}_correct"] = maj_correct
    return out


def _binom_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p-value of ``k`` successes in ``n`` fair coin flips (McNemar's exact test on the
    discordant pairs): ``min(1, 2 * P(X <= min(k, n - k)))``."""
    if n == 0:
        return 1.0
    m = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(m + 1)) / 2**n  # integers: 2.0**n overflows past n = 1023
    return min(1.0, 2.0 * tail)


def paired_accuracy_change(before: Sequence[bool], after: Sequence[bool], *, level: float = 0.95,
                           n_boot: int = 10000, seed: int = 0) -> dict:
    """The accuracy change ``after - before`` on the same problems (``before[i]`` and ``after[i]`` are the
    verdicts of one problem) with a paired interval: a percentile bootstrap over problems (resampling the
    problems, so both verdicts of a problem travel together; deterministic in ``seed``), and McNemar's
    exact test on the discordant problems (``gained``: wrong before, right after; ``lost``: the reverse).

    The bootstrap resamples n problems with replacement; only the counts of gained/lost/unchanged problems
    matter, so it draws them from the multinomial of those shares (the same distribution as index
    resampling, O(n_boot)). Returns ``{n, before, after, delta, gained, lost, ci_low, ci_high, level,
    mcnemar_p, excludes_zero}`` (accuracies and delta as fractions)."""
    if len(before) != len(after):
        raise ValueError(f"paired_accuracy_change: {len(before)} verdicts before, {len(after)} after; "
                         "a paired interval needs the same problems")
    if not 0.0 < level < 1.0:
        raise ValueError(f"paired_accuracy_change: level={level}; allowed (0, 1)")
    n = len(before)
    gained = sum(1 for a, b in zip(before, after, strict=True) if not a and b)
    lost = sum(1 for a, b in zip(before, after, strict=True) if a and not b)
    if n == 0:
        return {"n": 0, "before": 0.0, "after": 0.0, "delta": 0.0, "gained": 0, "lost": 0, "ci_low": 0.0,
                "ci_high": 0.0, "level": level, "mcnemar_p": 1.0, "excludes_zero": False}
    delta = (gained - lost) / n
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, [gained / n, lost / n, (n - gained - lost) / n], size=int(n_boot))
    boot = (draws[:, 0] - draws[:, 1]) / n
    a = (1.0 - level) / 2.0
    lo, hi = (float(x) for x in np.quantile(boot, [a, 1.0 - a]))
    return {
        "n": n,
        "before": sum(map(bool, before)) / n,
        "after": sum(map(bool, after)) / n,
        "delta": delta,
        "gained": gained,
        "lost": lost,
        "ci_low": lo,
        "ci_high": hi,
        "level": level,
        "mcnemar_p": _binom_two_sided_p(gained, gained + lost),
        "excludes_zero": bool(lo > 0.0 or hi < 0.0),
    }
