"""Issue #29: SIGTERM (what SLURM, Kubernetes and `kill` send) is treated like Ctrl-C: one line naming the
signal and saying that a rerun of the same command resumes, no traceback, exit status 143 (128 + 15).

The job is kept busy cheaply: `sphere eval backend=openai` against a local socket that accepts the
connection and never answers, so the signal arrives while sphere waits inside a Hydra job."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "WANDB_MODE": "disabled"}


def test_sigterm_prints_one_line_and_exits_143(tmp_path):
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        srv.settimeout(120)
        port = srv.getsockname()[1]
        # a SIGTERM the parent inherited as ignored would be inherited too: restore the default in the child
        proc = subprocess.Popen(
            [sys.executable, "-m", "sphere.cli", "eval", "backend=openai", f"backend.base_url=http://127.0.0.1:{port}",
             "backend.retries=0", "backend.timeout_s=300", "benchmarks=[mini]", "limit=2",
             f"hydra.run.dir={tmp_path / 'run'}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT,
            preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
        try:
            conn, _ = srv.accept()  # sphere is now inside the job, waiting for GET /v1/models
            with conn:
                proc.send_signal(signal.SIGTERM)
                stdout, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 143, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines[-1] == "sphere: terminated by SIGTERM; rerun the same command (same hydra.run.dir) to resume"
    assert "Traceback" not in stderr and "Error executing job" not in stderr, stderr[-3000:]
