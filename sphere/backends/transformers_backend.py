"""transformers ``generate`` backend: batched, left padding, stop strings; CPU or GPU.

Logprobs are those of the raw model distribution (``output_logits``, before temperature/top-p), the same
quantity vLLM reports by default, so candidates from both backends are comparable. Greedy with n > 1
generates once and repeats the candidate (transformers refuses greedy with num_return_sequences > 1).
Scoring runs one forward pass with right padding (positions then start at 0 for every row).
"""

from __future__ import annotations

import time
from pathlib import Path

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
from sphere.model_paths import check_model_dir

_DTYPES = ("float32", "bfloat16", "float16", "auto")


class TransformersBackend(BackendBase):
    name = "transformers"

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "float32",
        device: str = "auto",
        batch_size: int = 64,
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = check_model_dir(model_path)
        if dtype not in _DTYPES:
            raise ValueError(f"backend.dtype={dtype!r}: allowed {_DTYPES}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"backend.batch_size must be >= 1, got {batch_size}")
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype,
                                                          trust_remote_code=trust_remote_code)
        self.model.to(self.device).eval()
        limit = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.max_model_len = int(min(max_model_len or limit, limit))
        self.eos_ids = model_eos_ids(path, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id
        self.model_path = str(path)
        self._stats = {"calls": 0, "prompts": 0, "sequences": 0, "generated_tokens": 0, "gen_seconds": 0.0}

    # ------------------------------------------------------------------------------------------ public
    def score(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
        import torch

        rows = self._score_rows(prompts, continuations, f"{self.name} backend ({self.model_path})")
        out: list[list[float]] = []
        for s in range(0, len(rows), self.batch_size):
            chunk = rows[s: s + self.batch_size]
            width = max(map(len, chunk))
            x = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(x)
            for i, r in enumerate(chunk):  # right padding: positions start at 0 in every row
                x[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
            with torch.inference_mode():
                logits = self.model(input_ids=x.to(self.device), attention_mask=mask.to(self.device)).logits
                lp = torch.log_softmax(logits.float(), dim=-1)
            for i, (p, c) in enumerate(zip(prompts[s: s + self.batch_size], continuations[s: s + self.batch_size])):
                if not c:
                    out.append([])
                    continue
                pos = torch.arange(len(p) - 1, len(p) + len(c) - 1, device=lp.device)
                tgt = torch.tensor(c, device=lp.device)
                out.append(lp[i, pos, tgt].tolist())
        return out

    def stats(self) -> dict:
        st = dict(self._stats)
        st["tokens_per_s"] = st["generated_tokens"] / st["gen_seconds"] if st["gen_seconds"] else 0.0
        st["prefix_cache_hit_rate"] = None  # transformers has no cross-request prefix cache
        return st

    def close(self) -> None:
        self.model = None

    # -------------------------------------------------------------------------------------- internals
    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Candidate]]:
        import torch

        check_sampling(params)
        where = f"{self.name} backend ({self.model_path})"
        check_context(prompts, params.max_tokens, self.max_model_len, where)
        if self.model is None:
            raise RuntimeError(f"{where}: backend is closed")
        t0 = time.perf_counter()
        n_gen = 1 if params.greedy else params.n
        per_chunk = max(1, self.batch_size // n_gen)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        results: list[list[Candidate]] = []
        for s in range(0, len(prompts), per_chunk):
            results.extend(self._generate_chunk(prompts[s: s + per_chunk], params, n_gen, where))
        self._stats["calls"] += 1
        self._stats["prompts"] += len(prompts)
        self._stats["gen_seconds"] += time.perf_counter() - t0
        return results

    def _generate_chunk(self, chunk, params: SamplingParams, n_gen: int, where: str) -> list[list[Candidate]]:
        import torch

        width = max(map(len, chunk))
        max_new = min(params.max_tokens, self.max_model_len - width)
        if max_new < 1:
            raise ContextOverflowError(f"{where}: a prompt of {width} tokens leaves no room to generate "
                                       f"in the {self.max_model_len}-token context window")
        x = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(x)
        for i, p in enumerate(chunk):  # left padding
            x[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        kw = dict(max_new_tokens=max_new, num_return_sequences=n_gen, return_dict_in_generate=True,
                  output_logits=True, pad_token_id=self.pad_id, eos_token_id=sorted(self.eos_ids))
        if params.greedy:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:  # top_k=0: no top-k cut (transformers' default is 50), as in vLLM
            kw.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        if params.stop:
            kw.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        with torch.inference_mode():
            out = self.model.generate(input_ids=x.to(self.device), attention_mask=mask.to(self.device), **kw)
        seqs = out.sequences[:, width:].cpu()
        # logprob of each generated token under the raw model distribution
        lps = torch.stack([torch.log_softmax(lg.float(), dim=-1).gather(1, seqs[:, t: t + 1].to(lg.device))
                           .squeeze(1).cpu() for t, lg in enumerate(out.logits)], dim=1) if out.logits else \
            torch.zeros_like(seqs, dtype=torch.float)
        cands: list[list[Candidate]] = []
        for i in range(len(chunk)):
            row: list[Candidate] = []
            for j in range(n_gen):
                k = i * n_gen + j
                ids = seqs[k].tolist()
                end, hit_eos = len(ids), False
                for t, tok in enumerate(ids):
                    if tok in self.eos_ids:
                        end, hit_eos = t, True
                        break
                    if tok == self.pad_id:  # finished by a stop string, then padded
                        end = t
                        break
                gen = ids[:end]
                self._stats["generated_tokens"] += end + int(hit_eos)
                self._stats["sequences"] += 1
                row.append(finalize(self.tokenizer, gen, lps[k, :end].tolist(), stop=params.stop,
                                    hit_eos=hit_eos, hit_length=(end == max_new and not hit_eos)))
            if n_gen < params.n:  # greedy: identical samples
                row = [row[0]] + [Candidate(**{**row[0].__dict__}) for _ in range(params.n - 1)]
            cands.append(row)
        return cands
