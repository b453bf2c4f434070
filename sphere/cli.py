"""`sphere <command> [hydra overrides]`: one console command, one Hydra app per sub-command.

Examples::

    sphere run                                   # the embedded CPU default (mini world)
    sphere eval model=mini benchmarks=[mini] limit=500
    sphere bench engine trees=256
    sphere bench engine -m trees=256,1024        # Hydra multirun

Each sub-command maps to a primary config in ``conf/`` and a ``main(cfg)`` function. ``model=VALUE``
where VALUE is not an option of the ``conf/model`` group (a path or a hub name) is rewritten to
``model.policy=VALUE``, so ``model=/ckpt/dir`` and ``model=mini`` both work; such a model also brings its
prompt family (its chat template decides, ``sphere.prompts.detect_family``; ``prompt=FAMILY`` wins).
``experiment=X`` works for ``generate``, ``train`` and ``eval`` too: appended last (``+experiment=X``), it
gives each phase the settings ``sphere run experiment=X`` uses for it (``hydra_overrides``).
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import logging
import os
import signal
import sys
from pathlib import Path

import hydra

from sphere import rundir  # the run-dir lock is a Hydra callback (conf/config.yaml); see sphere/rundir/
from sphere.cli_overrides import defaults_groups, family_overrides, rewrite_model_override
from sphere.console import route_third_party
from sphere.loggers import redact_console
from sphere.overrides import check_added_keys
from sphere.resources import resource_path
from sphere.schema import register

# command words -> (primary config name, "module:function"). Functions take a DictConfig.
HYDRA_COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("run",): ("run", "sphere.loop.rounds:main"),
    ("generate",): ("generate", "sphere.runners:generate_main"),
    ("train",): ("train", "sphere.train.dpo:main"),
    ("eval",): ("eval", "sphere.runners:eval_main"),
    ("pretrain-mini",): ("pretrain_mini", "sphere.mini.pretrain:main"),
    ("bench", "engine"): ("bench_engine", "sphere.bench.engine:main"),
    ("bench", "verify"): ("bench_verify", "sphere.bench.verify:main"),
    ("bench", "generate"): ("bench_generate", "sphere.bench.generate:main"),
    ("bench", "pipeline"): ("bench_pipeline", "sphere.bench.pipeline:main"),
    ("bench", "prm"): ("bench_prm", "sphere.bench.prm:main"),
}

# command words -> "module:function" taking argv (non-Hydra commands).
PLAIN_COMMANDS: dict[tuple[str, ...], str] = {
    ("sweep",): "sphere.sweep:main",
    ("viz", "tree"): "sphere.viz:main",
    ("report",): "sphere.runreport:main",
}

# One line per command for `sphere --help` (kept here so the help never imports torch).
DESCRIPTIONS: dict[tuple[str, ...], str] = {
    ("run",): "the self-evolution loop: evaluate, generate pairs (3 stages), DPO, repeat",
    ("generate",): "the three SPHERE stages over a problem set -> pairs.jsonl",
    ("train",): "DPO (TRL; LoRA by default) on a pairs.jsonl -> a merged checkpoint",
    ("eval",): "pass@1 / pass@k / maj@k on MATH-500, GSM8K, AIME, AMC, OlympiadBench, mini",
    ("pretrain-mini",): "train the mini-world models from scratch on CPU and measure them",
    ("bench", "engine"): "search-engine throughput, C++ vs the Python reference (and peers)",
    ("bench", "verify"): "answer-checking throughput and the pathological set",
    ("bench", "generate"): "generation throughput of every installed backend",
    ("bench", "pipeline"): "model work per preference pair: sphere's loop vs per-problem and one-leaf loops",
    ("bench", "prm"): "PRM tokens and wall per expansion: separate scoring vs the shared prefix (kv, packed)",
    ("sweep",): "run the Hydra multiruns a sweep file describes (sweeps/*.yaml)",
    ("viz", "tree"): "render a saved search tree as one HTML page",
    ("report",): "plots and a markdown report from a run or a multirun directory",
}

# Config groups a user chooses on the command line (`group=option`); others (hydra/*, accelerate/*, the
# mini recipes) are internal and stay out of `--help`.
USER_GROUPS = ("model", "backend", "prompt", "search", "scorer", "runner", "logger", "train_opts",
               "experiment", "mini", "construction")


def conf_dir() -> Path:
    """The config directory: the repository's ``conf/`` (checkout / editable install) or the packaged copy
    (``sphere.resources``)."""
    cand = resource_path("conf", must_exist=False)
    if (cand / "config.yaml").is_file():
        return cand
    raise SystemExit(
        "sphere: cannot find the config directory (conf/config.yaml). Reinstall with "
        "`pip install -e .` from the repository root."
    )


def _usage() -> str:
    lines = ["sphere: self-evolving preference data for multi-step math (SPHERE, arXiv 2503.04813)", "",
             "usage: sphere <command> [key=value ...]      (Hydra overrides: `sphere run rounds=3 search=mcts`)",
             "", "commands:"]
    for key in [*HYDRA_COMMANDS, *PLAIN_COMMANDS]:
        lines.append(f"  {' '.join(key):<16} {DESCRIPTIONS.get(key, '')}")
    lines += ["", "`sphere <command> --help` describes a command and the options it takes;",
              "`sphere <command> --cfg job` prints its composed config (each field's type, default and doc:",
              "sphere/schema.py; presets and experiments: conf/)."]
    return "\n".join(lines)


# `sphere <command> --help` text for commands whose module docstring is written for developers (the runner
# layer serves generate and eval): how a user chooses what the command works on.
USAGE: dict[tuple[str, ...], str] = {
    ("generate",): """usage: sphere generate [model=M] [data.problems=P] [key=value ...]

Searches each problem (SPHERE's three stages) and writes preference pairs to <hydra.run.dir>/pairs.jsonl.

what to generate from:
  data.problems=P    mini (the CPU mini world, default) | math_train | gsm8k_train (shipped train splits)
                     | PATH.jsonl (records: id, problem, answer) | training (NuminaMath + MetaMathQA pools,
                     data.training) | numina:PATH | metamath:PATH | hf:NAME[:SPLIT] (a cached hub dataset)
                     | [a,b] (several)
  data.limit=N       at most N problems (null = all); data.mini_n=N problems of the mini world
which models:
  model=M            the policy: an option below (mini, qwen2_5_7b, ...), a local model directory or a cached
                     hub name; its chat template picks the prompt family (prompt=FAMILY overrides)
  model.small=M      stage 3's small model;  scorer=prm|symbolic|mini_world|rollout: the step scorer
  backend=B          transformers (CPU/GPU) | vllm | openai (a served model: backend.base_url)
how to search:
  search=paper|mcts  search.expansions=E  search.max_depth=D  stages.stage2/stage3=true|false
  experiment=X       the settings of `sphere run experiment=X` (e.g. paper_qwen2_5_7b)
examples:
  sphere generate data.mini_n=16
  sphere generate model=/ckpt/qwen data.problems=math_train data.limit=500 backend=vllm scorer=prm""",
    ("eval",): """usage: sphere eval [model=M] [benchmarks=[B,...]] [limit=N] [key=value ...]

Scores a model (or stored completions) and writes <hydra.run.dir>/eval/results.{json,md}; prints the table.

which benchmarks:
  benchmarks=[B,...] math500 | gsm8k | aime24 | aime25 | amc23 | olympiadbench | mini | gsm8k_train
                     | math_train | all (the six paper benchmarks) | PATH.jsonl (id, problem, answer)
  limit=N            the first N problems of each (null = all)
which model:
  model=M            an option below (mini, qwen2_5_7b, ...), a local model directory or a cached hub name;
                     its chat template picks the prompt family (prompt=FAMILY overrides)
  backend=B          vllm (default) | transformers | openai (a served model: backend.base_url) | replay
                     (grade stored completions: replay.path=FILE, or replay.references=true)
how to sample:
  sampling.n=K       K samples per problem (K > 1 adds pass@k and maj@K); temperature=T; max_tokens=N
  experiment=X       the per-round evaluation of `sphere run experiment=X`
examples:
  sphere eval model=mini benchmarks=[mini] limit=200
  sphere eval model=/ckpt/qwen backend=vllm benchmarks=[math500,gsm8k]""",
}


def command_help(key: tuple[str, ...], cdir: Path) -> str:
    """`sphere <command> --help`: what the command does, its usage, the groups and options it takes."""
    config_name, target = HYDRA_COMMANDS[key]
    mod = target.split(":")[0]

    doc = USAGE.get(key, "")
    spec = importlib.util.find_spec(mod) if not doc else None
    if spec is not None and spec.origin:
        doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8"))) or ""
    name = " ".join(key)
    lines = [f"sphere {name}: {DESCRIPTIONS.get(key, '')}", ""]
    if doc:
        lines += [doc.strip(), ""]
    groups = {g: d for g, d in defaults_groups(cdir, config_name).items() if g.split("@")[0] in USER_GROUPS}
    if key in PHASE_COMMANDS:  # null slots exist only for an experiment's overrides; experiment=X is appended
        groups = {g: d for g, d in groups.items() if d != "null"}
        groups.setdefault("experiment", "none")
    if groups:
        lines.append("config groups (choose with group=option; default in brackets):")
        for g, d in groups.items():
            gdir = cdir / g.split("@")[0]
            opts = sorted(p.stem for p in gdir.glob("*.yaml")) if gdir.is_dir() else []
            lines.append(f"  {g:<16} [{d}]  {' | '.join(opts)}")
        if key in PHASE_COMMANDS:
            lines.append("  (experiment=X: this phase's settings of `sphere run experiment=X`)")
        lines.append("")
    lines += [f"fields: `sphere {name} --cfg job` prints the composed config; each field is documented in "
              f"conf/{config_name}.yaml and the files it composes ({cdir}).",
              "common: hydra.run.dir=DIR (where outputs go; rerun the same command to resume), "
              "verbose=true (third-party INFO logs), -m (multirun sweep).",
              f"Hydra's own flags: sphere {name} --hydra-help"]
    return "\n".join(lines)


def _match(argv: list[str], table: dict) -> tuple[tuple[str, ...], list[str]] | None:
    for n in (2, 1):
        key = tuple(argv[:n])
        if len(key) == n and key in table:
            return key, argv[n:]
    return None


def experiment_overrides(args: list[str], key: tuple[str, ...], cdir: Path) -> list[str]:
    """``experiment=X`` for a command whose config has no experiment slot (generate, train, eval): appended
    as ``+experiment=X``, so the experiment applies last, over everything, as in `sphere run` (conf/run.yaml).
    Each of these configs has null slots for the groups an experiment overrides (train_opts@train, search,
    ...), so ``experiment=paper_qwen2_5_7b`` composes and gives each phase the settings `sphere run` uses."""
    if key not in PHASE_COMMANDS or "experiment" in defaults_groups(cdir, HYDRA_COMMANDS[key][0]):
        return args
    out = []
    for a in args:
        if a.startswith("experiment="):
            if a.split("=", 1)[1] in ("null", "none", ""):
                continue
            a = "+" + a
        out.append(a)
    return out


def hydra_overrides(key: tuple[str, ...], args: list[str], cdir: Path, note=None) -> list[str]:
    """The overrides Hydra gets for `sphere <key> <args>`: ``experiment=`` placed last for the phase commands,
    ``model=PATH`` as ``model.policy=PATH`` with the model's prompt family (``family_overrides``). Tests
    compose with these, so they check what the command line composes."""
    extra = family_overrides(args, cdir, note) if key in FAMILY_COMMANDS else []
    out = rewrite_model_override(experiment_overrides(args, key, cdir), cdir)
    if extra:  # beside the override they follow from: Hydra's flags (--cfg job, -m) may come after them
        at = max(i for i, a in enumerate(args) if a.split("=", 1)[0] in ("model", "prompt"))
        out[at + 1:at + 1] = extra
    return out


# Commands whose model takes its prompt family from ``model=PATH``, and the phase commands, which take
# ``experiment=X`` (the phases of `sphere run experiment=X`).
FAMILY_COMMANDS = (("run",), ("generate",), ("train",), ("eval",))
PHASE_COMMANDS = (("generate",), ("train",), ("eval",))


def _load(target: str):
    mod, fn = target.split(":")
    return getattr(importlib.import_module(mod), fn)


def _verbose(args: list[str]) -> bool:
    return any(a.lower() in ("verbose=true", "verbose=1", "+verbose=true") for a in args)


def quiet_third_party(verbose: bool) -> None:
    """Third-party libraries log at WARNING unless ``verbose=true`` (vLLM's ~100 start-up INFO lines, HF
    progress chatter); sphere's own progress lines are unaffected. Environment settings the user made win.
    vLLM's log lines (its engine and worker processes inherit the environment) go to stderr, like sphere's:
    stdout keeps the tables and JSON."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    if verbose:
        return
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bars
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")

    for name in ("vllm", "transformers", "datasets", "ray", "urllib3", "httpx", "filelock", "torch"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _task(fn, verbose: bool):
    """The Hydra task: ``fn(cfg)`` with sphere's process-wide settings applied first."""
    @functools.wraps(fn)  # Hydra names the job after the wrapped function's module
    def task(cfg):
        quiet_third_party(verbose)
        if verbose:
            logging.getLogger().setLevel(logging.INFO)

        route_third_party(verbose)  # vLLM / W&B / Python warnings: to <run dir>/<job>.log, not the console

        command = sys.argv[0].removeprefix("sphere-").replace("-", " ")
        with rundir.cli_errors(command):  # full disk, read-only dir, dir in use, settings mismatch: one line
            try:
                rundir.set_default_mode(cfg.get("resume", "auto"))  # resume=bogus: one line (a ValueError)

                check_added_keys(cfg, sys.argv[1:])  # `+search.expansion=3`: a typo, refused (sphere/overrides.py)
                return fn(cfg)
            except USER_ERRORS as e:
                if verbose or os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                # bad input (config, files, a plan that cannot fit): the message names the key or file and
                # what is allowed; a traceback would only bury it
                msg = e.args[0] if isinstance(e, KeyError) and e.args else e
                print(f"sphere {command}: error: {msg}\n(verbose=true or HYDRA_FULL_ERROR=1 shows the traceback)",
                      file=sys.stderr, flush=True)
                raise SystemExit(1) from None

    return task


# Exceptions that report bad input (validation, missing files or optional packages, a memory plan that does
# not fit, a backend server nobody answers at backend.base_url): printed as one message without a traceback.
from sphere.backends.base import BackendUnavailableError  # noqa: E402 - stdlib-only module

USER_ERRORS = (ValueError, KeyError, FileNotFoundError, ModuleNotFoundError, NotADirectoryError,
               BackendUnavailableError)


INTERRUPTED = "sphere: interrupted; rerun the same command (same hydra.run.dir) to resume"
TERMINATED = "sphere: terminated by {sig}; rerun the same command (same hydra.run.dir) to resume"


class Terminated(KeyboardInterrupt):
    """SIGTERM (what SLURM, Kubernetes and `kill` send) raised in the main thread: a KeyboardInterrupt, so
    every cleanup that runs on Ctrl-C runs for it too; ``main`` reports it in one line and exits 143."""


def _on_sigterm(signum, frame):
    raise Terminated(signal.Signals(signum).name)


def _catch_sigterm() -> None:
    """Treat SIGTERM like SIGINT (a disposition the process inherited as ignored, as under nohup, is kept)."""
    try:
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (main() called from a thread): leave signals alone
        pass


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    # Keep tokenizers/torch from oversubscribing small machines unless the user chose otherwise.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _catch_sigterm()
    try:
        _dispatch(argv)
    except KeyboardInterrupt as e:
        # one line, no 100-line torch traceback; the outputs written so far are durable (resume works)
        term = isinstance(e, Terminated)
        if term:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM during this exit ends it at once
        print("\n" + (TERMINATED.format(sig=e.args[0] if e.args else "SIGTERM") if term else INTERRUPTED),
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(143 if term else 130)  # skip atexit handlers of half-stopped engines (their own tracebacks)


def _dispatch(argv: list[str]) -> None:
    # Hydra prints a failed job's overrides in clear ("Error executing job with overrides: [...]"), keys
    # included; tracebacks and log lines may repeat a value: the console streams hide every secret value of
    # the command line and the environment (SECURITY.md, claim 4)
    redact_console(argv)
    m = _match(argv, PLAIN_COMMANDS)
    if m is not None:
        key, rest = m
        sys.exit(_load(PLAIN_COMMANDS[key])(rest) or 0)
    m = _match(argv, HYDRA_COMMANDS)
    subs = [k for k in [*HYDRA_COMMANDS, *PLAIN_COMMANDS] if len(k) > 1 and k[0] == argv[0]]
    if m is None and subs and (len(argv) == 1 or argv[1] in ("-h", "--help", "help")):
        # a group word alone or with --help (`sphere viz --help`, `sphere bench`): its sub-commands
        print(f"usage: sphere {argv[0]} <command> [key=value ...]\n\ncommands:")
        for k in subs:
            print(f"  {' '.join(k):<16} {DESCRIPTIONS.get(k, '')}")
        print(f"\n`sphere {argv[0]} <command> --help` describes one.")
        sys.exit(0 if len(argv) > 1 else 2)
    if m is None:
        print(f"sphere: unknown command {' '.join(argv[:2])!r}\n" + _usage(), file=sys.stderr)
        sys.exit(2)
    key, rest = m
    config_name, target = HYDRA_COMMANDS[key]
    cdir = conf_dir()
    if any(a in ("-h", "--help") for a in rest):
        print(command_help(key, cdir))
        return
    rest = hydra_overrides(key, rest, cdir, note=lambda m: print(m, file=sys.stderr, flush=True))
    if any(a.startswith("construction=") for a in rest):  # one line naming the allowed ones
        from sphere.generate.constructions import check_construction_override  # defers sphere.generate (2 s)

        check_construction_override(rest, cdir)
    verbose = _verbose(rest)
    quiet_third_party(verbose)
    fn = _load(target)

    register()  # typed schemas of search/train/eval/... in Hydra's ConfigStore (checked by RunDirLock)
    sys.argv = ["sphere-" + "-".join(key), *rest]
    hydra.main(version_base="1.3", config_path=str(cdir), config_name=config_name)(_task(fn, verbose))()


if __name__ == "__main__":
    main()
