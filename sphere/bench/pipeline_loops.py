"""The three stage-1 loops of ``sphere bench pipeline`` (moved out of sphere/bench/pipeline.py, issue #18):
the arm names (``ARMS``), ``PaperChains`` (the paper's two chains of one problem in plain Python) and the
loops ``run_per_problem`` (one expansion per backend call), ``run_one_leaf`` (one leaf per live tree per call)
and ``run_sphere`` (the ``SearchDriver`` as ``sphere generate`` runs stage 1); each returns problem id ->
(route, Sol_max text, Sol_min text)."""

from __future__ import annotations

from typing import Any

from sphere.backends.base import SamplingParams
from sphere.generate.stages import route
from sphere.rewards.base import shape_rewards
from sphere.search.driver import SearchDriver
from sphere.search.types import SearchJob

ARMS = ("sphere", "per_problem", "one_leaf")


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
