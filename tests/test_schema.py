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
    ("generate", ["runner=ray", "logger=wandb"]), ("train", ["pairs=p.jsonl", "logger=wandb"]),
    *[("eval", [f"backend={b}", "runner=ray"]) for b in ("openai", "replay", "transformers", "vllm")],
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
    # runner / logger / backend: per option (sphere/schema_groups.py); controls: `sphere run`'s
    ("generate", {"runner": {"name": "ray", "workers": 0}}, "config runner.workers=0: must be >= 1"),
    ("eval", {"runner": {"name": "ray", "chunk_size": 0}},
     "config runner.chunk_size=0: must be auto or an integer >= 1"),
    ("eval", {"runner": {"name": "ray", "chunk_size": "auto", "gpus_per_worker": 0.5}}, None),
    ("run", {"runner": {"name": "ray", "gpus_per_worker": -1}},
     "config runner.gpus_per_worker=-1: must be auto or a number >= 0"),
    ("generate", {"runner": {"name": "local", "workers": 0}}, None),  # not a field of the local runner
    ("train", {"logger": {"name": "wandb", "mode": "cloud"}},
     "config logger.mode='cloud': allowed auto | online | offline | disabled"),
    ("eval", {"backend": {"name": "openai", "max_concurrency": "many"}},
     "config backend.max_concurrency='many': expected an integer"),
    ("eval", {"backend": {"name": "vllm", "max_num_batched_tokens": 8192}}, None),  # a keyword argument
    ("run", {"controls": {"rft_beta": 0.5}}, "config controls.rft_beta=0.5: must be in (0, 0.01]"),
    ("run", {"controls": {"rft": "maybe"}}, "config controls.rft='maybe': expected true or false"),
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


def test_plus_key_under_a_typed_open_group_is_refused_only_when_it_misspells_a_key():
    """backend and logger take new keys (keyword arguments, ``+logger.api_key``): sphere/overrides.py refuses
    a ``+`` key there only when its name is a near miss of a key the option has (the CLI cases:
    tests/test_bad_input.py)."""
    from sphere.overrides import check_added_keys
    from sphere.schema import defaults
    from sphere.schema_groups import OpenAIBackendSettings, VLLMBackendSettings, WandbLoggerSettings

    cfg = OmegaConf.create({"backend": {**defaults(OpenAIBackendSettings), "name": "openai"},
                            "logger": {**defaults(WandbLoggerSettings), "name": "wandb"}})
    with pytest.raises(ValueError, match=r"did you mean backend\.max_concurrency\?"):
        check_added_keys(cfg, ["+backend.max_concurency=3"])
    with pytest.raises(ValueError, match=r"did you mean logger\.project\?"):
        check_added_keys(cfg, ["+logger.projct=x"])
    check_added_keys(cfg, ["+backend.token=abc", "+logger.api_key=abc", "++backend.max_concurency=3"])
    vllm = OmegaConf.create({"backend": {**defaults(VLLMBackendSettings, alone=True), "name": "vllm"}})
    check_added_keys(vllm, ["+backend.data_parallel_size=2", "+backend.max_num_batched_tokens=8192"])
