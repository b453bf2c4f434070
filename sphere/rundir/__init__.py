"""Run directories you can trust (issue #17): one writer at a time, and resume only what matches.

**One writer.** Every command that writes a run directory holds an exclusive ``fcntl.flock`` on
``<run dir>/.lock`` for as long as it runs (``RunDirLock``, a Hydra callback registered in conf/config.yaml:
taken in ``on_run_start``, before Hydra creates the directory, writes ``.hydra/`` or opens the job log; in a
multirun each job locks its own job directory in ``on_job_start``). A second process on the same directory
fails at once: ``run directory D is in use by PID N (started ...)``. The OS drops the lock when its process
dies, so a SIGKILLed run never leaves a stale lock; the ``.lock`` file itself stays (it only says who held
it last). The lock is taken by the driver process only: Ray actors, checker workers and vLLM engines never
write the run directory (they return their results to the driver).

**Resume only what matches.** A run directory records in ``signature.json`` everything that determines a
command's outputs (``generate_signature``, ``train_signature``, ``sphere.evaluation.harness.eval_signature``):
model names and content hashes of their weights, the data's hash, the search / scorer / stage / filter /
prompt settings, the seed, the DPO recipe. ``check_or_record(run_dir, command, sig)`` runs before any work;
when the recorded signature differs it raises ``SignatureMismatch`` naming every differing key (old -> new)
and the override, the config key ``resume``:

- ``auto`` (default): continue a matching run, refuse a different one;
- ``fresh``: move the command's old outputs aside to ``<run dir>/previous/<command>-<UTC time>/`` and
  start over in the same directory (always, even when the settings match);
- ``force``: continue with the old outputs anyway (deliberately mixing settings); the new signature is
  recorded, the old one kept under ``forced_over``.

A directory whose recorded signature has no outputs yet (a run that failed before writing any) is simply
re-signed.

The code lives in three modules; this package keeps every name importable as ``sphere.rundir.X``:
sphere/rundir/lock.py (the lock, the Hydra callback, the CLI error text), sphere/rundir/resume.py
(``signature.json``, resume modes, ``check_or_record``) and sphere/rundir/fingerprints.py (content hashes
and the per-command signatures).
"""

# ruff: noqa: F401 - re-exports

from __future__ import annotations

from sphere.rundir.fingerprints import (
    GENERATE_IGNORED,
    MODEL_FILE_NAMES,
    MODEL_FILE_SUFFIXES,
    TRAIN_IGNORED,
    check_generate,
    data_signature,
    file_sha256,
    generate_signature,
    model_dir_sha256,
    model_fingerprint,
    train_signature,
)
from sphere.rundir.lock import (
    RunDirInUse,
    RunDirLock,
    acquire,
    cli_errors,
    command_errors,
    describe_os_error,
    holder,
    is_held,
    locked,
    note_start,
    release,
    undo_failed_start,
)
from sphere.rundir.resume import (
    ABSENT,
    BOOKKEEPING,
    LOCK_NAME,
    PREVIOUS_DIR,
    RESUME_MODES,
    SIGNATURE_NAME,
    SignatureMismatch,
    check_or_record,
    default_mode,
    differences,
    flatten,
    forget_checks,
    mismatch_message,
    resume_mode,
    set_default_mode,
)

__all__ = [
    "RunDirInUse", "SignatureMismatch", "RunDirLock", "acquire", "release", "locked", "holder", "is_held",
    "check_or_record", "check_generate", "generate_signature", "train_signature", "model_fingerprint",
    "file_sha256", "resume_mode", "set_default_mode", "cli_errors", "command_errors", "describe_os_error",
]
