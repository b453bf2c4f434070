"""``train.processes=N > 1``: DPO as N data-parallel processes, launched by ``train_dpo`` itself.

``launch`` renders the pairs once (the tokenizer only), saves them as a ``datasets`` directory the ranks share
(map caches and TRL's precomputed reference log-probs are written once, by rank 0), and runs
``python -m torch.distributed.run --standalone --nproc_per_node N -m sphere.train.rank SPEC``: N
processes (sphere.train.rank), each on one device, joined by torch DDP through the HF Trainer / accelerate
(gloo on CPU, NCCL on GPU, one GPU per local rank). ``train.batch_size`` stays per process, so the global
batch is ``processes x batch_size x grad_accum``. Every rank trains; rank 0 alone writes ``adapter/``,
``merged/``, train_metrics.json and DONE (sphere.train.dpo._train). Resume: the launcher picks the TRL
checkpoint before any rank starts, every rank loads it (model, optimizer, scheduler, its own RNG state).

Metrics: rank 0 appends its train/* records to ``.processes/metrics.jsonl``; the launcher forwards them to
the caller's logger while the processes run. Output of all ranks: ``out_dir/train_processes.log`` (and the
terminal, when the progress bar is on).

Failures: a rank that raises writes ``.processes/rank<r>.error.json`` and exits 1; torchrun then stops the
other ranks (which may be blocked in a collective: no hang), and ``launch`` raises one error naming the
first failing rank and its message, of the same built-in type (ValueError, FileNotFoundError, ...). A rank
killed without a Python error (e.g. out of memory) is reported with torchrun's exit code and the log.
"""

from __future__ import annotations

import builtins
import collections
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from sphere.io import atomic_write_json
from sphere.train.loading import _quiet, _rows, _tokenizer
from sphere.train.train_config import _use_cpu

log = logging.getLogger("sphere.train")

WORK = ".processes"  # under out_dir: the spec, the shared dataset, metrics.jsonl, error files
LOG = "train_processes.log"
_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
             "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
             "TORCHELASTIC_RESTART_COUNT",
             "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_ERROR_FILE", "ACCELERATE_USE_CPU")


class _Forwarder:
    """Reads new complete lines of rank 0's metrics.jsonl and passes them on to the caller's logger."""

    def __init__(self, path: Path, logger):
        self.path, self.logger, self.pos = path, logger, 0

    def __call__(self) -> None:
        if self.logger is None or not self.path.is_file():
            return
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.pos += end
        for line in data[:end].splitlines():
            if line.strip():
                rec = json.loads(line)
                self.logger.log(rec["metrics"], step=rec.get("step"))


def launch(t: dict, policy_path: Path, pairs, out_dir: Path, *, logger, show: bool,
           ckpt: Path | None) -> None:
    """Run the training as ``t["processes"]`` processes; returns when they all exited cleanly."""
    n = int(t["processes"])
    cpu = _use_cpu(str(t["device"]))
    if not cpu:
        import torch

        k = torch.cuda.device_count()
        if n > k:
            raise ValueError(f"train.processes={n}: only {k} GPU(s) visible (CUDA_VISIBLE_DEVICES); one "
                             "process per GPU")
    work = out_dir / WORK
    _prepare(work, t, policy_path, pairs, out_dir, show=show, ckpt=ckpt)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "--max_restarts=0", "-m", "sphere.train.rank", str(work / "spec.json")]
    logfile = out_dir / LOG
    log.info("train: %d processes (%s), output in %s", n, "gloo on CPU" if cpu else "NCCL, one GPU each",
             logfile)
    rc, tail = _run(cmd, logfile, _Forwarder(work / "metrics.jsonl", logger), show=show)
    if rc != 0:
        raise _failure(work, n, rc, tail, logfile)
    shutil.rmtree(work, ignore_errors=True)


def _prepare(work: Path, t: dict, policy_path: Path, pairs, out_dir: Path, *, show: bool,
             ckpt: Path | None) -> None:
    """The ranks' shared inputs under ``work``: the rendered pairs as a ``datasets`` directory and spec.json."""
    from datasets import Dataset

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    _quiet(show)
    rows, render = _rows(pairs, _tokenizer(policy_path, pairs, t), policy_path)
    Dataset.from_list(rows).save_to_disk(str(work / "data"))
    spec = {"t": t, "policy": str(policy_path), "pairs": str(pairs.path), "out_dir": str(out_dir),
            "ckpt": str(ckpt) if ckpt is not None else None, "render": render, "show": bool(show)}
    atomic_write_json(work / "spec.json", spec)


def _run(cmd: list[str], logfile: Path, forward: _Forwarder, *, show: bool) -> tuple[int, list[str]]:
    """Run torchrun, its output appended to ``logfile`` (and the terminal when ``show``), rank 0's metrics
    forwarded while it runs; returns its exit code and the last 40 lines of output."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    tail: collections.deque[str] = collections.deque(maxlen=40)
    with open(logfile, "a", encoding="utf-8") as lf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                errors="replace", bufsize=1)

        def tee() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lf.write(line)
                lf.flush()
                tail.append(line.rstrip("\n"))
                if show:
                    sys.stderr.write(line)

        reader = threading.Thread(target=tee, daemon=True)
        reader.start()
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                forward()
        finally:
            if proc.poll() is None:  # interrupted here (Ctrl-C, an error while forwarding): stop the ranks
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            reader.join(10)
        forward()
    return proc.returncode, list(tail)


def _failure(work: Path, n: int, rc: int, tail: list[str], logfile: Path) -> Exception:
    """One exception for a failed launch: the first rank's error (by time), as its built-in type."""
    errs = []
    for p in work.glob("rank*.error.json"):
        try:
            errs.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            pass
    if not errs:
        last = next((line for line in reversed(tail) if line.strip()), "")
        return RuntimeError(f"train: the {n} training processes failed (torchrun exit {rc}) without a "
                            f"Python error (killed, e.g. out of memory?); last output: {last!r}; all output: "
                            f"{logfile}")
    e = min(errs, key=lambda r: r["time"])
    others = sorted({r["rank"] for r in errs} - {e["rank"]})
    also = f"; rank(s) {others} failed after it" if others else ""
    msg = f"train: rank {e['rank']} of {n} failed: {e['type']}: {e['message']}{also} (all output: {logfile})"
    cls = getattr(builtins, e["type"], None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(msg)
        except TypeError:
            pass
    return RuntimeError(msg)
