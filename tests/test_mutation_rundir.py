"""sphere/rundir/ (lock, resume, fingerprints): who may write a run directory and when its outputs are kept,
moved aside or refused, asserted value by value (the mutation run, scripts/mutation.sh / docs/mutation.md;
each test fails on a mutant the rest of the suite let through)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os

import pytest

from sphere.rundir import lock, resume
from sphere.rundir.resume import (
    ABSENT,
    SignatureMismatch,
    check_or_record,
    differences,
    flatten,
    forget_checks,
    mismatch_message,
    resume_mode,
    set_default_mode,
)


@pytest.fixture(autouse=True)
def _clean():
    forget_checks()
    before = resume.default_mode()
    yield
    forget_checks()
    set_default_mode(before)


@pytest.mark.parametrize("value, mode", [
    (None, "auto"), (True, "auto"), (False, "fresh"), ("true", "auto"), (" Yes ", "auto"), ("1", "auto"),
    ("false", "fresh"), ("0", "fresh"), ("NO", "fresh"), ("auto", "auto"), ("fresh", "fresh"),
    (" Force", "force"),
])
def test_resume_modes(value, mode):
    assert resume_mode(value) == mode


def test_a_bad_resume_mode_names_the_key_and_what_is_allowed():
    with pytest.raises(ValueError) as e:
        resume_mode("fersh")
    assert str(e.value) == "config resume='fersh': allowed auto | fresh | force (conf/config.yaml)"
    with pytest.raises(ValueError):
        set_default_mode("fersh")
    assert set_default_mode("force") == "force" and resume.default_mode() == "force"
    assert set_default_mode("fersh", strict=False) == "auto" and resume.default_mode() == "auto"


def test_flatten_and_differences():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}, "f": "x"}) == {
        "a.b": 1, "a.c.d": [1, 2], "e": {}, "f": "x"}
    old = {"a": 1, "b": 2, "sampling.n": 4}
    new = {"a": 1, "b": 3, "c": 5}
    assert differences(old, new) == [("b", 2, 3), ("c", ABSENT, 5)]
    # a key added later reads as its old behaviour; a removed key is no difference
    assert differences({}, {"scorer.shared_prefix": "off"}) == []
    assert differences({}, {"scorer.shared_prefix": "on"}) == [("scorer.shared_prefix", ABSENT, "on")]
    assert differences({"sampling.n": 4}, {"sampling.n": 5}) == [("sampling.n", 4, 5)]
    assert differences({"x": 1}, {}) == [("x", 1, ABSENT)]


def test_mismatch_message_lists_at_most_twelve():
    diffs = [(f"k{i:02d}", i, i + 1) for i in range(14)]
    msg = mismatch_message("/r", "generate", diffs)
    assert msg.startswith("/r: the generate outputs here were written with different settings (k00: 0 -> 1; ")
    assert "k11: 11 -> 12; and 2 more)" in msg and "k12" not in msg
    assert "resume=fresh to move them aside (to previous/)" in msg
    assert "; and" not in mismatch_message("/r", "generate", diffs[:12])
    m = mismatch_message("/r", "eval", [("a", ABSENT, "x" * 100)])
    assert "a: <absent> -> 'xxx" in m and "...)" in m


def test_check_or_record_new_match_mismatch_fresh_force(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    assert check_or_record(d, "generate", {"a": 1}) == "new"
    rec = json.loads((d / "signature.json").read_text())
    assert rec["generate"]["signature"] == {"a": 1}
    forget_checks()
    assert check_or_record(d, "generate", {"a": 1}) == "match"
    forget_checks()
    # different settings, no outputs yet: re-signed
    assert check_or_record(d, "generate", {"a": 2}) == "new"
    (d / "pairs.jsonl").write_text("x\n")
    (d / "empty.jsonl").write_text("")
    (d / "generate.log").write_text("log\n")
    forget_checks()
    with pytest.raises(SignatureMismatch, match=r"a: 2 -> 3"):
        check_or_record(d, "generate", {"a": 3})
    forget_checks()
    assert check_or_record(d, "generate", {"a": 3}, mode="force") == "forced"
    rec = json.loads((d / "signature.json").read_text())
    assert rec["generate"]["signature"] == {"a": 3} and rec["generate"]["forced_over"] == [{"a": 2}]
    forget_checks()
    assert check_or_record(d, "generate", {"a": 4}, mode="fresh") == "fresh"
    assert not (d / "pairs.jsonl").exists() and (d / "empty.jsonl").exists() and (d / "generate.log").exists()
    (moved,) = (d / "previous").iterdir()
    assert moved.name.startswith("generate-") and (moved / "pairs.jsonl").read_text() == "x\n"
    assert json.loads((moved / "signature.json").read_text())["generate"]["signature"] == {"a": 3}
    # the memo: a second check in this process with the same signature is a match without reading
    assert check_or_record(d, "generate", {"a": 4}) == "match"
    # another command's record is kept beside
    assert check_or_record(d, "eval", {"b": 1}, outputs=["eval"]) == "new"
    assert set(json.loads((d / "signature.json").read_text())) == {"generate", "eval"}


def test_outputs_given_limit_what_counts(tmp_path):
    d = tmp_path
    check_or_record(d, "eval", {"a": 1}, outputs=["eval"])
    (d / "pairs.jsonl").write_text("x\n")  # not eval's output
    forget_checks()
    assert check_or_record(d, "eval", {"a": 2}, outputs=["eval"]) == "new"
    (d / "eval").mkdir()
    (d / "eval" / "sub").mkdir()
    forget_checks()
    assert check_or_record(d, "eval", {"a": 3}, outputs=["eval"]) == "new"  # an empty tree holds no data
    (d / "eval" / "sub" / "r.json").write_text("{}")
    forget_checks()
    with pytest.raises(SignatureMismatch):
        check_or_record(d, "eval", {"a": 4}, outputs=["eval"])


def _hold(path, started, stop):
    lock.acquire(path, "generate")
    started.set()
    stop.wait(30)


def test_the_lock_is_reentrant_and_exclusive(tmp_path):
    d = tmp_path / "r"
    assert lock.acquire(d, "eval") == d and lock.is_held(d)
    assert lock.acquire(d, "eval") == d
    info = lock.holder(d)
    assert info["pid"] == os.getpid() and info["command"] == "eval" and set(info) == {
        "pid", "started", "command", "host"}
    lock.release(d)
    assert lock.is_held(d)
    lock.release(d)
    assert not lock.is_held(d)
    lock.release(d)  # releasing what is not held does nothing
    ctx = mp.get_context("spawn")
    started, stop = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold, args=(str(d), started, stop))
    p.start()
    try:
        assert started.wait(60)
        with pytest.raises(lock.RunDirInUse) as e:
            lock.acquire(d, "eval")
        assert str(e.value).startswith(f"run directory {d} is in use by PID {p.pid} (started ")
        assert ", `sphere generate`). Two writers would interleave" in str(e.value)
        assert not lock.is_held(d)
    finally:
        stop.set()
        p.join(30)
    with lock.locked(d, "eval") as got:
        assert got == d and lock.is_held(d)
    assert not lock.is_held(d)
