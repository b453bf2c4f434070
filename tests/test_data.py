"""Benchmark registry and strict problem loaders (sphere.data)."""

from __future__ import annotations

import json

import pytest

from sphere.data import BENCHMARKS, PAPER_BENCHMARKS, benchmark_key, default_data_dir, load_benchmark

EXPECTED_COUNTS = {"math500": 500, "gsm8k": 1319, "aime24": 30, "aime25": 30, "amc23": 40,
                   "olympiadbench": 675}


@pytest.mark.parametrize("name", PAPER_BENCHMARKS)
def test_shipped_benchmarks_load_with_unique_ids(name):
    recs = load_benchmark(name)
    assert len(recs) == EXPECTED_COUNTS[name]
    assert len({r["id"] for r in recs}) == len(recs)
    for r in recs:
        assert r["problem"].strip() and r["answer"].strip()
    has_sol = sum(1 for r in recs if r.get("solution"))
    assert (has_sol > 0) == BENCHMARKS[name].has_solutions


def test_limit_takes_the_first_n_in_file_order():
    full = load_benchmark("gsm8k")
    assert [r["id"] for r in load_benchmark("gsm8k", limit=3)] == [r["id"] for r in full[:3]]
    with pytest.raises(ValueError, match="limit"):
        load_benchmark("gsm8k", limit=0)


def test_explicit_data_dir_and_missing_file_message(tmp_path):
    assert len(load_benchmark("aime25", data_dir=default_data_dir())) == 30
    with pytest.raises(FileNotFoundError, match="paths.data_dir"):
        load_benchmark("math500", data_dir=tmp_path)


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_local_jsonl_loads_and_keeps_extra_fields(tmp_path):
    p = _write(tmp_path / "mine.jsonl", [json.dumps({"id": "a", "problem": "1+1?", "answer": "2", "x": 1}),
                                         "", json.dumps({"id": "b", "problem": "2+2?", "answer": "4"})])
    recs = load_benchmark(str(p))
    assert [r["id"] for r in recs] == ["a", "b"] and recs[0]["x"] == 1
    assert benchmark_key(str(p)) == "mine"


@pytest.mark.parametrize(
    "lines, match",
    [
        (['{"id": "a", "problem": "p"}'], r"mine.jsonl:1: field 'answer' must be a non-empty string"),
        (['{"id": "a", "problem": "p", "answer": 3}'], r"mine.jsonl:1: field 'answer'"),
        (['{"id": "a", "problem": "p", "answer": "1"}', "{not json"], r"mine.jsonl:2: invalid JSON"),
        (['{"id": "a", "problem": "p", "answer": "1"}', '{"id": "a", "problem": "q", "answer": "2"}'],
         r"record 2 repeats id 'a' of record 1"),
        (['[1, 2]'], r"mine.jsonl:1: expected a JSON object"),
        (['{"id": "a", "problem": "p", "answer": "1", "solution": 5}'], r"'solution' must be a string"),
    ],
)
def test_local_jsonl_errors_name_file_and_line(tmp_path, lines, match):
    p = _write(tmp_path / "mine.jsonl", lines)
    with pytest.raises(ValueError, match=match):
        load_benchmark(str(p))


def test_unknown_name_lists_what_is_allowed():
    with pytest.raises(KeyError, match="allowed: math500, gsm8k"):
        load_benchmark("math5000")


def test_benchmark_key_for_paths():
    assert benchmark_key("math500") == "math500"
    assert benchmark_key("/x/foo/test.jsonl") == "foo_test"
    assert benchmark_key("/x/my set!.jsonl") == "my_set"
    assert benchmark_key("/x/meta.jsonl") == "local_meta"


def test_mini_benchmark_delegates_to_the_mini_world():
    recs = load_benchmark("mini", limit=7)
    assert len(recs) == 7 and len({r["id"] for r in recs}) == 7
    assert recs == load_benchmark("mini", limit=7)  # deterministic
