"""A killed and resumed `sphere train` records the whole training (third reliability pass, item 1).

Before: ``train_metrics.json`` of a resumed training described only the attempt after the checkpoint (its
``loss_first`` was the loss of the first step after the resume, e.g. 0.503 instead of step 1's 0.693, and
``train_loss_mean`` averaged only those steps), although the weights were bit-identical to an uninterrupted
run's. Now the killed attempt's log history (the checkpoint's ``trainer_state.json``) is merged with the
resumed attempt's, and ``resumed`` says where it resumed.
"""

from __future__ import annotations

import json

import pytest
from test_train_dpo import FAST, FakeLogger, make_pairs, write_jsonl

# 8 optimizer steps (16 pairs, batch 2), a checkpoint every 3 (only the newest kept: the resumed attempt's
# checkpoint-6 removes checkpoint-3, the one it resumed from), the kill after step 5: resume from step 3
OPTS = {**FAST, "epochs": 1, "batch_size": 2, "lora": {"r": 4}, "save_steps": 3, "save_total_limit": 1}
KILL_AFTER = 5


class Killed(RuntimeError):
    pass


def _kill_after(step: int):
    from transformers import TrainerCallback

    class KillAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= step:
                raise Killed(f"killed after step {state.global_step}")

    return KillAt()


@pytest.mark.slow  # three short trainings of the tiny model (~30 s on 2 busy cores)
def test_resumed_training_metrics_describe_the_whole_training(tmp_path, tiny_model_dir, monkeypatch):
    from safetensors.torch import load_file

    from sphere.train import dpo

    pairs = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(16))
    clean = tmp_path / "clean"
    dpo.train_dpo(OPTS, tiny_model_dir, pairs, clean, logger=FakeLogger())
    want = json.loads((clean / "train_metrics.json").read_text())
    assert want["steps"] == 8 and want["resumed_from_step"] is None and want["resumed"] is None

    out = tmp_path / "run"
    real = dpo._callbacks
    monkeypatch.setattr(dpo, "_callbacks", lambda *a: [*real(*a), _kill_after(KILL_AFTER)])
    with pytest.raises(Killed):
        dpo.train_dpo(OPTS, tiny_model_dir, pairs, out)
    monkeypatch.setattr(dpo, "_callbacks", real)
    assert (out / "trainer" / "checkpoint-3" / "trainer_state.json").is_file()
    assert not (out / "merged").exists()

    log = FakeLogger()
    dpo.train_dpo(OPTS, tiny_model_dir, pairs, out, logger=log)
    got = json.loads((out / "train_metrics.json").read_text())
    # the resumed attempt itself logged steps 4-8 only
    assert sorted(s for m, s in log.calls if "train/loss" in m) == [4, 5, 6, 7, 8]
    # the weights are the uninterrupted run's, bit for bit, and so is every recorded summary of the training
    w_clean = load_file(clean / "merged" / "model.safetensors")
    w_run = load_file(out / "merged" / "model.safetensors")
    assert all((w_clean[k] == w_run[k]).all() for k in w_clean)
    assert got["resumed_from_step"] == 3 and got["steps"] == want["steps"] == 8
    for key in ("loss_first", "loss_final", "rewards_margins_first", "rewards_margins_final",
                "rewards_accuracies_first", "rewards_accuracies_final", "logps_chosen_first",
                "logps_rejected_first", "grad_norm_first", "grad_norm_final", "train_loss_mean"):
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (key, got[key], want[key])
    assert got["loss_first"] == pytest.approx(0.6931, abs=1e-3)  # step 1: the policy is the reference
    r = got["resumed"]
    assert r["checkpoint"] == "trainer/checkpoint-3" and r["step"] == 3
    assert r["log_history"].startswith("steps 1-3 from the killed attempt's checkpoint-3/trainer_state.json")
    assert "steps 4-8 from this attempt" in r["log_history"]
    # trainer_state.json (TRL's own record) has the whole history too
    state = json.loads((out / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == list(range(1, 9))


def test_prior_history_and_the_whole_loss_mean(tmp_path):
    """The killed attempt's records up to the checkpoint's step; the whole-training loss mean weights each
    logged loss by the steps it covers."""
    from types import SimpleNamespace

    from sphere.train.dpo import _prior_history, _whole_loss_mean

    ck = tmp_path / "checkpoint-4"
    ck.mkdir()
    hist = [{"loss": 0.7, "step": 2, "epoch": 0.1}, {"loss": 0.5, "step": 4, "epoch": 0.2},
            {"loss": 0.4, "step": 6, "epoch": 0.3}]  # a record past the checkpoint's step is not kept
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": 4, "log_history": hist}))
    prior = _prior_history(ck)
    assert [h["step"] for h in prior] == [2, 4] and prior[0]["loss"] == 0.7
    assert _prior_history(None) == [] and _prior_history(tmp_path / "nope") == []
    # steps 5-8 (this attempt) averaged 0.3: (0.7*2 + 0.5*2 + 0.3*4) / 8
    res = SimpleNamespace(global_step=8, training_loss=0.3)
    assert _whole_loss_mean(prior, res, 4) == pytest.approx((1.4 + 1.0 + 1.2) / 8)
