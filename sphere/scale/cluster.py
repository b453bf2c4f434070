"""The runner config and the Ray cluster of ``runner=ray`` (sphere.scale.ray_runner): the ``runner`` config
check, the plain config shipped to actors, the actors' runtime environment, the ``ray.init`` console
settings, the cluster context manager and one actor's resources."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sphere.console import QUIET_ENV


def validate_runner_config(rcfg: Any) -> None:
    def pos_int(key: str, minimum: int = 1) -> None:
        v = rcfg.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise ValueError(f"config runner.{key}={v!r}: allowed an integer >= {minimum}")

    for k in ("workers", "eval_chunk_size", "cpus_per_worker"):
        pos_int(k)
    if rcfg.get("chunk_size") != "auto":
        pos_int("chunk_size")
    for k in ("max_chunk_retries", "max_restarts", "max_task_retries"):
        pos_int(k, 0)
    for k in ("unavailable_s", "stall_timeout_s"):
        v = rcfg.get(k)
        if not isinstance(v, int | float) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"config runner.{k}={v!r}: allowed a number of seconds > 0")
    g = rcfg.get("gpus_per_worker")
    if not (g == "auto" or (isinstance(g, int | float) and not isinstance(g, bool) and g >= 0)):
        raise ValueError(f"config runner.gpus_per_worker={g!r}: allowed auto or a number >= 0")
    pos_int("nodes")
    if rcfg.get("gpus_per_node") is not None:
        pos_int("gpus_per_node")
    if rcfg.get("num_cpus") is not None:
        pos_int("num_cpus")
    if not isinstance(rcfg.get("object_store_mb"), int) or rcfg.get("object_store_mb") < 64:
        raise ValueError(
            f"config runner.object_store_mb={rcfg.get('object_store_mb')!r}: allowed an integer >= 64"
        )
    if float(rcfg.get("progress_poll_s", 1.0)) <= 0:
        raise ValueError(
            f"config runner.progress_poll_s={rcfg.get('progress_poll_s')!r}: allowed a number > 0"
        )


def plain_config(cfg: Any) -> dict:
    """The composed config as a resolved plain dict (no ``hydra`` node) to ship to the actors: Hydra
    resolvers such as ``${hydra:runtime.cwd}`` only resolve in the driver."""
    return {
        str(k): (OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k])
        for k in cfg
        if k != "hydra"
    }


def runtime_env(rcfg: Any) -> dict:
    """Environment of the actors: thread caps, offline flags, the sphere caches and the repository on
    PYTHONPATH (so a node without the editable install still imports this checkout)."""
    repo = str(Path(__file__).resolve().parents[2])
    threads = str(int(rcfg.cpus_per_worker))
    env = {
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([repo, *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    for k, v in os.environ.items():
        if k.startswith(("SPHERE_", "HF_", "TRANSFORMERS_", "VLLM_", "WANDB_")):
            env[k] = v
    env.update({str(k): str(v) for k, v in (rcfg.get("env") or {}).items()})
    return {"env_vars": env}


def ray_init_kwargs(rcfg: Any) -> dict:
    """``log_to_driver`` and ``logging_level`` for ``ray.init``. ``runner.log_to_driver: auto`` (the default)
    forwards the actors' stdout/stderr to this terminal only when the command runs with ``verbose=true``
    (otherwise third-party notices go to the job log, sphere.console.route_third_party, and the actors' output
    stays in Ray's session logs, ``<temp dir>/session_latest/logs``); ``true`` / ``false`` force it. Without
    ``verbose``, Ray's own INFO lines ("Started a local Ray instance", ...) are not printed either."""
    quiet = bool(os.environ.get(QUIET_ENV))
    v = rcfg.get("log_to_driver", "auto")
    word = str(v).lower()
    if word == "auto":
        to_driver = not quiet
    elif word in ("true", "false"):
        to_driver = word == "true"
    else:
        raise ValueError(f"config runner.log_to_driver={v!r}: allowed auto | true | false (conf/runner/ray.yaml)")
    return {"log_to_driver": to_driver, "logging_level": logging.WARNING if quiet else logging.INFO}


class RayCluster:
    """Context manager: join ``runner.address``, reuse an already initialised Ray (tests, notebooks), or
    start a local cluster sized for ``runner.workers`` and shut it down on exit."""

    def __init__(self, rcfg: Any):
        self.rcfg = rcfg
        self.started = False

    def __enter__(self) -> RayCluster:
        import ray

        r = self.rcfg
        if ray.is_initialized():
            return self
        kw: dict[str, Any] = {"runtime_env": runtime_env(r), **ray_init_kwargs(r), "include_dashboard": False}
        if r.get("address"):
            kw.pop("include_dashboard")
            ray.init(address=str(r.address), **kw)
        else:
            n_cpu = int(r.num_cpus) if r.get("num_cpus") else int(r.workers) * int(r.cpus_per_worker)
            ray.init(
                address="local", num_cpus=n_cpu, object_store_memory=int(r.object_store_mb) * 2**20, **kw
            )
        self.started = True
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            import ray

            ray.shutdown()


def actor_resources(rcfg: Any, cfg: Any) -> dict:
    """``num_cpus`` / ``num_gpus`` of one actor (``gpus_per_worker: auto``: the backend's tensor-parallel
    size when the cluster has GPUs)."""
    import ray

    g = rcfg.gpus_per_worker
    if g == "auto":
        has_gpu = ray.cluster_resources().get("GPU", 0) > 0
        g = int(OmegaConf.select(cfg, "backend.tensor_parallel_size", default=1) or 1) if has_gpu else 0
    return {"num_cpus": int(rcfg.cpus_per_worker), "num_gpus": float(g)}
