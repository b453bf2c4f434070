"""Monte-Carlo rollout step values (Math-Shepherd, Wang et al. 2024, arXiv 2312.08935).

The value of step t is the fraction of ``m`` sampled completions from the prefix (problem, steps[:t+1]) whose
final answer equals the gold answer ("soft" estimation; ``mode="hard"``: 1 if any completion reaches it).
A step that already holds the final answer (``\\boxed{}``) is scored by checking that answer directly,
without rollouts. All rollouts of a ``score`` call go to the backend in one ``complete`` call (n = m per
prefix), so prefix caching shares the problem and earlier steps; answers are checked in one batch by
``sphere.verify.check_answers``.

``RolloutScorer(cfg, backend)``: reads ``cfg.scorer`` (conf/scorer/rollout.yaml: m, mode, temperature,
max_tokens, seed) and the prompt family of ``cfg``. Gold answers: ``score(items, golds)`` (one per item),
or register problem records once (``set_golds(records)`` / ``RolloutScorer(..., records=...)``) so the
StepScorer call ``score(items)`` finds each problem's gold by its text (what the search driver calls);
``score_records(records, steps)`` takes records directly.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from sphere.backends.base import SamplingParams, has_boxed_answer
from sphere.prompts import build_prompt_ids, family_config, load_family
from sphere.verify import check_answers


class RolloutScorer:
    def __init__(self, cfg: Any = None, backend: Any = None, *, family: dict | None = None,
                 records: list[dict] | None = None, **overrides: Any):
        if backend is None:
            raise ValueError("RolloutScorer needs a generation backend (sphere.backends.make_backend(cfg))")
        sc = cfg.get("scorer") if cfg is not None and hasattr(cfg, "get") else None
        s = OmegaConf.to_container(sc, resolve=True) if OmegaConf.is_config(sc) else dict(sc or {})
        s.update(overrides)
        self.backend = backend
        self.gold_by_problem: dict[str, str] = {}
        if records:
            self.set_golds(records)
        self.m = int(s.get("m", 8))
        self.mode = s.get("mode", "soft")
        if self.m < 1:
            raise ValueError(f"scorer.m must be >= 1, got {self.m}")
        if self.mode not in ("soft", "hard"):
            raise ValueError(f"scorer.mode={self.mode!r}: allowed 'soft' | 'hard'")
        self.temperature = float(s.get("temperature", 0.8))
        self.top_p = float(s.get("top_p", 1.0))
        self.max_tokens = int(s.get("max_tokens", 512))
        self.seed = s.get("seed")
        self.verify_timeout_s = float(s.get("verify_timeout_s", 5.0))
        if family is None:
            family = family_config(cfg) if cfg is not None else load_family("mini")
        self.family = family
        self.delim = family["step_delimiter"]
        self.rollouts = 0

    def set_golds(self, records: list[dict]) -> None:
        """Remember gold answers by problem text (``{"problem": ..., "answer": ...}`` records)."""
        for r in records:
            self.gold_by_problem[r["problem"]] = str(r["answer"])

    def score(self, items: list[tuple[str, list[str]]], golds: list[str] | None = None) -> list[list[float]]:
        """One value in [0, 1] per step: the share of m rollouts from that step that reach ``golds[i]``."""
        if golds is None and self.gold_by_problem:
            missing = [p for p, _ in items if p not in self.gold_by_problem]
            if missing:
                raise KeyError(f"RolloutScorer: no gold answer registered for problem {missing[0][:80]!r} "
                               "(call set_golds(records) or pass golds=)")
            golds = [self.gold_by_problem[p] for p, _ in items]
        if golds is None or len(golds) != len(items):
            raise ValueError(f"RolloutScorer.score needs one gold answer per item (golds=...), got "
                             f"{None if golds is None else len(golds)} for {len(items)} items")
        tok = self.backend.tokenizer
        prompts, where, direct = [], [], []  # where: (item, step) per rollout prompt
        for i, (problem, steps) in enumerate(items):
            for t, step in enumerate(steps):
                if has_boxed_answer(step):  # the step states the final answer: check it, no rollouts
                    direct.append((i, t, self.delim.join(steps[: t + 1])))
                else:
                    prompts.append(build_prompt_ids(tok, problem, steps[: t + 1], self.family))
                    where.append((i, t))
        out = [[0.0] * len(steps) for _, steps in items]
        pairs: list[tuple[str, str]] = []
        owners: list[tuple[int, int]] = []
        if prompts:
            sp = SamplingParams(n=self.m, temperature=self.temperature, top_p=self.top_p,
                                max_tokens=self.max_tokens, seed=self.seed)
            res = self.backend.complete(prompts, sp)
            self.rollouts += sum(len(r) for r in res)
            for (i, t), row in zip(where, res):
                for c in row:  # only the completion: the prefix's numbers must not count as its answer
                    pairs.append((c.text, golds[i]))
                    owners.append((i, t))
        for i, t, text in direct:
            pairs.append((text, golds[i]))
            owners.append((i, t))
        ok = check_answers(pairs, timeout_s=self.verify_timeout_s) if pairs else []
        hits: dict[tuple[int, int], list[bool]] = {}
        for key, v in zip(owners, ok):
            hits.setdefault(key, []).append(bool(v))
        for (i, t), vs in hits.items():
            out[i][t] = (float(any(vs)) if self.mode == "hard" else sum(vs) / len(vs))
        return out

    def score_records(self, records: list[dict], steps: list[list[str]]) -> list[list[float]]:
        """``score`` for problem records (``{"problem": ..., "answer": ...}``) and their step lists."""
        items = [(r["problem"], s) for r, s in zip(records, steps)]
        return self.score(items, [str(r["answer"]) for r in records])  # golds as set_golds keeps them
