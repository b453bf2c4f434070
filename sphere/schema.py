"""The typed settings of sphere: one place for each setting's type, default, range and doc.

Each group a user overrides (``search``, ``sampling``, ``train`` (the DPO recipe of ``train_opts``),
``eval``, ``data``, ``stages``, ``filters``, ``controls``, ``model``) is one dataclass (here; ``train``'s in
sphere/schema_train.py, ``eval``'s in sphere/schema_eval.py, ``sampling``'s and ``controls``' in
sphere/schema_groups.py, ``model``'s in sphere/schema_models.py), and a group whose options have fields of
their own one dataclass per option (``OPTIONS``, picked by ``name``: ``scorer`` (symbolic, mini_world, prm,
rollout) in sphere/schema_scorers.py; ``runner`` (local, ray), ``logger`` (none, wandb), ``backend`` (openai,
replay, transformers, vllm) in sphere/schema_groups.py; ``construction`` (sphere, first_wrong_step, siblings,
best_worst_of_n) and ``prompt`` (every family: one shared dataclass) in sphere/schema_models.py). A field
carries (sphere/schema_fields.py)

- its **type** (the annotation),
- its **default** (the dataclass default; nothing else writes it),
- its **doc** (``metadata["doc"]``, what the YAML comments said before),
- its **range** (``metadata``: ``ge`` / ``gt`` / ``le`` / ``lt`` numeric bounds, ``choices`` allowed values,
  ``word`` the wording of the allowed range in a message),

the way TRL's ``DPOConfig`` does. ``register()`` puts every group's defaults in Hydra's ConfigStore as
``settings/<group>`` (``settings/<group>/<option>`` for an option's dataclass; a plain node: the values, no
structured typing at compose time), and the YAML files
compose over it (``- /settings/search@_here_`` in conf/search/paper.yaml, ``- /settings/sampling@sampling`` in
conf/config.yaml, ...), so that conf/ keeps only presets and experiment deltas. It also stores the dataclasses
themselves as ``schema/<name>`` (tools, tests). ``sphere/__init__.py`` calls ``register()`` on import, so any
process composing sphere's configs has them.

``check_config(cfg, command)`` checks every present node against its dataclass before anything runs: a value
of the wrong type names its full key (``config search.expansions='abc': expected an integer``, not
``invalid literal for int()``), and every budget has a range (``search.max_step_tokens=0``: ``>= 1``).
``RunDirLock`` (sphere/rundir/) runs it in ``on_run_start``, before Hydra creates the run directory, so a
mistyped command writes nothing and loads no model. Keys no dataclass lists are left alone here (``+key``
typos are refused by sphere/overrides.py); the commands' own checks (``validate_search_config``,
``validate_train_cfg``, ...) cover the cross-field rules. tests/test_settings.py fails when a YAML key under a
typed group has no field here and when a YAML file writes a default again.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from sphere.schema_eval import EvalCommandSettings, EvalSamplingSettings, EvalSettings, RunEvalSettings
from sphere.schema_fields import _f, _sub
from sphere.schema_groups import (
    BACKEND_OPTIONS,
    LOGGER_OPTIONS,
    RUNNER_OPTIONS,
    ControlsSettings,
    SamplingSettings,
)
from sphere.schema_models import CONSTRUCTION_OPTIONS, PROMPT_OPTIONS, ModelSettings
from sphere.schema_scorers import SCORERS
from sphere.schema_train import LoraSettings, LossSettings, TrainSettings


# ============================================================================================== search
@dataclass
class PruningSettings:
    policy: str = _f("minmax", "none | minmax (paper: keep the best and the worst child) | topk | threshold")
    k: int = _f(2, "topk: children kept per expansion", ge=1)
    tau: float = _f(0.0, "threshold: drop children with reward < tau (or < best - tau when relative)")
    relative: bool = _f(False, "threshold relative to the best sibling's reward")


@dataclass
class EngineSettings:
    rule: str = _f("puct", "uct | puct (selection rule for mcts mode)")
    c: float = _f(1.25, "exploration constant (c_uct or c_puct)", ge=0)
    virtual_loss: float = _f(1.0, "in-flight visits counted as losses so the k leaves of a tree differ", ge=0)
    fpu: str = _f("parent", "first-play urgency: parent | value | inf", choices=("parent", "value", "inf"))
    fpu_reduction: float = _f(0.0, "subtracted from the parent's Q for unvisited children (fpu=parent)")
    q_norm: bool = _f(False, "min-max normalise Q per tree (MuZero)")


@dataclass
class SearchSettings:
    """The search (conf/search/: paper, the default, and mcts). The defaults are the SPHERE paper's
    self-generation search (arXiv 2503.04813, Sec. 3.1): at each expansion sample E candidate steps, keep only
    the best and the worst by reward (minmax pruning); two greedy chains give Sol_max and Sol_min. The paper
    gives no constants beyond E=5 and T=0.8; the rest are ours."""

    mode: str = _f("paper", "paper (two pruned greedy chains) | mcts (UCT/PUCT with a simulation budget); "
                   "validate_search_config checks it")
    expansions: int = _f(5, "E: candidate steps sampled per expansion (paper: 5)", ge=1)
    temperature: float = _f(0.8, "sampling temperature for candidate steps (paper: 0.8)", ge=0)
    top_p: float = _f(1.0, "nucleus sampling for candidate steps", gt=0, le=1)
    max_step_tokens: int = _f(96, "max new tokens per step; a step cut here ends with finish=\"length\"", ge=1)
    max_depth: int = _f(8, "max steps per solution; a step at this depth is terminal", ge=1)
    batch_leaves: int = _f(64, "prompts per backend call: trees join until this many leaves are pending", ge=1)
    dedup_candidates: bool = _f(True, "merge identical candidates of one expansion into one child (prior and "
                                "mean backup weighted by the multiplicity) and score each distinct step once; "
                                "paper-mode Sol_max/Sol_min are unchanged by it (sphere/search/driver.py)")
    k: int = _f(1, "leaves per tree per round (mcts; paper mode expands each chain's head)", ge=1)
    simulations: int = _f(16, "expansions per tree (mcts budget; paper mode stops when both chains end)", ge=1)
    max_terminals: int = _f(0, "mcts: retire a tree after this many terminal trajectories (0 = no limit)", ge=0)
    reward: str = _f("advantage", "step reward: raw PRM score | advantage (paper: PRM(s<=t) - PRM(s<=t-1)) | min")
    outcome: str = _f("replace", "terminal value from the answer check: replace (1/0) | mix ((1-w) PRM + w "
                      "outcome) | add (PRM +- w) | none (PRM only); w = outcome_weight")
    outcome_in_reward: bool = _f(False, "also add +-outcome_weight to a terminal step's reward (steers minmax "
                                 "to answers)")
    outcome_weight: float = _f(1.0, "w above (mix needs 0 <= w <= 1)", ge=0)
    backup: str = _f("mean", "value backed up from an expansion: mean | max over the kept children's values")
    pruning: PruningSettings = _sub(PruningSettings, "which children an expansion keeps")
    engine: EngineSettings = _sub(EngineSettings, "the tree engine's selection (mcts mode)")


# =============================================================================================== data
@dataclass
class TrainingPoolSettings:
    """The paper's pools for data.problems=training (and numina:PATH / metamath:PATH); local files only."""

    numina: str = _f("${paths.data_dir}/../training/numina", "NuminaMath-CoT: a parquet/JSONL/JSON file, a "
                     "directory of them, or hf:AI-MO/NuminaMath-CoT if in the local hub cache")
    metamath: str = _f("${paths.data_dir}/../training/metamath", "MetaMathQA: MetaMathQA-395K.json (a JSON list), "
                       "a directory, or hf:meta-math/MetaMathQA if cached")
    n: Optional[int] = _f(20000, "problems sampled in total over the mix (a numina:/metamath: source: from that "
                          "file alone); null = every usable row", ge=1)
    mix: Any = _f({"numina": 0.5, "metamath": 0.5}, "share of n per pool (weights, renormalised; 0 = pool unused)")
    seed: Optional[int] = _f("${seed}", "sampling seed (recorded in the manifest)")
    decontaminate: bool = _f(True, "drop problems sharing a word n-gram with MATH-500, GSM8K test, AIME 24/25, "
                             "AMC 23, OlympiadBench (under data_dir)")
    ngram: int = _f(13, "decontamination window in normalised words (shorter problems: whole-problem containment "
                    "or exact match)", ge=1)
    fallback: Any = _f(None, "sources used instead when a pool of the mix has no local files (e.g. [math_train, "
                       "gsm8k_train]); null = error")
    manifest: Optional[str] = _f("training_manifest.json", "sampled ids, seed, mix, quotas and drop counts, "
                                 "written in the run directory (null = not written)")


@dataclass
class DataSettings:
    """The problems searched (`sphere generate`, each round of `sphere run`): sphere.data.problems."""

    problems: Any = _f("mini", "mini | math_train | gsm8k_train | training (NuminaMath + MetaMathQA, "
                       "data.training) | numina:PATH | metamath:PATH | a local JSONL path | hf:NAME[:SPLIT]; or a "
                       "list of them")
    limit: Optional[int] = _f(None, "use only the first N problems (null = all)", ge=0)
    mini_n: int = _f(256, "mini world: number of training problems generated", ge=1)
    mini_seed: int = _f(7, "mini world: seed of the training split (disjoint from the held-out test seed)")
    data_dir: str = _f("${paths.data_dir}", "where math_train / gsm8k_train live")
    hf_problem_field: str = _f("problem", "hf: datasets: the problem text column")
    hf_answer_field: str = _f("answer", "hf: datasets: the gold answer column")
    hf_expected_size: Optional[int] = _f(None, "hf: datasets: rows the dry run counts for it (it reads no hub); "
                                         "null = 0", ge=0)
    training: TrainingPoolSettings = _sub(TrainingPoolSettings, "the paper's training pools")


# ============================================================================================= stages
@dataclass
class StagesSettings:
    """SPHERE's stages 2 and 3 (stage 1, self-generation, always runs)."""

    stage2: bool = _f(True, "self-correction for problems where Sol_max and Sol_min are both wrong")
    stage3: bool = _f(True, "diversity induction with the small model where both are right")
    inverted: str = _f("swap", "Sol_max wrong but Sol_min right: swap (pair with roles swapped, stage 1) | drop",
                       choices=("swap", "drop"))
    stage2_rejected: str = _f("sol_max", "the wrong attempt shown in the reflection prompt and rejected: "
                              "sol_max | sol_min", choices=("sol_max", "sol_min"))
    stage2_prompt_with_attempt: bool = _f(False, "pair prompt = reflection prompt with the attempt (true) or the "
                                          "plain problem")
    small_expansions_factor: int = _f(2, "stage 3: the small model samples factor * E candidates (paper: 2E)",
                                      ge=1)
    close_policy_before_small: bool = _f(False, "free the policy backend before loading the small model (big GPU "
                                         "models)")


# ============================================================================================ filters
@dataclass
class FiltersSettings:
    """Which pairs are kept (sphere/generate/filters)."""

    dedup: bool = _f(True, "drop exact duplicate (prompt, chosen, rejected) pairs")
    min_margin: float = _f(0.0, "keep pairs with value(chosen) - value(rejected) >= this")
    min_edit_distance: float = _f(0.02, "keep pairs whose texts differ by at least this normalised edit distance "
                                  "[0, 1]", ge=0, le=1)
    max_length_ratio: float = _f(4.0, "drop pairs whose longer text is more than this times the shorter (0 = off)",
                                 ge=0)
    chosen_min_step_score: float = _f(0.0, "drop pairs whose chosen solution has a step the scorer scores below "
                                      "this (raw step score in [0, 1]; 0 = off). A right answer reached through a "
                                      "wrong step teaches that step. Symbolic checker: 0.5 drops steps whose "
                                      "equations are mostly wrong", ge=0, le=1)
    stage3_rejected_needs_answer: bool = _f(True, "stage 3: a rejected solution must state a final answer "
                                            "(\\boxed{}); one without is not a plausible wrong solution. The best "
                                            "wrong one with an answer is used")
    stage2_drop_attempt_refs: bool = _f(True, "stage 2 with the plain pair prompt (stages.stage2_prompt_with_attempt:"
                                        " false): a chosen solution that refers to \"the attempt\" it was shown is "
                                        "not used")


# ========================================================================================== registry
# The groups whose defaults live here: name in the ConfigStore (settings/<name>) -> dataclass. The YAML that
# composes over each: search -> conf/search/paper.yaml; sampling -> conf/config.yaml; train ->
# conf/train_opts/lora.yaml; eval -> conf/run.yaml and conf/eval.yaml; data, stages, filters ->
# conf/generate.yaml; controls -> conf/run.yaml; model -> every conf/model/*.yaml (sphere/schema_models.py).
SETTINGS: dict[str, type] = {"search": SearchSettings, "sampling": SamplingSettings, "train": TrainSettings,
                             "eval": EvalSettings, "data": DataSettings, "stages": StagesSettings,
                             "filters": FiltersSettings, "controls": ControlsSettings, "model": ModelSettings}

# Groups with one dataclass per option (the node's ``name`` picks it): settings/<group>/<option> in the
# ConfigStore, which conf/<group>/<option>.yaml composes over (``- /settings/scorer/prm@_here_`` in
# conf/scorer/prm.yaml): scorer (sphere/schema_scorers.py), runner, logger, backend (sphere/schema_groups.py),
# construction, prompt (sphere/schema_models.py; every prompt family maps to the one PromptSettings).
OPTIONS: dict[str, dict[str, type]] = {"scorer": SCORERS, "runner": RUNNER_OPTIONS, "logger": LOGGER_OPTIONS,
                                       "backend": BACKEND_OPTIONS, "construction": CONSTRUCTION_OPTIONS,
                                       "prompt": PROMPT_OPTIONS}

# (config node, dataclass, the commands (primary config names) it is checked for); node "" = the top level
SCHEMAS: list[tuple[str, type, tuple[str, ...]]] = [
    ("search", SearchSettings, ("generate", "run")),
    ("sampling", SamplingSettings, ("generate", "run")),
    ("sampling", EvalSamplingSettings, ("eval",)),
    ("train", TrainSettings, ("train", "run")),
    ("eval", RunEvalSettings, ("run",)),
    ("eval", EvalSettings, ("eval",)),
    ("data", DataSettings, ("generate", "run")),
    ("stages", StagesSettings, ("generate", "run")),
    ("filters", FiltersSettings, ("generate", "run")),
    ("", EvalCommandSettings, ("eval",)),
    ("controls", ControlsSettings, ("run",)),
    ("model", ModelSettings, ("generate", "eval", "train", "run")),
]
# (config node, {option name: dataclass}, commands): checked with the dataclass of the node's ``name``
OPTION_SCHEMAS: list[tuple[str, dict[str, type], tuple[str, ...]]] = [
    ("scorer", SCORERS, ("generate", "run")),
    ("runner", RUNNER_OPTIONS, ("generate", "eval", "run")),
    ("logger", LOGGER_OPTIONS, ("generate", "eval", "train", "run")),
    ("backend", BACKEND_OPTIONS, ("generate", "eval", "run")),
    ("construction", CONSTRUCTION_OPTIONS, ("generate", "run")),
    ("prompt", PROMPT_OPTIONS, ("generate", "eval", "train", "run")),
]


def schema_of(cfg_node: Any, key: str, schema: Any) -> Optional[type]:
    """The dataclass a node is checked with: ``schema`` itself, or for an options group the one its ``name``
    picks (None: an unknown name, which the command itself refuses)."""
    if isinstance(schema, dict):
        name = cfg_node.get("name") if isinstance(cfg_node, dict) else None
        return schema.get(str(name)) if name is not None else None
    return schema

# the names older code and tests use
SearchSchema, SamplingSchema, TrainSchema, LossSchema, LoraSchema = (
    SearchSettings, SamplingSettings, TrainSettings, LossSettings, LoraSettings)
DataSchema, StagesSchema, EvalSchema, RunEvalSchema = DataSettings, StagesSettings, EvalCommandSettings, RunEvalSettings


def defaults(cls: type, alone: bool = False) -> dict:
    """A settings dataclass's defaults as a plain nested dict. Interpolations such as ``${seed}`` are kept, or
    with ``alone`` (a partial config read outside a composed one) replaced by the field's ``alone`` value (what
    the interpolation gives in the shipped base config)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            v = f.default
        elif f.default_factory is not dataclasses.MISSING:
            v = f.default_factory()
        else:  # no default (an option's name): the YAML file writes it
            continue
        if alone and "alone" in f.metadata:
            v = f.metadata["alone"]
        out[f.name] = defaults(type(v), alone) if dataclasses.is_dataclass(v) else v
    return out


def doc(key: str) -> str:
    """The doc of a dotted settings key, e.g. ``doc("train.loss.beta")``."""
    group, *rest = key.split(".")
    cls: Any = SETTINGS[group]
    for i, name in enumerate(rest):
        f = {f.name: f for f in dataclasses.fields(cls)}[name]
        if i == len(rest) - 1:
            return str(f.metadata.get("doc", ""))
        cls = f.default_factory()  # type: ignore[misc]
        cls = type(cls)
    return (cls.__doc__ or "").strip()


_registered = False


def register() -> None:
    """Put the settings in Hydra's ConfigStore: ``settings/<group>`` (each group's defaults, the node the YAML
    files compose over) and ``schema/<name>`` (the dataclasses, for ``defaults`` lists and tools). Idempotent."""
    global _registered
    if _registered:
        return

    cs = ConfigStore.instance()
    for name, cls in SETTINGS.items():
        cs.store(group="settings", name=name, node=defaults(cls))
    for group, options in OPTIONS.items():  # settings/<group>/<option>: conf/<group>/<option>.yaml composes over it
        for name, cls in options.items():
            cs.store(group=f"settings/{group}", name=name, node=defaults(cls))
    stored: set[str] = set()
    for key, schema, commands in SCHEMAS:  # a node typed differently per command: <command>_<node> after the first
        name = key or commands[0]
        name = f"{commands[0]}_{key or 'top'}" if name in stored else name
        stored.add(name)
        cs.store(group="schema", name=name, node=schema)
    _registered = True


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


def check_node(schema: type, node: dict, prefix: str) -> None:
    """Check a plain (resolved) ``node`` against ``schema``: type and range of every field it has; the message
    names ``prefix`` + the field."""
    hints = typing.get_type_hints(schema)
    typed = OmegaConf.structured(schema)
    for f in dataclasses.fields(schema):
        if f.name not in node:
            continue
        key, v, tp = f"{prefix}{f.name}", node[f.name], hints[f.name]
        if dataclasses.is_dataclass(tp):
            if isinstance(v, dict):
                check_node(tp, v, key + ".")
            elif v is not None:
                raise ConfigTypeError(f"config {key}={v!r}: expected a mapping of settings")
            continue
        try:
            typed[f.name] = v  # OmegaConf's own conversion: "3" -> 3; "abc" or 3.5 for an int is an error
        except ValidationError:
            raise ConfigTypeError(f"config {key}={v!r}: expected {_type_word(tp)}") from None
        _check_range(key, typed[f.name], dict(f.metadata), v)


_walk = check_node


def check_config(cfg: Any, command: str | None = None) -> None:
    """Check ``cfg``'s typed nodes (``SCHEMAS``) before anything runs; raises ``ConfigTypeError`` naming the
    full key. ``command``: the primary config name (generate, train, eval, run; other commands' configs
    are not checked here)."""
    for key, schema, commands in SCHEMAS:
        if command not in commands:
            continue
        node = OmegaConf.select(cfg, key, default=None) if key else cfg
        if node is None or not OmegaConf.is_dict(node):
            continue
        plain = OmegaConf.to_container(node, resolve=True) if key else {
            f.name: OmegaConf.select(cfg, f.name, default=None) for f in dataclasses.fields(schema)
            if f.name in cfg}
        check_node(schema, plain, f"{key}." if key else "")
    for key, options, commands in OPTION_SCHEMAS:
        node = OmegaConf.select(cfg, key, default=None) if command in commands else None
        if node is None or not OmegaConf.is_dict(node):
            continue
        plain = OmegaConf.to_container(node, resolve=True)
        schema = schema_of(plain, key, options)
        if schema is not None:
            check_node(schema, plain, f"{key}.")
    rounds = OmegaConf.select(cfg, "rounds", default=None) if command == "run" else None
    if rounds is not None and (not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 0):
        raise ConfigTypeError(f"config rounds={rounds!r}: expected an integer >= 0")
