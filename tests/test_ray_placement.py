"""Where `runner=ray` puts the models on a described cluster (sphere/scale/placement.py): which GPU of which
node holds which worker's policy, PRM and small model, and a plan the cluster cannot hold refused naming the
keys. No Ray cluster is started: the placement is computed from the config and the memory plan."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sphere.memplan import memory_plan
from sphere.scale.placement import PlacementError, check_placement, format_placement

CONF = Path(__file__).resolve().parents[1] / "conf"
PAPER = ["experiment=paper_qwen2_5_7b", "runner=ray", "data.training.fallback=[math_train,gsm8k_train]",
         "hardware.gpu_memory_gb=80"]


def compose(overrides: list[str]):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hcompose("run", overrides=overrides)


def place(*ov: str) -> dict | None:
    cfg = compose([*PAPER, *ov])
    return check_placement(cfg, memory_plan(cfg, budgets={}))


def test_eight_gpu_node_one_worker_per_gpu():
    pl = place("runner.gpus_per_node=8", "runner.workers=8")
    assert pl["fits"] and not pl["idle_gpus"]
    assert [(w["node"], w["gpus"]) for w in pl["workers"]] == [(0, [g]) for g in range(8)]
    g7 = pl["gpus"][7]
    assert (g7["node"], g7["gpu"], g7["worker"]) == (0, 7, 7)
    assert [x["what"] for x in g7["phases"]["generate"]] == ["policy", "PRM"]
    assert [x["what"] for x in g7["phases"]["stage3"]] == ["small", "PRM"]  # policy closed before small
    text = format_placement(pl)
    assert "node 0 GPU 7: worker 7 | generate: policy Qwen/Qwen2.5-7B-Instruct" in text
    assert "fits: yes" in text


def test_two_workers_leave_six_gpus_idle_and_say_so():
    pl = place("runner.gpus_per_node=8", "runner.workers=2")
    assert len(pl["gpus"]) == 2 and len(pl["idle_gpus"]) == 6
    assert "idle: node 0 GPU 2" in format_placement(pl)


def test_tensor_parallel_worker_spans_its_gpus_prm_on_the_first():
    pl = place("runner.gpus_per_node=8", "runner.workers=4", "backend.tensor_parallel_size=2")
    assert pl["gpus_per_worker"] == 2  # auto = tensor_parallel_size
    assert [w["gpus"] for w in pl["workers"]] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    g2, g3 = pl["gpus"][2], pl["gpus"][3]
    assert g2["worker"] == g3["worker"] == 1
    assert [x["what"] for x in g2["phases"]["generate"]] == ["policy", "PRM"]
    assert [x["what"] for x in g3["phases"]["generate"]] == ["policy"]


def test_two_nodes_fill_in_order():
    pl = place("runner.nodes=2", "runner.gpus_per_node=4", "runner.workers=8")
    assert pl["fits"]
    assert [(w["node"], w["gpus"][0]) for w in pl["workers"]][3:5] == [(0, 3), (1, 0)]
    assert "node 1 GPU 3: worker 7" in format_placement(pl)


@pytest.mark.parametrize(
    "ov, needle",
    [
        (["runner.gpus_per_node=8", "runner.workers=9"], "runner.workers=9 x 1 GPUs need 9 GPUs"),
        (["runner.nodes=2", "runner.gpus_per_node=4", "runner.workers=3", "backend.tensor_parallel_size=3"],
         "runner.workers=3 x 3 GPUs need 9 GPUs"),  # 1 worker per 4-GPU node: 2 fit
        (["runner.gpus_per_node=8", "runner.workers=2", "runner.gpus_per_worker=1",
          "backend.tensor_parallel_size=2"], "runner.gpus_per_worker=1 < backend.tensor_parallel_size=2"),
        (["runner.gpus_per_node=4", "runner.workers=1", "runner.gpus_per_worker=8"],
         "runner.gpus_per_worker=8 > runner.gpus_per_node=4"),
    ],
)
def test_plans_the_cluster_cannot_hold_are_refused(ov, needle):
    with pytest.raises(PlacementError, match=needle.replace("(", r"\(").replace("+", r"\+")):
        place(*ov)


def test_not_described_or_local_is_not_checked():
    assert place("runner.workers=99") is None  # runner.gpus_per_node=null
    cfg = compose(["experiment=paper_qwen2_5_7b", "runner=local"])
    assert check_placement(cfg, memory_plan(cfg, budgets={})) is None


def test_cli_dry_run_prints_the_placement_and_refuses_what_does_not_fit(tmp_path):
    """The user's command: `sphere run experiment=paper_qwen2_5_7b runner=ray dry_run=true` on a described
    8-GPU node; then the same with 9 workers: one error line, exit 1, no traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, "-m", "sphere.cli", "run", *PAPER, "dry_run=true", "runner.gpus_per_node=8"]
    ok = subprocess.run([*base, "runner.workers=8", f"hydra.run.dir={tmp_path}/a"], cwd=CONF.parent, env=env,
                        capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "Ray placement (1 node(s) x 8 GPUs, 80 GB each; 8 workers x 1 GPU(s)):" in ok.stderr
    assert "node 0 GPU 0: worker 0 | generate: policy Qwen/Qwen2.5-7B-Instruct" in ok.stderr
    bad = subprocess.run([*base, "runner.workers=9", f"hydra.run.dir={tmp_path}/b"], cwd=CONF.parent, env=env,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1
    assert "runner.workers=9 x 1 GPUs need 9 GPUs" in bad.stderr and "Traceback" not in bad.stderr
