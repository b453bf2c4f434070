"""trajectories.jsonl (issue #17 item E): one line per distinct trajectory per stage record, with the roles it
plays (sol_max, sol_min, terminal). Before, a record's terminals were written as they came, so a search whose
Sol_max and Sol_min coincide, or whose terminals repeat a text (two siblings sampled the same step), wrote the
same trajectory again: 86 of 174 lines on `sphere generate data.mini_n=32`."""

from __future__ import annotations

import json

from sphere.io import JsonlAppender, read_jsonl_tolerant


def _traj(steps: list[str], correct: bool, value: float) -> dict:
    return {"steps": steps, "correct": correct, "value": value, "rewards": [value] * len(steps),
            "scores": [value] * len(steps), "finish": "answer"}


def test_one_line_per_distinct_trajectory_with_its_roles(tmp_path):
    from test_generate import _cfg

    from sphere.generate.generator import Generator

    same = _traj(["a", "b"], True, 0.9)
    low = _traj(["a", "c"], False, 0.2)
    recs = {
        1: [  # Sol_max == Sol_min == the only terminal (written twice in the terminals, as the engine can)
            {"problem_id": "p1", "stage": 1, "route": "both_right", "answer": "1", "sol_max": same,
             "sol_min": same, "terminals": [same, dict(same)], "nodes": 3, "expansions": 2, "pairs": []},
            # distinct extremes; a terminal repeated
            {"problem_id": "p2", "stage": 1, "route": "pair", "answer": "1", "sol_max": same, "sol_min": low,
             "terminals": [low, same, low], "nodes": 5, "expansions": 3, "pairs": []},
        ],
        2: [  # Sol_max is not among the terminals (a paper chain can end unfinished)
            {"problem_id": "p1", "stage": 2, "route": "uncorrected", "answer": "1",
             "sol_max": _traj(["x"], False, 0.5), "sol_min": None, "terminals": [low], "nodes": 2,
             "expansions": 1, "pairs": []},
        ],
    }
    out = tmp_path / "gen"
    gen = Generator(_cfg(), out)
    for s, rows in recs.items():
        with JsonlAppender(out / "stages" / f"stage{s}.jsonl") as w:
            w.write_many(rows)
    gen.finalize([{"id": "p1", "problem": "q", "answer": "1"}, {"id": "p2", "problem": "q", "answer": "1"}],
                 {"search": {}}, 0.0)
    lines = read_jsonl_tolerant(out / "trajectories.jsonl")
    got = {(ln["problem_id"], ln["stage"], tuple(ln["steps"])): ln["roles"] for ln in lines}
    assert len(lines) == len(got) == 5  # was 6 terminal lines, two of them duplicates, no unfinished Sol_max
    assert got == {
        ("p1", 1, ("a", "b")): ["sol_max", "sol_min", "terminal"],
        ("p2", 1, ("a", "b")): ["sol_max", "terminal"],
        ("p2", 1, ("a", "c")): ["sol_min", "terminal"],
        ("p1", 2, ("x",)): ["sol_max"],
        ("p1", 2, ("a", "c")): ["terminal"],
    }
    for ln in lines:  # the trajectory itself is kept whole
        assert {"steps", "correct", "value", "rewards", "scores", "finish", "roles"} <= set(ln)
    keys = [json.dumps({k: v for k, v in ln.items() if k != "roles"}, sort_keys=True) for ln in lines]
    assert len(keys) == len(set(keys))
