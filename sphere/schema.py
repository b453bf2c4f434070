"""Typed configs (issue #17 item G): dataclass schemas of the settings a typo can silently break, registered
in Hydra's ConfigStore (group ``schema``: ``search``, ``sampling``, ``train``, ``eval``, ``run_eval``, ``data``,
``stages``), and ``check_config(cfg)``, which checks every present node against its schema: a value of the
wrong type names its full key (``config search.expansions='abc': expected an integer``, not ``invalid literal
for int()``), and every budget has a range (``search.max_step_tokens=0``: ``>= 1``). ``RunDirLock``
(sphere/rundir/) runs it in ``on_run_start``, before Hydra creates the run directory, so a mistyped
command writes nothing and loads no model.

The schemas type the fields they list and leave the rest alone (the YAML files stay the documentation and
the place for new fields); the commands' own checks (``validate_search_config``, ``validate_train_cfg``, ...)
still cover the cross-field rules.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

# metadata keys: ge / gt / le / lt (numeric bounds), choices (allowed values); a float bound message shows
# the interval


def _f(default: Any, **meta: Any) -> Any:
    return field(default=default, metadata=meta)


@dataclass
class PruningSchema:
    policy: str = "minmax"
    k: int = _f(2, ge=1)
    tau: float = 0.0
    relative: bool = False


@dataclass
class EngineSchema:
    rule: str = "puct"
    c: float = _f(1.25, ge=0)
    virtual_loss: float = _f(1.0, ge=0)
    fpu: str = _f("parent", choices=("parent", "value", "inf"))
    fpu_reduction: float = 0.0
    q_norm: bool = False


@dataclass
class SearchSchema:
    mode: str = "paper"  # paper | mcts: validate_search_config
    expansions: int = _f(5, ge=1)
    temperature: float = _f(0.8, ge=0)
    top_p: float = _f(1.0, gt=0, le=1)
    max_step_tokens: int = _f(96, ge=1)
    max_depth: int = _f(8, ge=1)
    batch_leaves: int = _f(64, ge=1)
    dedup_candidates: bool = True
    k: int = _f(1, ge=1)
    simulations: int = _f(16, ge=1)
    max_terminals: int = _f(0, ge=0)
    reward: str = "advantage"
    outcome: str = "replace"
    outcome_in_reward: bool = False
    outcome_weight: float = _f(1.0, ge=0)
    backup: str = "mean"
    pruning: PruningSchema = field(default_factory=PruningSchema)
    engine: EngineSchema = field(default_factory=EngineSchema)


@dataclass
class SamplingSchema:
    n: int = _f(4, ge=1)
    temperature: float = _f(0.8, ge=0)
    top_p: float = _f(1.0, gt=0, le=1)
    max_step_tokens: int = _f(256, ge=1)
    max_solution_tokens: int = _f(1024, ge=1)
    seed: Optional[int] = 0


@dataclass
class LoraSchema:
    enabled: bool = True
    r: int = _f(32, ge=1)
    alpha: float = _f(64, gt=0)
    dropout: float = _f(0.0, ge=0, lt=1)
    target_modules: Any = "all-linear"


@dataclass
class LossSchema:
    type: Any = "sigmoid"  # a TRL loss type or a list of them (sphere.train.config.loss_settings checks it)
    weights: Any = None  # one weight per type, or null
    beta: float = _f(0.1, gt=0)
    label_smoothing: float = _f(0.0, ge=0, lt=0.5)
    rpo_alpha: float = _f(0.0, ge=0)
    ld_alpha: Optional[float] = _f(None, ge=0, le=1)
    use_weighting: bool = False
    discopop_tau: float = _f(0.05, gt=0)


@dataclass
class TrainSchema:
    lora: LoraSchema = field(default_factory=LoraSchema)
    loss: LossSchema = field(default_factory=LossSchema)
    lr: float = _f(5e-4, gt=0)
    epochs: float = _f(2.0, ge=0)  # > 0 unless max_steps >= 1: sphere.train.config.validate_train_cfg
    max_steps: int = _f(-1, ge=-1)
    batch_size: int = _f(8, ge=1)
    grad_accum: int = _f(1, ge=1)
    max_length: Optional[int] = _f(512, ge=8)
    max_prompt_length: Optional[int] = _f(None, ge=1)
    append_eos: bool = True
    warmup_ratio: float = _f(0.1, ge=0, lt=1)
    scheduler: str = "cosine"
    weight_decay: float = _f(0.0, ge=0)
    max_grad_norm: float = _f(1.0, gt=0)
    precompute_ref: bool = True
    seed: int = 0
    threads: Optional[int] = _f(None, ge=1)
    logging_steps: int = _f(1, ge=1)
    dtype: str = _f("float32", choices=("float32", "bfloat16", "float16"))
    trust_remote_code: bool = False
    device: str = _f("auto", choices=("auto", "cpu", "cuda"))
    gradient_checkpointing: bool = False
    save_steps: int = _f(50, ge=0)
    save_total_limit: int = _f(1, ge=1)
    processes: int = _f(1, ge=1)  # 1 = one process on one device; N = N DDP processes (torchrun)


@dataclass
class EvalSchema:
    """`sphere eval`'s top-level settings (conf/eval.yaml)."""

    limit: Optional[int] = _f(None, ge=1, word="a positive integer or null (all problems)")
    batch_size: Optional[int] = _f(None, ge=1, word="a positive integer or null (one call per benchmark)")
    temperature: Optional[float] = _f(None, ge=0)
    max_tokens: Optional[int] = _f(None, ge=1)
    verify_timeout_s: float = _f(5.0, gt=0)


@dataclass
class RunEvalSchema:
    """`sphere run`'s per-round evaluation (conf/run.yaml ``eval``)."""

    limit: Optional[int] = _f(500, ge=1)
    n: int = _f(1, ge=1)
    batch_size: Optional[int] = _f(None, ge=1)
    temperature: Optional[float] = _f(None, ge=0)
    max_tokens: Optional[int] = _f(None, ge=1)
    verify_timeout_s: float = _f(5.0, gt=0)


@dataclass
class DataSchema:
    limit: Optional[int] = _f(None, ge=0)
    mini_n: int = _f(256, ge=1)
    mini_seed: int = 7


@dataclass
class StagesSchema:
    stage2: bool = True
    stage3: bool = True
    inverted: str = "swap"
    stage2_rejected: str = "sol_max"
    stage2_prompt_with_attempt: bool = False
    small_expansions_factor: int = _f(2, ge=1)
    close_policy_before_small: bool = False


# (config node, schema, the commands (primary config names) it applies to); node "" = the top level
SCHEMAS: list[tuple[str, type, tuple[str, ...]]] = [
    ("search", SearchSchema, ("generate", "run")),
    ("sampling", SamplingSchema, ("generate", "run", "eval")),
    ("train", TrainSchema, ("train", "run")),
    ("eval", RunEvalSchema, ("run",)),
    ("data", DataSchema, ("generate", "run")),
    ("stages", StagesSchema, ("generate", "run")),
    ("", EvalSchema, ("eval",)),
]


def register() -> None:
    """Put the schemas in Hydra's ConfigStore (group ``schema``), for ``defaults`` lists and tools."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for key, schema, commands in SCHEMAS:
        cs.store(group="schema", name=key or commands[0], node=schema)


class ConfigTypeError(ValueError):
    """A config value of the wrong type or outside its range; the message names the full key."""


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _type_word(tp: Any) -> str:
    opt = getattr(tp, "__origin__", None) is not None and type(None) in getattr(tp, "__args__", ())
    base = next((a for a in getattr(tp, "__args__", ()) if a is not type(None)), tp) if opt else tp
    word = _TYPE_WORDS.get(base, getattr(base, "__name__", str(base)))
    return f"{word} or null" if opt else word


def _check_range(key: str, v: Any, meta: dict, shown: Any) -> None:
    if v is None:
        return
    if "choices" in meta and v not in meta["choices"]:
        raise ConfigTypeError(f"config {key}={shown!r}: allowed {' | '.join(map(str, meta['choices']))}")
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return
    lo = ("[", meta["ge"], v >= meta["ge"]) if "ge" in meta else ("(", meta["gt"], v > meta["gt"]) \
        if "gt" in meta else None
    hi = ("]", meta["le"], v <= meta["le"]) if "le" in meta else (")", meta["lt"], v < meta["lt"]) \
        if "lt" in meta else None
    if (lo is None or lo[2]) and (hi is None or hi[2]):
        return
    if meta.get("word"):
        want = meta["word"]
    elif lo and hi:
        want = f"in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    elif lo:
        want = f"{'>=' if lo[0] == '[' else '>'} {lo[1]}"
    else:
        want = f"{'<=' if hi[0] == ']' else '<'} {hi[1]}"
    raise ConfigTypeError(f"config {key}={shown!r}: must be {want}")


def _walk(schema: type, node: dict, prefix: str) -> None:
    import typing

    from omegaconf import OmegaConf
    from omegaconf.errors import ValidationError

    hints = typing.get_type_hints(schema)
    typed = OmegaConf.structured(schema)
    for f in dataclasses.fields(schema):
        if f.name not in node:
            continue
        key, v, tp = f"{prefix}{f.name}", node[f.name], hints[f.name]
        if dataclasses.is_dataclass(tp):
            if isinstance(v, dict):
                _walk(tp, v, key + ".")
            elif v is not None:
                raise ConfigTypeError(f"config {key}={v!r}: expected a mapping of settings")
            continue
        try:
            typed[f.name] = v  # OmegaConf's own conversion: "3" -> 3; "abc" or 3.5 for an int is an error
        except ValidationError:
            raise ConfigTypeError(f"config {key}={v!r}: expected {_type_word(tp)}") from None
        _check_range(key, typed[f.name], dict(f.metadata), v)


def check_config(cfg: Any, command: str | None = None) -> None:
    """Check ``cfg``'s typed nodes (``SCHEMAS``) before anything runs; raises ``ConfigTypeError`` naming the
    full key. ``command``: the primary config name (generate, train, eval, run; other commands' configs
    are not checked here)."""
    from omegaconf import OmegaConf

    for key, schema, commands in SCHEMAS:
        if command not in commands:
            continue
        node = OmegaConf.select(cfg, key, default=None) if key else cfg
        if node is None or not OmegaConf.is_dict(node):
            continue
        plain = OmegaConf.to_container(node, resolve=True) if key else {
            f.name: OmegaConf.select(cfg, f.name, default=None) for f in dataclasses.fields(schema)
            if f.name in cfg}
        _walk(schema, plain, f"{key}." if key else "")
    rounds = OmegaConf.select(cfg, "rounds", default=None) if command == "run" else None
    if rounds is not None and (not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 0):
        raise ConfigTypeError(f"config rounds={rounds!r}: expected an integer >= 0")
