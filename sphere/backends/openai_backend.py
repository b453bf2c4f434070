"""OpenAI-compatible HTTP backend (``vllm serve``, SGLang, llama.cpp server): ``/v1/completions``.

- Prompts are sent as token-id lists (vLLM and SGLang accept them), with ``logprobs=1`` and vLLM's
  ``return_token_ids`` so candidates carry the engine's own token ids. A server that omits ``token_ids``
  (llama.cpp) gets the text tokenised locally; one that omits ``stop_reason`` cannot tell a stop string
  from EOS, and a "stop" is then read as the step delimiter (documented limit).
- One request per prompt (n samples each), at most ``max_concurrency`` in flight (thread pool),
  ``timeout_s`` per request, ``retries`` with exponential backoff on connection errors, timeouts, 429 and
  5xx. A 4xx answer is not retried: it is raised with the server's message.
- A server that does not answer fails at construction (``GET /v1/models``) with an error naming the URL.
- The prefix-cache hit rate is read from the server's Prometheus ``/metrics`` when it has vLLM's counters.
Stdlib only (urllib), so it adds no dependency.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sphere.backends.base import (
    BackendBase,
    BackendUnavailableError,
    Candidate,
    ContextOverflowError,
    SamplingParams,
    check_context,
    check_sampling,
    finalize,
)
from sphere.model_paths import check_model_dir


def shown_url(url: str) -> str:
    """``url`` as error messages show it: without user:password@ and without a query string or fragment
    (either may carry a key, e.g. ``?api_key=...``)."""
    try:
        u = urlsplit(url)
        host = u.hostname or ""
        if ":" in host:  # IPv6
            host = f"[{host}]"
        netloc = host + (f":{u.port}" if u.port else "")
        return urlunsplit((u.scheme, netloc, u.path, "", ""))
    except ValueError:
        return "<backend.base_url>"


def _no_secrets(text: str, url: str, shown: str) -> str:
    """``text`` with the full ``url`` (and its user:password@ part) replaced by ``shown``."""
    text = text.replace(url, shown)
    try:
        u = urlsplit(url)
    except ValueError:
        return text
    for part in (u.password, u.username, u.query):
        if part:
            text = text.replace(part, "***")
    return text


class HTTPStatusError(RuntimeError):
    def __init__(self, url: str, status: int, body: str):
        super().__init__(f"{shown_url(url)}: HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


class OpenAIBackend(BackendBase):
    name = "openai"

    def __init__(
        self,
        model_path: str | Path,
        *,
        base_url: str = "http://127.0.0.1:8000",
        served_model: str | None = None,
        api_key: str | None = None,
        max_concurrency: int = 16,
        retries: int = 3,
        backoff_s: float = 0.5,
        timeout_s: float = 60.0,
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
    ):
        from transformers import AutoTokenizer

        path = check_model_dir(model_path, what="tokenizer (backend model)")
        self.model_path = str(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.base_url = base_url.rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[:-3]
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"backend.base_url={base_url!r}: must start with http:// or https://")
        if max_concurrency < 1 or retries < 0 or timeout_s <= 0:
            raise ValueError("backend: max_concurrency >= 1, retries >= 0 and timeout_s > 0 are required "
                             f"(got {max_concurrency}, {retries}, {timeout_s})")
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY")
        self.retries, self.backoff_s, self.timeout_s = int(retries), float(backoff_s), float(timeout_s)
        self.max_concurrency = int(max_concurrency)
        self._pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="sphere-http")
        self._lock = threading.Lock()
        self._stats = {"calls": 0, "requests": 0, "retries": 0, "prompts": 0, "sequences": 0,
                       "generated_tokens": 0, "gen_seconds": 0.0}
        models = self._request("GET", "/v1/models")  # fails at once, naming the URL, if nobody answers
        data = models.get("data") or []
        if served_model is None:
            if not data:
                raise BackendUnavailableError(f"backend=openai: {shown_url(self.base_url)}/v1/models lists no "
                                              "model; set backend.served_model")
            served_model = data[0]["id"]
        self.served_model = served_model
        if max_model_len is None:
            for m in data:
                if m.get("id") == served_model and m.get("max_model_len"):
                    max_model_len = int(m["max_model_len"])
        self.max_model_len = int(max_model_len or getattr(self.tokenizer, "model_max_length", 0) or 2048)
        if self.max_model_len > 10**7:  # tokenizers without a limit report a huge sentinel
            self.max_model_len = 2048
        self._base_counters = self._prefix_counters()

    # --------------------------------------------------------------------------------------------- HTTP
    def _request(self, method: str, route: str, body: dict | None = None, raw: bool = False) -> Any:
        url = self.base_url + route
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        delay, last = self.backoff_s, None
        for attempt in range(self.retries + 1):
            if attempt:
                with self._lock:
                    self._stats["retries"] += 1
                time.sleep(delay)
                delay *= 2
            req = urllib.request.Request(url, data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                    payload = r.read()
                return payload.decode() if raw else json.loads(payload)
            except urllib.error.HTTPError as e:
                err = HTTPStatusError(url, e.code, e.read().decode(errors="replace"))
                if e.code == 429 or e.code >= 500:
                    last = err
                    continue
                raise err from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = e
                continue
        reason = getattr(last, "reason", last)
        reason = getattr(reason, "strerror", None) or reason  # ConnectionRefusedError -> "Connection refused"
        shown = shown_url(url)
        raise BackendUnavailableError(
            f"backend=openai: {shown}: no answer after {self.retries + 1} attempt(s) (timeout "
            f"{self.timeout_s:g}s each): {type(last).__name__}: {_no_secrets(str(reason), url, shown)}. Check "
            f"that the server is running and listening at {shown_url(self.base_url)} (e.g. `vllm serve MODEL "
            "--port PORT`), or set backend.base_url (backend.timeout_s, backend.retries)"
        )

    def _prefix_counters(self) -> dict[str, float]:
        try:
            text = self._request_once_raw("/metrics")
        except Exception:  # noqa: BLE001 - metrics are optional
            return {}
        out: dict[str, float] = {}
        for name in ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits"):
            pat = re.compile(rf"^{re.escape(name)}(?:_total)?(?:{{[^}}]*}})?\s+([0-9.eE+-]+)$", re.M)
            vals = [float(v) for v in pat.findall(text)]
            if vals:
                out[name] = sum(vals)
        return out

    def _request_once_raw(self, route: str) -> str:
        with urllib.request.urlopen(self.base_url + route, timeout=min(self.timeout_s, 5.0)) as r:
            return r.read().decode()

    # ------------------------------------------------------------------------------------------ public
    def score(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
        rows = self._score_rows(prompts, continuations, self._where())

        def one(i: int) -> list[float]:
            if not continuations[i]:
                return []
            body = {"model": self.served_model, "prompt": rows[i], "max_tokens": 1, "temperature": 0.0,
                    "prompt_logprobs": 0, "return_token_ids": True}
            ch = self._request("POST", "/v1/completions", body)["choices"][0]
            plp = ch.get("prompt_logprobs")
            if plp is None:
                raise RuntimeError(f"{self.base_url}: the server returned no prompt_logprobs; scoring needs "
                                   "vLLM's prompt_logprobs extension")
            p = len(prompts[i])
            return [float(plp[p + j][str(t)]["logprob"]) for j, t in enumerate(continuations[i])]

        return list(self._pool.map(one, range(len(rows))))

    def stats(self) -> dict:
        st = dict(self._stats)
        st["tokens_per_s"] = st["generated_tokens"] / st["gen_seconds"] if st["gen_seconds"] else 0.0
        now = self._prefix_counters() if self._pool is not None else {}
        q = now.get("vllm:prefix_cache_queries", 0.0) - self._base_counters.get("vllm:prefix_cache_queries", 0.0)
        h = now.get("vllm:prefix_cache_hits", 0.0) - self._base_counters.get("vllm:prefix_cache_hits", 0.0)
        st["prefix_cache_hit_rate"] = (h / q) if q > 0 else None
        return st

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # -------------------------------------------------------------------------------------- internals
    def _where(self) -> str:
        return f"openai backend ({self.base_url}, tokenizer {self.model_path})"

    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Candidate]]:
        check_sampling(params)
        if self._pool is None:
            raise RuntimeError(f"{self._where()}: backend is closed")
        check_context(prompts, params.max_tokens, self.max_model_len, self._where())
        n_gen = 1 if params.greedy else params.n
        t0 = time.perf_counter()

        def one(i: int) -> list[Candidate]:
            p = list(prompts[i])
            budget = min(params.max_tokens, self.max_model_len - len(p))
            if budget < 1:
                raise ContextOverflowError(f"{self._where()}: a prompt of {len(p)} tokens leaves no room to "
                                           f"generate in the {self.max_model_len}-token context window")
            body = {"model": self.served_model, "prompt": p, "n": n_gen, "temperature": params.temperature,
                    "top_p": params.top_p, "max_tokens": budget, "logprobs": 1, "return_token_ids": True,
                    "include_stop_str_in_output": False, "skip_special_tokens": True}
            if params.seed is not None:
                body["seed"] = int(params.seed)  # same per-request seed as the offline vLLM backend
            if params.stop:
                body["stop"] = list(params.stop)
            resp = self._request("POST", "/v1/completions", body)
            row = []
            for ch in sorted(resp["choices"], key=lambda c: c.get("index", 0)):
                row.append(self._candidate(ch, params))
            if n_gen < params.n:
                row = [row[0]] + [Candidate(**{**row[0].__dict__}) for _ in range(params.n - 1)]
            return row

        out = list(self._pool.map(one, range(len(prompts))))
        with self._lock:
            self._stats["calls"] += 1
            self._stats["requests"] += len(prompts)
            self._stats["prompts"] += len(prompts)
            self._stats["gen_seconds"] += time.perf_counter() - t0
        return out

    def _candidate(self, ch: dict, params: SamplingParams) -> Candidate:
        text = ch.get("text") or ""
        fin = ch.get("finish_reason")
        lp = ch.get("logprobs") or {}
        tlp = [0.0 if x is None else float(x) for x in (lp.get("token_logprobs") or [])]
        ids = ch.get("token_ids")
        if ids is None:  # servers without vLLM's return_token_ids: tokenise the text locally
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            tlp = (tlp + [0.0] * len(ids))[: len(ids)]
        ids = list(ids)
        if "stop_reason" in ch:
            hit_stop = fin == "stop" and isinstance(ch["stop_reason"], str)
        else:
            hit_stop = fin == "stop" and bool(params.stop)
        hit_eos = fin == "stop" and not hit_stop
        eos = self.tokenizer.eos_token_id
        if hit_eos and ids and ids[-1] == eos:
            ids, tlp = ids[:-1], tlp[: len(ids) - 1]
        with self._lock:
            self._stats["generated_tokens"] += len(ch.get("token_ids") or ids)
            self._stats["sequences"] += 1
        return finalize(self.tokenizer, ids, tlp, stop=params.stop, hit_eos=hit_eos,
                        hit_length=fin == "length", text=text, hit_stop=hit_stop)
