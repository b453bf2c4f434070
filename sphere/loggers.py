"""Experiment loggers: ``none`` (default) and ``wandb``.

W&B mode (``logger.mode``): ``auto`` = ``$WANDB_MODE`` when set, else ``online`` when ``WANDB_API_KEY`` is
set, else ``offline`` (files under ``<run dir>/wandb/``, synced later with ``wandb sync``); or
``online`` | ``offline`` | ``disabled`` explicitly. One run per job: a Hydra multirun gives one run per
job (named ``<job>-<job number>``, with the job's overrides as run notes) grouped by ``logger.group``, else
``$WANDB_RUN_GROUP``, else its sweep directory.
Metric names are namespaced by the caller (``search/``, ``gen/``, ``train/``, ``eval/``).

The API key is never logged: wandb reads it from the environment itself, and the resolved config we
log has every secret by key name (``is_secret_key``: ``api_key``, ``token``, ``*_token``, ``secret``,
``password``, ``WANDB_API_KEY``, ``HF_TOKEN``, ... but not counts such as ``max_step_tokens``), every
secret-shaped value (``is_secret_value``: a 40-hex W&B key, ``hf_...``, ``sk-...``, ``ghp_...``, ``AKIA...``)
and every value containing a secret environment variable's value replaced by ``***``.
``sphere.wandb_runs.read_offline_run`` reads an offline run back (the tests use it to check what was recorded).
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from sphere.io import atomic_write_text

MODES = ("auto", "online", "offline", "disabled")

# Secrets by key name, matched on the key's last segments (split at `.`, `_`, `-`), never by substring:
# `token`, `hf_token`, `WANDB_API_KEY`, `client_secret`, `db_password` are secrets; `max_step_tokens`,
# `tokenizer`, `token_budget` and a tokenizer's `eos_token` are not.
_SECRET_WORDS = {"token", "secret", "password", "passwd", "passphrase", "credential", "credentials",
                 "apikey", "authorization", "cookie"}
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("secret", "key"), ("private", "key"), ("auth", "key"),
                 ("client", "secret"), ("session", "key"), ("signing", "key")}
# `<x>_token` keys that name a tokenizer's special token, not a credential
_SPECIAL_TOKENS = {"pad", "eos", "bos", "unk", "sep", "cls", "mask", "reward", "step", "stop", "start", "end",
                   "special", "image", "audio", "think", "answer"}
# Secrets by value shape (whole value, or one word of a longer string for the prefixed kinds)
_SECRET_VALUE = re.compile(
    r"(?<![A-Za-z0-9_-])(hf_[A-Za-z0-9]{30,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{30,}"
    r"|github_pat_[A-Za-z0-9_]{30,}|xox[abpr]-[A-Za-z0-9-]{20,}|AKIA[0-9A-Z]{16})(?![A-Za-z0-9_-])")
_HEX40 = re.compile(r"[0-9a-fA-F]{40}")  # a W&B API key (also a git commit id: see _HASH_KEY)
_HASH_KEY = re.compile(r"(sha\d*|hash|digest|revision|commit|checksum)$", re.I)


def _key_words(key: str) -> list[str]:
    last = str(key).lstrip("+~").rsplit(".", 1)[-1]
    return [w for w in re.split(r"[_\-\s]+", last.lower()) if w]


def is_secret_key(key: Any) -> bool:
    """A config key or environment variable name that holds a secret (see ``_SECRET_WORDS``)."""
    words = _key_words(str(key))
    if not words:
        return False
    if words[-1] in _SECRET_WORDS:
        if words[-1] == "token" and len(words) >= 2 and words[-2] in _SPECIAL_TOKENS:
            return False
        return True
    return len(words) >= 2 and (words[-2], words[-1]) in _SECRET_PAIRS


def is_secret_value(value: Any, key: Any = "") -> bool:
    """A string shaped like a credential: a 40-hex W&B key (unless its key names a hash or revision), an
    ``hf_``, ``sk-``, ``ghp_``, ``github_pat_``, Slack or AWS access key anywhere in it."""
    if not isinstance(value, str):
        return False
    v = value.strip()
    if _HEX40.fullmatch(v) and not _HASH_KEY.search(str(key)):
        return True
    return _SECRET_VALUE.search(v) is not None


def _secret_env_values() -> set[str]:
    """Values of environment variables whose names are secrets (WANDB_API_KEY, HF_TOKEN, ...)."""
    return {v for k, v in os.environ.items() if is_secret_key(k) and len(v) >= 8}


def redact(obj: Any, _secrets: set[str] | None = None, _key: Any = "") -> Any:
    """A copy of a config dict (or override list) with secrets replaced by '***': values under secret
    key names (``is_secret_key``), secret-shaped values (``is_secret_value``) and values containing a
    secret environment variable's value. Other keys and values are kept as they are."""
    secrets = _secret_env_values() if _secrets is None else _secrets
    if isinstance(obj, dict):
        return {k: ("***" if is_secret_key(k) and obj[k] is not None else redact(v, secrets, k))
                for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v, secrets, _key) for v in obj]
    if isinstance(obj, str):
        key, eq, val = obj.partition("=")  # a command-line override: backend.api_key=...
        if eq and re.fullmatch(r"[+~]{0,2}[\w.@/-]+", key):
            if is_secret_key(key) or is_secret_value(val, key) or any(s in val for s in secrets):
                return f"{key}=***"
            return obj
        if any(s in obj for s in secrets) or is_secret_value(obj, _key):
            return "***"
    return obj


class NullLogger:
    name = "none"

    def log(self, metrics: dict, step: int | None = None) -> None:
        pass

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, name: str, type_: str) -> None:
        pass

    def finish(self) -> None:
        pass

    close = finish


def resolve_mode(mode: str) -> str:
    """``logger.mode`` -> the wandb mode actually used (see the module docstring)."""
    mode = str(mode)
    if mode not in MODES:
        raise ValueError(f"config logger.mode={mode!r}: allowed {' | '.join(MODES)}")
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env:
        if env in ("dryrun",):
            return "offline"
        if env not in MODES[1:]:
            raise ValueError(f"environment WANDB_MODE={env!r} (used by logger.mode=auto): "
                             "allowed online | offline | disabled")
        return env
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def hydra_job_identity() -> dict[str, Any]:
    """Group / job number / overrides of the current Hydra job ({} outside Hydra)."""
    try:
        hc = HydraConfig.get()
    except Exception:
        return {}
    out: dict[str, Any] = {"overrides": list(hc.overrides.task or [])}
    if hc.mode is not None and str(hc.mode).endswith("MULTIRUN"):
        sweep = Path(str(hc.sweep.dir))
        # parent/name: `sphere sweep` writes <dir>/<block>, plain multiruns <job>/<timestamp>
        out["group"] = f"{sweep.parent.name}/{sweep.name}" if sweep.parent.name else sweep.name
        out["num"] = int(hc.job.num)
    return out


def run_group(cfg_logger: Any, ident: dict[str, Any]) -> str | None:
    """W&B run group: ``logger.group``, else ``$WANDB_RUN_GROUP`` (a driver such as `sphere sweep` can set
    it to put all its multiruns in one group), else the Hydra sweep directory of a multirun job."""
    return cfg_logger.get("group") or os.environ.get("WANDB_RUN_GROUP") or ident.get("group") or None


class WandbLogger:
    name = "wandb"

    def __init__(self, cfg_logger: Any, run_dir: Path, config: dict, job_name: str):
        import wandb

        mode = resolve_mode(cfg_logger.get("mode", "auto"))
        ident = hydra_job_identity()
        group = run_group(cfg_logger, ident)
        name = str(cfg_logger.get("name_prefix", "") or "") + job_name
        if "num" in ident:
            name += f"-{ident['num']}"
        notes = " ".join(redact(ident.get("overrides") or [])) or None
        self._wandb = wandb
        self.mode = mode
        self.table_rows = int(cfg_logger.get("log_pairs_table", 32))  # sample-table rows per stage
        run_dir.mkdir(parents=True, exist_ok=True)
        # wandb records the command line (sys.argv) in the run's metadata: a secret passed as an override
        # (+logger.api_key=...) would be stored in the run file and uploaded; it sees the redacted argv.
        argv, sys.argv = sys.argv, [str(a) for a in redact(list(sys.argv))]
        try:
            self.run = wandb.init(
                project=str(cfg_logger.get("project", "sphere")),
                entity=cfg_logger.get("entity") or None,
                name=name,
                group=group,
                notes=notes,
                dir=str(run_dir),
                mode=mode,
                config=redact(config),
                tags=list(cfg_logger.get("tags", []) or []),
                reinit="finish_previous",
                # non-interactive logs (CI, SLURM) get wandb's essentials only, not its banners
                settings=wandb.Settings(quiet=not sys.stderr.isatty()),
            )
        finally:
            sys.argv = argv

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        self.run.log({key: self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def log_artifact(self, path: str | os.PathLike, name: str, type_: str) -> None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"log_artifact: {path} is not a file")
        art = self._wandb.Artifact(name=re.sub(r"[^A-Za-z0-9_.-]", "-", name), type=type_)
        art.add_file(str(path))
        self.run.log_artifact(art)

    def finish(self) -> None:
        self.run.finish()
        # wandb-core writes the offline transaction log asynchronously and may still be flushing when
        # finish() returns; tearing the service down waits for it, so the run's files are complete when
        # the job ends (a later job in the same process starts a fresh service).
        if self.mode != "disabled":
            self._wandb.teardown()

    close = finish


def make_logger(cfg: Any, run_dir: str | os.PathLike, job_name: str) -> NullLogger | WandbLogger:
    """The logger selected by ``cfg.logger.name`` (conf/logger/)."""
    lcfg = cfg.get("logger") if hasattr(cfg, "get") else None
    name = str(lcfg.get("name", "none")) if lcfg is not None else "none"
    if name == "none":
        return NullLogger()
    if name == "wandb":
        try:
            config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
        except Exception:  # an interpolation that needs a live Hydra app (outside `sphere <cmd>`)
            config = OmegaConf.to_container(cfg, resolve=False)
        return WandbLogger(lcfg, Path(run_dir), config, job_name)
    raise ValueError(f"config logger.name={name!r}: allowed none | wandb")


class RedactHydraFiles(Callback):
    """Hydra callback (conf/config.yaml ``hydra.callbacks``): Hydra saves the composed config and the
    command-line overrides to ``<run dir>/.hydra/*.yaml`` before the job starts; a secret passed as an
    override (``+logger.api_key=...``) would sit there in clear. ``on_job_start`` runs right after the
    save and rewrites those files through ``redact`` (tests/test_security.py), and in a multirun the
    sweep directory's ``multirun.yaml``, which the sweeper saved before the first job."""

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        paths = []
        hydra_dir = config.hydra.get("output_subdir")
        if hydra_dir:
            d = Path(config.hydra.runtime.output_dir) / str(hydra_dir)
            paths += [d / name for name in ("config.yaml", "hydra.yaml", "overrides.yaml")]
        if str(config.hydra.get("mode", "")).endswith("MULTIRUN"):  # the sweeper saved it before any job
            paths.append(Path(str(config.hydra.sweep.dir)) / "multirun.yaml")
        for p in paths:
            if p.is_file():
                data = OmegaConf.to_container(OmegaConf.load(p), resolve=False)
                atomic_write_text(p, OmegaConf.to_yaml(OmegaConf.create(redact(data))))


def override_secret_values(args: list[str]) -> set[str]:
    """The secret values a command line carries: the value of every ``key=value`` override whose key names
    a secret (``is_secret_key``) or whose value is shaped like one (``is_secret_value``), as typed and
    unquoted, plus the secret environment variables' values. ``RedactingStream`` hides them."""
    found = set(_secret_env_values())
    for a in args:
        key, eq, val = str(a).partition("=")
        if not eq or not re.fullmatch(r"[+~]{0,2}[\w.@/-]+", key):
            continue
        if is_secret_key(key) or is_secret_value(val, key):
            plain = val.strip().strip("'\"")
            for v in (val, plain, *plain.split(",")):  # a sweep a,b: each job gets one
                # a multirun prints each job's overrides with Hydra's escapes (`\:`), inside a list's repr
                esc = re.sub(r"([\\()\[\]{}:=, ])", r"\\\1", v)
                for w in (v, esc, esc.replace("\\", "\\\\")):
                    if len(w) >= 4 and w.lower() not in ("null", "none", "true", "false", "***"):
                        found.add(w)
        found.update(m.group(0) for m in _SECRET_VALUE.finditer(val))
    return found


class RedactingStream:
    """A text stream (sys.stdout / sys.stderr) that writes every known secret value as ``***``. Hydra prints
    a failed job's overrides in clear ("Error executing job with overrides: [...]"), tracebacks and log
    lines may repeat a value: with the console streams wrapped, nothing the process prints carries one."""

    def __init__(self, stream: Any, secrets: set[str]):
        self._stream = stream
        self._secrets = sorted(secrets, key=len, reverse=True)  # longest first: a value inside another

    def _clean(self, s: str) -> str:
        for v in self._secrets:
            if v in s:
                s = s.replace(v, "***")
        return s

    def write(self, s: str) -> int:
        self._stream.write(self._clean(s) if isinstance(s, str) else s)
        return len(s)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


# The secret values of this process's command line and environment (``redact_console`` fills it): the
# console streams and the job log's file handler (``RedactSecrets``) write each as ``***``.
CONSOLE_SECRETS: set[str] = set()


def redact_console(args: list[str]) -> None:
    """Wrap sys.stdout and sys.stderr in ``RedactingStream`` for the secrets of ``args`` (a no-op when the
    command line and the environment carry none). Call before Hydra configures logging: its handlers then
    write through the wrapped streams; the job log file filters through ``RedactSecrets``."""
    secrets = override_secret_values(args)
    CONSOLE_SECRETS.update(secrets)
    if not secrets:
        return
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream, secrets))


class RedactSecrets:
    """A logging filter (conf/config.yaml ``hydra.job_logging``, on the job log's file handler, which does not
    write through the redacted console streams): the record's message and its traceback, formatted here,
    with every secret of ``CONSOLE_SECRETS`` (and the secret environment variables) written as ``***``."""

    def filter(self, record: Any) -> bool:
        secrets = CONSOLE_SECRETS | _secret_env_values()
        if not secrets:
            return True
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        elif record.exc_text:
            msg += "\n" + record.exc_text
        if record.stack_info:
            msg += "\n" + record.stack_info
        clean = RedactingStream(None, secrets)._clean(msg)
        record.msg, record.args, record.exc_info, record.exc_text, record.stack_info = clean, (), None, None, None
        return True
