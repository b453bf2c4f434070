"""Measurement of one arm of ``sphere bench pipeline`` (moved out of sphere/bench/pipeline.py, issue #18): the
counting wrappers (``CountingBackend``, ``CountingScorer``), vLLM's prompt-token counters, CPU seconds and
load average, ``_run_arm`` (one timed run of an arm: calls, tokens sent / computed / generated, scorer work,
pairs, per-pair and per-problem figures) and ``_warm`` (the engine warm-up outside the timed loops)."""

from __future__ import annotations

import os
import time
from typing import Any

from sphere.backends.base import SamplingParams
from sphere.backends.vllm_backend import read_counters
from sphere.bench.pipeline_loops import ARMS, run_one_leaf, run_per_problem, run_sphere
from sphere.prompts import build_prompt_ids


# ---------------------------------------------------------------------------------------------- counters
class CountingBackend:
    """Wraps a backend: counts calls, prompts, prompt tokens sent and candidates; everything else passes."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.calls = self.prompts = self.prompt_tokens = self.candidates = 0
        self.n_gen_tokens = 0  # prompt tokens x sequences prefilled (n per prompt, 1 when greedy)
        self.seconds = 0.0  # wall time inside next_steps

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def next_steps(self, prompts: list[list[int]], params: SamplingParams):
        self.calls += 1
        self.prompts += len(prompts)
        sent = sum(map(len, prompts))
        self.prompt_tokens += sent
        self.n_gen_tokens += sent * (1 if params.greedy else params.n)
        t0 = time.perf_counter()
        out = self.inner.next_steps(prompts, params)
        self.seconds += time.perf_counter() - t0
        self.candidates += sum(map(len, out))
        return out


class CountingScorer:
    """Wraps a step scorer: counts calls, items and steps; keeps the texts it read (tokenised after the arm,
    outside the timed loop) unless the scorer reports its own token counts (PRM ``stats()``)."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.calls = self.items = self.steps = 0
        self.seconds = 0.0  # wall time inside score
        self.texts: list[str] | None = None if _model_scorer(inner) else []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def score(self, items):
        self.calls += 1
        self.items += len(items)
        self.steps += sum(len(s) for _, s in items)
        if self.texts is not None:
            self.texts.extend(p + "\n\n" + "\n\n".join(s) for p, s in items)
        t0 = time.perf_counter()
        out = self.inner.score(items)
        self.seconds += time.perf_counter() - t0
        return out


def _model_scorer(scorer: Any) -> bool:
    """Whether the scorer counts the model tokens it runs (``stats()["tokens_computed"]``, the PRM)."""
    st = getattr(scorer, "stats", None)
    return callable(st) and "tokens_computed" in st()


def _vllm_counters(backend: Any) -> dict[str, float]:
    """vLLM's prompt-token counters, by source label (``vllm:prompt_tokens_by_source{local_compute}``)."""
    llm = getattr(backend, "llm", None)
    return {} if llm is None else read_counters(llm, by_label="source")


def _cpu_s() -> float | None:
    """CPU seconds (user + system) of this process and its live descendants (the vLLM engine core, the
    checker's workers): the work done, much less sensitive than wall time to other jobs on a busy machine.
    None without psutil (a vLLM dependency)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover
        return None
    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total += t.user + t.system
    return total


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover
        return None


# ---------------------------------------------------------------------------------------------- one arm
def _run_arm(arm: str, problems, backend, scorer, verifier, cfg, fam, tok, counters: bool = False) -> dict:
    """One timed run of ``arm``. ``counters``: read vLLM's prompt-token counters for this backend (only valid
    for the engine created last in the process, see ``bench``)."""
    scfg = cfg.search
    delim = str(fam["step_delimiter"])
    seed = int(cfg.seed)
    jobs = [
        (lambda text: lambda steps: build_prompt_ids(tok, text, steps, fam))(p["problem"]) for p in problems
    ]
    be, sc = CountingBackend(backend), CountingScorer(scorer)
    llm = getattr(backend, "llm", None)
    if llm is not None and hasattr(llm, "reset_prefix_cache"):
        llm.reset_prefix_cache()  # nothing cached from the previous arm
    st0 = dict(backend.stats())
    vc0 = _vllm_counters(backend)
    sc0 = dict(scorer.stats()) if sc.texts is None else {}
    load0 = _loadavg()
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if arm == "sphere":
        recs, extra["search_stats"] = run_sphere(
            problems, jobs, be, sc, verifier, scfg, delim, seed, str(cfg.engine_backend)
        )
    elif arm == "per_problem":
        recs = run_per_problem(problems, jobs, be, sc, verifier, scfg, delim, seed)
    elif arm == "one_leaf":
        recs = run_one_leaf(problems, jobs, be, sc, verifier, scfg, delim, seed)
    else:
        raise ValueError(f"bench pipeline: unknown arm {arm!r}; allowed {' | '.join(ARMS)}")
    wall = time.perf_counter() - t0
    cpu1 = _cpu_s()
    cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    routes = [r[0] for r in recs.values()]
    st1 = dict(backend.stats())
    vc1 = _vllm_counters(backend)
    sc1 = dict(scorer.stats()) if sc.texts is None else {}
    gen_tokens = int(st1.get("generated_tokens", 0) - st0.get("generated_tokens", 0))
    out = _arm_record(be, sc, routes, wall, cpu, gen_tokens, _prompt_tokens(be, vc0, vc1, counters),
                      _scorer_tokens(sc, sc0, sc1, tok), load0)
    out.update(extra)
    return out


def _prompt_tokens(be: CountingBackend, vc0: dict, vc1: dict, counters: bool) -> dict:
    """Prompt tokens computed (vLLM's counter after prefix-cache hits, else sent x n) and prefilled."""
    key = "vllm:prompt_tokens_by_source{local_compute}"
    if counters and key in vc1:
        prefilled = int(vc1.get("vllm:prompt_tokens", 0.0) - vc0.get("vllm:prompt_tokens", 0.0))
        return {"computed": int(vc1[key] - vc0.get(key, 0.0)),
                "source": "vllm prompt_tokens_by_source{local_compute} (after prefix-cache hits)",
                "prefilled": prefilled,
                "ok": prefilled == be.n_gen_tokens}  # the counters are this engine's: n sequences per prompt
    return {"computed": be.n_gen_tokens,
            "source": "sent x n sequences (no prefix cache; padding not counted)",
            "prefilled": be.n_gen_tokens, "ok": None}


def _scorer_tokens(sc: CountingScorer, sc0: dict, sc1: dict, tok) -> dict:
    """Scorer tokens: what a model scorer ran (its stats), or the text the symbolic checker read."""
    if sc.texts is None:
        return {"tokens": int(sc1.get("tokens", 0) - sc0.get("tokens", 0)),
                "computed": int(sc1.get("tokens_computed", 0) - sc0.get("tokens_computed", 0)),
                "items_run": int(sc1.get("items_scored", 0) - sc0.get("items_scored", 0)),
                "source": "scorer stats(): tokens run (computed: padding included)"}
    lens = [len(ids) for ids in tok(sc.texts, add_special_tokens=False)["input_ids"]] if sc.texts else []
    n = int(sum(lens))
    return {"tokens": n, "computed": n, "items_run": sc.items,
            "source": "policy-tokenizer tokens of the text the scorer read (it runs no model)"}


def _arm_record(be: CountingBackend, sc: CountingScorer, routes: list[str], wall: float, cpu: float | None,
                gen_tokens: int, pt: dict, st: dict, load0: float | None) -> dict:
    """The arm's figures, in all, per pair and per problem."""
    computed, prefilled = pt["computed"], pt["prefilled"]
    scorer_tokens, scorer_computed = st["tokens"], st["computed"]
    counts = {r: routes.count(r) for r in ("pair", "inverted", "both_right", "both_wrong")}
    pairs = counts["pair"] + counts["inverted"]
    out = {
        "problems": len(routes),
        "wall_s": round(wall, 3),
        # CPU s of this process and its children (engine core, checkers)
        "cpu_s": round(cpu, 3) if cpu is not None else None,
        "backend_s": round(be.seconds, 3),  # wall time inside backend calls
        "scorer_s": round(sc.seconds, 3),  # wall time inside scorer calls
        "backend_calls": be.calls,
        "prompts": be.prompts,
        "prompts_per_call": round(be.prompts / max(1, be.calls), 2),
        "candidates": be.candidates,
        "prompt_tokens_sent": be.prompt_tokens,
        "prompt_tokens_prefilled": prefilled,  # every sequence's prompt (n per request), before cache hits
        "prompt_tokens_computed": computed,
        "prompt_tokens_computed_source": pt["source"],
        "vllm_counters_consistent": pt["ok"],  # vllm:prompt_tokens == sent x n (null: counters not used)
        "generated_tokens": gen_tokens,
        "scorer_calls": sc.calls,
        "scorer_items": sc.items,
        "scorer_items_run": st["items_run"],
        "scorer_steps": sc.steps,
        "scorer_tokens": scorer_tokens,
        "scorer_tokens_computed": scorer_computed,
        "scorer_tokens_source": st["source"],
        "routes": counts,
        "pairs": pairs,
        "loadavg_1m_start": load0,
        "loadavg_1m_end": _loadavg(),
    }
    per = {
        "wall_s": wall,
        "cpu_s": cpu or 0.0,
        "backend_calls": be.calls,
        "prompt_tokens_sent": be.prompt_tokens,
        "prompt_tokens_computed": computed,
        "generated_tokens": gen_tokens,
        "scorer_tokens": scorer_tokens,
        "scorer_tokens_computed": scorer_computed,
    }
    out["per_pair"] = {k: (round(v / pairs, 4) if pairs else None) for k, v in per.items()}
    out["per_problem"] = {k: round(v / max(1, len(routes)), 4) for k, v in per.items()}
    return out


def _warm(backend: Any, tok, fam, verifier, scfg, rounds: int) -> None:
    """Engine start-up effects (the first calls of each batch shape are slow on vLLM-CPU) and the checker's
    worker processes, outside the timed loops: ``rounds`` calls of one prompt and of ``batch_leaves`` prompts
    on warm-up problems unlike the bench's, with the search's sampling settings."""
    sp = SamplingParams(
        n=int(scfg.expansions),
        temperature=float(scfg.temperature),
        top_p=float(scfg.top_p),
        max_tokens=int(scfg.max_step_tokens),
        seed=12345,
        stop=[str(fam["step_delimiter"])],
    )
    many = [
        build_prompt_ids(tok, f"Warm up {i}: what is {i} + {i}?", [], fam)
        for i in range(int(scfg.batch_leaves))
    ]
    for _ in range(max(1, rounds)):
        backend.next_steps(many[:1], sp)
        backend.next_steps(many, sp)
    verifier([("\\boxed{2}", "2")])
    llm = getattr(backend, "llm", None)
    if llm is not None and hasattr(llm, "reset_prefix_cache"):
        llm.reset_prefix_cache()
