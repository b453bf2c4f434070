"""The stage logs of a generation run directory: one reader and one resume rule for every runner.

``stages/stage{1,2,3}.jsonl`` hold one durable line per finished problem and stage. ``read_stage_logs``
returns ``{stage: {problem_id: record}}`` with the FIRST record of a problem winning (a later duplicate
can only come from a retried chunk or a second writer; the first is the one every consumer already used),
in file order. ``is_finished`` is the rule by which ``Generator.run`` and the Ray driver skip a problem on
resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sphere.io import read_jsonl_tolerant

STAGE_FILES = {1: "stage1.jsonl", 2: "stage2.jsonl", 3: "stage3.jsonl"}
STAGES = tuple(STAGE_FILES)


def read_stage_log(path: str | Path) -> dict[str, dict]:
    """``{problem_id: first record}`` of one stage log (a torn last line is dropped)."""
    out: dict[str, dict] = {}
    for r in read_jsonl_tolerant(path):
        out.setdefault(str(r["problem_id"]), r)
    return out


def read_stage_logs(run_dir: str | Path) -> dict[int, dict[str, dict]]:
    """``{stage: {problem_id: first record}}`` of ``run_dir/stages/``."""
    return {s: read_stage_log(Path(run_dir) / "stages" / f) for s, f in STAGE_FILES.items()}


def is_finished(pid: str, state: dict[int, dict[str, dict]], st_cfg: Any) -> bool:
    """A problem is finished when its stage-1 record exists and the stage it was routed to (if enabled) has
    its record too."""
    r1 = state[1].get(pid)
    if r1 is None:
        return False
    if r1["route"] == "both_wrong" and st_cfg.stage2:
        return pid in state[2]
    if r1["route"] == "both_right" and st_cfg.stage3:
        return pid in state[3]
    return True
