"""Issue #29, Must show: every `sphere` command, given a recognisable fake key in every secret-bearing field
(``backend.api_key`` of conf/backend/openai.yaml, ``+logger.api_key``, and the environment's
``WANDB_API_KEY``, ``OPENAI_API_KEY``, ``HF_TOKEN``: sphere/loggers.py ``is_secret_key``) and a forced
failure, prints none of the keys: not on stdout, not on stderr, not in any file under the run directory
(Hydra's record and job log included), not in W&B's offline files. ``--cfg job`` prints the composed config
with the keys as ``***``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

KEYS = {
    "backend.api_key": "sk-RELSCANbackendkeyaaaaaaaaaaaaaaaa",
    "+logger.api_key": "RELSCAN-logger-key-bbbbbbbb",
    "WANDB_API_KEY": "fedcba9876543210fedcba9876543210fedc0000",
    "OPENAI_API_KEY": "RELSCAN-openai-env-cccccc",
    "HF_TOKEN": "hf_RELSCANhfenvtokendddddddddddddddddd",
}
SECRET_ARGS = [f"+logger.api_key={KEYS['+logger.api_key']}"]
# an OpenAI-compatible server nobody answers: the forced failure of the commands that talk to a backend
OPENAI = ["backend=openai", "backend.base_url=http://127.0.0.1:9", "backend.retries=0",
          f"backend.api_key={KEYS['backend.api_key']}"]
WANDB = ["logger=wandb", "logger.mode=offline"]


def _env(home: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "WANDB_SILENT": "true", **{k: v for k, v in KEYS.items() if k.isupper()}}
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        env[var] = str(home)
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def _sweep_file(tmp: Path) -> list[str]:
    f = tmp / "fails.yaml"
    f.write_text("command: eval\noverrides: [benchmarks=[mini], limit=2]\n"
                 "blocks:\n  one: {backend.retries: '0'}\n")
    return ["sweep", str(f), *OPENAI, *SECRET_ARGS, f"dir={tmp / 'run'}"]


# command -> (argv builder(tmp) without hydra.run.dir, whether W&B files must appear)
CASES = {
    "run_dry_run": (lambda t: ["run", "dry_run=true", *OPENAI, *SECRET_ARGS, "data.problems=/nonexistent.jsonl"],
                    False),
    "generate": (lambda t: ["generate", *OPENAI, *WANDB, *SECRET_ARGS, "data.mini_n=2"], True),
    "eval": (lambda t: ["eval", *OPENAI, *WANDB, *SECRET_ARGS, "benchmarks=[mini]", "limit=2"], False),
    "train": (lambda t: ["train", f"pairs={t / 'nonexistent.jsonl'}", *WANDB, *SECRET_ARGS], True),
    "bench_engine": (lambda t: ["bench", "engine", "trees=4", "rounds=2", "py_rounds=1", "peers=false",
                                "rule=bogus", *SECRET_ARGS], False),
    "report": (lambda t: ["report", str(t / "no-such-run"), f"out={t / 'run'}"], False),
    "viz_tree": (lambda t: ["viz", "tree", str(t / "missing.npz"), f"out={t / 'run' / 'tree.html'}"], False),
    "sweep": (_sweep_file, False),
}
HYDRA = {"run_dry_run", "generate", "eval", "train", "bench_engine"}


def _files(*roots: Path) -> list[Path]:
    return [p for r in roots if r.exists() for p in r.rglob("*") if p.is_file()]


@pytest.mark.parametrize("name", list(CASES))
def test_no_key_printed_or_written_on_failure(name, tmp_path):
    build, wandb_files = CASES[name]
    out, home = tmp_path / "run", tmp_path / "wandb-home"
    args = build(tmp_path)
    if name in HYDRA:
        args.append(f"hydra.run.dir={out}")
    proc = subprocess.run([sys.executable, "-m", "sphere.cli", *args], capture_output=True, text=True,
                          env=_env(home), timeout=600, cwd=ROOT)
    assert proc.returncode != 0, f"the forced failure did not fail: {proc.stdout[-1500:]}"
    assert proc.stderr.strip(), "the failure is reported"
    files = _files(out, home)
    if wandb_files:
        assert any(p.suffix == ".wandb" for p in files), "no offline W&B run was written: nothing scanned"
    for field, key in KEYS.items():
        assert key not in proc.stdout, (field, proc.stdout[-2000:])
        assert key not in proc.stderr, (field, proc.stderr[-2000:])
        leaks = [str(p) for p in files if key.encode() in p.read_bytes()]
        assert not leaks, (field, leaks)


@pytest.mark.parametrize("command", ["run", "generate", "eval", "train"])
def test_cfg_job_prints_keys_as_stars(command, tmp_path):
    """`sphere <cmd> --cfg job +logger.api_key=...` prints the composed config: the field is there, its value
    is not."""
    args = [command, *OPENAI, *SECRET_ARGS, "--cfg", "job"]
    proc = subprocess.run([sys.executable, "-m", "sphere.cli", *args], capture_output=True, text=True,
                          env=_env(tmp_path / "home"), timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "api_key: '***'" in proc.stdout or "api_key: ***" in proc.stdout, proc.stdout[-2000:]
    for key in KEYS.values():
        assert key not in proc.stdout + proc.stderr


def test_job_log_file_is_redacted(tmp_path):
    """The job log (<run dir>/<job>.log, conf/config.yaml hydra.job_logging) is written by a FileHandler,
    not through the redacted console streams: a log line or a logged traceback repeating a command-line
    secret lands there in clear unless the handler filters it (sphere.loggers.RedactSecrets)."""
    import logging.config

    from omegaconf import OmegaConf

    import sphere.loggers as lg

    jl = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "config.yaml").hydra.job_logging, resolve=False)
    log = tmp_path / "job.log"
    jl["handlers"]["file"]["filename"] = str(log)
    jl["handlers"]["console"]["stream"] = "ext://sys.stdout"
    key = KEYS["+logger.api_key"]
    old = sys.stdout, sys.stderr, set(lg.CONSOLE_SECRETS)
    root = logging.getLogger()
    handlers = list(root.handlers)
    try:
        lg.redact_console([f"+logger.api_key={key}"])
        logging.config.dictConfig(jl)
        try:
            raise RuntimeError(f"server said no to {key}")
        except RuntimeError:
            logging.getLogger("sphere.scan").exception("request with +logger.api_key=%s failed", key)
        for h in logging.getLogger().handlers:
            h.flush()
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
            h.close()
        for h in handlers:
            root.addHandler(h)
        sys.stdout, sys.stderr = old[0], old[1]
        lg.CONSOLE_SECRETS.clear()
        lg.CONSOLE_SECRETS.update(old[2])
    text = log.read_text()
    assert "request with +logger.api_key=***" in text and "RuntimeError: server said no to ***" in text, text
    assert key not in text
