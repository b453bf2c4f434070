"""`sphere eval`: pass@1 (greedy), pass@k and maj@k of a backend on math benchmarks.

Run it::

    sphere eval                                                   # mini model on the mini benchmark
    sphere eval model=/ckpt backend=vllm benchmarks=[math500,gsm8k] limit=100
    sphere eval model=/ckpt sampling.n=8 sampling.temperature=0.8 benchmarks=[aime24]
    sphere eval backend=replay replay.references=true benchmarks=[math500,gsm8k]
    sphere eval backend=replay replay.path=other_system.jsonl benchmarks=[math500]

Protocol per benchmark: the problems (all of them in one backend call unless ``batch_size`` is set) get
the model family's prompt (``sphere.prompts``, no steps yet), ``backend.complete`` writes ``sampling.n``
full solutions each (greedy when n == 1), and ``sphere.verify`` extracts and checks the final answers.
Each finished problem is appended durably to ``<out>/eval/<benchmark>.jsonl``; a rerun in the same run
directory reuses those records (same settings required) and generates only the rest. At the end
``eval/results.json`` (atomic) and ``eval/results.md`` (with reference numbers reported elsewhere) are
written.

The code lives in four modules, this one keeps ``run_eval``, ``evaluate`` and ``report`` and keeps the other
names importable: sphere.evaluation.settings (``EvalSettings``, ``expand_benchmarks``,
``settings_from_config``), sphere.evaluation.signatures (record and directory signatures, ``reuse_records``)
and sphere.evaluation.benchmark (``evaluate_benchmark``: one benchmark generated, graded and summarised).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import OmegaConf

from sphere.backends import make_backend
from sphere.backends.replay import make_replay_backend
from sphere.data import benchmark_key, load_benchmark
from sphere.evaluation.benchmark import (  # moved out of this module (issue #18); importable here too
    _progress,
    evaluate_benchmark,
)
from sphere.evaluation.report import load_reference_results, markdown_table
from sphere.evaluation.settings import (  # moved out of this module (issue #18); importable here too
    EvalSettings,
    expand_benchmarks,
    settings_from_config,
)
from sphere.evaluation.signatures import (  # moved out of this module (issue #18); importable here too
    _pkg_version,
    checker_info,
    eval_signature,
    prompt_info,
)
from sphere.io import atomic_write_json, atomic_write_text
from sphere.model_paths import resolve_model
from sphere.prompts import family_config
from sphere.rundir import check_or_record, resume_mode

RESERVED_KEYS = ("meta",)


def run_eval(
    backend,
    benchmarks: Sequence[str],
    out_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    settings: EvalSettings | None = None,
    family_cfg: Mapping | None = None,
    model_name: str = "",
    reference_path: str | Path | None = None,
    progress: bool | None = None,
    extra_meta: Mapping | None = None,
    backend_name: str | None = None,
    backend_stats: Mapping | None = None,
) -> dict:
    """Evaluate ``backend`` (already constructed; reused, not closed) on ``benchmarks``; write
    ``out_dir/eval/{results.json, results.md, <benchmark>.jsonl}``; return the results dict
    ``{benchmark: {n, correct, accuracy, ci95_low, ci95_high, ...}, "meta": {...}}``.

    ``backend=None`` summarises records that are all finished already (the Ray driver, whose actors wrote
    them): ``backend_name``/``backend_stats`` stand for the backend in the signature and the metadata, and
    a problem without a record is an error."""
    settings = settings or EvalSettings()
    out_dir = Path(out_dir)
    names = expand_benchmarks(benchmarks)
    keys = _output_keys(names)
    loaded = [(n, load_benchmark(n, data_dir, limit)) for n in names]  # fail on bad data before generating
    sig_parts = {"model": model_name,
                 "backend": backend_name or getattr(backend, "name", type(backend).__name__),
                 "prompt": prompt_info(family_cfg) if not hasattr(backend, "complete_records") else None,
                 "checker": checker_info()}
    # refuse (or, with resume=fresh, move aside) eval/ outputs of other settings before generating anything
    check_or_record(out_dir, "eval", eval_signature(sig_parts, settings), mode=resume_mode(settings.resume),
                    outputs=["eval"])
    results: dict = {}
    runs: dict = {}
    with _progress(progress) as prog:
        for (name, recs), key in zip(loaded, keys):
            results[key], runs[key] = evaluate_benchmark(backend, name, recs, out_dir, settings,
                                                         family_cfg=family_cfg, sig_parts=sig_parts,
                                                         progress=prog)
    stats = dict(backend_stats or {}) if backend is None else (backend.stats() if hasattr(backend, "stats")
                                                                  else {})
    results["meta"] = _meta(model_name, sig_parts, stats, settings, limit, data_dir, runs, extra_meta)
    atomic_write_json(out_dir / "eval" / "results.json", results)
    refs = load_reference_results(reference_path)
    atomic_write_text(out_dir / "eval" / "results.md", markdown_table(results, refs))
    return results


def _output_keys(names: list[str]) -> list[str]:
    """Each benchmark's key in eval/results.json, refused where reserved or where two collide."""
    keys = [benchmark_key(n) for n in names]
    for k in keys:
        if k in RESERVED_KEYS:
            raise ValueError(f"benchmarks: {k!r} is a reserved key of eval/results.json; rename the file")
    if len(set(keys)) != len(keys):
        raise ValueError(f"benchmarks: two entries map to the same output name: {keys}")
    return keys


def _meta(model_name: str, sig_parts: dict, stats: Mapping, settings: EvalSettings, limit: int | None,
          data_dir: str | Path | None, runs: dict, extra_meta: Mapping | None) -> dict:
    """results.json ``meta``: what was evaluated, how, and when."""
    return {
        "model": model_name,
        "backend": {"name": sig_parts["backend"], "stats": stats},
        "prompt": sig_parts["prompt"],
        "checker": sig_parts["checker"],
        "sampling": asdict(settings.sampling_params()),
        "batch_size": settings.batch_size,
        "limit": limit,
        "data_dir": str(data_dir) if data_dir is not None else None,
        "runs": runs,
        "sphere_version": _pkg_version("sphere"),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **dict(extra_meta or {}),
    }


def evaluate(cfg, out_dir: str | Path, backend=None) -> dict:
    """Evaluate from a composed config (conf/eval.yaml). ``backend``: reuse an existing one (e.g. the
    engine of ``sphere run``; it is not closed here); None -> built from ``cfg.backend`` and closed."""
    backend_name = OmegaConf.select(cfg, "backend.name", default=None)
    benchmarks = expand_benchmarks(cfg.benchmarks)
    data_dir = OmegaConf.select(cfg, "paths.data_dir", default=None)
    for name in benchmarks:  # unknown names and missing files fail before any engine starts
        benchmark_key(name)
        load_benchmark(name, data_dir, cfg.get("limit"))
    own = backend is None
    family_cfg = None
    extra: dict = {}
    model_name = str(OmegaConf.select(cfg, "model.policy", default=""))
    if backend is None and backend_name == "replay":
        backend = make_replay_backend(cfg)
        model_name = f"replay:{backend.source}"
    elif backend is None:
        model_path = resolve_model(model_name, cfg)
        extra["model_path"] = str(model_path)
        backend = make_backend(cfg, model_path)
    if not hasattr(backend, "complete_records"):
        family_cfg = family_config(cfg)
    try:
        results = run_eval(
            backend,
            benchmarks,
            out_dir,
            data_dir=data_dir,
            limit=cfg.get("limit"),
            settings=settings_from_config(cfg),
            family_cfg=family_cfg,
            model_name=model_name,
            reference_path=cfg.get("reference_results"),
            progress=cfg.get("progress"),
            extra_meta=extra,
        )
    finally:
        if own:
            backend.close()
    return results


def report(results: dict, out_dir: Path) -> float:
    """Print the results table and the one-line JSON summary; the mean accuracy (for sweepers)."""
    print((out_dir / "eval" / "results.md").read_text(encoding="utf-8"))
    accs = [v["accuracy"] for k, v in results.items() if k not in RESERVED_KEYS]
    line = {k: round(v["accuracy"], 4) for k, v in results.items() if k not in RESERVED_KEYS}
    print(json.dumps({"eval/accuracy": line, "out": str(out_dir / "eval" / "results.json")}), file=sys.stdout)
    return sum(accs) / len(accs) if accs else 0.0
