"""What every command and experiment composes to, pinned (the settings refactor's safety net).

``tests/data/composed/snapshot.json`` holds, for every command config (``sphere <command> --cfg job``: run,
generate, eval, train, pretrain-mini, bench *) and for ``sphere run experiment=X`` with each
``conf/experiment/X.yaml``, the composed config with every interpolation resolved and the ``hydra`` node left
out, as dotted keys. Paths of this checkout and of ``$HOME`` read ``<ROOT>`` / ``<HOME>`` so the file is the
same on every machine. The test recomposes each entry and compares key by key: a difference fails unless its
key is in ``ALLOWED`` (each with the reason it may differ from the recorded snapshot).

Regenerate after an intended change of a composed value (and say why in the commit):
    .venv/bin/python tests/test_composed_snapshot.py --write
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT / "tests" / "data" / "composed" / "snapshot.json"

# key (dotted, any entry) -> why it may be missing now (a removed dead field). Only a removal is allowed: a key
# listed here that is still composed must keep its recorded value.
# Empty: the snapshot was rewritten (--write) after the dead sampling.n / sampling.max_step_tokens went and
# the typed option groups were added.
ALLOWED: dict[str, str] = {}
# (entry, key prefix) -> why keys under it may be new (absent from the snapshot)
ADDED: dict[tuple[str, str], str] = {}


def entries() -> dict[str, tuple[tuple[str, ...], list[str]]]:
    """entry name -> (command words, arguments)."""
    from sphere.cli import HYDRA_COMMANDS

    out = {" ".join(key): (key, []) for key in HYDRA_COMMANDS}
    for p in sorted((ROOT / "conf" / "experiment").glob("*.yaml")):
        out[f"run experiment={p.stem}"] = (("run",), [f"experiment={p.stem}"])
    # the options the defaults do not compose (typed per option: sphere/schema_groups.py, schema_models.py)
    for key, arg in [(("generate",), "runner=ray"), (("run",), "runner=ray"), (("train",), "logger=wandb"),
                     (("run",), "logger=wandb"), *((("eval",), f"backend={b}") for b in
                                                   ("openai", "replay", "transformers", "vllm")),
                     # construction / model / prompt options (typed: sphere/schema_models.py)
                     *((("generate",), f"construction={c}") for c in
                       ("first_wrong_step", "siblings", "best_worst_of_n")),
                     *((("eval",), f"model={m}") for m in ("standin_phi4", "qwen2_5_7b")),
                     *((("eval",), f"prompt={f}") for f in ("deepseek_r1", "qwen2_5_math"))]:
        out[f"{' '.join(key)} {arg}"] = (key, [arg])
    return out


def _normalise(v):
    if isinstance(v, str):
        return v.replace(str(ROOT), "<ROOT>").replace(os.path.expanduser("~"), "<HOME>")
    return v


def flatten(node, prefix: str = "") -> dict:
    out = {}
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = [_normalise(x) for x in v] if isinstance(v, list) else _normalise(v)
    return out


def composed(key: tuple[str, ...], args: list[str]) -> dict:
    """``sphere <key> <args> --cfg job``, resolved, hydra node excluded, flattened."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from sphere.cli import HYDRA_COMMANDS, conf_dir, hydra_overrides

    env = {k: os.environ.pop(k) for k in ("SPHERE_DATA_DIR", "SPHERE_CACHE_DIR") if k in os.environ}
    try:
        cdir = conf_dir()
        with initialize_config_dir(config_dir=str(cdir), version_base="1.3"):
            cfg = hydra_compose(config_name=HYDRA_COMMANDS[key][0], overrides=hydra_overrides(key, args, cdir))
        cfg = OmegaConf.to_container(cfg, resolve=True)
    finally:
        os.environ.update(env)
    cfg.pop("hydra", None)
    return flatten(cfg)


def write() -> None:
    snap = {name: composed(key, args) for name, (key, args) in entries().items()}
    SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
    SNAPSHOT.write_text(json.dumps(snap, indent=1, sort_keys=True) + "\n", encoding="utf-8")


_SNAP = json.loads(SNAPSHOT.read_text(encoding="utf-8")) if SNAPSHOT.is_file() else {}
_ABSENT = "<absent>"


def test_every_command_and_experiment_is_recorded():
    assert sorted(_SNAP) == sorted(entries()), "a command or experiment was added or removed: --write"


@pytest.mark.parametrize("name", sorted(entries()))
def test_composes_as_recorded(name):
    key, args = entries()[name]
    now, old = composed(key, args), _SNAP[name]
    diffs = [f"{k}: {old.get(k, _ABSENT)!r} -> {now.get(k, _ABSENT)!r}" for k in sorted(set(old) | set(now))
             if old.get(k, _ABSENT) != now.get(k, _ABSENT) and not (k in ALLOWED and k not in now)
             and not (k not in old and any(e == name and k.startswith(p) for e, p in ADDED))]
    assert not diffs, f"`sphere {name}` composes differently from {SNAPSHOT.name}:\n" + "\n".join(diffs)


def test_eval_keeps_sampling_n():
    """`sphere eval` reads sampling.n (samples per problem): removing the dead field elsewhere keeps it there."""
    now = composed(("eval",), [])
    assert now["sampling.n"] == _SNAP["eval"]["sampling.n"] == 1


if __name__ == "__main__":
    if "--write" in sys.argv:
        write()
        print(f"wrote {SNAPSHOT}")
