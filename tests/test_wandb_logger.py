"""W&B logging, checked offline: what a run records is read back from its transaction log and files.

No network: runs are ``offline`` (or ``disabled``); wandb's cache/config/data dirs point into tmp_path so
the secret scan sees every file wandb wrote.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sphere.loggers import NullLogger, make_logger, redact, resolve_mode
from sphere.wandb_runs import read_offline_run

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # looks like a W&B key (40 hex chars); not real


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Hermetic wandb: every wandb directory under tmp_path/wandb-home, no WANDB_MODE from the CI env."""
    home = tmp_path / "wandb-home"
    for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_DATA_DIR", "data"),
                     ("WANDB_ARTIFACT_DIR", "artifacts")):
        (home / sub).mkdir(parents=True)
        monkeypatch.setenv(var, str(home / sub))
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    return home


def _cfg(mode: str, **extra) -> OmegaConf:
    from sphere.schema import defaults
    from sphere.schema_groups import WandbLoggerSettings

    path = Path(__file__).resolve().parents[1] / "conf" / "logger" / "wandb.yaml"
    own = OmegaConf.to_container(OmegaConf.load(path))
    own.pop("defaults", None)  # conf/logger/wandb.yaml composes over WandbLoggerSettings' defaults
    base = OmegaConf.create({**defaults(WandbLoggerSettings), **own})
    base.mode = mode
    base.project = "sphere-test"
    return OmegaConf.create({"logger": base, "seed": 7,
                             "search": {"pruning": {"policy": "minmax", "tau": 0.0}}, **extra})


def _files_containing(root: Path, needle: str) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and needle.encode() in p.read_bytes():
            hits.append(str(p))
    return hits


def test_redact_keys_and_secret_values(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    cfg = {"backend": {"api_key": "x", "openai": {"token": "y", "base_url": "http://h"}},
           "notes": [f"key={FAKE_KEY}", "plain"], "hf_token_path": "/p", "seed": 1}
    r = redact(cfg)
    assert r["backend"]["api_key"] == "***" and r["backend"]["openai"]["token"] == "***"
    assert r["backend"]["openai"]["base_url"] == "http://h"
    # secrets by key name and value shape, not by substring: a path to a token file is not the token (#17)
    assert r["notes"] == ["key=***", "plain"] and r["hf_token_path"] == "/p" and r["seed"] == 1
    assert FAKE_KEY not in json.dumps(r)
    assert redact(["backend.openai.api_key=sk-abc", "search.pruning.tau=0.5"]) == [
        "backend.openai.api_key=***", "search.pruning.tau=0.5"]


def test_mode_resolution(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert resolve_mode("auto") == "online"
    assert resolve_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "sideways")
    with pytest.raises(ValueError, match="WANDB_MODE='sideways'"):
        resolve_mode("auto")
    with pytest.raises(ValueError, match=r"logger.mode='cloud': allowed auto \| online"):
        resolve_mode("cloud")
    with pytest.raises(ValueError, match="logger.name='tensorboard'"):
        make_logger(OmegaConf.create({"logger": {"name": "tensorboard"}}), "/tmp", "x")
    assert isinstance(make_logger(OmegaConf.create({"logger": {"name": "none"}}), "/tmp", "x"), NullLogger)


def test_run_group_precedence(monkeypatch):
    from sphere.loggers import run_group

    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)
    assert run_group({"group": None}, {}) is None
    assert run_group({"group": None}, {"group": "sweep/threshold"}) == "sweep/threshold"
    monkeypatch.setenv("WANDB_RUN_GROUP", "pruning-2026")
    assert run_group({"group": None}, {"group": "sweep/threshold"}) == "pruning-2026"
    assert run_group({"group": "mine"}, {"group": "sweep/threshold"}) == "mine"


def test_offline_run_records_metrics_config_table_artifact_and_no_key(tmp_path, wandb_env, monkeypatch):
    # offline even with a key in the environment: mode=offline is explicit
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    run_dir = tmp_path / "job"
    cfg = _cfg("offline", backend={"openai": {"api_key": FAKE_KEY, "base_url": "http://127.0.0.1:1"}},
               note=f"leaked {FAKE_KEY} here")
    lg = make_logger(cfg, run_dir, "generate")
    assert lg.mode == "offline"
    lg.log({"search/tokens": 120, "gen/yield": 0.25}, step=0)
    lg.log({"train/loss": 0.69, "eval/mini/accuracy": 0.5}, step=1)
    lg.log({"eval/mini/accuracy": 0.625}, step=2)
    lg.log_table("gen/pairs_sample", ["stage", "problem_id", "chosen"],
                 [[1, "p0", "2 + 2 = 4"], [3, "p7", f"{FAKE_KEY[:8]}..."]])
    pairs = run_dir / "pairs.jsonl"
    pairs.write_text('{"stage": 1, "prompt": "p", "chosen": "c", "rejected": "r"}\n')
    results = run_dir / "results.json"
    results.write_text('{"mini": {"accuracy": 0.625}}\n')
    lg.log_artifact(pairs, "pairs-abc123", "dataset")
    lg.log_artifact(results, "eval results", "results")
    with pytest.raises(FileNotFoundError, match="not a file"):
        lg.log_artifact(run_dir / "nope.json", "x", "results")
    lg.finish()

    rec = read_offline_run(run_dir)
    assert rec["run"]["name"] == "generate" and rec["run"]["project"] == "sphere-test"
    assert rec["config"]["seed"] == 7
    assert rec["config"]["search"]["pruning"]["policy"] == "minmax"
    assert rec["config"]["backend"]["openai"]["api_key"] == "***"
    assert rec["config"]["note"] == "***"
    hist = {h["_step"]: h for h in rec["history"]}
    assert hist[0]["search/tokens"] == 120 and hist[0]["gen/yield"] == 0.25
    assert hist[1]["train/loss"] == pytest.approx(0.69)
    assert rec["summary"]["eval/mini/accuracy"] == 0.625
    assert all(k.split("/")[0] in ("search", "gen", "train", "eval") for h in rec["history"] for k in h
               if not k.startswith("_"))
    assert rec["tables"]["gen/pairs_sample"]["columns"] == ["stage", "problem_id", "chosen"]
    assert rec["tables"]["gen/pairs_sample"]["data"][0] == [1, "p0", "2 + 2 = 4"]
    arts = {a["name"]: a for a in rec["artifacts"]}
    assert arts["pairs-abc123"]["type"] == "dataset" and arts["pairs-abc123"]["files"] == ["pairs.jsonl"]
    assert arts["eval-results"]["type"] == "results" and arts["eval-results"]["files"] == ["results.json"]
    # the key appears in no file wandb wrote (run dir, logs, caches)
    assert _files_containing(run_dir / "wandb", FAKE_KEY) == []
    assert _files_containing(wandb_env, FAKE_KEY) == []


def test_disabled_mode_logs_nothing(tmp_path, wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    lg = make_logger(_cfg("auto"), tmp_path / "job", "run")
    assert lg.mode == "disabled"
    lg.log({"eval/mini/accuracy": 0.5}, step=0)
    lg.log_table("gen/pairs_sample", ["a"], [[1]])
    (tmp_path / "job" / "p.jsonl").write_text("{}\n")
    lg.log_artifact(tmp_path / "job" / "p.jsonl", "pairs", "dataset")
    lg.finish()
    assert not list((tmp_path / "job").rglob("*.wandb"))


def test_generate_logging_sample_table_per_stage_and_pairs_artifact(tmp_path, wandb_env):
    """The generate command's own logging path (sphere.generate.generator.log_generate_stats) on its outputs."""
    from sphere.generate.local import log_generate_stats

    out = tmp_path / "gen"
    out.mkdir()
    pairs = [{"stage": s, "problem_id": f"p{s}-{i}", "prompt": f"Problem {i}", "chosen": "1 + 1 = 2",
              "rejected": "1 + 1 = 3", "margin": 0.5} for s in (1, 2, 3) for i in range(40 if s == 1 else 3)]
    (out / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    stats = {"pairs_per_stage": {"1": 40, "2": 3, "3": 3}, "yield": 46 / 50, "pairs_total": 46, "wall_s": 1.5,
             "engine_time_frac": 0.1, "backend_calls": 9, "tokens": 1000, "mean_leaves_per_call": 7.5,
             "pruned": 30, "collisions": 0, "config_hash": "abc123"}
    lg = make_logger(_cfg("offline"), out, "generate")
    log_generate_stats(lg, stats, out)
    lg.finish()
    rec = read_offline_run(out)
    assert rec["summary"]["gen/pairs_total"] == 46 and rec["summary"]["gen/yield"] == pytest.approx(0.92)
    for s in ("1", "2", "3"):
        assert rec["summary"][f"gen/pairs_stage{s}"] == stats["pairs_per_stage"][s]
    assert rec["summary"]["search/backend_calls"] == 9
    table = rec["tables"]["gen/pairs_sample"]
    stages = [row[0] for row in table["data"]]
    assert set(stages) == {1, 2, 3} and stages.count(1) <= 32  # a capped sample from every stage
    assert [a["type"] for a in rec["artifacts"] if a["name"] == "pairs-abc123"] == ["dataset"]


def test_multirun_gives_one_run_per_job_grouped_by_sweep(tmp_path, wandb_env):
    app = tmp_path / "app"
    (app / "conf").mkdir(parents=True)
    (app / "conf" / "config.yaml").write_text(textwrap.dedent("""
        logger: {name: wandb, mode: offline, project: sphere-test, group: null, name_prefix: "", tags: []}
        tau: 0.0
        hydra:
          sweep: {dir: SWEEP, subdir: "${hydra:job.num}"}
        """).replace("SWEEP", str(tmp_path / "sweep" / "threshold")))
    (app / "toy.py").write_text(textwrap.dedent("""
        import hydra
        from hydra.core.hydra_config import HydraConfig
        from sphere.loggers import make_logger

        @hydra.main(version_base="1.3", config_path="conf", config_name="config")
        def main(cfg):
            lg = make_logger(cfg, HydraConfig.get().runtime.output_dir, "generate")
            lg.log({"gen/yield": 1.0 - cfg.tau})
            lg.finish()

        main()
        """))
    r = subprocess.run([sys.executable, str(app / "toy.py"), "-m", "tau=0.1,0.5"], capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = [read_offline_run(tmp_path / "sweep" / "threshold" / str(j)) for j in (0, 1)]
    assert [x["run"]["name"] for x in runs] == ["generate-0", "generate-1"]
    assert runs[0]["run"]["group"] == runs[1]["run"]["group"] == "sweep/threshold"
    assert runs[0]["run"]["id"] != runs[1]["run"]["id"]
    assert [x["config"]["tau"] for x in runs] == [0.1, 0.5]
    assert [x["summary"]["gen/yield"] for x in runs] == [pytest.approx(0.9), pytest.approx(0.5)]
    assert runs[1]["run"]["notes"] == "tau=0.5"
