"""`train.loss` (issue 33): every TRL DPO loss family, mixtures with weights, cDPO, the RPO/SFT term, LD-DPO and
WPO reach trl.DPOConfig as TRL expects them, bad settings are one line naming the key, and TRL's real loss code
computes the documented formula with our weights (docs/experiments/objectives.md)."""

from __future__ import annotations

import math

import pytest

from sphere.train.train_config import LOSS_TYPES, loss_settings


def test_every_trl_loss_type_is_accepted_and_trl_knows_them():
    """LOSS_TYPES is TRL's list: each one reaches DPOConfig and TRL's own help text names it."""
    from trl import DPOConfig

    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    for t in LOSS_TYPES:
        eps = 0.1 if t == "exo_pair" else 0.0
        s = loss_settings({"type": t, "label_smoothing": eps})
        assert s["loss_type"] == [t] and s["loss_weights"] is None
        assert f"'{t}'" in help_text, t
    named = {x.strip("`' ,.") for x in help_text.split("Possible values are:")[1].split("If multiple")[0].split()}
    assert named - {"", "and"} == set(LOSS_TYPES)  # a TRL upgrade that adds or drops a loss shows up here


@pytest.mark.parametrize("loss,types,weights,extra", [
    ({"type": ["sigmoid", "sft"], "weights": [1.0, 0.5]}, ["sigmoid", "sft"], [1.0, 0.5], {}),
    ({"type": ["sigmoid", "bco_pair", "sft"], "weights": [0.8, 0.2, 1.0]}, ["sigmoid", "bco_pair", "sft"],
     [0.8, 0.2, 1.0], {}),  # MPO's mixture, as in TRL's docs
    ({"type": ["sigmoid", "hinge"]}, ["sigmoid", "hinge"], [1.0, 1.0], {}),
    ({"type": ["sigmoid", "sft"], "rpo_alpha": 0.5}, ["sigmoid", "sft"], [1.0, 1.5], {}),  # rft on a mixture
    ({"type": "apo_zero", "rpo_alpha": 1.0}, ["apo_zero", "sft"], [1.0, 1.0], {}),
    ({"type": "sigmoid_norm", "beta": 2.0}, ["sigmoid_norm"], None, {"beta": 2.0}),
    ({"type": "robust", "label_smoothing": 0.1}, ["robust"], None, {"label_smoothing": 0.1}),
    ({"type": "sigmoid", "ld_alpha": 0.5}, ["sigmoid"], None, {"ld_alpha": 0.5}),
    ({"type": "sigmoid", "use_weighting": True}, ["sigmoid"], None, {"use_weighting": True}),
    ({"type": "discopop", "discopop_tau": 0.1}, ["discopop"], None, {"discopop_tau": 0.1}),
])
def test_loss_settings_reach_dpo_config(tmp_path, loss, types, weights, extra):
    from sphere.train.train_config import dpo_config, resolve_train_cfg

    args = dpo_config(resolve_train_cfg({"loss": loss, "progress": False}), tmp_path)
    assert args.loss_type == types
    assert args.loss_weights == (None if weights is None else pytest.approx(weights))
    for k, v in extra.items():
        assert getattr(args, k) == v, k


@pytest.mark.parametrize("loss,msg", [
    ({"type": "kto"}, r"train.loss.type='kto': allowed sigmoid \| hinge \| ipo"),
    ({"type": ["sigmoid", "dpo"]}, "train.loss.type='dpo': allowed"),
    ({"type": []}, r"train.loss.type=\[\]: allowed one of"),
    ({"type": ["sigmoid", "sigmoid"]}, "appears twice"),
    ({"type": ["sigmoid", "sft"], "weights": [1.0]}, r"train.loss.weights=\[1.0\]: allowed null or a list of 2"),
    ({"type": ["sigmoid", "sft"], "weights": [1.0, "x"]}, r"train.loss.weights='x': expected a number"),
    ({"type": "apo_zero", "label_smoothing": 0.1}, "label_smoothing=0.1 applies to type=sigmoid alone"),
    ({"type": ["sigmoid", "sft"], "label_smoothing": 0.1}, "label_smoothing=0.1 applies to type=sigmoid alone"),
    ({"type": "exo_pair"}, "exo_pair needs train.loss.label_smoothing > 0"),
    ({"ld_alpha": 1.5}, r"train.loss.ld_alpha=1.5: allowed null \(off\) or \[0, 1\]"),
    ({"use_weighting": "yes"}, "train.loss.use_weighting='yes': allowed true or false"),
    ({"discopop_tau": 0}, "train.loss.discopop_tau=0.0: must be > 0"),
    ({"type": "ipo", "beta": 0}, "train.loss.beta=0.0: must be > 0"),
])
def test_bad_loss_settings_name_the_key(loss, msg):
    with pytest.raises(ValueError, match=msg):
        loss_settings(loss)


def test_a_loss_list_passes_the_typed_config_check():
    from omegaconf import OmegaConf

    from sphere.schema import ConfigTypeError, check_config

    cfg = OmegaConf.create({"train": {"loss": {"type": ["sigmoid", "sft"], "weights": [1, 0.5], "ld_alpha": None}}})
    check_config(cfg, "train")
    with pytest.raises(ConfigTypeError, match="train.loss.ld_alpha"):
        check_config(OmegaConf.create({"train": {"loss": {"ld_alpha": 2.0}}}), "train")


def _ls(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > -30 else x


def _train_logged(tmp_path, tiny_model_dir, loss: dict) -> list[dict]:
    from test_train_dpo import FAST, FakeLogger, make_pairs, write_jsonl

    from sphere.train.dpo import train_dpo

    pairs = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(4, seed=3))
    log = FakeLogger()
    train_dpo({**FAST, "batch_size": 1, "max_steps": 4, "lr": 5e-3, "precompute_ref": False, "loss": loss},
              tiny_model_dir, pairs, tmp_path / "out", logger=log)
    steps = [m for m, _ in log.calls if "train/loss" in m]
    assert len(steps) == 4
    return steps


def test_a_weighted_mixture_is_the_weighted_sum_in_trl(tmp_path, tiny_model_dir):
    """[sigmoid, hinge] with weights [0.7, 0.3]: with batch 1 TRL logs the step's loss and m = beta * delta
    (rewards/margins); the loss must be 0.7 * -logsig(m) + 0.3 * relu(1 - m), TRL's real loss code."""
    moved = 0
    for m in _train_logged(tmp_path, tiny_model_dir, {"type": ["sigmoid", "hinge"], "weights": [0.7, 0.3],
                                                      "beta": 0.5}):
        x = m["train/rewards/margins"]
        moved += abs(x) > 1e-3
        assert m["train/loss"] == pytest.approx(0.7 * -_ls(x) + 0.3 * max(0.0, 1 - x), rel=1e-4, abs=1e-5)
    assert moved >= 2


def test_apo_zero_is_the_apo_formula_in_trl(tmp_path, tiny_model_dir):
    """apo_zero: (1 - sig(r_c)) + sig(r_r), r = beta * log-ratio of each side (rewards/chosen, /rejected)."""
    def sig(x):
        return 1 / (1 + math.exp(-x))

    moved = 0
    for m in _train_logged(tmp_path, tiny_model_dir, {"type": "apo_zero", "beta": 0.5}):
        rc, rr = m["train/rewards/chosen"], m["train/rewards/rejected"]
        moved += abs(rc) > 1e-3
        assert m["train/loss"] == pytest.approx((1 - sig(rc)) + sig(rr), rel=1e-4, abs=1e-5)
    assert moved >= 2
