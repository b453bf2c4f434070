"""The typed ``sampling``, ``runner``, ``logger``, ``backend`` and ``controls`` settings (sphere.schema): each
field's type, default, range and doc. ``runner``, ``logger`` and ``backend`` have one dataclass per option of
conf/<group>/ (``name`` picks it); ``sampling`` and ``controls`` are one dataclass each. The code that reads a
group keeps its own checks (with the messages their tests pin): sphere/scale/cluster.py
(``validate_runner_config``), sphere/loggers.py, sphere/backends/, sphere/controls.py
(``validate_controls_config``); the ranges here repeat them so that ``check_config`` refuses a bad value
before anything runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from sphere.schema_fields import _f, _name


# ============================================================================================ sampling
@dataclass
class SamplingSettings:
    """Sampling of full solutions (sphere.backends.SamplingParams): the evaluation and the controls' samples.
    The search samples its steps with ``search.*`` (temperature, top_p, max_step_tokens, expansions)."""

    temperature: float = _f(0.8, "0 = greedy (evaluation: used when it samples, eval.n > 1)", ge=0)
    top_p: float = _f(1.0, "nucleus sampling mass (1.0 = off)", gt=0, le=1)
    max_solution_tokens: int = _f(1024, "token budget of a full solution (complete: evaluation, rollouts, "
                                  "constructions)", ge=1)
    seed: Optional[int] = _f("${seed}", "per-call sampling seed (null = engine randomness)")


# ============================================================================================== runner
_RUNNER = "the runner: local | ray (conf/runner/{}.yaml writes it)"


@dataclass
class LocalRunnerSettings:
    """The single-process path (the default): one backend in this process runs every problem."""

    name: str = _name(_RUNNER.format("local"))


@dataclass
class RayRunnerSettings:
    """Ray scale-out of `sphere generate` and `sphere eval` (sphere/scale/ray_runner.py): the driver sends
    chunks of problems to ``workers`` actors, each holding one backend, and writes the files a single-process
    run writes (conf/runner/ray.yaml says more). sphere/scale/cluster.py (validate_runner_config) checks the
    ranges again with its own messages."""

    name: str = _name(_RUNNER.format("ray"))
    workers: int = _f(2, "actors, each holding one backend (one vLLM engine of tensor_parallel_size GPUs, or "
                      "one transformers model)", ge=1)
    address: Optional[str] = _f(None, "Ray cluster to join: null = start a local cluster in this process "
                                "(shut down at the end); \"auto\" = the cluster started with `ray start` on "
                                "this node; \"ray://HOST:10001\" = a remote one")
    nodes: int = _f(1, "nodes of the cluster, for the placement check (sphere/scale/placement.py; with "
                    "hardware.gpu_memory_gb): a plan the cluster cannot hold is refused before anything "
                    "loads", ge=1)
    gpus_per_node: Optional[int] = _f(None, "GPUs per node, for the placement check; null = not checked (a "
                                      "CPU cluster, or unknown)", ge=1)
    cpus_per_worker: int = _f(1, "CPUs reserved per actor (also its OMP_NUM_THREADS / torch threads)", ge=1)
    gpus_per_worker: Any = _f("auto", "GPUs per actor: auto = backend.tensor_parallel_size when the cluster "
                              "has GPUs, else 0; or a number", ge=0, word="auto or a number >= 0")
    num_cpus: Optional[int] = _f(None, "local cluster only: CPUs it offers (null = workers * "
                                 "cpus_per_worker)", ge=1)
    object_store_mb: int = _f(200, "local cluster only: its object store in MB (records travel through it; "
                              "200 MB is plenty for text)", ge=64)
    chunk_size: Any = _f("auto", "generation: problems per chunk sent to an actor; auto = enough problems to "
                         "fill one backend call of search.batch_leaves prompts (2 per problem in paper "
                         "mode), at most an even share per worker. The driver saves a chunk's records when "
                         "it returns, so a driver crash loses at most the chunks in flight",
                         ge=1, word="auto or an integer >= 1")
    eval_chunk_size: int = _f(64, "evaluation: problems per chunk (vLLM batches a whole chunk in one call; "
                              "bigger is faster)", ge=1)
    max_restarts: int = _f(3, "Ray's restarts of each actor (ray.remote max_restarts; a restart reloads its "
                           "models, on any node with room). When spent (or unplaceable), the actor is dead "
                           "and the run goes on with fewer workers", ge=0)
    max_task_retries: int = _f(2, "Ray reruns the chunk in flight on the restarted actor this many times "
                               "(ray.remote max_task_retries)", ge=0)
    max_chunk_retries: int = _f(2, "extra dispatches of one chunk by the driver (to another actor, after its "
                                "actor died for good or stopped answering) before the run fails naming the "
                                "chunk", ge=0)
    unavailable_s: float = _f(60, "an actor that answered before and has not answered a progress poll for "
                              "this long (restarting, or its node is gone) keeps its chunk, and the chunk "
                              "also goes to the actors that answer (first result wins)", gt=0)
    stall_timeout_s: float = _f(1800, "no chunk finished and no progress polled for this long: the run stops "
                                "naming what it waits for (the finished chunks are saved; rerun to resume)",
                                gt=0)
    progress_poll_s: float = _f(2.0, "seconds between progress polls of the actors (the driver's bar counts "
                                "problems inside running chunks)", gt=0)
    scratch_dir: Optional[str] = _f(None, "directory for the actors' per-chunk scratch logs (null = the "
                                    "system temp dir on each node); removed after each chunk")
    log_to_driver: Any = _f("auto", "forward the actors' stdout/stderr to this terminal: auto = only with "
                            "verbose=true (otherwise they stay in Ray's session logs, <ray temp "
                            "dir>/session_latest/logs, and Ray's INFO lines are not printed) | true | false")
    env: Any = _f({}, "extra environment variables for the actors, e.g. {HF_HOME: /shared/hf, "
                  "VLLM_CPU_KVCACHE_SPACE: \"4\"}. OMP_NUM_THREADS, TOKENIZERS_PARALLELISM, HF_HUB_OFFLINE, "
                  "SPHERE_* and PYTHONPATH are passed on already")


RUNNER_OPTIONS: dict[str, type] = {"local": LocalRunnerSettings, "ray": RayRunnerSettings}


# ============================================================================================== logger
_LOGGER = "the experiment logger: none | wandb (conf/logger/{}.yaml writes it)"


@dataclass
class NoLoggerSettings:
    """No experiment logger (the default). Metrics still go to files in the run directory."""

    name: str = _name(_LOGGER.format("none"))


@dataclass
class WandbLoggerSettings:
    """Weights & Biases (sphere/loggers.py). mode=auto: online when WANDB_API_KEY is set, else offline (sync
    later with `wandb sync`). Extra keys (``+logger.api_key=...``) are taken too."""

    name: str = _name(_LOGGER.format("wandb"))
    mode: str = _f("auto", "auto | online | offline | disabled",
                   choices=("auto", "online", "offline", "disabled"))
    project: str = _f("sphere", "W&B project")
    entity: Optional[str] = _f(None, "W&B entity (team/user); null = your default")
    group: Optional[str] = _f(None, "run group; null = the multirun sweep directory name for -m jobs")
    name_prefix: str = _f("", "prefix for run names (the job name follows)")
    tags: Any = _f([], "run tags")
    log_pairs_table: int = _f(32, "rows per stage in the sample table of preference pairs")


LOGGER_OPTIONS: dict[str, type] = {"none": NoLoggerSettings, "wandb": WandbLoggerSettings}


# ============================================================================================= backend
# Extra keys (``+backend.KEY=V``) are the backend class's keyword arguments; the class refuses one it does not
# take.
_BACKEND = "the generation backend: transformers | vllm | openai | replay (conf/backend/{}.yaml writes it)"


@dataclass
class OpenAIBackendSettings:
    """OpenAI-compatible HTTP backend (sphere/backends/openai_backend.py): vLLM serve, SGLang, llama.cpp
    server. Uses /v1/completions with token-id prompts, logprobs and (vLLM) return_token_ids."""

    name: str = _name(_BACKEND.format("openai"))
    base_url: str = _f("http://127.0.0.1:8000", "server root, e.g. http://127.0.0.1:8000 (the /v1 path is "
                       "added)")
    served_model: Optional[str] = _f(None, "model name the server knows (null = the first of GET /v1/models)")
    api_key: Optional[str] = _f(None, "API key sent as a Bearer token (null = none; read from "
                                "$OPENAI_API_KEY when set)")
    max_concurrency: int = _f(16, "requests in flight at once (bounded concurrency)", ge=1)
    retries: int = _f(3, "retries per request on connection errors, timeouts and 5xx/429 answers "
                      "(exponential backoff)", ge=0)
    backoff_s: float = _f(0.5, "first backoff delay in seconds (doubles per retry)")
    timeout_s: float = _f(60, "per-request timeout in seconds (connect and read)", gt=0)
    max_model_len: Optional[int] = _f(None, "context window in tokens used for the early overflow check "
                                      "(null = ask the server: max_model_len)")


@dataclass
class ReplayBackendSettings:
    """Replay backend (sphere/backends/replay.py): no model; grades stored completions by problem id with the
    evaluation protocol. Its inputs are the ``replay:`` fields of conf/eval.yaml (path, references,
    missing)."""

    name: str = _name(_BACKEND.format("replay"))


@dataclass
class TransformersBackendSettings:
    """transformers ``generate`` backend (sphere/backends/transformers_backend.py): CPU or GPU, no server."""

    name: str = _name(_BACKEND.format("transformers"))
    dtype: str = _f("${model.dtype}", "weights dtype: float32 | bfloat16 | float16 | auto (CPU: float32)",
                    choices=("float32", "bfloat16", "float16", "auto"), alone="float32")
    device: str = _f("auto", "device: auto (cuda if available, else cpu) | cpu | cuda | cuda:N")
    batch_size: int = _f(64, "sequences per generate() call (prompts x n); larger is faster until memory "
                         "runs out", ge=1)
    max_model_len: Optional[int] = _f(None, "context window cap in tokens (null = the model's "
                                      "max_position_embeddings)")


@dataclass
class VLLMBackendSettings:
    """vLLM offline engine (vllm.LLM) backend (sphere/backends/vllm_backend.py). The same settings run on GPU
    (vllm) and CPU (vllm-cpu). One engine per process, shared by the search and evaluation."""

    name: str = _name(_BACKEND.format("vllm"))
    dtype: str = _f("${model.dtype}", "weights dtype: float32 | bfloat16 | float16 | auto (vllm-cpu: float32 "
                    "or bfloat16)", alone="float32")
    enable_prefix_caching: bool = _f(True, "automatic prefix caching: tree search shares long prefixes "
                                     "between siblings (keep on)")
    gpu_memory_utilization: float = _f(0.85, "fraction of GPU memory vLLM may use (GPU only; ignored by "
                                       "vllm-cpu)")
    cpu_kvcache_gib: float = _f(1, "KV-cache size in GiB on CPU (sets VLLM_CPU_KVCACHE_SPACE when unset; "
                                "ignored on GPU)")
    max_model_len: Optional[int] = _f(2048, "context window in tokens (null = the model's maximum). Smaller "
                                      "saves KV-cache memory")
    enforce_eager: bool = _f(True, "skip CUDA-graph capture / torch.compile (faster start, slower decode). "
                             "CPU: true keeps start-up short")
    tensor_parallel_size: int = _f(1, "GPUs for tensor parallelism (1 on CPU)")
    block_size: Optional[int] = _f(None, "KV-cache block size in tokens (null = vLLM's default: 16 on GPU, "
                                   "128 on CPU). Prefix caching reuses whole blocks only, so short step "
                                   "prompts need small blocks (CPU: a multiple of 32)")
    max_num_seqs: Optional[int] = _f(None, "max sequences scheduled per engine step (null = vLLM's default)")
    enable_chunked_prefill: Optional[bool] = _f(None, "chunked prefill (null = vLLM's default on GPU, off on "
                                                "CPU: vllm-cpu 0.32 crashes when a seeded request is split "
                                                "by chunked prefill). Off raises max_num_batched_tokens to "
                                                "at least max_model_len")
    seed: int = _f("${seed}", "engine seed (per-request seeds come from sampling.seed)", alone=0)
    cpu_omp_threads_bind: str = _f("nobind", "CPU thread binding for vllm-cpu (VLLM_CPU_OMP_THREADS_BIND "
                                   "when unset): \"nobind\" on shared machines, \"auto\" on dedicated ones, "
                                   "or an explicit list like \"0-7\"")


BACKEND_OPTIONS: dict[str, type] = {"openai": OpenAIBackendSettings, "replay": ReplayBackendSettings,
                                    "transformers": TransformersBackendSettings, "vllm": VLLMBackendSettings}


# ============================================================================================ controls
_SAMPLES = "an integer >= 2 (solutions sampled per problem; a random pair needs a right and a wrong one)"


@dataclass
class ControlsSettings:
    """Per-round controls of `sphere run` (sphere/controls.py): baselines trained from the same start policy,
    on the same problems, with the same ``train`` recipe, evaluated on the same benchmarks; summary.md shows
    each one's paired change against the start policy and SPHERE's against it. Each adds one training and one
    evaluation per round (random_pairs also samples ``samples`` solutions per searched problem); which runs
    may have them: sphere/loop/plan.py. sphere/controls.py (validate_controls_config) checks the ranges again
    with its own messages."""

    rft: bool = _f(False, "SFT on the round's chosen solutions only (rejection-sampling fine-tuning): "
                   "SPHERE's pairs with the DPO term off (train.loss.beta = rft_beta) and the RPO NLL term "
                   "on")
    random_pairs: bool = _f(False, "DPO on one random right and one random wrong sampled solution per "
                            "problem (no tree, no scorer), as many pairs as SPHERE's round at most")
    samples: int = _f(4, "random_pairs: solutions sampled per searched problem at search.temperature (>= 2)",
                      ge=2, word=_SAMPLES)
    rft_beta: float = _f(1.0e-4, "rft: the DPO term's weight, (0, 0.01]; tiny = off (its gradient scales "
                         "with beta)", gt=0, le=0.01)
    seed: Optional[int] = _f(None, "random_pairs: pairing seed (null = the run's seed)")
