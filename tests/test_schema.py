"""Typed configs (issue #17 G, sphere/schema.py): every shipped config passes its schemas; a wrong type or an
out-of-range budget names the full key. The CLI cases (nothing written, no model loaded) are in
tests/test_bad_input.py::test_typed_config_error_names_the_key_before_anything_is_written."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf


def _experiments() -> list[str]:
    from sphere.cli import conf_dir

    return sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("command,overrides", [
    ("generate", []), ("generate", ["search=mcts"]), ("generate", ["scorer=prm"]), ("train", ["pairs=p.jsonl"]),
    ("train", ["pairs=p.jsonl", "train_opts@train=full"]), ("eval", []), ("run", []),
    *[("run", [f"experiment={e}"]) for e in _experiments()],
])
def test_shipped_configs_pass_their_schemas(command, overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from sphere.cli import conf_dir
    from sphere.schema import check_config

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(command, overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # ${hydra:...} interpolations resolve as under the CLI
        check_config(cfg, command)


@pytest.mark.parametrize("command,node,message", [
    ("generate", {"search": {"expansions": "abc"}}, "config search.expansions='abc': expected an integer"),
    ("generate", {"search": {"expansions": "3"}}, None),  # what OmegaConf converts is fine
    ("generate", {"search": {"max_step_tokens": 0}}, "config search.max_step_tokens=0: must be >= 1"),
    ("generate", {"search": {"top_p": 0}}, "config search.top_p=0: must be in (0, 1]"),
    ("generate", {"search": {"pruning": {"k": 1.5}}}, "config search.pruning.k=1.5: expected an integer"),
    ("generate", {"search": {"new_option": "anything"}}, None),  # fields the schema does not list: untouched
    ("run", {"train": {"warmup_ratio": 1.0}}, "config train.warmup_ratio=1.0: must be in [0, 1)"),
    ("run", {"train": {"lora": {"r": "big"}}}, "config train.lora.r='big': expected an integer"),
    ("run", {"train": {"max_length": None}}, None),
    ("run", {"rounds": -1}, "config rounds=-1: expected an integer >= 0"),
    ("eval", {"limit": 0}, "config limit=0: must be a positive integer or null (all problems)"),
    ("eval", {"sampling": {"seed": None}}, None),
    ("bench_engine", {"search": {"expansions": "abc"}}, None),  # other commands' configs are not checked
])
def test_type_and_range_errors_name_the_full_key(command, node, message):
    from sphere.schema import ConfigTypeError, check_config

    cfg = OmegaConf.create(node)
    if message is None:
        check_config(cfg, command)
        return
    with pytest.raises(ConfigTypeError) as ei:
        check_config(cfg, command)
    assert str(ei.value) == message


def test_schemas_are_in_the_config_store():
    from hydra.core.config_store import ConfigStore

    from sphere.schema import SCHEMAS, register

    register()
    names = {f"{key or commands[0]}.yaml" for key, _, commands in SCHEMAS}
    assert names <= set(ConfigStore.instance().list("schema"))
