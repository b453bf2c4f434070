"""Crash safety (issue #11): `sphere generate`, `sphere eval` and `sphere run` killed with SIGKILL at random
points (seeded), rerun in the same directory until they finish, compared with an uninterrupted run.

Checked after the final rerun: nothing finished is lost or duplicated (problem ids per stage / benchmark equal
the clean run's, no id twice in any append-only log), every output file parses (JSON, JSONL, tree
snapshots), and where the run is deterministic the results are identical:

- `sphere eval` is greedy: results and completions equal the clean run's.
- `sphere generate` with ``search.temperature=0`` (greedy steps) gives the same stage records and pairs
  whatever the batch composition, so a resumed run equals the clean one. With sampling it is not
  deterministic across a resume: the transformers backend seeds torch once per backend call
  (``torch.manual_seed(seed)`` for the whole batch), so a prompt's sample depends on which other prompts
  share its call, and a resumed run batches differently. Sampled runs are checked for ids, no duplicates,
  internal consistency (every both-wrong problem has its stage-2 record, ...) and parsing only.
- `sphere run` (rounds=1): round 0's evaluation equals the clean run's; round 1 trains on sampled pairs, so
  it is checked for completeness and parsing.

The tiny test model never solves a problem, so with the real checker generation gives no pairs and
`sphere run` stops before training. Runs here go through this file as a script (``python
tests/test_crash.py <command> ...``), which installs ``fake_check_answers`` (a FakeHashVerifier: a completion
is "correct" when the first byte of its SHA-1 is even) and then runs the real CLI.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()
HANG_GUARD_S = 600  # a run that takes longer than this is hung (not a performance check)

def fake_check_answers(pairs, timeout_s=None):  # noqa: ARG001 - same signature as sphere.verify
    """FakeHashVerifier: deterministic per completion text, about half of all completions "correct"."""
    return [hashlib.sha1(c.encode("utf-8", "replace")).digest()[0] % 2 == 0 for c, _ in pairs]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _cmd(args: list[str], fake_verifier: bool) -> list[str]:
    if fake_verifier:
        return [sys.executable, str(THIS), *args]
    return [sys.executable, "-m", "sphere.cli", *args]


def _run(args: list[str], fake_verifier: bool, log: Path) -> None:
    with open(log, "ab") as f:
        proc = subprocess.run(_cmd(args, fake_verifier), stdout=f, stderr=subprocess.STDOUT, env=_env(),
                              cwd=ROOT, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, log.read_text(errors="replace")[-4000:]


def _run_and_kill(args: list[str], fake_verifier: bool, log: Path, ready: Callable[[], bool],
                  delay_s: float) -> bool:
    """Start the command; once ``ready()`` holds, wait ``delay_s`` and SIGKILL its whole process group.
    Returns True if it was killed, False if it finished first (it must then have succeeded)."""
    with open(log, "ab") as f:
        proc = subprocess.Popen(_cmd(args, fake_verifier), stdout=f, stderr=subprocess.STDOUT, env=_env(),
                                cwd=ROOT, start_new_session=True)
        deadline = time.monotonic() + HANG_GUARD_S
        try:
            while proc.poll() is None and not ready():
                if time.monotonic() > deadline:
                    raise AssertionError(f"hung: {args}")
                time.sleep(0.02)
            if proc.poll() is None:
                time.sleep(delay_s)
        finally:
            killed = proc.poll() is None
            if killed:
                os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its checker workers
            proc.wait()
    if not killed:
        assert proc.returncode == 0, log.read_text(errors="replace")[-4000:]
    else:
        with open(log, "a") as f:  # counted for the README: grep -c '^### SIGKILL' over the logs
            f.write(f"\n### SIGKILL {args[0]}\n")
    return killed


def _lines(*paths: Path) -> int:
    n = 0
    for p in paths:
        if p.exists():
            n += p.read_bytes().count(b"\n")
    return n


def _strict_jsonl(path: Path) -> list[dict]:
    """Every line of a finished file parses (a rerun repairs a torn tail before appending)."""
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), f"{path}: unterminated last line"
    return [json.loads(line) for line in data.split(b"\n") if line.strip()]


def _assert_all_outputs_parse(run_dir: Path) -> int:
    """JSON, JSONL and .npz files under run_dir (not Hydra's, not leftover temp files) all parse."""
    from sphere.viz.snapshot import load_tree_snapshot

    n = 0
    for p in run_dir.rglob("*"):
        if not p.is_file() or p.name.startswith(".") or ".hydra" in p.parts:
            continue
        if p.suffix == ".jsonl":
            _strict_jsonl(p)
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".npz":
            load_tree_snapshot(p)
        else:
            continue
        n += 1
    return n


# ---------------------------------------------------------------------------------------------- generate
def _gen_args(model: Path, out: Path, temperature: float) -> list[str]:
    return ["generate", f"model={model}", f"model.small={model}", "backend=transformers", "data.mini_n=8",
            "search.max_depth=3", "search.max_step_tokens=24", f"search.temperature={temperature}",
            "search.batch_leaves=8", "output.snapshot_every=3", f"hydra.run.dir={out}"]


def _stage_files(out: Path) -> list[Path]:
    return [out / "stages" / f"stage{s}.jsonl" for s in (1, 2, 3)]


def _interrupt_generate(args: list[str], out: Path, log: Path, rng: random.Random, kills: int = 2) -> int:
    killed = 0
    for _ in range(kills):
        start = _lines(*_stage_files(out))
        threshold = start + rng.randint(0, 6)  # 0: kill while loading / in the first backend calls
        delay = rng.uniform(0.0, 0.6) if threshold > start else rng.uniform(2.0, 8.0)
        killed += _run_and_kill(args, True, log, lambda t=threshold: _lines(*_stage_files(out)) >= t, delay)
    _run(args, True, log)
    return killed


def _gen_state(out: Path) -> dict:
    recs = {}
    for s, p in zip((1, 2, 3), _stage_files(out), strict=False):
        rows = _strict_jsonl(p)
        ids = [r["problem_id"] for r in rows]
        assert len(ids) == len(set(ids)), f"{p}: duplicate problem ids {sorted(ids)}"
        recs[s] = {r["problem_id"]: r for r in rows}
    pairs = _strict_jsonl(out / "pairs.jsonl")
    keys = [(p["problem_id"], p["stage"]) for p in pairs]
    assert len(keys) == len(set(keys)), "a problem's pair written twice"
    stats = json.loads((out / "generate_stats.json").read_text())
    # internal consistency of the resumed logs: every routed problem has its follow-up record
    both_wrong = {i for i, r in recs[1].items() if r["route"] == "both_wrong"}
    both_right = {i for i, r in recs[1].items() if r["route"] == "both_right"}
    assert set(recs[2]) == both_wrong and set(recs[3]) == both_right
    assert stats["problems_done_stage1"] == len(recs[1]) and stats["pairs_total"] == len(pairs)
    assert {(p["problem_id"], p["stage"]) for p in pairs} <= {
        (i, s) for s in (1, 2, 3) for i, r in recs[s].items() if r["pairs"]}
    return {"recs": recs, "pairs": pairs, "stats": stats}


@pytest.fixture(scope="module")
def clean_generate_greedy(tiny_model_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gen_clean") / "run"
    _run(_gen_args(tiny_model_dir, out, 0.0), True, out.parent / "log.txt")
    return _gen_state(out)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, pytest.param(2, marks=pytest.mark.nightly)])  # seed 2: nightly (CI time)
def test_generate_greedy_killed_twice_equals_clean_run(seed, clean_generate_greedy, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = _gen_args(tiny_model_dir, out, 0.0)
    killed = _interrupt_generate(args, out, tmp_path / "log.txt", random.Random(seed))
    assert killed >= 1, "no kill landed before the run finished"
    got = _gen_state(out)
    want = clean_generate_greedy
    assert len(want["recs"][1]) == 8
    for s in (1, 2, 3):
        assert got["recs"][s].keys() == want["recs"][s].keys()
        for pid, r in want["recs"][s].items():  # the same searches, the same trees, the same pairs
            assert got["recs"][s][pid] == r, (s, pid)
    by_key = lambda ps: sorted(json.dumps(p, sort_keys=True) for p in ps)  # noqa: E731 - order = finish order
    assert by_key(got["pairs"]) == by_key(want["pairs"])
    assert _assert_all_outputs_parse(out) >= 6


@pytest.mark.slow
def test_generate_sampled_killed_keeps_every_finished_problem_once(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = _gen_args(tiny_model_dir, out, 0.8)
    rng = random.Random(3)
    killed = 0
    before: dict[int, dict] = {}
    for _ in range(2):
        threshold = _lines(*_stage_files(out)) + rng.randint(1, 6)
        killed += _run_and_kill(args, True, tmp_path / "log.txt",
                                lambda t=threshold: _lines(*_stage_files(out)) >= t, rng.uniform(0.0, 0.6))
        # what was committed before the kill is kept verbatim by the rerun (never redone, never doubled)
        for s, p in zip((1, 2, 3), _stage_files(out), strict=False):
            from sphere.io import read_jsonl_tolerant

            for r in read_jsonl_tolerant(p):
                before.setdefault(s, {})[r["problem_id"]] = r
    _run(args, True, tmp_path / "log.txt")
    assert killed >= 1
    got = _gen_state(out)
    assert len(got["recs"][1]) == 8
    for s, recs in before.items():
        for pid, r in recs.items():
            assert got["recs"][s][pid] == r
    assert _assert_all_outputs_parse(out) >= 6


# ---------------------------------------------------------------------------------------------- eval
def _eval_args(model: Path, out: Path) -> list[str]:
    return ["eval", "backend=transformers", f"model={model}", "benchmarks=[mini,gsm8k]", "limit=4",
            "max_tokens=24", "batch_size=1", f"hydra.run.dir={out}"]


@pytest.fixture(scope="module")
def clean_eval(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval_clean") / "run"
    _run(_eval_args(tiny_model_dir, out), False, out.parent / "log.txt")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, *(pytest.param(k, marks=pytest.mark.nightly) for k in (2, 3))])
def test_eval_killed_at_random_points_equals_clean_run(seed, clean_eval, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = _eval_args(tiny_model_dir, out)
    rng = random.Random(seed)
    files = [out / "eval" / "mini.jsonl", out / "eval" / "gsm8k.jsonl"]
    killed = 0
    for _ in range(2):
        threshold = _lines(*files) + rng.randint(0, 3)
        killed += _run_and_kill(args, False, tmp_path / "log.txt", lambda t=threshold: _lines(*files) >= t,
                                rng.uniform(0.0, 1.0))
    _run(args, False, tmp_path / "log.txt")
    assert killed >= 1
    res = json.loads((out / "eval" / "results.json").read_text())
    ref = json.loads((clean_eval / "eval" / "results.json").read_text())
    assert {k: v for k, v in res.items() if k != "meta"} == {k: v for k, v in ref.items() if k != "meta"}
    for b in ("mini", "gsm8k"):
        got = _strict_jsonl(out / "eval" / f"{b}.jsonl")
        want = {r["id"]: r for r in _strict_jsonl(clean_eval / "eval" / f"{b}.jsonl")}
        assert len(got) == len({r["id"] for r in got}) == len(want) == 4
        for r in got:
            w = want[r["id"]]
            assert r["completions"] == w["completions"] and r["verdict"] == w["verdict"]
    assert _assert_all_outputs_parse(out) >= 3


# ---------------------------------------------------------------------------------------------- run
def _run_args(model: Path, out: Path) -> list[str]:
    return ["run", "experiment=mini_planted", f"model={model}", f"model.small={model}", "backend=transformers",
            "rounds=1",
            "data.mini_n=8", "search.max_depth=3", "search.max_step_tokens=24", "eval.limit=3",
            "eval.max_tokens=24", "eval.batch_size=1", "train.max_steps=2", "train.batch_size=2",
            "stages.stage3=true",  # the mini default turns stage 3 off; the kills must hit all three stages
            f"hydra.run.dir={out}"]


@pytest.fixture(scope="module")
def clean_run(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run_clean") / "run"
    _run(_run_args(tiny_model_dir, out), True, out.parent / "log.txt")
    return out


def _phase_ready(out: Path, phase: str, rng: random.Random) -> Callable[[], bool]:
    gen = out / "round_1" / "generate" / "stages"
    if phase == "eval0":
        return lambda: (out / "round_0" / "eval" / "mini.jsonl").exists()
    if phase == "generate":
        t = rng.randint(1, 8)
        return lambda: _lines(*(gen / f"stage{s}.jsonl" for s in (1, 2, 3))) >= t
    if phase == "train":
        return lambda: (out / "round_1" / "generate" / "pairs.jsonl").exists()
    return lambda: (out / "round_1" / "train" / "merged" / "DONE").exists()  # eval of round 1


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, pytest.param(2, marks=pytest.mark.nightly)])
def test_run_killed_in_each_phase_completes_every_round(seed, clean_run, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = _run_args(tiny_model_dir, out)
    rng = random.Random(seed)
    phases = rng.sample(["eval0", "generate", "train", "eval1"], 2)
    phases.sort(key=["eval0", "generate", "train", "eval1"].index)
    killed = sum(_run_and_kill(args, True, tmp_path / "log.txt", _phase_ready(out, ph, rng),
                               rng.uniform(0, 1.5))
                 for ph in phases)
    _run(args, True, tmp_path / "log.txt")
    assert killed >= 1
    summary = json.loads((out / "summary.json").read_text())
    ref = json.loads((clean_run / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    assert summary["rounds"][0]["eval"] == ref["rounds"][0]["eval"]  # greedy eval of the same start policy
    assert summary["rounds"][1]["eval"]["mini"]["n"] == 3
    assert (out / "round_1" / "train" / "merged" / "DONE").is_file()
    st = _gen_state(out / "round_1" / "generate")
    assert len(st["recs"][1]) == 8
    assert summary["rounds"][1]["pairs_per_stage"] == st["stats"]["pairs_per_stage"]
    for r in (0, 1):
        rows = _strict_jsonl(out / f"round_{r}" / "eval" / "mini.jsonl")
        assert len(rows) == len({x["id"] for x in rows}) == 3
    assert _assert_all_outputs_parse(out) >= 10


@pytest.mark.slow
def test_run_rerun_with_other_settings_is_refused_per_round(clean_run, tiny_model_dir, tmp_path):
    """A finished `sphere run` directory rerun with another search: round 0's evaluation matches and is
    reused, round 1's generate directory refuses (naming itself and the key) before generating anything."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(clean_run, out)
    pairs = (out / "round_1" / "generate" / "pairs.jsonl").read_bytes()
    args = [*_run_args(tiny_model_dir, out), "search.expansions=3"]
    proc = subprocess.run(_cmd(args, True), capture_output=True, text=True, env=_env(), cwd=ROOT,
                          timeout=HANG_GUARD_S)
    assert proc.returncode != 0
    assert f"{out / 'round_1' / 'generate'}: the generate outputs here were written with different settings" \
        in proc.stderr and "search.expansions: 5 -> 3" in proc.stderr, proc.stderr[-3000:]
    assert (out / "round_1" / "generate" / "pairs.jsonl").read_bytes() == pairs
    for sub in ("round_0", "round_1", "round_1/generate", "round_1/train"):
        assert (out / sub / "signature.json").is_file(), sub


# ---------------------------------------------------------------------------------------------- train
def _train_args(model: Path, pairs: Path, out: Path) -> list[str]:
    # enough optimizer steps that a kill lands between checkpoints (every 4 steps, the last 2 kept)
    return ["train", f"model={model}", f"pairs={pairs}", "train.max_steps=30", "train.batch_size=2",
            "train.lora.r=4", "train.save_steps=4", "train.save_total_limit=2", "train.warmup_ratio=0.0",
            f"hydra.run.dir={out}"]


def _global_step(out: Path) -> int:
    return int(json.loads((out / "trainer_state.json").read_text())["global_step"])


@pytest.fixture(scope="module")
def train_pairs(tmp_path_factory) -> Path:
    from test_train_dpo import make_pairs, write_jsonl

    return write_jsonl(tmp_path_factory.mktemp("train_pairs") / "pairs.jsonl", make_pairs(16))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, pytest.param(2, marks=pytest.mark.nightly)])
def test_train_killed_after_a_checkpoint_resumes_to_the_same_step_count(seed, train_pairs, tiny_model_dir,
                                                                        tmp_path):
    """`sphere train` SIGKILLed mid-way (after at least one TRL checkpoint) resumes from the last complete
    checkpoint on rerun instead of starting over, and ends after the same number of optimizer steps as an
    uninterrupted run (trainer_state.json global_step)."""
    clean = tmp_path / "clean"
    _run(_train_args(tiny_model_dir, train_pairs, clean), False, tmp_path / "clean.log")
    want = _global_step(clean)
    assert want == 30 and not (clean / "trainer").exists()  # checkpoints are removed once merged/ is done

    out = tmp_path / "run"
    args = _train_args(tiny_model_dir, train_pairs, out)
    rng = random.Random(seed)
    ckpts = lambda: sorted((out / "trainer").glob("checkpoint-*/trainer_state.json"))  # noqa: E731
    killed = _run_and_kill(args, False, tmp_path / "log.txt", lambda: len(ckpts()) >= 1, rng.uniform(0.0, 0.3))
    assert killed, "the run finished before the kill"
    assert not (out / "merged" / "DONE").exists() and ckpts()
    _run(args, False, tmp_path / "log.txt")
    assert _global_step(out) == want
    m = json.loads((out / "train_metrics.json").read_text())
    assert m["steps"] == want and m["resumed_from_step"] is not None and m["resumed_from_step"] >= 4
    assert "resuming from" in (tmp_path / "log.txt").read_text()
    assert (out / "merged" / "DONE").is_file() and not (out / "trainer").exists()


if __name__ == "__main__":  # `python tests/test_crash.py <sphere command> ...`: the CLI with the fake checker
    import sphere.verify

    sphere.verify.check_answers = fake_check_answers
    from sphere.cli import main

    main(sys.argv[1:])
