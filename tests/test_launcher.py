"""Hydra launchers (submitit: SLURM preset composed, local launcher run for real) and the accelerate configs
for multi-GPU training (parsed by accelerate's own launcher code; the runs themselves need GPUs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


# --------------------------------------------------------------------------------------------- accelerate
def _launch_options() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {a.dest for a in launch_command_parser()._actions}


@pytest.mark.parametrize("name,dtype", [("ddp", "MULTI_GPU"), ("zero3", "DEEPSPEED"), ("fsdp", "FSDP")])
def test_accelerate_config_parses(name, dtype):
    """accelerate reads the file (unknown top-level keys are an error there) and every nested key is an
    `accelerate launch` option (accelerate would silently ignore a misspelt one)."""
    from accelerate.commands.config.config_args import ClusterConfig

    path = CONF / "accelerate" / f"{name}.yaml"
    cc = ClusterConfig.from_yaml_file(str(path))
    assert cc.distributed_type.value == dtype
    assert cc.num_processes == 8 and cc.num_machines == 1
    opts = _launch_options()
    raw = yaml.safe_load(path.read_text())
    for section, prefix in (("deepspeed_config", ""), ("fsdp_config", "fsdp_")):
        for key in raw.get(section) or {}:
            k = key if key.startswith(prefix) else prefix + key
            assert k in opts, f"{path}: {section}.{key} is not an `accelerate launch` option"
    # every line of configuration carries a comment somewhere above it: at least one comment per 3 keys
    text = path.read_text()
    assert text.count("#") * 3 >= len(
        [ln for ln in text.splitlines() if ":" in ln and not ln.lstrip().startswith("#")]
    )


def test_zero3_deepspeed_json():
    raw = yaml.safe_load((CONF / "accelerate" / "zero3.yaml").read_text())
    ds_path = ROOT / raw["deepspeed_config"]["deepspeed_config_file"]
    ds = json.loads(ds_path.read_text())
    assert ds["zero_optimization"]["stage"] == 3
    # batch sizes come from the DPO arguments, never from two places
    for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        assert ds[k] == "auto"
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


# --------------------------------------------------------------------------------------------- hydra
def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("generate", overrides=overrides, return_hydra_config=True)


def test_slurm_preset_composes_over_submitit_slurm():
    cfg = _compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"])
    lc = cfg.hydra.launcher
    assert lc._target_.endswith("submitit_launcher.SlurmLauncher")
    assert lc.partition == "gpu" and lc.gpus_per_node == 8 and lc.nodes == 1 and lc.max_num_timeout == 3
    # the preset only sets fields the plugin defines (the plugin would ignore a misspelt one)
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    preset = yaml.safe_load((CONF / "hydra" / "launcher" / "slurm.yaml").read_text())
    fields = set(SlurmQueueConf.__dataclass_fields__)
    assert set(preset) - {"defaults"} <= fields


def test_runner_group_defaults_to_local():
    cfg = _compose([])
    assert cfg.runner.name == "local"
    cfg = _compose(["runner=ray", "runner.workers=3"])
    assert cfg.runner.name == "ray" and cfg.runner.workers == 3


@pytest.mark.slow  # two submitit jobs, each a fresh process loading a model: ~60 s on 2 busy cores
def test_submitit_local_pruning_sweep(tmp_path):
    """`sphere generate -m hydra/launcher=submitit_local search.pruning.policy=minmax,none` runs two jobs
    through submitit's local executor; each leaves exactly one generate_stats.json with its own policy."""
    import random

    from sphere.standins.tiny import arithmetic_problem, tiny_model_path

    rng = random.Random(3)
    data = tmp_path / "problems.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": f"s{i}", "problem": p, "answer": a}) + "\n"
            for i, (p, _, a, _) in enumerate(arithmetic_problem(rng) for _ in range(4))
        )
    )
    tiny = tiny_model_path()
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "sphere.cli",
        "generate",
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=20",
        "hydra.launcher.cpus_per_task=1",
        "search.pruning.policy=minmax,none",
        "engine_backend=py",
        f"data.problems={data}",
        "data.limit=4",
        f"model.policy={tiny}",
        f"model.small={tiny}",
        "backend=transformers",
        "backend.device=cpu",
        "prompt=mini",
        "scorer=symbolic",
        "search.expansions=3",
        "search.max_depth=4",
        "search.max_step_tokens=24",
        "search.batch_leaves=16",
        "output.snapshot_every=0",
        f"hydra.sweep.dir={sweep}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    stats = sorted(sweep.glob("*/generate_stats.json"))
    assert [p.parent.name for p in stats] == ["0", "1"], sorted(p.name for p in sweep.iterdir())
    assert (sweep / ".submitit").is_dir()  # the jobs really went through submitit
    policies = []
    for p in stats:
        s = json.loads(p.read_text())
        assert s["problems"] == 4 and s["problems_done_stage1"] == 4
        policies.append(
            yaml.safe_load((p.parent / ".hydra" / "config.yaml").read_text())["search"]["pruning"]["policy"]
        )
    assert sorted(policies) == ["minmax", "none"]
