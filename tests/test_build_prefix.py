"""CI's reproducibility check of the shipped checkpoints: bit-exact prefixes of their builds (issue #16).

The full from-scratch rebuilds (tests marked `nightly`, scripts/nightly.sh) take ~20 minutes; every CI run
instead replays the first optimizer steps of the same builds, schedules unchanged, and compares the weights
with assets/build_prefix_digests.json within a calibrated tolerance (another CPU sums floats in another
order: bit-exactness holds on one machine only; sphere/standins/build_prefix.py).
"""

from __future__ import annotations

import copy
import json

import pytest

from sphere.standins import build_prefix as B


@pytest.mark.slow
@pytest.mark.parametrize("which", sorted(B.BUILDS))
def test_build_prefix_reproduces_the_recorded_digests(tmp_path, which):
    """Run whatever the library versions: a newer torch/transformers/trl that changes the numbers fails here
    with the recorded and running versions named (compare), one that does not passes."""
    got = B.compute(which, tmp_path)
    assert B.compare(which, got) == []


def test_a_changed_weight_or_step_count_is_reported():
    rec = B.recorded()["builds"]["standin"]
    name = sorted(rec["fingerprint"])[0]
    tensor = sorted(rec["fingerprint"][name])[0]
    rms = rec["fingerprint"][name][tensor][0]

    def moved(by: float) -> dict:
        got = copy.deepcopy(rec)
        got["sha256"][name] = "0" * 64  # another machine: never bit-identical
        got["fingerprint"][name][tensor][1] += by * rms
        return got

    # another summation order moves a projection by ~1e-4 of the RMS: within the tolerance, reproduced
    assert B.compare("standin", moved(0.1 * B.REL_TOL)) == []
    # a real change (one optimizer step: ~7e-2) is reported, naming the model and the drift
    problems = B.compare("standin", moved(10 * B.REL_TOL))
    assert len(problems) >= 1 and name in problems[0] and "tolerance" in problems[0] and "0" * 64 in problems[0]
    assert B.compare("standin", {**rec, "steps": rec["steps"] + 1})[0].startswith("standin: prefix of")
    missing = copy.deepcopy(rec)
    missing["sha256"][name] = "0" * 64
    missing["fingerprint"][name].pop(tensor)
    assert B.compare("standin", missing), "a tensor missing from the weights is a difference"


def test_the_tolerance_sits_between_another_cpus_drift_and_one_step():
    cal = B.recorded()["calibration"]
    assert cal["rel_tol"] == B.REL_TOL and cal["loss_rel_tol"] == B.LOSS_REL_TOL
    for which in ("mini", "standin"):
        assert 3 * cal[which]["kernels_drift"] < B.REL_TOL < cal[which]["one_step"] / 10
        assert 3 * cal[which]["loss_kernels_drift"] < B.LOSS_REL_TOL < cal[which]["loss_one_step_off"] / 10


@pytest.mark.parametrize("which", sorted(B.BUILDS))
def test_a_changed_loss_curve_is_reported(which):
    rec = B.recorded()["builds"][which]
    assert set(rec["loss"]) == set(rec["sha256"]) and all(len(c) >= 2 for c in rec["loss"].values())
    assert B.compare(which, rec) == []
    name = sorted(rec["loss"])[-1]

    def moved(i: int, by: float) -> dict:
        got = copy.deepcopy(rec)
        got["loss"][name][i][1] *= 1 + by
        return got

    assert B.compare(which, moved(-1, 0.5 * B.LOSS_REL_TOL)) == []
    for i in (0, -1):
        (p,) = B.compare(which, moved(i, 2 * B.LOSS_REL_TOL))
        assert p.startswith(f"{which}/{name}: training loss curve differs from the recorded one by 0.002 of a loss")
    short = copy.deepcopy(rec)
    short["loss"][name].pop()
    (p,) = B.compare(which, short)
    assert "differs from the recorded one by inf" in p
    assert B.loss_drift([[1, 2.0], [2, 1.0]], [[1, 2.0], [2, 1.0]]) == 0.0
    assert B.loss_drift([[1, 2.2], [2, 1.0]], [[1, 2.0], [2, 1.1]]) == pytest.approx(0.1)
    assert B.loss_drift([[1, 2.0]], [[2, 2.0]]) == float("inf")


def test_stop_after_gives_the_full_runs_weights_at_that_step(tmp_path):
    """The prefix is a prefix: stopping after k steps (cosine schedule of the full run kept) saves exactly
    the weights the full run has after step k, and not the full run's final weights."""
    from test_mini_model import TINY

    from sphere.mini.pretrain import sha256_file
    from sphere.mini.training import train

    recipe = json.loads(json.dumps(TINY))
    recipe["train"].update(max_steps=6, lr_scheduler="cosine", warmup_steps=2)
    train(recipe, tmp_path / "full", progress=False, snapshots=(3,))
    train(recipe, tmp_path / "prefix", progress=False, stop_after=3)
    prefix = sha256_file(tmp_path / "prefix" / "model.safetensors")
    assert prefix == sha256_file(tmp_path / "full" / "step-3" / "model.safetensors")
    assert prefix != sha256_file(tmp_path / "full" / "model.safetensors")


def test_standin_sft_stop_after_keeps_the_schedule(monkeypatch):
    """sft(..., stop_after=k) runs k steps with the learning rates of the full schedule."""
    import torch

    from sphere.standins import qwen2_5 as S

    seen = []
    real = S._lr_at
    monkeypatch.setattr(S, "_lr_at", lambda step, total, warmup, lr: seen.append((step, total)) or
                        real(step, total, warmup, lr))
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.zeros(3))

    class Out:
        def __init__(self, loss):
            self.loss = loss

    model.forward = lambda input_ids, attention_mask, labels: Out((model.w.sum() - 1.0) ** 2)
    pools = [[([1, 2, 3], 1)] * 4]
    losses = S.sft(model, pools, steps=10, batch_size=2, lr=0.1, warmup=2, seed=0, pad_id=0, stop_after=4)
    assert len(losses) == 4 and seen == [(s, 10) for s in range(4)]


def test_nightly_tests_are_deselected_unless_asked_for():
    """The full rebuilds leave every run (deselected, not skipped: the skip gate sees nothing) unless
    --nightly or SPHERE_NIGHTLY=1 asks for them."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    node = "tests/test_standin.py::test_rebuild_reproduces_shipped_weights"
    env = {k: v for k, v in os.environ.items() if k != "SPHERE_NIGHTLY"}

    def collect(*extra, **env_extra):
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q", node, *extra]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env={**env, **env_extra})
        return p.stdout

    assert "1 deselected" in collect() and node not in collect()
    assert node in collect("--nightly")
    assert node in collect(SPHERE_NIGHTLY="1")
