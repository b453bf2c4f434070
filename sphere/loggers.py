"""Experiment loggers: ``none`` (default) and ``wandb``.

W&B mode: ``online`` only when ``WANDB_API_KEY`` is set, otherwise ``offline`` (files under the run
directory, synced later with ``wandb sync``); ``disabled`` when asked. One run per job; a Hydra multirun
groups its jobs by sweep directory. Metric names are namespaced by the caller (``search/``, ``gen/``,
``train/``, ``eval/``). The API key is never logged: it is read by wandb itself from the environment and
the resolved config we log has every key that looks like a secret redacted.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

_SECRET = re.compile(r"(api[_-]?key|token|secret|password)", re.I)


def redact(obj: Any) -> Any:
    """A copy of a config dict with secret-looking keys replaced by '***'."""
    if isinstance(obj, dict):
        return {k: ("***" if _SECRET.search(str(k)) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
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


class WandbLogger:
    name = "wandb"

    def __init__(self, cfg_logger: Any, run_dir: Path, config: dict, job_name: str):
        import wandb

        mode = str(cfg_logger.get("mode", "auto"))
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        if mode not in ("online", "offline", "disabled"):
            raise ValueError(f"config logger.mode={mode!r}: allowed auto | online | offline | disabled")
        group = cfg_logger.get("group") or None
        try:
            from hydra.core.hydra_config import HydraConfig

            hc = HydraConfig.get()
            if group is None and hc.mode is not None and str(hc.mode).endswith("MULTIRUN"):
                group = Path(hc.sweep.dir).name
        except Exception:
            pass
        self._wandb = wandb
        self.run = wandb.init(
            project=str(cfg_logger.get("project", "sphere")),
            entity=cfg_logger.get("entity") or None,
            name=cfg_logger.get("name_prefix", "") + job_name,
            group=group,
            dir=str(run_dir),
            mode=mode,
            config=redact(config),
            tags=list(cfg_logger.get("tags", []) or []),
            reinit="finish_previous",
        )

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        self.run.log({key: self._wandb.Table(columns=columns, data=rows)})

    def log_artifact(self, path: str | os.PathLike, name: str, type_: str) -> None:
        art = self._wandb.Artifact(name=re.sub(r"[^A-Za-z0-9_.-]", "-", name), type=type_)
        art.add_file(str(path))
        self.run.log_artifact(art)

    def finish(self) -> None:
        self.run.finish()


def make_logger(cfg: Any, run_dir: str | os.PathLike, job_name: str) -> NullLogger | WandbLogger:
    """The logger selected by ``cfg.logger.name`` (conf/logger/)."""
    lcfg = cfg.get("logger") if hasattr(cfg, "get") else None
    name = str(lcfg.get("name", "none")) if lcfg is not None else "none"
    if name == "none":
        return NullLogger()
    if name == "wandb":
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
        return WandbLogger(lcfg, Path(run_dir), config, job_name)
    raise ValueError(f"config logger.name={name!r}: allowed none | wandb")
