"""The actor bodies of ``runner=ray`` (sphere.scale.ray_runner): ``GenerateWorker`` (one ``Models`` owner
and ``Generator.run`` per chunk) and ``EvalWorker`` (one backend and ``evaluate_benchmark`` per chunk), each
working in a scratch directory of its own and returning its records to the driver."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sphere.backends import make_backend
from sphere.data import benchmark_key
from sphere.evaluation.benchmark import evaluate_benchmark
from sphere.evaluation.settings import settings_from_config
from sphere.evaluation.signatures import checker_info, prompt_info, record_signature
from sphere.generate.generator import Generator
from sphere.generate.records import STAGE_FILES, read_stage_logs
from sphere.io import JsonlAppender, read_jsonl_tolerant
from sphere.lifecycle import Models
from sphere.model_paths import resolve_model
from sphere.prompts import family_config
from sphere.verify import check_answers


def _set_threads(cfg: DictConfig) -> None:
    try:
        import torch

        torch.set_num_threads(int(OmegaConf.select(cfg, "runner.cpus_per_worker", default=1)))
    except ImportError:  # pragma: no cover
        pass


class GenerateWorker:
    """Ray actor body for `sphere generate`: one policy backend (and the small model's, when it differs),
    one scorer, built once; ``run_chunk`` runs ``Generator.run`` on a chunk in a fresh scratch directory."""

    def __init__(self, cfg_plain: dict, slot: int):
        self.cfg = OmegaConf.create(cfg_plain)
        self.slot = slot
        _set_threads(self.cfg)
        root = OmegaConf.select(self.cfg, "runner.scratch_dir", default=None)
        if root:
            Path(str(root)).mkdir(parents=True, exist_ok=True)
        self.scratch = Path(tempfile.mkdtemp(prefix=f"sphere-ray-gen{slot}-", dir=root or None))
        # the one owner of policy / small / scorer, as in a local run; kept for the actor's life: the driver
        # sends every stage-1/2 chunk of a round first (policy only), then the stage-3 chunks (small model),
        # so with stages.close_policy_before_small a worker loads the policy once and the small model once
        self.models = Models(self.cfg)
        self.tokenizer: Any = None  # the policy's tokenizer (stage-3 chunks build pair prompts with it)
        self.done_in_chunk = 0

    def info(self) -> dict:
        import ray

        return {
            "slot": self.slot,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node": ray.get_runtime_context().get_node_id(),
            "scratch": str(self.scratch),
        }

    def loads(self) -> dict:
        """Models opened by this actor so far, by role (``Models.opened`` counts every open and reopen)."""
        out: dict = {}
        for name in self.models.opened:
            if not name.startswith("-"):
                out[name] = out.get(name, 0) + 1
        return out

    def poll(self) -> int:
        return self.done_in_chunk

    def run_chunk(self, chunk_id: int, problems: list[dict], prior: dict, phase: str = "all") -> dict:
        """Run the stages on ``problems``; ``prior[stage]`` holds the run directory's records of these
        problems (a partly finished problem resumes at its next stage). ``phase``: ``policy`` = stages 1
        and 2 only (a both-right problem waits for the stage-3 phase), ``small`` = stage 3 of problems whose
        stage-1 record is in ``prior`` (the policy is not opened: its tokenizer is kept from the policy
        phase), ``all`` = every stage. Returns the new records per stage, the search statistics, the tree
        snapshots (file name -> npz bytes) and the models this actor has loaded."""
        work = self.scratch / f"chunk-{chunk_id}"
        shutil.rmtree(work, ignore_errors=True)
        (work / "stages").mkdir(parents=True)
        for s, recs in prior.items():
            if recs:
                with JsonlAppender(work / "stages" / STAGE_FILES[int(s)], fsync=False) as w:
                    w.write_many(recs)
        self.done_in_chunk = 0

        def progress(counts: dict) -> None:
            self.done_in_chunk = int(counts.get("done", 0))

        t0 = time.perf_counter()
        try:
            m = self.models
            gen = Generator(self.cfg, work)  # its config hash (the records' signature) is the run's
            if phase == "policy":
                gen.cfg = OmegaConf.merge(self.cfg, {"stages": {"stage3": False}})
            if phase == "small":
                if self.tokenizer is None:  # a restarted actor: open the policy once for its tokenizer
                    self.tokenizer = m.policy().tokenizer
                policy: Any = _PolicyView(m, self.tokenizer)
            else:
                policy = m.policy()
                self.tokenizer = policy.tokenizer
            stats = gen.run(
                problems,
                policy,
                m.scorer(),
                check_answers,
                small_backend_factory=m.small if self.cfg.stages.stage3 else None,
                progress=progress,
            )
            had = {int(s): {r["problem_id"] for r in recs} for s, recs in prior.items()}
            records = {s: [r for r in d.values() if r["problem_id"] not in had.get(s, set())]
                       for s, d in read_stage_logs(work).items()}
            trees = {p.name: p.read_bytes() for p in sorted((work / "trees").glob("*.npz"))}
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return {
            "records": records,
            "search": stats.get("search", {}),
            "trees": trees,
            "wall_s": time.perf_counter() - t0,
            "worker": self.info(),
            "loads": self.loads(),
        }

    def close(self) -> None:
        self.models.close_all()
        shutil.rmtree(self.scratch, ignore_errors=True)


class _PolicyView:
    """The policy as a stage-3 chunk sees it: its tokenizer (kept from the policy phase); anything else
    opens the policy (``Models.policy``), so nothing is faked, only not loaded when unused."""

    def __init__(self, models: Any, tokenizer: Any):
        self._models = models
        self.tokenizer = tokenizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._models.policy(), name)


class EvalWorker:
    """Ray actor body for `sphere eval`: one backend; ``run_chunk`` runs the harness's
    ``evaluate_benchmark`` on a chunk of one benchmark in a scratch directory and returns its records."""

    def __init__(self, cfg_plain: dict, slot: int):
        self.cfg = OmegaConf.create(cfg_plain)
        self.slot = slot
        _set_threads(self.cfg)
        root = OmegaConf.select(self.cfg, "runner.scratch_dir", default=None)
        self.scratch = Path(tempfile.mkdtemp(prefix=f"sphere-ray-eval{slot}-", dir=root or None))
        self.model_name = str(OmegaConf.select(self.cfg, "model.policy", default=""))
        self.backend = make_backend(self.cfg, resolve_model(self.model_name, self.cfg))
        self.family_cfg = family_config(self.cfg)
        # the same signature parts as run_eval (sphere.evaluation.harness), so records merge and resume
        self.sig_parts = {
            "model": self.model_name,
            "backend": getattr(self.backend, "name", type(self.backend).__name__),
            "prompt": prompt_info(self.family_cfg),
            "checker": checker_info(),
        }
        self.done_in_chunk = 0

    def signature(self) -> dict:
        return {"backend_name": self.sig_parts["backend"], "sig": _eval_sig(self.sig_parts, self.cfg)}

    def poll(self) -> int:
        return self.done_in_chunk

    def stats(self) -> dict:
        return self.backend.stats() if hasattr(self.backend, "stats") else {}

    def run_chunk(self, chunk_id: int, name: str, records: list[dict]) -> dict:
        settings = replace(settings_from_config(self.cfg), resume=True)
        work = self.scratch / f"chunk-{chunk_id}"
        shutil.rmtree(work, ignore_errors=True)
        self.done_in_chunk = 0
        worker = self

        class Counter:  # the two calls evaluate_benchmark makes on its rich progress bar
            def add_task(self, *a, **k):
                return 0

            def advance(self, task, n):
                worker.done_in_chunk += int(n)

        t0 = time.perf_counter()
        try:
            evaluate_benchmark(
                self.backend,
                name,
                records,
                work,
                settings,
                family_cfg=self.family_cfg,
                sig_parts=self.sig_parts,
                progress=Counter(),
            )
            out = read_jsonl_tolerant(work / "eval" / f"{benchmark_key(name)}.jsonl")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return {"records": out, "wall_s": time.perf_counter() - t0}

    def close(self) -> None:
        self.backend.close()
        shutil.rmtree(self.scratch, ignore_errors=True)


def _eval_sig(sig_parts: dict, cfg: Any) -> str:
    """The record signature ``evaluate_benchmark`` writes (sphere.evaluation.harness)."""
    return record_signature(sig_parts, settings_from_config(cfg))
