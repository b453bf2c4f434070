"""One benchmark of ``sphere eval`` (moved out of sphere/evaluation/harness.py, issue #18):
``evaluate_benchmark`` (resume from ``eval/<benchmark>.jsonl``, generate the rest in batches, grade, append
each record durably, summarise), with ``_generate`` (the backend's completions; a prompt that overflows the
context window is graded wrong, not sent), ``_grade`` (the checker's verdicts, extracted answers, majority
vote) and ``_progress`` (the progress bar on stderr)."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sphere.backends.base import Candidate, SamplingParams
from sphere.data import BENCHMARKS, benchmark_key
from sphere.evaluation.metrics import majority_vote, summarize
from sphere.evaluation.settings import EvalSettings
from sphere.evaluation.signatures import record_signature, reuse_records
from sphere.io import JsonlAppender
from sphere.prompts import build_prompt_ids
from sphere.rundir import default_mode, resume_mode
from sphere.verify import check_answers, extract_answer


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
    if summary.get("overflow"):  # graded wrong without a word, these read as the model's mistakes
        limit = getattr(backend, "max_model_len", None)
        print(f"sphere eval {key}: {summary['overflow']} of {summary['n']} prompt(s) longer than the context "
              f"window{f' ({limit} tokens)' if limit else ''}: not generated, counted wrong (finish "
              "'overflow'; results.md notes them)", file=sys.stderr, flush=True)
    info = {"generated": len(todo), "reused": len(records) - len(todo), "seconds": time.perf_counter() - t0,
            "file": str(path)}
    return summary, info
