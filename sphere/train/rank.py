"""One rank of ``train.processes=N > 1`` (sphere.train.distributed): the module torchrun runs in each of the N
processes (``python -m sphere.train.rank SPEC``). It trains with ``sphere.train.dpo._train`` on the dataset
the launcher saved; rank 0 appends its train/* records to ``.processes/metrics.jsonl`` (forwarded by the
launcher); a rank that raises writes ``.processes/rank<r>.error.json`` and exits 1.

``SPHERE_TRAIN_FAIL_RANK=r[:k]`` (tests only): rank r raises after its k-th optimizer step (default 1).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from sphere.io import atomic_write_json
from sphere.train.dpo import _train
from sphere.train.pairs_file import load_pairs


class _JsonlLogger:
    """Rank 0's MetricsLogger: one JSON line per call, read by the launcher's _Forwarder."""

    def __init__(self, path: Path):
        self.path = path

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"metrics": metrics, "step": step}) + "\n")


def _fail_callback(rank: int, step: int):
    from transformers import TrainerCallback

    class FailAt(TrainerCallback):
        # after the step: the other ranks have finished the previous step's checkpoint (they took part in this
        # step's gradient all-reduce) and now wait in the next one
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= step:
                raise RuntimeError(f"injected failure on rank {rank} after step {state.global_step} "
                                   "(SPHERE_TRAIN_FAIL_RANK)")

    return FailAt()


def main(argv: list[str] | None = None) -> int:
    """One rank (run by torchrun): train, or write this rank's error file and exit 1."""
    argv = sys.argv[1:] if argv is None else argv
    spec_path = Path(argv[0])
    work = spec_path.parent
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(message)s")
    for name in ("datasets", "transformers", "peft", "trl", "accelerate"):
        logging.getLogger(name).setLevel(logging.WARNING if rank == 0 else logging.ERROR)
    try:
        spec: dict[str, Any] = json.loads(spec_path.read_text())
        extra = ()
        fail = os.environ.get("SPHERE_TRAIN_FAIL_RANK", "").split(":")
        if fail[0] == str(rank):
            extra = (_fail_callback(rank, int(fail[1]) if len(fail) > 1 else 1),)
        _train(spec["t"], Path(spec["policy"]), load_pairs(spec["pairs"]), Path(spec["out_dir"]),
               logger=_JsonlLogger(work / "metrics.jsonl") if rank == 0 else None,
               show=bool(spec["show"]) and rank == 0, ckpt=Path(spec["ckpt"]) if spec["ckpt"] else None,
               data=(work / "data", spec["render"]), extra_callbacks=extra)
    except Exception as e:  # noqa: BLE001 - reported to the launcher, then this rank exits 1
        traceback.print_exc()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        atomic_write_json(work / f"rank{rank}.error.json",
                          {"rank": rank, "time": time.time(), "type": type(e).__name__, "message": msg,
                           "traceback": traceback.format_exc()})
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # at once: no interpreter teardown waiting on a process group the others still hold
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
