"""`runner=ray`: `sphere generate` and `sphere eval` sharded over Ray actors, same outputs as one process.

    sphere generate runner=ray runner.workers=2 hydra.run.dir=DIR          # local cluster, started here
    sphere generate runner=ray runner.workers=8 runner.address=auto backend=vllm model=qwen2_5_7b ...
    sphere eval runner=ray runner.workers=8 model=/ckpt backend=vllm benchmarks=[all]

Design (sphere/schema_groups.py, RayRunnerSettings, documents every knob; conf/runner/ray.yaml picks it):

- The driver (this process) loads the problems, reads the run directory's resume logs and keeps only the
  unfinished problems, cuts them into chunks of ``runner.chunk_size`` and hands chunks to
  ``runner.workers`` actors. Each actor builds ONE backend (``sphere.backends.make_backend``; a vLLM engine
  of ``backend.tensor_parallel_size`` GPUs, ``runner.gpus_per_worker``) and one scorer, once, and runs
  each chunk with the single-process code (``Generator.run`` / ``evaluate_benchmark``) in a scratch
  directory of its own, so every actor has its own search forest.
- A chunk's records come back to the driver, which appends them durably to the run directory's
  ``stages/stage{1,2,3}.jsonl`` (``eval/<benchmark>.jsonl``), skipping problem ids already there: a chunk
  that is retried, or a run that is resumed, never writes a problem twice.
- An actor that dies (``RayActorError``: killed, OOM, node lost) is replaced by a fresh one and its chunk
  goes back to the front of the queue, to the next free actor (``runner.max_chunk_retries``,
  ``runner.max_actor_restarts``). An exception raised by our own code in a chunk is not retried: it would
  fail again; the run stops with the actor's traceback.
- At the end the driver calls the single-process output code: ``Generator.finalize`` (pairs.jsonl,
  trajectories.jsonl, generate_stats.json) or ``run_eval`` over the finished records (results.json/md).
  ``ray_runner.json`` adds what only a distributed run has (workers, chunks, retries, deaths).

Known limits: chunk granularity is the unit of durability (a driver crash loses the chunks in flight, not
the finished ones); the actors need the model paths and the Python environment on every node (a shared
filesystem or the same image), the problems themselves travel from the driver.

The code lives in five modules, this one keeps the names importable: sphere.scale.cluster (config check,
cluster), sphere.scale.pool (actor pool), sphere.scale.workers (the actor bodies),
sphere.scale.generate_driver and sphere.scale.eval_driver (the two drivers).
"""

from __future__ import annotations

from sphere.scale.eval_driver import evaluate
from sphere.scale.generate_driver import (
    STAGES,
    generate,
    is_finished,
    main_generate,
    stage_state,
)
from sphere.scale.cluster import (
    RayCluster,
    actor_resources,
    plain_config,
    runtime_env,
    validate_runner_config,
)
from sphere.scale.pool import ActorPool, Chunk, PoolStats, chunked
from sphere.scale.workers import EvalWorker, GenerateWorker

__all__ = [
    "STAGES",
    "ActorPool",
    "Chunk",
    "EvalWorker",
    "GenerateWorker",
    "PoolStats",
    "RayCluster",
    "actor_resources",
    "chunked",
    "evaluate",
    "generate",
    "is_finished",
    "main_generate",
    "plain_config",
    "runtime_env",
    "stage_state",
    "validate_runner_config",
]
