"""`sphere bench prm` (issue 34): one small run on the stand-in PRM reports both forms side by side, with the
shared prefix computing fewer tokens and giving the same scores; bad settings are one line."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from sphere.bench.prm import bench, main


def _cfg(**kw):
    base = dict(models=["standin"], lengths=[300], forms=["off", "kv"], E=5, expansions=1, batch_size=16,
                random_layers=2, seed=0, standin_past_window=True)
    base.update(kw)
    return OmegaConf.create(base)


def test_bench_reports_separate_and_shared_side_by_side():
    res = bench(_cfg())
    (row,) = res["rows"]
    assert row["model"] == "standin" and row["prefix_tokens"] >= 250
    off, kv = row["off"], row["kv"]
    # one expansion of 5 candidates: separate scoring computes the prefix 5 times, kv once
    assert off["tokens_per_expansion"] >= 5 * row["prefix_tokens"]
    assert kv["tokens_per_expansion"] < off["tokens_per_expansion"] / 3
    assert kv["token_ratio"] == pytest.approx(off["tokens_per_expansion"] / kv["tokens_per_expansion"])
    assert kv["max_abs_diff"] <= 1e-4
    assert off["wall_s_per_expansion"] > 0 and kv["wall_s_per_expansion"] > 0


@pytest.mark.parametrize("kw,msg", [(dict(forms=["kv"]), "must include off"),
                                    (dict(forms=["off", "tree"]), "'tree' unknown"),
                                    (dict(models=["llama"]), "'llama' unknown")])
def test_bad_settings_are_one_line(kw, msg):
    with pytest.raises(SystemExit, match=msg):
        main(_cfg(**kw))
