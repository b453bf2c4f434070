"""Peer MCTS implementations on the `sphere bench engine` workload (optional: `pip install -e .[bench]`).

A "simulation" is one select -> expand one leaf with `branching` children -> backup, as in our rounds.
* llm-reasoners (`reasoners.algorithm.MCTS`): one Python tree at a time. Its default `_simulate` rolls out
  to the depth limit, expanding a node per step; that is more work than one expansion, so the peer class
  below makes `_simulate` a no-op to time the same unit. World model and rewards are synthetic (random).
* mctx (`mctx.muzero_policy`, JAX on CPU): a batch of trees, one simulation per tree per step, jit-compiled
  (compile time excluded, reported separately); recurrent_fn draws random rewards/priors/values.
Each peer returns simulations per second; the caller divides our C++ simulations/s by it.
"""

from __future__ import annotations

import random
import time


def _llm_reasoners(trees: int, sims: int, branching: int, max_depth: int, clock) -> dict:
    from reasoners import SearchConfig, WorldModel
    from reasoners.algorithm import MCTS

    rnd = random.Random(0)

    class World(WorldModel):
        def init_state(self):
            return ()

        def step(self, state, action):
            return (*state, action), {}

        def is_terminal(self, state):
            return rnd.random() < 0.05

    class Config(SearchConfig):
        def get_actions(self, state):
            return list(range(branching))

        def fast_reward(self, state, action):
            return rnd.random(), {}

        def reward(self, state, action, **kwargs):
            return rnd.random(), {}

    class OneExpansionMCTS(MCTS):
        def _simulate(self, path):  # one expansion per simulation, like the sphere workload
            return None

    t_total = 0.0
    for _ in range(trees):
        algo = OneExpansionMCTS(n_iters=sims, depth_limit=max_depth, w_exp=1.25, disable_tqdm=True,
                                output_strategy="follow_max")
        algo.world_model, algo.search_config = World(), Config()
        t0 = clock()
        algo.search()
        t_total += clock() - t0
    return {"llm_reasoners_simulations_per_s": round(trees * sims / t_total),
            "llm_reasoners_workload": f"{trees} trees x {sims} simulations, sequential"}


def _mctx(trees: int, sims: int, branching: int, max_depth: int, clock) -> dict:
    import jax
    import jax.numpy as jnp
    import mctx

    b, a = trees, branching

    def recurrent_fn(params, rng_key, action, embedding):
        k1, k2, k3 = jax.random.split(rng_key, 3)
        out = mctx.RecurrentFnOutput(
            reward=jax.random.uniform(k1, (b,)),
            discount=jnp.ones((b,)),
            prior_logits=jax.random.normal(k2, (b, a)),
            value=jax.random.uniform(k3, (b,)),
        )
        return out, embedding + 1

    @jax.jit
    def search(rng_key):
        k1, k2 = jax.random.split(rng_key)
        root = mctx.RootFnOutput(prior_logits=jax.random.normal(k1, (b, a)), value=jnp.zeros((b,)),
                                 embedding=jnp.zeros((b,), jnp.int32))
        out = mctx.muzero_policy(params=(), rng_key=k2, root=root, recurrent_fn=recurrent_fn,
                                 num_simulations=sims, max_depth=max_depth)
        return out.action

    t0 = time.perf_counter()
    search(jax.random.PRNGKey(0)).block_until_ready()
    compile_s = time.perf_counter() - t0
    best = float("inf")
    for i in range(3):
        t0 = clock()
        search(jax.random.PRNGKey(i + 1)).block_until_ready()
        best = min(best, clock() - t0)
    return {"mctx_simulations_per_s": round(b * sims / best), "mctx_compile_s": round(compile_s, 2),
            "mctx_workload": f"{b} trees x {sims} simulations, batched, jit (best of 3), jax {jax.__version__}"}


def run_peers(cfg, cpp_sims_per_s: float, timer: str = "cpu") -> dict:
    """Time the installed peers with the same clock as ours ("cpu": process CPU time, which for mctx counts
    all of XLA's threads; "wall": perf_counter). A missing or failing peer is reported, not raised."""
    out: dict = {}
    branching, max_depth = int(cfg.branching), int(cfg.max_depth)
    sims = int(cfg.peer_simulations)
    clock = time.process_time if timer == "cpu" else time.perf_counter
    for name, fn, trees in (("llm_reasoners", _llm_reasoners, int(cfg.peer_trees_llm_reasoners)),
                            ("mctx", _mctx, int(cfg.trees))):
        try:
            res = fn(trees, sims, branching, max_depth, clock)
        except ImportError as e:
            out[f"vs_{name}"] = None
            out[f"{name}_status"] = f"skipped: not installed ({e}); pip install -e .[bench]"
            continue
        except Exception as e:  # a peer's failure must not hide our numbers
            out[f"vs_{name}"] = None
            out[f"{name}_status"] = f"failed: {type(e).__name__}: {e}"
            continue
        out.update(res)
        out[f"vs_{name}"] = round(cpp_sims_per_s / res[f"{name}_simulations_per_s"], 1)
        out[f"{name}_status"] = "ok"
    return out
