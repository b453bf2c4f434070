"""Run directories you can trust (issue #17, sphere/rundir/): one writer per run directory (an flock on
``<run dir>/.lock`` that dies with its process), and a rerun resumes only outputs of the same settings
(``signature.json``; ``resume=auto|fresh|force``).

The CLI tests run the real `sphere` command in child processes on the mini world (CPU, seconds each).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}


def _sphere(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sphere.cli", *args], capture_output=True, text=True,
                          env=_env(), timeout=timeout, cwd=ROOT)


def _start(*args: str, log: Path) -> subprocess.Popen:
    f = open(log, "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "sphere.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                            env=_env(), cwd=ROOT, start_new_session=True)


def _wait(cond, proc: subprocess.Popen | None = None, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before the condition held")
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def _lines(p: Path) -> int:
    return p.read_bytes().count(b"\n") if p.exists() else 0


# ============================================================================================ A: the lock
_HOLDER = """
import sys, time
from sphere import rundir
rundir.acquire(sys.argv[1], "holder")
print("held", flush=True)
time.sleep(600)
"""


def test_lock_is_exclusive_names_the_holder_and_dies_with_it(tmp_path):
    from sphere import rundir

    d = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(d)], stdout=subprocess.PIPE, text=True,
                              env=_env(), cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(rundir.RunDirInUse) as ei:
            rundir.acquire(d, "test")
        msg = str(ei.value)
        assert f"run directory {d} is in use by PID {holder.pid} (started " in msg and "`sphere holder`" in msg
        assert not rundir.is_held(d)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # SIGKILL: the OS dropped the lock; no stale lock to clean up
    with rundir.locked(d, "test"):
        assert rundir.is_held(d)
        assert rundir.holder(d)["pid"] == os.getpid()
        with rundir.locked(d, "test"):  # re-entrant within one process
            assert rundir.is_held(d)
        assert rundir.is_held(d)
    assert not rundir.is_held(d)


def _gen_args(out: Path, *extra: str) -> list[str]:
    return ["generate", "data.mini_n=96", "output.snapshot_every=0", *extra, f"hydra.run.dir={out}"]


@pytest.mark.slow
def test_second_sphere_generate_on_the_same_dir_fails_at_once_and_a_killed_one_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "gen"
    first = _start(*_gen_args(out), log=tmp_path / "first.log")
    try:
        _wait(lambda: _lines(out / "stages" / "stage1.jsonl") >= 1, first)  # searching, lock held
        t0 = time.monotonic()
        second = _sphere(*_gen_args(out, "seed=1"), timeout=120)
        took = time.monotonic() - t0
        assert second.returncode != 0, second.stdout[-2000:]
        assert f"run directory {out} is in use by PID {first.pid} (started " in second.stderr, second.stderr
        assert took < 60, took  # at once: no model load, no waiting
        assert first.poll() is None  # the first writer is untouched ...
        assert "seed=1" not in (out / ".hydra" / "overrides.yaml").read_text()  # ... and so is its record
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL
    rerun = _sphere(*_gen_args(out))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (out / "pairs.jsonl").is_file() and json.loads((out / ".lock").read_text())["pid"] != first.pid


def test_multirun_jobs_lock_their_own_job_dirs(tmp_path):
    """Each job of a multirun holds its own job directory's lock: a job directory held by another process
    stops the sweep with that process named."""
    sweep = tmp_path / "sweep"
    args = ["eval", "-m", "backend=replay", "replay.references=true", "limit=2", "seed=0,1",
            f"hydra.sweep.dir={sweep}"]
    ok = _sphere(*args)
    assert ok.returncode == 0, ok.stderr[-3000:]
    for job in ("0", "1"):
        assert json.loads((sweep / job / ".lock").read_text())["command"] == "eval"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(sweep / "1")], stdout=subprocess.PIPE,
                              text=True, env=_env(), cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = _sphere(*args)
        assert busy.returncode != 0
        assert f"run directory {sweep / '1'} is in use by PID {holder.pid}" in busy.stderr, busy.stderr[-2000:]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_ray_driver_runs_under_the_command_lock(tmp_path, monkeypatch):
    """`runner=ray` runs its driver (the only writer of the run directory: actors return their records) inside
    `sphere generate`'s process, under the lock the command took."""
    import sphere.scale.ray_runner as rr
    from sphere import rundir
    from sphere.cli import main

    seen = {}

    def fake_generate(cfg, out):  # the Ray driver, as the runner seam calls it (sphere/runners.py RayRunner)
        seen["held"] = rundir.is_held(out)
        seen["holder"] = rundir.holder(out)
        return {"pairs_per_stage": {}, "pairs_total": 0, "yield": 0.0, "engine_time_frac": 0.0,
                "leaves_per_call_frac": 0.0, "wall_s": 0.0, "backend_calls": 0, "tokens": 0,
                "mean_leaves_per_call": 0.0, "pruned": 0, "collisions": 0}

    monkeypatch.setattr(rr, "generate", fake_generate)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # sphere.cli.main sets it for Hydra
    out = tmp_path / "ray"
    main(["generate", "runner=ray", "data.mini_n=2", f"hydra.run.dir={out}"])
    assert seen == {"held": True, "holder": {**seen["holder"], "pid": os.getpid(), "command": "generate"}}
    assert not rundir.is_held(out)  # released when the command ends


# ====================================================================================== C: signatures
def test_check_or_record_refuses_names_keys_and_honours_fresh_and_force(tmp_path):
    from sphere import rundir

    rundir.forget_checks()
    d = tmp_path / "run"
    sig = {"search": {"expansions": 5, "temperature": 0.7}, "model": {"policy": {"sha256": "aa"}}, "seed": 0}
    assert rundir.check_or_record(d, "generate", sig) == "new"
    (d / "pairs.jsonl").write_text('{"x": 1}\n')
    rundir.forget_checks()
    assert rundir.check_or_record(d, "generate", sig) == "match"
    other = {**sig, "search": {"expansions": 3, "temperature": 0.7}, "model": {"policy": {"sha256": "bb"}}}
    with pytest.raises(rundir.SignatureMismatch) as ei:
        rundir.check_or_record(d, "generate", other)
    msg = str(ei.value)
    assert "search.expansions: 5 -> 3" in msg and "model.policy.sha256: 'aa' -> 'bb'" in msg
    assert "temperature" not in msg and "resume=fresh" in msg and "resume=force" in msg
    assert (d / "pairs.jsonl").read_text() == '{"x": 1}\n'  # refused before anything changed
    # force: continue deliberately; the old signature is kept on record
    assert rundir.check_or_record(d, "generate", other, mode="force") == "forced"
    rec = json.loads((d / "signature.json").read_text())["generate"]
    assert rec["signature"]["search.expansions"] == 3 and rec["forced_over"][0]["search.expansions"] == 5
    # fresh: the old outputs move to previous/, the directory starts over
    rundir.forget_checks()
    assert rundir.check_or_record(d, "generate", sig, mode="fresh") == "fresh"
    assert not (d / "pairs.jsonl").exists()
    moved = list((d / "previous").glob("generate-*/pairs.jsonl"))
    assert len(moved) == 1 and moved[0].read_text() == '{"x": 1}\n'
    # a recorded signature without outputs (a run that failed early) is simply replaced
    rundir.forget_checks()
    assert rundir.check_or_record(d, "generate", other) == "new"
    assert json.loads((d / "signature.json").read_text())["generate"]["signature"]["search.expansions"] == 3
    # two commands share one directory (a round of `sphere run`): separate entries, own outputs
    assert rundir.check_or_record(d, "eval", {"model": "m"}, outputs=["eval"]) == "new"
    assert set(json.loads((d / "signature.json").read_text())) == {"generate", "eval"}
    with pytest.raises(ValueError, match="resume='later'"):
        rundir.resume_mode("later")


def _mini_train_dir(tmp_path: Path) -> Path:
    """A finished `sphere train` directory: the mini policy, 12 pairs of the tiny test format, 2 steps."""
    from test_train_dpo import make_pairs, write_jsonl

    pairs = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(12))
    out = tmp_path / "train"
    r = _sphere("train", f"pairs={pairs}", "train.max_steps=2", "train.batch_size=4", "train.lora.r=4",
                f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.slow
def test_sphere_train_refuses_other_pairs_and_recipe_on_a_finished_dir(tmp_path):
    """Before: `sphere train pairs=OTHER train.lr=1e-3` on a finished dir printed "merged is complete, skipping
    training" and kept the old weights."""
    from test_train_dpo import make_pairs, write_jsonl

    out = _mini_train_dir(tmp_path)
    weights = (out / "merged" / "model.safetensors").read_bytes()
    other = write_jsonl(tmp_path / "other.jsonl", make_pairs(12, seed=1))
    r = _sphere("train", f"pairs={other}", "train.max_steps=2", "train.batch_size=4", "train.lora.r=4",
                "train.lr=1e-3", f"hydra.run.dir={out}")
    assert r.returncode != 0
    assert "written with different settings" in r.stderr and "pairs_sha256" in r.stderr, r.stderr[-3000:]
    assert "train.lr: 0.0005 -> 0.001" in r.stderr and "resume=fresh" in r.stderr
    assert (out / "merged" / "model.safetensors").read_bytes() == weights
    assert "lr=1e-3" not in (out / ".hydra" / "overrides.yaml").read_text()  # the record still fits merged/
    # the same settings: reused as before
    same = _sphere("train", f"pairs={tmp_path / 'pairs.jsonl'}", "train.max_steps=2", "train.batch_size=4",
                   "train.lora.r=4", f"hydra.run.dir={out}")
    assert same.returncode == 0 and (out / "merged" / "model.safetensors").read_bytes() == weights
    # resume=fresh: the old result moves aside and the new recipe trains
    fresh = _sphere("train", f"pairs={other}", "train.max_steps=2", "train.batch_size=4", "train.lora.r=4",
                    "train.lr=1e-3", "resume=fresh", f"hydra.run.dir={out}")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert list((out / "previous").glob("train-*/merged/model.safetensors"))
    sig = json.loads((out / "signature.json").read_text())["train"]["signature"]
    assert sig["train.lr"] == 0.001


@pytest.mark.slow
def test_sphere_generate_refuses_other_model_and_search_on_a_finished_dir(tmp_path, tiny_model_dir):
    """Before: `sphere generate model=OTHER search.expansions=3` on a finished dir re-emitted the old pairs."""
    out = tmp_path / "gen"
    base = ["generate", "data.mini_n=8", "output.snapshot_every=0", f"hydra.run.dir={out}"]
    first = _sphere(*base)
    assert first.returncode == 0, first.stderr[-3000:]
    pairs = (out / "pairs.jsonl").read_bytes()
    hydra_cfg = (out / ".hydra" / "config.yaml").read_bytes()
    r = _sphere(*base, f"model={tiny_model_dir}", "search.expansions=3")
    assert r.returncode != 0
    assert "written with different settings" in r.stderr, r.stderr[-3000:]
    assert "search.expansions: 5 -> 3" in r.stderr and "model.policy.name: 'mini' -> <absent>" in r.stderr
    assert "model.policy.sha256" in r.stderr
    assert (out / "pairs.jsonl").read_bytes() == pairs
    assert (out / ".hydra" / "config.yaml").read_bytes() == hydra_cfg  # still describes the outputs
    forced = _sphere(*base, "search.expansions=3", "resume=force")
    assert forced.returncode == 0, forced.stderr[-3000:]
    rec = json.loads((out / "signature.json").read_text())["generate"]
    assert rec["signature"]["search.expansions"] == 3 and rec["forced_over"][0]["search.expansions"] == 5


def test_eval_records_its_signature_and_refuses_other_sampling(tmp_path):
    """`sphere eval` goes through the same mechanism: signature.json has an "eval" entry (the record
    signature's parts + the model hash); other settings are refused naming the key."""
    from sphere import rundir

    rundir.forget_checks()
    out = tmp_path / "ev"
    args = ["eval", "backend=replay", "replay.references=true", "limit=3", f"hydra.run.dir={out}"]
    assert _sphere(*args).returncode == 0
    sig = json.loads((out / "signature.json").read_text())["eval"]["signature"]
    assert sig["backend"] == "replay" and sig["sampling.max_tokens"] == 1024
    r = _sphere(*args, "max_tokens=7")
    assert r.returncode != 0 and "sampling.max_tokens: 1024 -> 7" in r.stderr, r.stderr[-2000:]
    assert "different settings" in r.stderr
    ok = _sphere(*args, "max_tokens=7", "resume=false")  # eval's older boolean: false = fresh
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert list((out / "previous").glob("eval-*/eval/mini.jsonl"))


def test_failed_command_leaves_no_new_run_dir(tmp_path):
    """A command that fails before writing any output removes the run directory it created (no directory
    holding only .hydra/, .lock, signature.json and an empty log)."""
    out = tmp_path / "run"
    r = _sphere("generate", f"data.problems={tmp_path / 'missing.jsonl'}", f"hydra.run.dir={out}")
    assert r.returncode != 0 and "missing.jsonl" in r.stderr
    assert not out.exists(), sorted(str(p) for p in out.rglob("*"))


def test_each_command_keeps_its_record_and_fresh_moves_it_with_the_outputs(tmp_path):
    """Issue #29: a second, different command into a run directory overwrote the first one's `.hydra` record,
    and `resume=fresh` moved the outputs to previous/ without the `signature.json` entry and `.hydra` record
    that describe them. Now each command's record is kept in `.hydra/<command>/`, and previous/<command>-*/
    holds the moved outputs with their signature entry and the `.hydra` they were written under."""
    import yaml

    from sphere import rundir

    rundir.forget_checks()
    out = tmp_path / "run"
    gen = _sphere("generate", "data.mini_n=2", "search.max_depth=2", f"hydra.run.dir={out}")
    assert gen.returncode == 0, gen.stderr[-3000:]
    ev = ["eval", "backend=replay", "replay.references=true", "limit=2", f"hydra.run.dir={out}"]
    r = _sphere(*ev)
    assert r.returncode == 0, r.stderr[-3000:]
    h = out / ".hydra"
    assert "data.mini_n=2" in yaml.safe_load((h / "generate" / "overrides.yaml").read_text())  # generate's kept
    assert yaml.safe_load((h / "generate" / "config.yaml").read_text())["data"]["mini_n"] == 2
    assert "limit=2" in yaml.safe_load((h / "eval" / "overrides.yaml").read_text())
    assert (h / "overrides.yaml").read_bytes() == (h / "eval" / "overrides.yaml").read_bytes()  # the latest on top

    r = _sphere(*ev, "max_tokens=7", "resume=fresh")
    assert r.returncode == 0, r.stderr[-3000:]
    (prev,) = list((out / "previous").glob("eval-*"))
    assert (prev / "eval" / "mini.jsonl").is_file()
    moved_sig = json.loads((prev / "signature.json").read_text())
    assert set(moved_sig) == {"eval"} and moved_sig["eval"]["signature"]["sampling.max_tokens"] == 1024
    moved_ovr = yaml.safe_load((prev / ".hydra" / "overrides.yaml").read_text())
    assert "limit=2" in moved_ovr and "max_tokens=7" not in moved_ovr  # the record of the moved outputs
    now = json.loads((out / "signature.json").read_text())
    assert now["eval"]["signature"]["sampling.max_tokens"] == 7 and "generate" in now
    assert "max_tokens=7" in yaml.safe_load((h / "eval" / "overrides.yaml").read_text())
    assert (out / "pairs.jsonl").is_file() and (h / "generate" / "config.yaml").is_file()  # generate untouched


def test_a_copied_run_dir_resumes_its_eval_by_model_content(tmp_path, tiny_model_dir):
    """Issue #29: a run directory moved or copied elsewhere (its checkpoint inside it) could not be resumed:
    the eval records and signature named the model by its absolute path. Now a local model directory counts
    by its content: the copy reuses every finished record; another model at the copy's path is refused."""
    import shutil

    rundir_a, rundir_b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_model_dir, rundir_a / "ckpt")
    args = ["eval", "backend=transformers", "benchmarks=[mini]", "limit=2", "max_tokens=8"]
    first = _sphere(*args, f"model={rundir_a / 'ckpt'}", f"hydra.run.dir={rundir_a}")
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.copytree(rundir_a, rundir_b)
    again = _sphere(*args, f"model={rundir_b / 'ckpt'}", f"hydra.run.dir={rundir_b}")
    assert again.returncode == 0, again.stderr[-3000:]
    runs = json.loads((rundir_b / "eval" / "results.json").read_text())["meta"]["runs"]
    assert runs["mini"]["generated"] == 0 and runs["mini"]["reused"] == 2, runs
    # other weights at the same path: not the same model, refused
    st = rundir_b / "ckpt" / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[-1] ^= 1
    st.write_bytes(bytes(data))
    other = _sphere(*args, f"model={rundir_b / 'ckpt'}", f"hydra.run.dir={rundir_b}")
    assert other.returncode != 0 and "different settings" in other.stderr, other.stderr[-2000:]


def test_a_record_from_before_a_key_existed_matches_only_the_old_behaviour(tmp_path):
    """Upgrading sphere adds signature keys (train.loss.weights, scorer.shared_prefix, ...): a record written
    without one matches the value that does what the older code did, and any other value is refused naming
    the key (sphere.rundir.resume.ADDED_KEYS)."""
    import json as _json

    from sphere.rundir.resume import SignatureMismatch, check_or_record

    (tmp_path / "pairs.jsonl").write_text("{}\n")  # an output, so a mismatch is refused
    old = {"train": {"lr": 1e-4, "loss": {"beta": 0.1}}, "scorer": {"name": "prm"}}
    check_or_record(tmp_path, "train", old)
    same = {"train": {"lr": 1e-4, "loss": {"beta": 0.1, "weights": None, "ld_alpha": None,
                                           "use_weighting": False, "discopop_tau": 0.05}},
            "scorer": {"name": "prm", "shared_prefix": "off", "shared_prefix_min": 16}}
    from sphere.rundir.resume import forget_checks

    forget_checks()
    assert check_or_record(tmp_path, "train", same) == "match"
    rec = _json.loads((tmp_path / "signature.json").read_text())["train"]["signature"]
    assert rec["scorer.shared_prefix"] == "off"  # re-recorded with the new keys
    (tmp_path / "signature.json").write_text(_json.dumps({"train": {"signature": {
        "train.lr": 1e-4, "train.loss.beta": 0.1, "scorer.name": "prm"}}}))
    forget_checks()
    changed = {**same, "scorer": {**same["scorer"], "shared_prefix": "kv"}}
    with pytest.raises(SignatureMismatch, match=r"\(scorer\.shared_prefix: <absent> -> 'kv'\)"):
        check_or_record(tmp_path, "train", changed)
