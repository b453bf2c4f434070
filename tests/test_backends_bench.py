"""`sphere bench generate` composes and prints its figures as the last JSON line (transformers only here;
the vLLM figures need two engines and are produced by running the bench itself)."""

from __future__ import annotations

import json

from hydra import compose, initialize_config_dir

from sphere.cli import HYDRA_COMMANDS, conf_dir


def test_bench_generate_registered_and_prints_json(capsys, tiny_model_dir):
    assert HYDRA_COMMANDS[("bench", "generate")] == ("bench_generate", "sphere.bench.generate:main")
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="bench_generate",
                      overrides=["backends=[transformers]", "problems=2", "branches=2", "rounds=2", "shots=1",
                                 "max_step_tokens=12"])
    from sphere.bench.generate import main

    res = main(cfg)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(res))
    r = res["backends"]["transformers"]
    assert "error" not in r, r
    assert r["candidates"] == 2 * 2 * 2 * cfg.n  # problems x branches x rounds x n
    assert r["tokens_per_s"] > 0 and r["candidates_per_s"] > 0
    assert res["workload"]["prompts_per_round"] == 4
