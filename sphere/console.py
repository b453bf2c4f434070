"""Third-party notices on the console (sphere.cli): the job log, not the console. ``route_third_party`` keeps
sphere's own lines and errors on the console (``SphereOnConsole``) and sends library notices (vLLM, Python
warnings, W&B, Ray) to the job's log file; ``QUIET_ENV`` tells Ray and vLLM that it did."""

from __future__ import annotations

import atexit
import json
import logging
import os
import tempfile
from typing import Any


class SphereOnConsole:
    """A logging filter for the console handler (``route_third_party``): sphere's own records, and any
    library's errors, reach the console; every other library's notices (vLLM's start-up warnings, Python
    warnings, W&B's, Hydra's) go to the job log file only."""

    def filter(self, record: Any) -> bool:
        name = record.name
        return name == "sphere" or name.startswith("sphere.") or record.levelno >= logging.ERROR


# vLLM configures its own "vllm" logger in every process it starts (engine core, workers) from this file
# (VLLM_LOGGING_CONFIG_PATH): a handler appending to the job log, secrets filtered as in the job log's own.
def _vllm_logging_config(log_file: str, level: str) -> dict:
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"plain": {
            "format": "[%(asctime)s][%(name)s][%(levelname)s] - (pid %(process)d) %(message)s"}},
        "filters": {"redact": {"()": "sphere.loggers.RedactSecrets"}},
        "handlers": {"job_log": {"class": "logging.FileHandler", "filename": log_file, "formatter": "plain",
                                 "level": level, "delay": True, "filters": ["redact"]}},
        "loggers": {"vllm": {"handlers": ["job_log"], "level": level, "propagate": False}},
    }


# set by route_third_party when third-party notices go to the job log (read by
# sphere.scale.cluster.ray_init_kwargs)
QUIET_ENV = "SPHERE_THIRD_PARTY_LOG"


def route_third_party(verbose: bool) -> str | None:
    """Third-party notices go to the job's log file (<run dir>/<job>.log, the root logger's file handler that
    Hydra configured), not the console, unless ``verbose``: the console handler keeps sphere's own lines and
    errors (``SphereOnConsole``); Python warnings become log records (``logging.captureWarnings``); vLLM's
    loggers in this and its child processes append to the job log (``VLLM_LOGGING_CONFIG_PATH``); W&B is
    silent (``WANDB_SILENT``); Ray logs at WARNING and keeps the actors' output in its session logs
    (``runner.log_to_driver: auto``). Settings the user made in the environment win. Returns the job log's path."""
    if verbose:
        return None
    root = logging.getLogger()
    log_file = None
    for h in root.handlers:
        if isinstance(h, logging.FileHandler):
            log_file = h.baseFilename
        elif isinstance(h, logging.StreamHandler) and not any(isinstance(f, SphereOnConsole)
                                                              for f in h.filters):
            h.addFilter(SphereOnConsole())
    if log_file is None:  # not under Hydra's logging (a library call): leave the console as it is
        return None
    # captureWarnings(True) does nothing while logging believes it already captures; a caller that restored
    # warnings.showwarning since (warnings.catch_warnings, pytest) left it believing so: start over
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    os.environ.setdefault("WANDB_SILENT", "true")
    # Ray (sphere/scale/cluster.py): INFO lines and the actors' output stay off
    os.environ[QUIET_ENV] = log_file
    # child processes (vLLM's engine core and workers) print library FutureWarnings straight to their stderr
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    if "VLLM_LOGGING_CONFIG_PATH" not in os.environ and os.environ.get("VLLM_CONFIGURE_LOGGING", "1") != "0":
        fd, path = tempfile.mkstemp(prefix="sphere-vllm-logging-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(_vllm_logging_config(log_file, os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")), f)
        os.environ["VLLM_LOGGING_CONFIG_PATH"] = path

        def _remove(p: str = path) -> None:
            try:
                os.unlink(p)
            except OSError:
                pass

        atexit.register(_remove)
    return log_file
