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
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from sphere.backends.base import Candidate, SamplingParams
from sphere.data import BENCHMARKS, PAPER_BENCHMARKS, benchmark_key, load_benchmark
from sphere.evaluation.metrics import majority_vote, summarize
from sphere.io import JsonlAppender, atomic_write_json, atomic_write_text, read_jsonl_tolerant

RESERVED_KEYS = ("meta",)


@dataclass
class EvalSettings:
    n: int = 1  # samples per problem (sampling.n)
    temperature: float = 0.0  # 0 = greedy; the harness default for n == 1
    top_p: float = 1.0
    max_tokens: int = 1024  # generation budget per solution
    seed: int | None = 0
    batch_size: int | None = None  # problems per backend call; None = a whole benchmark in one call
    # reuse finished problems of eval/<benchmark>.jsonl: True/"auto" (same settings), False/"fresh" (move
    # eval/ aside, start over) or "force" (reuse whatever is there); sphere/rundir/
    resume: bool | str = True
    verify_timeout_s: float = 5.0  # per-answer checker timeout

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"sampling.n: must be >= 1, got {self.n}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size: must be a positive integer or null, got {self.batch_size}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {self.max_tokens}")

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(n=self.n, temperature=self.temperature, top_p=self.top_p,
                              max_tokens=self.max_tokens, seed=self.seed, stop=None)


def expand_benchmarks(names: Sequence[str] | str) -> list[str]:
    """``all`` -> the six paper benchmarks; duplicates removed, order kept. A single name (``benchmarks=mini``
    on the command line arrives as a string) is a one-element list, never a list of its letters."""
    if isinstance(names, str):
        names = [x.strip() for x in names.split(",") if x.strip()]
    out: list[str] = []
    for nm in names:
        for x in (PAPER_BENCHMARKS if nm == "all" else (str(nm),)):
            if x not in out:
                out.append(x)
    if not out:
        raise ValueError("benchmarks: empty list; give e.g. benchmarks=[math500,gsm8k] or benchmarks=[all]")
    return out


def record_signature(sig_parts: Mapping, settings: EvalSettings) -> str:
    """The signature each eval record carries (model, backend, prompt, checker, sampling): a resumed run reuses
    only records with the same one. The Ray driver computes it with this function too."""
    return _sha({**dict(sig_parts), "sampling": asdict(settings.sampling_params())})


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _pkg_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def checker_info() -> dict:
    """Versions that define a verdict: sphere.verify's own version tag (if it has one) and math-verify."""
    import sphere.verify as v

    return {
        "module": "sphere.verify",
        "version": getattr(v, "CHECKER_VERSION", None) or getattr(v, "__version__", None),
        "math_verify": _pkg_version("math-verify"),
        "sympy": _pkg_version("sympy"),
    }


def prompt_info(family_cfg: Mapping | None) -> dict:
    if family_cfg is None:
        return {"family": None, "sha256_16": None}
    import sphere.prompts as p

    return {
        "family": family_cfg.get("name"),
        "version": getattr(p, "PROMPT_VERSION", None),
        "sha256_16": _sha(dict(family_cfg)),
    }


def _generate(
    backend, key: str, batch: list[dict], params: SamplingParams, family_cfg
) -> list[list[Candidate]]:
    """``params.n`` candidates per record. A prompt that leaves no room to generate in the backend's
    context window (``backend.max_model_len``) is not sent: it gets empty candidates with finish
    ``"overflow"`` and is graded wrong (counted as ``overflow`` in the summary), so one long problem
    cannot abort a benchmark."""
    if hasattr(backend, "complete_records"):  # replay: completions looked up by problem id
        out = backend.complete_records(key, batch, params)
    else:
        from sphere.prompts import build_prompt_ids

        if family_cfg is None:
            raise ValueError(
                "run_eval: family_cfg (the prompt family, cfg.prompt) is required for a model backend"
            )
        prompts = [build_prompt_ids(backend.tokenizer, r["problem"], [], family_cfg) for r in batch]
        limit = getattr(backend, "max_model_len", None)
        fits = [i for i, p in enumerate(prompts) if not isinstance(limit, int) or len(p) + 1 <= limit]
        got = backend.complete([prompts[i] for i in fits], params) if fits else []
        if len(got) != len(fits):
            raise RuntimeError(f"backend {getattr(backend, 'name', '?')!r}: complete() returned {len(got)} "
                               f"lists for {len(fits)} prompts")
        overflow = [Candidate(text="", token_ids=[], logprob_sum=0.0, logprob_mean=0.0, finish="overflow")]
        out = [overflow * params.n for _ in batch]
        for i, cands in zip(fits, got):
            out[i] = cands
    if len(out) != len(batch) or any(len(c) != params.n for c in out):
        raise RuntimeError(
            f"backend {getattr(backend, 'name', '?')!r}: complete() returned {len(out)} lists for "
            f"{len(batch)} prompts (expected {params.n} candidates each)"
        )
    return out


def _grade(batch: list[dict], cands: list[list[Candidate]], sig: str, timeout_s: float) -> list[dict]:
    from sphere.verify import check_answers, extract_answer

    pairs = [(c.text, r["answer"]) for r, cs in zip(batch, cands) for c in cs]
    verdicts = check_answers(pairs, timeout_s=timeout_s) if pairs else []
    out, i = [], 0
    for r, cs in zip(batch, cands):
        v = [bool(x) for x in verdicts[i : i + len(cs)]]
        i += len(cs)
        ex = [extract_answer(c.text) for c in cs]
        rec = {
            "id": r["id"],
            "gold": r["answer"],
            "verdict": v[0],  # sample 0 (the greedy answer when n == 1)
            "completions": [c.text for c in cs],
            "extracted": ex,
            "verdicts": v,
            "finish": [c.finish for c in cs],
            "n_tokens": [len(c.token_ids) for c in cs],
            "sig": sig,
        }
        if len(cs) > 1:
            m = majority_vote(ex)
            rec["maj_answer"] = ex[m] if m is not None else None
            rec["maj_verdict"] = bool(v[m]) if m is not None else False
        out.append(rec)
    return out


def _progress(enabled: bool | None):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    on = console.is_terminal if enabled is None else enabled
    return Progress(TextColumn("eval {task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, disable=not on)


def evaluate_benchmark(backend, name: str, records: list[dict], out_dir: Path, settings: EvalSettings, *,
                       family_cfg=None, sig_parts: Mapping | None = None, progress=None) -> tuple[dict, dict]:
    """Evaluate one benchmark's ``records``; returns (summary, run info). Resumes from
    ``out_dir/eval/<key>.jsonl``."""
    key = benchmark_key(name)
    path = Path(out_dir) / "eval" / f"{key}.jsonl"
    skipped = 0
    if hasattr(backend, "select"):  # replay: problems without a stored completion
        records, skipped = backend.select(key, records)
    sig = record_signature(sig_parts or {}, settings)
    done: dict[str, dict] = {}
    from sphere.rundir import default_mode, resume_mode

    mode = resume_mode(settings.resume)
    mode = default_mode() if mode == "auto" else mode
    if mode != "fresh":
        # run_eval has compared the run directory's signature.json (sphere.rundir.check_or_record); a record
        # of other settings here is from a directory that has none (an older sphere) or was forced
        records_done = reuse_records(path, records, sig, mode)
        done.update(records_done)
    elif path.exists():
        path.unlink()
    todo = [r for r in records if r["id"] not in done]
    if todo and backend is None:
        raise RuntimeError(f"{path}: {len(todo)} problems have no finished record to summarise (first: "
                           f"{todo[0]['id']!r}); rerun the same command to resume")
    params = settings.sampling_params()
    task = progress.add_task(key, total=len(records), completed=len(done)) if progress is not None else None
    t0 = time.perf_counter()
    if todo:
        bs = settings.batch_size or len(todo)
        with JsonlAppender(path) as w:
            for s in range(0, len(todo), bs):
                batch = todo[s : s + bs]
                cands = _generate(backend, key, batch, params, family_cfg)
                new = _grade(batch, cands, sig, settings.verify_timeout_s)
                w.write_many(new)
                done.update((r["id"], r) for r in new)
                if task is not None:
                    progress.advance(task, len(batch))
    final = [done[r["id"]] for r in records]
    summary = summarize(final, settings.n)
    summary["title"] = BENCHMARKS[key].title if key in BENCHMARKS else key
    summary["skipped"] = skipped
    info = {"generated": len(todo), "reused": len(records) - len(todo), "seconds": time.perf_counter() - t0,
            "file": str(path)}
    return summary, info


def reuse_records(path: Path, records: list[dict], sig: str, mode: str = "auto") -> dict[str, dict]:
    """Finished records of ``path`` for ``records`` (by id). A record written with other settings (its
    ``sig``) is refused in mode auto, with the shared signature-mismatch message (sphere/rundir/), and
    reused in mode force."""
    from sphere.rundir import SignatureMismatch, mismatch_message

    ids = {r["id"] for r in records}
    done: dict[str, dict] = {}
    for k, rec in enumerate(read_jsonl_tolerant(path), 1):
        if rec.get("sig") != sig and mode != "force":
            raise SignatureMismatch(mismatch_message(
                f"{path}: record {k}", "eval",
                [("sig (model, backend, prompt, checker, sampling)", rec.get("sig"), sig)]))
        if rec["id"] in ids:
            done[rec["id"]] = rec
    return done


def eval_signature(sig_parts: Mapping, settings: EvalSettings) -> dict:
    """signature.json content of an eval directory: what each record's ``sig`` hashes (model name, backend,
    prompt family, checker versions, sampling) plus the model's weights hash when it is a local directory
    or the mini model (sphere/rundir/)."""
    from sphere.rundir import model_fingerprint

    out = {**dict(sig_parts), "sampling": asdict(settings.sampling_params())}
    fp = model_fingerprint(sig_parts.get("model", "")) if sig_parts.get("model") else {}
    if fp.get("sha256"):
        out["model_sha256"] = fp["sha256"]
    return out


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
    keys = [benchmark_key(n) for n in names]
    for k in keys:
        if k in RESERVED_KEYS:
            raise ValueError(f"benchmarks: {k!r} is a reserved key of eval/results.json; rename the file")
    if len(set(keys)) != len(keys):
        raise ValueError(f"benchmarks: two entries map to the same output name: {keys}")
    loaded = [(n, load_benchmark(n, data_dir, limit)) for n in names]  # fail on bad data before generating
    sig_parts = {"model": model_name,
                 "backend": backend_name or getattr(backend, "name", type(backend).__name__),
                 "prompt": prompt_info(family_cfg) if not hasattr(backend, "complete_records") else None,
                 "checker": checker_info()}
    from sphere.rundir import check_or_record, resume_mode

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
    results["meta"] = {
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
    atomic_write_json(out_dir / "eval" / "results.json", results)
    from sphere.evaluation.report import load_reference_results, markdown_table

    refs = load_reference_results(reference_path)
    atomic_write_text(out_dir / "eval" / "results.md", markdown_table(results, refs))
    return results


def settings_from_config(cfg) -> EvalSettings:
    """EvalSettings from the composed config (conf/eval.yaml + the ``sampling`` node)."""
    from omegaconf import OmegaConf

    from sphere.rundir import resume_mode

    def sel(key, default):
        v = OmegaConf.select(cfg, key, default=default)
        return default if v is None else v

    n = int(sel("sampling.n", 1))
    temp = cfg.get("temperature")
    if temp is None:  # eval default: greedy for a single sample, the sampling temperature for n > 1
        temp = 0.0 if n == 1 else float(sel("sampling.temperature", 0.8))
    max_tokens = cfg.get("max_tokens")
    if max_tokens is None:
        max_tokens = int(sel("sampling.max_solution_tokens", 1024))
    return EvalSettings(n=n, temperature=float(temp), top_p=float(sel("sampling.top_p", 1.0)),
                        max_tokens=int(max_tokens),
                        seed=OmegaConf.select(cfg, "sampling.seed", default=cfg.get("seed")),
                        batch_size=cfg.get("batch_size"), resume=resume_mode(cfg.get("resume", True)),
                        verify_timeout_s=float(cfg.get("verify_timeout_s", 5.0)))


def evaluate(cfg, out_dir: str | Path, backend=None) -> dict:
    """Evaluate from a composed config (conf/eval.yaml). ``backend``: reuse an existing one (e.g. the
    engine of ``sphere run``; it is not closed here); None -> built from ``cfg.backend`` and closed."""
    from omegaconf import OmegaConf

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
        from sphere.backends.replay import make_replay_backend

        backend = make_replay_backend(cfg)
        model_name = f"replay:{backend.source}"
    elif backend is None:
        from sphere.backends import make_backend
        from sphere.models import resolve_model

        model_path = resolve_model(model_name, cfg)
        extra["model_path"] = str(model_path)
        backend = make_backend(cfg, model_path)
    if not hasattr(backend, "complete_records"):
        from sphere.prompts import family_config

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
