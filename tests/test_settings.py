"""One source of truth per setting (sphere/schema.py and the sphere/schema_*.py it imports): each typed
group's type, default, range and doc live in its dataclass; conf/ keeps presets and experiment deltas.

- ``test_every_composed_key_has_a_typed_field``: every key that a command or experiment composes under a typed
  node (``sphere.schema.SCHEMAS``: search, sampling, train, eval, data, stages, filters, controls, model, and
  per option ``OPTION_SCHEMAS``: scorer, runner, logger, backend, construction, prompt, for the commands that
  read them) is a field of that node's dataclass: a YAML key with no field (a typo, a field added to conf/
  only, a dead field) fails here. Options a command does not compose by default (``runner=ray``,
  ``logger=wandb``, ``backend=openai``, ``construction=siblings``, ``model=phi4``, ``prompt=deepseek_r1``,
  ...) are composed too (``_commands``).
- ``test_the_run_base_is_neutral``: conf/run.yaml sets no mini (or paper) values; experiments carry them.
- ``test_no_default_is_written_twice``. The rule: a YAML file outside ``conf/experiment/`` (the group options
  and the command configs: conf/*.yaml, conf/search/, conf/train_opts/, conf/model/, and each option
  group's directory: conf/scorer/, conf/runner/, conf/logger/, conf/backend/, conf/construction/,
  conf/prompt/) must not set a key of a typed node to the value it already has there, i.e. the dataclass
  default overlaid with what the file composes over (its own ``defaults``: another option of the same
  group, ``full`` over ``lora``, ``mcts`` over ``paper``; for a command config, the command configs it
  extends: run over generate over config). Interpolations compare as written
  (``${seed}`` equals ``${seed}``). Experiments are exempt: they state the settings of a study (a paper's
  beta = 0.1 even though it is the default), and tests/test_composed_snapshot.py pins what they compose to.
  conf/mini/ (the mini models' pretraining recipes) and the bench configs have nodes of their own shape and
  are not typed groups.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from test_composed_snapshot import ROOT, composed, entries

CONF = ROOT / "conf"


def _commands() -> dict[str, tuple[tuple[str, ...], list[str]]]:
    out = {n: e for n, e in entries().items() if e[0][0] in ("run", "generate", "train", "eval")}
    out["generate search=mcts"] = (("generate",), ["search=mcts"])
    out["train train_opts@train=full"] = (("train",), ["train_opts@train=full"])
    for scorer in ("prm", "rollout", "mini_world"):
        out[f"generate scorer={scorer}"] = (("generate",), [f"scorer={scorer}"])
    # the options of runner / logger / backend that no command composes by default
    for key, args in [*[((c,), ["runner=ray"]) for c in ("generate", "eval", "run")],
                      (("train",), ["logger=wandb"]), (("generate",), ["logger=wandb"]),
                      *[(("eval",), [f"backend={b}"]) for b in ("openai", "replay", "transformers")],
                      (("generate",), ["backend=vllm"]), (("run",), ["backend=openai"]),
                      # construction / model / prompt (sphere/schema_models.py)
                      *[(("generate",), [f"construction={c}"]) for c in ("first_wrong_step", "siblings",
                                                                         "best_worst_of_n")],
                      (("run",), ["construction=siblings"]),
                      *[(("eval",), [f"model={m}"]) for m in ("phi4", "standin_deepseek_r1", "mini_honest")],
                      (("train",), ["model=qwen2_5_7b"]),
                      *[(("generate",), [f"prompt={f}"]) for f in ("qwen2_5", "qwen2_5_math", "deepseek_r1")],
                      (("train",), ["prompt=phi4"])]:
        out[" ".join([*key, *args])] = (key, args)
    return out


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return None if f.default_factory is dataclasses.MISSING else f.default_factory()


def _fields(cls: type, prefix: str) -> tuple[set[str], set[str]]:
    """(leaf keys, mapping keys) of a dataclass, dotted under ``prefix``."""
    leaves, maps = set(), set()
    for f in dataclasses.fields(cls):
        v = _default(f)
        if dataclasses.is_dataclass(v):
            maps.add(prefix + f.name)
            sub_l, sub_m = _fields(type(v), f"{prefix}{f.name}.")
            leaves |= sub_l
            maps |= sub_m
        else:
            leaves.add(prefix + f.name)
    return leaves, maps


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_composed_key_has_a_typed_field(name):
    from sphere.schema import OPTION_SCHEMAS, SCHEMAS

    key, args = _commands()[name]
    cfg = composed(key, args)
    config_name = {"run": "run", "generate": "generate", "train": "train", "eval": "eval"}[key[0]]
    missing = []
    typed = [(n, c, cmds) for n, c, cmds in SCHEMAS if n]
    typed += [(n, opts.get(str(cfg.get(f"{n}.name"))), cmds) for n, opts, cmds in OPTION_SCHEMAS]
    for node, cls, commands in typed:
        if config_name not in commands:
            continue
        if cls is None:
            missing.append(f"{node} (its name {cfg.get(node + '.name')!r} has no dataclass)")
            continue
        leaves, maps = _fields(cls, node + ".")
        for k in cfg:
            if not k.startswith(node + "."):
                continue
            # a leaf, or a value inside a free-form field (a dict/list value such as data.training.mix.numina)
            if k not in leaves and not any(k.startswith(lf + ".") for lf in leaves):
                missing.append(k)
    assert not missing, (f"`sphere {name}` composes keys no dataclass of sphere/schema*.py declares (add a "
                         f"typed field with its doc, or remove the key): {sorted(missing)}")


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def _flat(node: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in node.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _parents(path: Path) -> list[Path]:
    """The YAML files of conf/ a file composes over: its ``defaults`` entries naming a file of its own
    directory (another option of the group, or another command config)."""
    out = []
    for item in _load(path).get("defaults", []) or []:
        if isinstance(item, str) and item != "_self_" and not item.startswith("/"):
            p = path.parent / f"{item}.yaml"
            if p.is_file():
                out.append(p)
    return out


def _typed_values(path: Path) -> dict[str, object]:
    """The dotted typed keys a file sets, and their values: a group option's whole body under its group's
    node (conf/search/ -> search, conf/train_opts/ -> train), a command config's typed top-level nodes."""
    from sphere.schema import OPTIONS, SETTINGS

    body = {k: v for k, v in _load(path).items() if k not in ("defaults", "hydra")}
    group = {"search": "search", "train_opts": "train", "model": "model",
             **{g: g for g in OPTIONS}}.get(path.parent.name)
    if group:
        return {f"{group}.{k}": v for k, v in _flat(body).items()}
    if path.parent == CONF:
        return {k: v for k, v in _flat({g: body[g] for g in SETTINGS if isinstance(body.get(g), dict)}).items()}
    return {}


def _overridden(path: Path) -> dict[str, object]:
    """What each typed key is before ``path`` sets it: the dataclass defaults, then the files it composes over."""
    from sphere.schema import OPTIONS, SETTINGS, defaults

    base = {}
    for g, cls in SETTINGS.items():
        base.update(_flat(defaults(cls), f"{g}."))
    if path.parent.name in OPTIONS:  # an option with a dataclass of its own (conf/scorer/prm.yaml)
        base.update(_flat(defaults(OPTIONS[path.parent.name][path.stem]), f"{path.parent.name}."))
    for p in _parents(path):
        base.update(_overridden(p))
        base.update(_typed_values(p))
    return base


def _checked_files() -> list[Path]:
    from sphere.schema import OPTIONS

    return [*sorted(CONF.glob("*.yaml")),
            *[p for d in ("search", "train_opts", "model", *OPTIONS)
              for p in sorted((CONF / d).glob("*.yaml"))]]


@pytest.mark.parametrize("path", _checked_files(), ids=lambda p: str(p.relative_to(CONF)))
def test_no_default_is_written_twice(path):
    before = _overridden(path)
    twice = [f"{k}: {v!r}" for k, v in _typed_values(path).items() if k in before and before[k] == v
             and type(before[k]) is type(v)]
    assert not twice, (f"conf/{path.relative_to(CONF)} writes values its settings already have (the dataclass "
                       f"default in sphere/schema*.py, or the file it composes over); delete them: {twice}")


def test_defaults_are_read_from_the_dataclasses():
    """train/config.DEFAULTS and loss_settings take the dataclass's values (no second copy to drift)."""
    from sphere.schema import defaults
    from sphere.schema_train import LossSettings, TrainSettings
    from sphere.train.train_config import DEFAULTS, loss_settings

    assert DEFAULTS == defaults(TrainSettings, alone=True)
    assert loss_settings({})["beta"] == LossSettings().beta


def test_every_field_has_a_doc():
    from sphere.schema import OPTION_SCHEMAS, SCHEMAS

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            v = _default(f)
            yield prefix + f.name, f
            if dataclasses.is_dataclass(v):
                yield from walk(type(v), f"{prefix}{f.name}.")

    classes = [cls for _, cls, _ in SCHEMAS] + [c for _, opts, _ in OPTION_SCHEMAS for c in opts.values()]
    undocumented = [f"{cls.__name__}.{k}" for cls in classes for k, f in walk(cls, "") if not f.metadata.get("doc")]
    assert not undocumented, f"settings without a doc (metadata['doc']): {undocumented}"


def test_the_run_base_is_neutral():
    """conf/run.yaml writes no study's values over the settings (the mini world's recipe lives in the mini_*
    experiments, the paper's in paper_*): of the typed keys it sets only the loop's own eval.resume. So an
    experiment states what its study sets, and no paper experiment undoes a mini default (their composed
    values are pinned by tests/test_composed_snapshot.py)."""
    assert _typed_values(CONF / "run.yaml") == {"eval.resume": True}


def test_an_option_group_is_checked_with_its_options_dataclass():
    """scorer=X is typed by X's dataclass (sphere.schema.OPTION_SCHEMAS): a wrong type names the full key."""
    from omegaconf import OmegaConf

    from sphere.schema import ConfigTypeError, check_config

    with pytest.raises(ConfigTypeError, match=r"^config scorer\.m='many': expected an integer$"):
        check_config(OmegaConf.create({"scorer": {"name": "rollout", "m": "many"}}), "generate")
    check_config(OmegaConf.create({"scorer": {"name": "symbolic", "m": "many"}}), "generate")  # not symbolic's
