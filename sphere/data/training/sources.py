"""The ``data.training`` config glue (moved out of sphere/data/training/, issue #18): the ``training`` and
``<pool>:PATH`` sources of ``data.problems``: ``load_source`` (sample, write the manifest, or use
``data.training.fallback`` decontaminated when a pool is missing), ``count_source`` (dry runs),
``describe_source`` (the dry-run plan) and ``training_available``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from sphere.data.selection import sources
from sphere.data.training.decontamination import DEFAULT_NGRAM, load_decontaminator
from sphere.data.training.pools import POOLS, pool_available
from sphere.data.training.sampling import sample_training
from sphere.io import atomic_write_json

log = logging.getLogger("sphere.data.training")  # the logger name of the module before the split (issue #18)

# The loader and counter of data.problems' other sources (``sphere.data.problems.load_source`` /
# ``count_problems``) for ``data.training.fallback``: passed in by sphere.data.problems, which dispatches the
# training sources here, so this module does not import it back (no import cycle in sphere.data).
Loader = Callable[[str, Any, int, "int | None"], list[dict]]
Counter = Callable[[Any, int], int]


# ---------------------------------------------------------------------------------------------- config glue
TRAINING_SOURCE = "training"


def is_training_source(src: str) -> bool:
    """``training`` (the mix of ``data.training``) or ``<pool>:PATH`` (one pool file: numina, metamath)."""
    return src == TRAINING_SOURCE or any(src.startswith(f"{p}:") for p in POOLS)


def _tcfg(dcfg: Any) -> Any:
    t = dcfg.get("training") if hasattr(dcfg, "get") else None
    if t is None:
        raise ValueError("config data.training is missing: the training sources need data.training.{n, mix, "
                         "seed, decontaminate, ngram} (see conf/generate.yaml)")
    return t


def _plain(x: Any) -> Any:
    return OmegaConf.to_container(x, resolve=True) if OmegaConf.is_config(x) else x


def _pools_for(src: str, dcfg: Any) -> tuple[dict[str, str], dict[str, float]]:
    t = _tcfg(dcfg)
    if src == TRAINING_SOURCE:
        mix = {str(k): float(v) for k, v in (_plain(t.mix) or {}).items()}
        pools = {}
        for k in mix:
            if k not in POOLS:
                raise ValueError(f"data.training.mix: unknown pool {k!r}; allowed {', '.join(POOLS)}")
            spec = t.get(k)
            if spec is None:
                raise ValueError(f"data.training.{k}: no path configured for the pool in data.training.mix")
            pools[k] = str(spec)
        return pools, mix
    pool, _, path = src.partition(":")
    if not path:
        raise ValueError(f"config data.problems: {src!r} needs a path ({pool}:PATH)")
    return {pool: path}, {pool: 1.0}


def training_available(dcfg: Any) -> tuple[bool, str]:
    """Whether every pool of ``data.training.mix`` (weight > 0) has local files, and if not why."""
    pools, mix = _pools_for(TRAINING_SOURCE, dcfg)
    reasons = []
    for k, w in mix.items():
        if w > 0:
            ok, why = pool_available(pools[k], POOLS[k])
            if not ok:
                reasons.append(why)
    return (not reasons), "; ".join(reasons)


def _fallback(dcfg: Any) -> list[str] | None:
    fb = _plain(_tcfg(dcfg).get("fallback"))
    if fb is None:
        return None
    return [str(s) for s in fb] if isinstance(fb, (list, tuple)) else [str(fb)]


def sample_from_config(src: str, dcfg: Any) -> tuple[list[dict], dict]:
    """``sample_training`` with the settings of ``data.training`` for source ``src``."""
    t = _tcfg(dcfg)
    pools, mix = _pools_for(src, dcfg)
    n = t.get("n")
    keys = None if src == TRAINING_SOURCE else {k: f"data.problems={src}" for k in pools}
    return sample_training(pools, n=None if n is None else int(n), mix=mix, seed=int(t.seed),
                           decontaminate=bool(t.decontaminate), ngram=int(t.ngram),
                           data_dir=str(dcfg.data_dir), keys=keys)


def _write_manifest(dcfg: Any, manifest: dict) -> Path | None:
    """Write the manifest to ``data.training.manifest`` (relative: in the Hydra run directory; no run
    directory: not written). Returns the path written."""
    name = _tcfg(dcfg).get("manifest")
    if not name:
        return None
    path = Path(str(name))
    if not path.is_absolute():
        try:
            path = Path(HydraConfig.get().runtime.output_dir) / path
        except Exception:  # noqa: BLE001 - no Hydra run (library use): the caller keeps the dict
            return None
    atomic_write_json(path, manifest)
    return path


def _summary(manifest: dict) -> str:
    d = manifest["decontamination"]
    pools = ", ".join(f"{k} {v['sampled']}/{v['quota']} (no answer {v['dropped_no_answer']}, duplicate "
                      f"{v['dropped_duplicate']}, contaminated {v['dropped_contaminated']})"
                      for k, v in manifest["pools"].items())
    dec = (f"decontaminated ({d['ngram']}-grams): {d['dropped_per_benchmark']}" if d["enabled"]
           else "decontamination off")
    head = f"training sample seed={manifest['seed']} mix={manifest['mix']}: {manifest['n']} problems"
    return f"{head}; {pools}; {dec}"


# The override that allows the shipped sets instead of missing pools (named by the refusal below).
FALLBACK_OVERRIDE = "data.training.fallback=[math_train,gsm8k_train]"


class MissingPoolsError(FileNotFoundError):
    """``data.problems=training`` with a pool of the mix absent and no ``data.training.fallback``."""


def missing_pools_error(why: str) -> MissingPoolsError:
    """One line: the pools that are missing (key, path) and the override that allows the fallback."""
    return MissingPoolsError(
        f"data.problems=training: refusing to run without the paper's training pools: {why}. Put the files "
        f"there (docs/scaling.md, 'The training problems'), or allow the shipped MATH train + GSM8K train "
        f"instead with {FALLBACK_OVERRIDE}")


def require_training(dcfg: Any) -> None:
    """Refuse (``MissingPoolsError``, one line) when ``data.problems`` includes ``training``, a pool of the
    mix has no local files and no ``data.training.fallback`` is set. Loading, counting (dry runs) and the
    plan's ``data_source`` all refuse the same way: a paper run never silently trains on other problems."""
    if TRAINING_SOURCE not in sources(dcfg):
        return
    ok, why = training_available(dcfg)
    if not ok and _fallback(dcfg) is None:
        raise missing_pools_error(why)


def load_source(src: str, dcfg: Any, seed: int, limit: int | None, *, load: Loader) -> list[dict]:
    """Problems of a training source for ``sphere.data.problems.load_problems`` (writes the manifest).
    ``training`` with a pool missing uses ``data.training.fallback`` when set (logged and recorded), else
    refuses in one line naming the missing files and the override (``require_training``). ``load``: the
    loader of the fallback's sources (``sphere.data.problems.load_source``, passed in: see ``Loader``)."""
    if src == TRAINING_SOURCE:
        ok, why = training_available(dcfg)
        if not ok:
            fb = _fallback(dcfg)
            if fb is None:
                raise missing_pools_error(why)
            log.warning("data.problems=training: %s; using data.training.fallback=%s", why, fb)
            out, dropped = _fallback_problems(dcfg, seed, load)
            _write_manifest(dcfg, {"kind": "sphere.training_sample", "fallback": fb, "reason": why,
                                   "decontamination": dropped})
            return out if limit is None else out[:limit]
    problems, manifest = sample_from_config(src, dcfg)
    where = _write_manifest(dcfg, manifest)
    log.info("%s%s", _summary(manifest), f" (manifest: {where})" if where else "")
    return problems if limit is None else problems[:limit]


def _fallback_problems(dcfg: Any, seed: int, load: Loader) -> tuple[list[dict], dict]:
    """The fallback sources' problems, decontaminated against the six benchmarks like the pools when
    ``data.training.decontaminate`` is on (the shipped MATH train holds exact copies of a MATH-500 and two
    OlympiadBench problems); returns (problems, drop counts per benchmark)."""
    out: list[dict] = []
    for s in _fallback(dcfg) or []:
        out.extend(load(s, dcfg, seed, None))
    t = _tcfg(dcfg)
    if not bool(t.get("decontaminate", True)):
        return out, {"enabled": False}
    dec = load_decontaminator(dcfg.get("data_dir"), int(t.get("ngram", DEFAULT_NGRAM)))
    hits = dec.find([p["problem"] for p in out])
    per: dict[str, int] = {}
    for h in hits:
        if h is not None:
            per[h.benchmark] = per.get(h.benchmark, 0) + 1
    kept = [p for p, h in zip(out, hits) if h is None]
    if per:
        log.warning("data.training.fallback: dropped %d problems overlapping the evaluation benchmarks %s",
                    len(out) - len(kept), per)
    return kept, {"enabled": True, "ngram": dec.n, "dropped_per_benchmark": per, "kept": len(kept)}


def count_source(src: str, dcfg: Any, seed: int, *, load: Loader, count: Counter) -> int:
    """Number of problems ``load_source`` gives (before data.limit), reading local files only (dry runs).
    With the pools present this runs the sampling and decontamination (seconds for the full datasets).
    Pools missing without a fallback: the same one-line refusal as ``load_source``. ``load`` / ``count``:
    ``sphere.data.problems.load_source`` / ``count_problems`` for the fallback's sources (see ``Loader``)."""
    if src == TRAINING_SOURCE:
        ok, why = training_available(dcfg)
        if not ok and _fallback(dcfg) is None:
            raise missing_pools_error(why)
    if src == TRAINING_SOURCE and not training_available(dcfg)[0] and _fallback(dcfg) is not None:
        if bool(_tcfg(dcfg).get("decontaminate", True)):
            return len(_fallback_problems(dcfg, seed, load)[0])
        sub = OmegaConf.merge(dcfg, {"problems": _fallback(dcfg), "limit": None})
        return count(sub, seed)
    return len(sample_from_config(src, dcfg)[0])


def describe_source(dcfg: Any) -> dict:
    """What ``data.problems`` reads, for the dry-run plan: ``{"uses": ..., "reason": ...}``."""
    srcs = sources(dcfg)
    if TRAINING_SOURCE not in srcs:
        return {"uses": srcs, "reason": "data.problems"}
    ok, why = training_available(dcfg)
    t = _tcfg(dcfg)
    if ok:
        pools, mix = _pools_for(TRAINING_SOURCE, dcfg)
        return {"uses": " + ".join(POOLS[k].title for k, w in mix.items() if w > 0),
                "reason": "data.problems=training and every pool of data.training.mix has local files",
                "pools": pools, "n": t.get("n"), "mix": mix, "seed": int(t.seed),
                "decontaminate": bool(t.decontaminate), "ngram": int(t.ngram)}
    fb = _fallback(dcfg)
    if fb is None:
        return {"uses": None, "reason": f"{why}; no data.training.fallback: the run refuses "
                                        f"({FALLBACK_OVERRIDE} allows the shipped sets)"}
    return {"uses": fb, "reason": f"fallback: {why}"}
