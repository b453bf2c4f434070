"""`sphere <command> [hydra overrides]`: one console command, one Hydra app per sub-command.

Examples::

    sphere run                                   # the embedded CPU default (mini world)
    sphere eval model=mini benchmarks=[mini] limit=500
    sphere bench engine trees=256
    sphere bench engine -m trees=256,1024        # Hydra multirun

Each sub-command maps to a primary config in ``conf/`` and a ``main(cfg)`` function. ``model=VALUE``
where VALUE is not an option of the ``conf/model`` group (a path or a hub name) is rewritten to
``model.policy=VALUE``, so ``model=/ckpt/dir`` and ``model=mini`` both work.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

# command words -> (primary config name, "module:function"). Functions take a DictConfig.
HYDRA_COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("bench", "engine"): ("bench_engine", "sphere.bench.engine:main"),
    ("bench", "verify"): ("bench_verify", "sphere.bench.verify:main"),
    ("bench", "generate"): ("bench_generate", "sphere.bench.generate:main"),
    ("generate",): ("generate", "sphere.generate.run:main"),
    ("run",): ("run", "sphere.pipeline:main"),
    ("eval",): ("eval", "sphere.evaluation.harness:main"),
    ("train",): ("train", "sphere.train.dpo:main"),
    ("pretrain-mini",): ("pretrain_mini", "sphere.mini.pretrain:main"),
}

# command words -> "module:function" taking argv (non-Hydra commands).
PLAIN_COMMANDS: dict[tuple[str, ...], str] = {
    ("sweep",): "sphere.sweep:main",
    ("viz", "tree"): "sphere.viz:main",
    ("report",): "sphere.report:main",
}


def conf_dir() -> Path:
    """The config directory: the repository's ``conf/`` (editable install) or the packaged copy."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "conf", here / "conf"):
        if (cand / "config.yaml").is_file():
            return cand
    raise SystemExit(
        "sphere: cannot find the config directory (conf/config.yaml). Reinstall with "
        "`pip install -e .` from the repository root."
    )


def _usage() -> str:
    names = sorted(" ".join(k) for k in [*HYDRA_COMMANDS, *PLAIN_COMMANDS])
    return "usage: sphere <command> [hydra overrides]\ncommands:\n  " + "\n  ".join(names)


def _match(argv: list[str], table: dict) -> tuple[tuple[str, ...], list[str]] | None:
    for n in (2, 1):
        key = tuple(argv[:n])
        if len(key) == n and key in table:
            return key, argv[n:]
    return None


def rewrite_model_override(args: list[str], cdir: Path) -> list[str]:
    """``model=X`` with X not in conf/model/ becomes ``model.policy=X`` (a path or a hub name)."""
    out = []
    for a in args:
        if a.startswith("model=") and "," not in a:
            val = a.split("=", 1)[1]
            if val and not (cdir / "model" / f"{val}.yaml").is_file():
                a = f"model.policy={val}"
        out.append(a)
    return out


def _load(target: str):
    mod, fn = target.split(":")
    return getattr(importlib.import_module(mod), fn)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    # Keep tokenizers/torch from oversubscribing small machines unless the user chose otherwise.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    m = _match(argv, PLAIN_COMMANDS)
    if m is not None:
        key, rest = m
        sys.exit(_load(PLAIN_COMMANDS[key])(rest) or 0)
    m = _match(argv, HYDRA_COMMANDS)
    if m is None:
        print(f"sphere: unknown command {' '.join(argv[:2])!r}\n" + _usage(), file=sys.stderr)
        sys.exit(2)
    key, rest = m
    config_name, target = HYDRA_COMMANDS[key]
    cdir = conf_dir()
    rest = rewrite_model_override(rest, cdir)
    fn = _load(target)

    import hydra

    sys.argv = ["sphere-" + "-".join(key), *rest]
    hydra.main(version_base="1.3", config_path=str(cdir), config_name=config_name)(fn)()


if __name__ == "__main__":
    main()
