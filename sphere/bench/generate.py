"""`sphere bench generate`: one tree-shaped next-step workload on every installed generation backend.

    sphere bench generate                                   # tiny test model, all backends (conf/bench_generate.yaml)
    sphere bench generate backends=[transformers,vllm] problems=8
    sphere bench generate model=/path/to/hf_model prompt=qwen2_5_math

Workload (the shape of a search): ``problems`` problems, each with ``branches`` partial solutions, behind a
shared few-shot header (``shots`` worked examples), so prompts share long prefixes as siblings in a search
tree do. ``rounds`` rounds; each round samples ``n`` candidate next steps for every partial solution
(problems x branches prompts) and extends each partial solution by its first candidate, so every round's
prompts extend the previous round's: the prefix cache can reuse all but the newest step.

Per backend: seconds, tokens_per_s (generated tokens / s), candidates_per_s. vLLM runs two engines in this
one process, prefix caching on and off, both open, and times ``apc_trials`` interleaved trials (the order
alternates: on/off, off/on, ...; each trial on its own workload seed, the prefix cache reset before every
run), so a machine that gets busier or quieter during the bench slows both sides alike: ``apc_speedup`` is
the median over trials of (time off / time on), ``apc_speedup_min``/``_max`` and ``apc_speedup_spread``
((max - min) / median) say how much the trials agreed; ``seconds`` etc. are the "on" engine's median trial
and ``prefix_cache_hit_rate`` is over all its trials. (Two sequential runs, on then off, read 0.255 on a
loaded machine and 1.43 on a quiet one.) The OpenAI backend
runs against ``openai_url`` or, when null, a ``vllm serve`` started here on 127.0.0.1. A backend that cannot
run (not installed, fails) is reported with an ``error`` and the others still run.
Prints a table, writes result.json under the Hydra run dir, and prints one JSON object as the last line.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sphere.backends import SamplingParams, transformers_backend, vllm_backend  # tests replace the classes
from sphere.backends.openai_backend import OpenAIBackend
from sphere.backends.vllm_backend import configure_cpu_env, is_cpu_build, launch_server, stop_server
from sphere.bench import emit
from sphere.model_paths import resolve_model
from sphere.prompts import build_prompt_text, family_config
from sphere.standins.tiny import DELIM, arithmetic_problem, tiny_model_path


def _model_path(cfg) -> Path:
    name = str(cfg.bench_model)
    if name == "tiny":
        return tiny_model_path()
    return resolve_model(name, cfg)


def _workload(cfg, tok, fam, seed: int | None = None) -> list[dict]:
    """Partial solutions: problem, header-prefixed plain template, steps so far."""
    rng = random.Random(int(cfg.seed) if seed is None else int(seed))
    shots = []
    for _ in range(int(cfg.shots)):
        p, steps, _, _ = arithmetic_problem(rng)
        shots.append(fam["template"].format(problem=p, instruction="", system="") + DELIM.join(steps))
    header = (DELIM.join(shots) + DELIM) if shots else ""
    jobs = []
    for _ in range(int(cfg.problems)):
        p, steps, _, _ = arithmetic_problem(rng)
        for b in range(int(cfg.branches)):
            # branches of one problem start from 0, 1, 2, ... of the reference steps (siblings/cousins)
            jobs.append({"problem": p, "header": header, "steps": steps[: b % 2]})
    return jobs


def _prompt_ids(tok, job, fam) -> list[int]:
    text = job["header"] + build_prompt_text(tok, job["problem"], job["steps"], fam)
    return list(tok(text)["input_ids"])


def run_workload(backend, cfg, fam, seed: int | None = None) -> dict:
    tok = backend.tokenizer
    jobs = _workload(cfg, tok, fam, seed)
    sp = SamplingParams(n=int(cfg.n), temperature=float(cfg.temperature), top_p=1.0,
                        max_tokens=int(cfg.max_step_tokens), seed=int(cfg.seed), stop=[fam["step_delimiter"]])
    # warm-up on other prompts (engine start-up effects, lazy init), not timed
    warm = [_prompt_ids(tok, {"problem": "Warm up.", "header": "", "steps": []}, fam)]
    backend.next_steps(warm, SamplingParams(n=1, temperature=0.0, max_tokens=4))
    gen_tokens = cands = prompt_tokens = calls = 0
    seconds = 0.0
    for _ in range(int(cfg.rounds)):
        prompts = [_prompt_ids(tok, j, fam) for j in jobs]
        t0 = time.perf_counter()
        res = backend.next_steps(prompts, sp)
        seconds += time.perf_counter() - t0
        calls += 1
        prompt_tokens += sum(map(len, prompts))
        for j, row in zip(jobs, res):
            cands += len(row)
            gen_tokens += sum(len(c.token_ids) for c in row)
            if row[0].finish == "step" and row[0].text.strip():
                j["steps"] = j["steps"] + [row[0].text]
    return {
        "seconds": round(seconds, 4),
        "tokens_per_s": round(gen_tokens / seconds, 2) if seconds else None,
        "candidates_per_s": round(cands / seconds, 2) if seconds else None,
        "generated_tokens": gen_tokens,
        "candidates": cands,
        "prompt_tokens": prompt_tokens,
        "calls": calls,
        "mean_prompt_tokens": round(prompt_tokens / max(1, len(jobs) * calls), 1),
    }


def _bcfg(cfg, name: str, **over: Any) -> dict:
    base = OmegaConf.to_container(cfg.backends_cfg[name], resolve=True) if name in cfg.backends_cfg else {}
    base.update(over)
    return base


def _run_one(name: str, cfg, model: Path, fam) -> dict:
    if name == "transformers":
        b = transformers_backend.TransformersBackend(model, **_bcfg(cfg, name))
        try:
            return {**run_workload(b, cfg, fam), **_pick(b.stats(), ["prefix_cache_hit_rate"])}
        finally:
            b.close()
    if name == "vllm":
        return _run_vllm_apc(cfg, model, fam)
    if name == "openai":
        proc = None
        url = cfg.openai_url
        vc = _bcfg(cfg, "vllm")
        if not url:
            args = ["--dtype", str(vc.get("dtype", "float32")), "--enforce-eager", "--enable-prefix-caching"]
            if vc.get("max_model_len"):
                args += ["--max-model-len", str(vc["max_model_len"])]
            if vc.get("block_size"):
                args += ["--block-size", str(vc["block_size"])]
            if is_cpu_build():
                configure_cpu_env(vc.get("cpu_kvcache_gib", 1), vc.get("cpu_omp_threads_bind", "nobind"))
            proc, url = launch_server(model, served_model="bench", args=args)
        try:
            b = OpenAIBackend(model, **_bcfg(cfg, name, base_url=url))
            try:
                return {**run_workload(b, cfg, fam), **_pick(b.stats(), ["prefix_cache_hit_rate"]),
                        "base_url": url}
            finally:
                b.close()
        finally:
            if proc is not None:
                stop_server(proc)
    raise ValueError(f"bench generate: unknown backend {name!r}; allowed transformers | vllm | openai")


def _run_vllm_apc(cfg, model: Path, fam) -> dict:
    """Prefix caching on vs off: two engines open at once, ``apc_trials`` interleaved trials (see the module
    docstring); the median ratio and its spread."""
    trials = int(cfg.get("apc_trials", 5))
    if trials < 1:
        raise ValueError(f"config apc_trials={trials}: allowed an integer >= 1")
    engines: dict[bool, Any] = {}
    try:
        # "off" first: a new engine unregisters the Prometheus metrics of the ones before it (vLLM 0.32,
        # PrometheusStatLogger.__init__), and the hit rate is read from the "on" engine's counters
        for apc in (False, True):
            engines[apc] = vllm_backend.VLLMBackend(model, **_bcfg(cfg, "vllm", enable_prefix_caching=apc))
        runs: dict[bool, list[dict]] = {True: [], False: []}
        for t in range(trials):
            for apc in ((True, False) if t % 2 == 0 else (False, True)):
                b = engines[apc]
                b.llm.reset_prefix_cache()  # no hits carried over from an earlier trial
                runs[apc].append(run_workload(b, cfg, fam, seed=int(cfg.seed) + t))
        st = engines[True].stats()
    finally:
        for b in engines.values():
            b.close()
    ratios = [off["seconds"] / on["seconds"] for on, off in zip(runs[True], runs[False]) if on["seconds"]]
    on_s = [r["seconds"] for r in runs[True]]
    off_s = [r["seconds"] for r in runs[False]]
    med_on = sorted(range(trials), key=lambda i: on_s[i])[(trials - 1) // 2]  # the median "on" trial
    out = dict(runs[True][med_on])
    med = statistics.median(ratios) if ratios else None
    out.update({
        "prefix_cache_hit_rate": st["prefix_cache_hit_rate"],
        "prefix_cache_queries": st["prefix_cache_queries"],
        "apc_trials": trials,
        "apc_on_seconds_trials": [round(x, 4) for x in on_s],
        "apc_off_seconds_trials": [round(x, 4) for x in off_s],
        "apc_off_seconds": round(statistics.median(off_s), 4),
        "apc_off_tokens_per_s": round(statistics.median([r["tokens_per_s"] or 0.0 for r in runs[False]]), 2),
        "apc_speedup": round(med, 3) if med is not None else None,
        "apc_speedup_trials": [round(x, 3) for x in ratios],
        "apc_speedup_min": round(min(ratios), 3) if ratios else None,
        "apc_speedup_max": round(max(ratios), 3) if ratios else None,
        "apc_speedup_spread": round((max(ratios) - min(ratios)) / med, 3) if med else None,
        "loadavg_1m": round(os.getloadavg()[0], 2),
    })
    return out


def _pick(d: dict, keys: list[str]) -> dict:
    return {k: d.get(k) for k in keys}


def main(cfg) -> dict:
    model = _model_path(cfg)
    fam = family_config(cfg)
    res: dict[str, Any] = {
        "bench": "generate",
        "model": str(model),
        "workload": {"problems": int(cfg.problems), "branches": int(cfg.branches), "rounds": int(cfg.rounds),
                     "prompts_per_round": int(cfg.problems) * int(cfg.branches), "n": int(cfg.n),
                     "shots": int(cfg.shots), "max_step_tokens": int(cfg.max_step_tokens),
                     "temperature": float(cfg.temperature)},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "omp_threads": os.environ.get("OMP_NUM_THREADS")},
        "backends": {},
    }
    for name in list(cfg.backends):
        t0 = time.perf_counter()
        try:
            res["backends"][name] = _run_one(name, cfg, model, fam)
        except Exception as e:  # noqa: BLE001 - one failing backend must not hide the others' figures
            traceback.print_exc()
            res["backends"][name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        res["backends"][name]["wall_s_incl_startup"] = round(time.perf_counter() - t0, 1)
    _table(res)
    emit(res)
    return res


def _table(res: dict) -> None:
    w = res["workload"]
    print(f"bench generate: {w['prompts_per_round']} partial solutions x n={w['n']} x {w['rounds']} rounds "
          f"(model {res['model']})")
    print(f"{'backend':<14}{'s':>9}{'tok/s':>10}{'cand/s':>10}{'apc_x':>8}{'hit':>7}")
    for name, r in res["backends"].items():
        if "error" in r:
            print(f"{name:<14} error: {r['error'][:90]}")
            continue
        hit = r.get("prefix_cache_hit_rate")
        print(f"{name:<14}{r['seconds']:>9.2f}{r['tokens_per_s'] or 0:>10.1f}{r['candidates_per_s'] or 0:>10.1f}"
              f"{r.get('apc_speedup') or float('nan'):>8.2f}{(hit if hit is not None else float('nan')):>7.2f}")

