"""sphere/rundir/ (lock, resume, fingerprints): who may write a run directory and when its outputs are kept,
moved aside or refused, asserted value by value (the mutation run, scripts/mutation.sh / docs/mutation.md;
each test fails on a mutant the rest of the suite let through)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hydra.conf import HydraConf
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

import sphere.model_paths as _model_paths
from sphere.rundir import fingerprints as fp
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


def test_short_values_and_the_end_of_the_mismatch_message():
    short = resume._short
    assert short(ABSENT) == "<absent>" and short("a") == "'a'" and short(None) == "null"
    assert short({"b": 1, "a": [Path("/p")]}) == '{"a": ["/p"], "b": 1}'
    exact = "x" * 78  # its repr is 80 characters: kept whole
    assert short(exact) == repr(exact)
    assert short(exact + "y") == repr(exact + "y")[:77] + "..." and len(short(exact + "y")) == 80
    assert short(list(range(40)), n=10) == "[0, 1, ..."
    # a key recorded as null and missing now is a difference
    assert differences({"x": None}, {}) == [("x", None, ABSENT)]
    assert mismatch_message("/r", "eval", [("a", 1, 2)]) == (
        "/r: the eval outputs here were written with different settings (a: 1 -> 2). Rerun with resume=fresh "
        "to move them aside (to previous/) and start over in this directory, resume=force to continue with "
        "them deliberately, or use another hydra.run.dir.")


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


_HOLDER = ("import sys; from sphere.rundir import lock; lock.acquire(sys.argv[1], 'generate'); print('held', "
           "flush=True); sys.stdin.read()")


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
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(d)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline() == "held\n"
        with pytest.raises(lock.RunDirInUse) as e:
            lock.acquire(d, "eval")
        assert str(e.value).startswith(f"run directory {d} is in use by PID {p.pid} (started ")
        assert ", `sphere generate`). Two writers would interleave" in str(e.value)
        assert not lock.is_held(d)
    finally:
        p.communicate("", timeout=60)
    with lock.locked(d, "eval") as got:
        assert got == d and lock.is_held(d)
    assert not lock.is_held(d)


# ===================================================================================== fingerprints


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def mem_hashes(monkeypatch):
    """A fresh in-memory hash cache (file_sha256's), so that no test sees another's entries."""
    fresh: dict = {}
    monkeypatch.setattr(fp, "_mem_hashes", fresh)
    return fresh


def test_the_hash_cache_lives_under_sphere_cache_dir_or_home(monkeypatch, tmp_path):
    monkeypatch.setenv("SPHERE_CACHE_DIR", str(tmp_path / "c"))
    assert fp._cache_file() == tmp_path / "c" / "file_sha256.json"
    monkeypatch.setenv("SPHERE_CACHE_DIR", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fp._cache_file() == tmp_path / "home" / ".cache" / "sphere" / "file_sha256.json"
    monkeypatch.delenv("SPHERE_CACHE_DIR")
    assert fp._cache_file() == tmp_path / "home" / ".cache" / "sphere" / "file_sha256.json"


def test_file_sha256_of_a_small_file_is_remembered_in_memory_not_on_disk(monkeypatch, tmp_path, mem_hashes):
    monkeypatch.setenv("SPHERE_CACHE_DIR", str(tmp_path / "cache"))
    data = b"0123456789" * 300_000  # 3 MB: several 1 MiB reads
    f = tmp_path / "f.bin"
    f.write_bytes(data)
    assert fp.file_sha256(str(f)) == _sha(data)
    st = f.stat()
    assert mem_hashes == {(os.path.realpath(f), st.st_size, st.st_mtime_ns, st.st_ino): _sha(data)}
    assert not (tmp_path / "cache").exists()  # below _HASH_CACHE_MIN: no disk cache
    # a second call answers from memory
    mem_hashes[(os.path.realpath(f), st.st_size, st.st_mtime_ns, st.st_ino)] = "remembered"
    assert fp.file_sha256(f) == "remembered"
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert fp.file_sha256(empty) == _sha(b"")
    under = tmp_path / "under"
    with open(under, "wb") as fh:
        fh.truncate(fp._HASH_CACHE_MIN - 1)
    assert fp.file_sha256(under) == _sha(b"\0" * (fp._HASH_CACHE_MIN - 1))
    assert not (tmp_path / "cache").exists()


def _big(path: Path) -> Path:
    with open(path, "wb") as fh:  # sparse: exactly the size from which hashes are cached on disk
        fh.truncate(fp._HASH_CACHE_MIN)
    return path


def test_file_sha256_of_a_big_file_is_cached_on_disk_by_path_size_mtime_inode(monkeypatch, tmp_path,
                                                                               mem_hashes):
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("SPHERE_CACHE_DIR", str(cache_dir))
    f = _big(tmp_path / "big.bin")
    real = _sha(b"\0" * fp._HASH_CACHE_MIN)
    assert fp.file_sha256(f) == real
    st = f.stat()
    key = os.path.realpath(f)
    entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "sha256": real}
    cache = cache_dir / "file_sha256.json"
    assert json.loads(cache.read_text()) == {key: entry}
    # another process (an empty memory) reads the disk cache instead of hashing
    mem_hashes.clear()
    cache.write_text(json.dumps({key: {**entry, "sha256": "from-disk"}}))
    assert fp.file_sha256(f) == "from-disk"
    assert mem_hashes == {(key, st.st_size, st.st_mtime_ns, st.st_ino): "from-disk"}
    # an entry whose size, mtime or inode differs is stale: hashed again and rewritten
    for field in ("size", "mtime_ns", "ino"):
        mem_hashes.clear()
        cache.write_text(json.dumps({key: {**entry, field: entry[field] + 1, "sha256": "stale"}, "other": 1}))
        assert fp.file_sha256(f) == real
        assert json.loads(cache.read_text()) == {key: entry, "other": 1}
    # an entry that is no mapping, a corrupt or a missing cache file: hashed
    for text in (json.dumps({key: "x"}), "{not json", None):
        mem_hashes.clear()
        if text is None:
            cache.unlink()
        else:
            cache.write_text(text)
        assert fp.file_sha256(f) == real
        assert json.loads(cache.read_text())[key] == entry


def test_file_sha256_when_the_cache_cannot_be_written(monkeypatch, tmp_path, mem_hashes):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache directory would be")
    monkeypatch.setenv("SPHERE_CACHE_DIR", str(blocker))
    f = _big(tmp_path / "big.bin")
    assert fp.file_sha256(f) == _sha(b"\0" * fp._HASH_CACHE_MIN)
    assert blocker.read_text() == "a file where the cache directory would be"


def _model_dir(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, data in (("config.json", b"{}"), ("tokenizer.json", b"tok"), ("model.safetensors", b"w1"),
                       ("w2.bin", b"w2"), ("a.pt", b"pt"), ("z.gguf", b"gg"), ("m.pth", b"pth"),
                       ("b.model", b"sp"), ("c.tiktoken", b"tt"), ("merges.txt", b"m")):
        (d / name).write_bytes(data)
    (d / "notes.txt").write_bytes(b"not part of the model")
    (d / "recipe.json").write_bytes(b"not part of the model either")
    (d / "sub.bin").mkdir()  # a directory, whatever its suffix
    (d / "sub.bin" / "x.bin").write_bytes(b"nested")
    return d


def _expected_dir_sha(d: Path, names: list[str]) -> str:
    h = hashlib.sha256()
    for n in sorted(names):
        h.update(f"{n}\0{_sha((d / n).read_bytes())}\n".encode())
    return h.hexdigest()


_MODEL_FILES = ["config.json", "tokenizer.json", "model.safetensors", "w2.bin", "a.pt", "z.gguf", "m.pth",
                "b.model", "c.tiktoken", "merges.txt"]


def test_model_dir_sha256_covers_weights_config_and_tokenizer_files_by_name_and_content(tmp_path, mem_hashes):
    d = _model_dir(tmp_path / "m")
    want = _expected_dir_sha(d, _MODEL_FILES)
    assert fp.model_dir_sha256(str(d)) == want
    (d / "notes.txt").write_bytes(b"changed")
    assert fp.model_dir_sha256(d) == want
    (d / "a.pt").write_bytes(b"pt2")
    assert fp.model_dir_sha256(d) == _expected_dir_sha(d, _MODEL_FILES) != want


def test_is_pathlike_follows_resolve_model(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()
    for s, want in (("/abs", True), ("./rel", True), ("~/m", True), ("a/b/c", True), ("org/name", False),
                    ("name", False), ("here", True), ("here/x", False)):
        assert fp._is_pathlike(s) is want, s


def test_model_fingerprint_by_content_for_directories_and_by_name_otherwise(monkeypatch, tmp_path,
                                                                            mem_hashes):
    d = _model_dir(tmp_path / "ckpt")
    sha = _expected_dir_sha(d, _MODEL_FILES)
    assert fp.model_fingerprint(f"  {d} ") == {"sha256": sha}
    assert fp.model_fingerprint(d) == {"sha256": sha}
    (tmp_path / "noconfig").mkdir()
    assert fp.model_fingerprint(str(tmp_path / "noconfig")) == {"name": str(tmp_path / "noconfig")}
    assert fp.model_fingerprint("org/some-model") == {"name": "org/some-model"}
    assert fp.model_fingerprint(" plain ") == {"name": "plain"}
    monkeypatch.setenv("HOME", str(tmp_path))
    assert fp.model_fingerprint("~/ckpt") == {"sha256": sha}


def test_model_fingerprint_of_shipped_models_by_name_and_content(monkeypatch, tmp_path, mem_hashes):
    from sphere.mini import assets_dir

    for name in ("mini", " mini-small"):
        got = fp.model_fingerprint(name)
        assert got == {"name": name.strip(), "sha256": fp.model_dir_sha256(assets_dir() / name.strip())}
    s = "standin-qwen2_5-small"
    assert fp.model_fingerprint(s) == {"name": s, "sha256": fp.model_dir_sha256(_model_paths.standin_path(s))}
    # a shipped name that cannot be resolved: named only (the command's model loading reports it)
    monkeypatch.setattr(_model_paths, "STANDIN_NAMES", (*_model_paths.STANDIN_NAMES, "standin-gone"))
    assert fp.model_fingerprint("standin-gone") == {"name": "standin-gone"}


def test_model_fingerprint_resolves_mini_with_the_config(monkeypatch, tmp_path, mem_hashes):
    """Not shipped: the mini model is found in the config's paths.cache_dir (not SPHERE_CACHE_DIR)."""
    import sphere.mini as mini

    shipped = mini.assets_dir() / "mini"
    monkeypatch.setattr(mini, "assets_dir", lambda: tmp_path / "no-assets")
    monkeypatch.setenv("SPHERE_CACHE_DIR", str(tmp_path / "env-cache"))
    recipe = mini.load_recipe("policy")
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    target = tmp_path / "cfg-cache" / "mini" / f"{recipe['name']}-{key}"
    shutil.copytree(shipped, target)
    cfg = OmegaConf.create({"paths": {"cache_dir": str(tmp_path / "cfg-cache")}})
    assert fp.model_fingerprint("mini", cfg) == {"name": "mini", "sha256": fp.model_dir_sha256(target)}
    assert fp.model_fingerprint("mini") == {"name": "mini"}


def test_data_signature_hashes_local_sources_and_names_the_others(monkeypatch, tmp_path, mem_hashes):
    monkeypatch.chdir(tmp_path)
    data_dir = tmp_path / "data"
    (data_dir / "math").mkdir(parents=True)
    (data_dir / "math" / "train.jsonl").write_bytes(b'{"q": 1}\n')
    (tmp_path / "local.jsonl").write_bytes(b'{"q": 2}\n')
    # files that happen to be called like the non-file sources are not read
    (tmp_path / "mini").write_bytes(b"a file named mini")
    (tmp_path / "hf:org").mkdir()
    (tmp_path / "hf:org" / "set").write_bytes(b"a file named like a hub source")
    problems = ["math_train", "gsm8k_train", "mini", "hf:org/set", str(tmp_path / "local.jsonl"),
                str(tmp_path / "absent.jsonl")]
    dcfg = OmegaConf.create({"problems": problems, "data_dir": str(data_dir), "limit": 5, "split": "train"})
    assert fp.data_signature(dcfg) == {
        "config": {"problems": problems, "limit": 5, "split": "train"},
        "files_sha256": {"math_train": _sha(b'{"q": 1}\n'), "gsm8k_train": "<missing>",
                         "local.jsonl": _sha(b'{"q": 2}\n')},
    }
    one = OmegaConf.create({"problems": "mini", "data_dir": "elsewhere"})
    assert fp.data_signature(one) == {"config": {"problems": "mini"}, "files_sha256": {}}


def _gen_cfg(**over):
    cfg = {
        "model": {"policy": "org/policy", "small": "org/small"},
        "data": {"problems": "mini", "data_dir": "/nowhere", "limit": 3},
        "search": {"expansions": 2, "temperature": 0.7},
        "scorer": {"name": "prm", "model": "org/prm", "shared_prefix": "off"},
        "stages": {"stage1": True, "stage3": True, "close_policy_before_small": True},
        "filters": {"min_gap": 0.1},
        "prompt": {"template": "t"},
        "sampling": {"max_solution_tokens": 512, "n": 4, "temperature": 0.8},
        "backend": {"name": "hf", "dtype": "float32", "device": "cpu"},
        "seed": 7,
        "paths": {"out": "/somewhere"},
        "workers": 3,
    }
    for k, v in over.items():
        cfg[k] = v
    return OmegaConf.create(cfg)


_GEN_SIG = {
    "model": {"policy": {"name": "org/policy"}, "small": {"name": "org/small"}, "prm": {"name": "org/prm"}},
    "data": {"config": {"problems": "mini", "limit": 3}, "files_sha256": {}},
    "search": {"expansions": 2, "temperature": 0.7},
    "scorer": {"name": "prm", "model": "org/prm", "shared_prefix": "off"},
    "stages": {"stage1": True, "stage3": True},
    "filters": {"min_gap": 0.1},
    "prompt": {"template": "t"},
    "sampling": {"max_solution_tokens": 512},
    "backend": {"name": "hf", "dtype": "float32"},
    "seed": 7,
}


def test_generate_signature_is_what_determines_the_outputs(tmp_path, mem_hashes):
    assert fp.generate_signature(_gen_cfg()) == _GEN_SIG
    # `sphere run` names the models of a round
    d = _model_dir(tmp_path / "round1")
    got = fp.generate_signature(_gen_cfg(), policy=str(d), small="org/other")
    assert got["model"] == {"policy": {"sha256": _expected_dir_sha(d, _MODEL_FILES)},
                            "small": {"name": "org/other"}, "prm": {"name": "org/prm"}}
    # no stage 3: no small model; stage3 unset: stage 3 runs
    got = fp.generate_signature(_gen_cfg(stages={"stage3": False, "close_policy_before_small": False}))
    assert got["model"] == {"policy": {"name": "org/policy"}, "prm": {"name": "org/prm"}}
    assert got["stages"] == {"stage3": False}
    got = fp.generate_signature(_gen_cfg(stages={"stage1": False}))
    assert got["model"]["small"] == {"name": "org/small"} and got["stages"] == {"stage1": False}
    # no stages node at all
    got = fp.generate_signature(_gen_cfg(stages=None))
    assert got["stages"] == {} and got["model"]["small"] == {"name": "org/small"}
    # the PRM is a model only for scorer=prm with a model
    got = fp.generate_signature(_gen_cfg(scorer={"name": "verifier", "model": "org/prm"}))
    assert got["model"] == {"policy": {"name": "org/policy"}, "small": {"name": "org/small"}}
    assert got["scorer"] == {"name": "verifier", "model": "org/prm"}
    got = fp.generate_signature(_gen_cfg(scorer={"name": "prm", "model": ""}))
    assert "prm" not in got["model"]
    got = fp.generate_signature(_gen_cfg(scorer=None, sampling=None, backend=None, seed=None))
    assert got["scorer"] == {} and got["sampling"] == {} and got["backend"] == {"name": None, "dtype": None}
    assert got["seed"] is None


def test_generate_signature_resolves_mini_models_with_the_config(monkeypatch, tmp_path, mem_hashes):
    import sphere.mini as mini

    shipped = mini.assets_dir()
    monkeypatch.setattr(mini, "assets_dir", lambda: tmp_path / "no-assets")
    monkeypatch.setenv("SPHERE_CACHE_DIR", str(tmp_path / "env-cache"))
    want = {}
    for which, name in (("policy", "mini"), ("small", "mini-small")):
        recipe = mini.load_recipe(which)
        key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
        target = tmp_path / "cfg-cache" / "mini" / f"{recipe['name']}-{key}"
        shutil.copytree(shipped / name, target)
        want[which] = {"name": name, "sha256": fp.model_dir_sha256(target)}
    cfg = _gen_cfg(model={"policy": "mini", "small": "mini-small"}, scorer={"name": "prm", "model": "mini"},
                   paths={"cache_dir": str(tmp_path / "cfg-cache")})
    assert fp.generate_signature(cfg)["model"] == {"policy": want["policy"], "small": want["small"],
                                                   "prm": want["policy"]}


def test_check_generate_records_the_generate_signature(tmp_path, mem_hashes):
    out = tmp_path / "gen"
    assert fp.check_generate(_gen_cfg(), out) == "new"
    rec = json.loads((out / "signature.json").read_text())
    assert list(rec) == ["generate"] and rec["generate"]["signature"] == flatten(_GEN_SIG)
    (out / "pairs.jsonl").write_text("{}\n")
    forget_checks()
    assert fp.check_generate(_gen_cfg(), str(out)) == "match"
    forget_checks()
    with pytest.raises(SignatureMismatch, match=r"model\.policy\.name: 'org/policy' -> 'org/p2'; "
                                                r"model\.small\.name: 'org/small' -> 'org/s2'\)"):
        fp.check_generate(_gen_cfg(), out, policy="org/p2", small="org/s2")


def test_train_signature_is_the_recipe_the_base_model_and_the_pairs(tmp_path, mem_hashes):
    base = _model_dir(tmp_path / "base")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(b'{"prompt": "p"}\n')
    t = OmegaConf.create({"beta": 0.1, "lr": 1e-5, "loss": {"name": "sigmoid"}, "threads": 4,
                          "progress": True, "logging_steps": 1, "save_steps": 10, "save_total_limit": 2})
    assert fp.train_signature(t, base, str(pairs)) == {
        "train": {"beta": 0.1, "lr": 1e-5, "loss": {"name": "sigmoid"}},
        "base_model": {"sha256": _expected_dir_sha(base, _MODEL_FILES)},
        "pairs_sha256": _sha(b'{"prompt": "p"}\n'),
    }
    assert fp.train_signature({"beta": 0.2}, "org/base", pairs) == {
        "train": {"beta": 0.2}, "base_model": {"name": "org/base"},
        "pairs_sha256": _sha(b'{"prompt": "p"}\n')}


# ============================================================================================ resume


@pytest.fixture
def prior(monkeypatch):
    """A fresh table of remembered ``.hydra/`` records (sphere.rundir.resume._prior_hydra)."""
    fresh: dict = {}
    monkeypatch.setattr(resume, "_prior_hydra", fresh)
    return fresh


def _hydra_yaml(config_name: str) -> bytes:
    return f"hydra:\n  job:\n    config_name: {config_name}\n    name: x\n".encode()


def test_absent_and_plain():
    assert repr(ABSENT) == "<absent>"
    got = resume._plain(OmegaConf.create({"a": [1, {"b": "${c}"}], "c": 2}))
    assert got == {"a": [1, {"b": 2}], "c": 2} and type(got["a"]) is list and type(got) is dict
    lst = resume._plain(OmegaConf.create([1, 2]))
    assert lst == [1, 2] and type(lst) is list
    assert resume._plain({"p": Path("/x"), 3: (1, Path("y"))}) == {"p": "/x", "3": [1, "y"]}


def test_record_command_names_the_command_of_a_hydra_record():
    rc = resume._record_command
    assert rc(_hydra_yaml("generate")) == "generate"
    assert rc(_hydra_yaml("pretrain_mini")) == "pretrain-mini"
    assert rc(_hydra_yaml("bench_engine")) == "bench engine"
    for bad in (None, b"", b"hydra: null\n", b"hydra:\n  job: null\n", b"hydra:\n  job:\n    name: x\n",
                b"hydra: [unclosed\n", b"- a list\n", b"hydra: 3\n", b"hydra:\n  job:\n    config_name:\n"):
        assert rc(bad) == "", bad


def test_remember_prior_hydra_keeps_a_copy_under_the_real_path(tmp_path, prior):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    files = {"hydra.yaml": b"h"}
    resume.remember_prior_hydra(tmp_path / "link", files)
    files["config.yaml"] = b"c"
    assert prior == {os.path.realpath(tmp_path / "real"): {"hydra.yaml": b"h"}}


def _hydra_dir(d: Path, config_name: str, **extra: bytes) -> Path:
    h = d / ".hydra"
    h.mkdir(parents=True, exist_ok=True)
    (h / "hydra.yaml").write_bytes(_hydra_yaml(config_name))
    (h / "config.yaml").write_bytes(f"cfg: {config_name}\n".encode())
    for name, data in extra.items():
        (h / name).write_bytes(data)
    return h


def _tree(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


def test_keep_command_record_keeps_each_commands_record(tmp_path, prior):
    d = tmp_path / "run"
    d.mkdir()
    resume.keep_command_record(d, "generate")  # no .hydra: nothing to keep
    assert _tree(d) == {}
    h = _hydra_dir(d, "viz_tree", **{"overrides.yaml": b"- a=1\n"})
    (h / "somedir").mkdir()
    resume.remember_prior_hydra(d, {"hydra.yaml": _hydra_yaml("bench_engine"), "config.yaml": b"old cfg\n"})
    resume.keep_command_record(d, "viz tree")
    assert _tree(h) == {
        "bench-engine": None, "bench-engine/config.yaml": b"old cfg\n",
        "bench-engine/hydra.yaml": _hydra_yaml("bench_engine"),
        "config.yaml": b"cfg: viz_tree\n", "hydra.yaml": _hydra_yaml("viz_tree"),
        "overrides.yaml": b"- a=1\n", "somedir": None,
        "viz-tree": None, "viz-tree/config.yaml": b"cfg: viz_tree\n",
        "viz-tree/hydra.yaml": _hydra_yaml("viz_tree"),
        "viz-tree/overrides.yaml": b"- a=1\n",
    }
    # again, after the top record changed: the other command's kept record stays as it was, this one's is
    # updated
    (h / "config.yaml").write_bytes(b"cfg: second\n")
    resume.remember_prior_hydra(d, {"hydra.yaml": _hydra_yaml("bench_engine"), "config.yaml": b"newer\n"})
    resume.keep_command_record(d, "viz tree")
    assert (h / "bench-engine" / "config.yaml").read_bytes() == b"old cfg\n"
    assert (h / "viz-tree" / "config.yaml").read_bytes() == b"cfg: second\n"


def test_keep_command_record_of_the_same_command_or_of_a_phase(tmp_path, prior):
    d = tmp_path / "run"
    h = _hydra_dir(d, "generate")
    resume.remember_prior_hydra(d, {"hydra.yaml": _hydra_yaml("generate"), "config.yaml": b"before\n"})
    resume.keep_command_record(d, "generate")  # the record before was this command's: nothing else kept
    assert sorted(p.name for p in h.iterdir()) == ["config.yaml", "generate", "hydra.yaml"]
    assert _tree(h / "generate") == {"config.yaml": b"cfg: generate\n", "hydra.yaml": _hydra_yaml("generate")}
    # a phase (train) called inside `sphere run`: the top record is run's; the record before (eval's) is kept
    d2 = tmp_path / "run2"
    h2 = _hydra_dir(d2, "run")
    resume.remember_prior_hydra(d2, {"hydra.yaml": _hydra_yaml("eval")})
    resume.keep_command_record(d2, "train")
    assert sorted(p.name for p in h2.iterdir()) == ["config.yaml", "eval", "hydra.yaml"]
    assert _tree(h2 / "eval") == {"hydra.yaml": _hydra_yaml("eval")}
    # no record remembered (not started through the CLI), a top record without a command
    d3 = tmp_path / "run3"
    h3 = _hydra_dir(d3, "train")
    (h3 / "hydra.yaml").write_bytes(b"hydra: {}\n")
    resume.keep_command_record(d3, "train")
    assert sorted(p.name for p in h3.iterdir()) == ["config.yaml", "hydra.yaml"]


def test_keep_command_record_through_check_or_record(tmp_path, prior):
    d = tmp_path / "run"
    _hydra_dir(d, "eval")
    assert check_or_record(d, "eval", {"a": 1}, outputs=["eval"]) == "new"
    assert _tree(d / ".hydra" / "eval") == {"config.yaml": b"cfg: eval\n", "hydra.yaml": _hydra_yaml("eval")}


_STAMP = re.compile(r"(\d{8}T\d{6})(\d{6})Z")


@pytest.fixture
def far_timezone(monkeypatch):
    """Local time 5:30 ahead of UTC, so that a stamp taken in local time is told from a UTC one."""
    import time

    monkeypatch.setenv("TZ", "IST-5:30")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_move_aside_moves_outputs_with_their_record(tmp_path, prior, capsys, far_timezone):
    d = tmp_path / "run"
    d.mkdir()
    (d / "pairs.jsonl").write_text("p\n")
    (d / "stage").mkdir()
    (d / "stage" / "s.json").write_text("{}")
    (d / "keep.jsonl").write_text("k\n")
    _hydra_dir(d, "generate")
    resume.remember_prior_hydra(d, {"hydra.yaml": b"before", "config.yaml": b"cfg before"})
    entry = {"signature": {"a": 1}, "recorded_utc": "then"}
    before = datetime.now(timezone.utc)
    dest = resume._move_aside(d, "bench engine", [d / "pairs.jsonl", d / "stage"], entry)
    assert dest.parent == d / "previous" and dest.name.startswith("bench-engine-")
    m = _STAMP.fullmatch(dest.name[len("bench-engine-"):])
    assert m is not None
    stamp = datetime.strptime(m.group(1), "%Y%m%dT%H%M%S").replace(tzinfo=timezone.utc)
    assert before - timedelta(seconds=1) <= stamp <= datetime.now(timezone.utc)
    assert _tree(dest) == {".hydra": None, ".hydra/config.yaml": b"cfg before",
                           ".hydra/hydra.yaml": b"before", "pairs.jsonl": b"p\n",
                           "signature.json": (json.dumps({"bench engine": entry}, indent=2) + "\n").encode(),
                           "stage": None, "stage/s.json": b"{}"}
    assert not (d / "pairs.jsonl").exists() and not (d / "stage").exists() and (d / "keep.jsonl").exists()
    err = capsys.readouterr().err
    assert err == f"sphere bench engine: resume=fresh: moved the previous outputs of {d} to {dest}\n"


def test_move_aside_without_a_remembered_record(tmp_path, prior):
    d = tmp_path / "run"
    d.mkdir()
    (d / "a").write_text("a")
    h = _hydra_dir(d, "generate")
    (h / "sub").mkdir()
    dest = resume._move_aside(d, "generate", [d / "a"])  # the .hydra/ as it is now, no signature entry
    assert _tree(dest) == {".hydra": None, ".hydra/config.yaml": b"cfg: generate\n",
                           ".hydra/hydra.yaml": _hydra_yaml("generate"), "a": b"a"}
    # a remembered empty record (no .hydra/ before this command): none is kept
    (d / "b").write_text("b")
    resume.remember_prior_hydra(d, {})
    dest = resume._move_aside(d, "eval", [d / "b"])
    assert _tree(dest) == {"b": b"b"}
    # no .hydra/ at all
    d2 = tmp_path / "bare"
    d2.mkdir()
    (d2 / "c").write_text("c")
    assert _tree(resume._move_aside(d2, "eval", [d2 / "c"])) == {"c": b"c"}


def test_outputs_present_needs_a_non_empty_file(tmp_path):
    d = tmp_path
    (d / "one").write_bytes(b"x")
    (d / "empty").write_bytes(b"")
    (d / "dangling").symlink_to(d / "nowhere")
    (d / "link").symlink_to(d / "one")
    os.mkfifo(d / "fifo")
    (d / "tree" / "sub").mkdir(parents=True)
    (d / "tree" / "sub" / "f").write_bytes(b"y")
    (d / "emptytree" / "sub").mkdir(parents=True)
    (d / "run.log").write_text("log")
    (d / ".hydra").mkdir()
    (d / ".hydra" / "x.yaml").write_text("x")
    (d / "signature.json").write_text("{}")
    assert sorted(p.name for p in resume._outputs_present(d, None)) == ["link", "one", "tree"]
    given = ["dangling", "fifo", "empty", "emptytree", "missing", "one"]
    assert resume._outputs_present(d, given) == [d / "one"]
    assert resume._outputs_present(d / "missing", None) == []


def test_check_or_record_reads_a_broken_record_as_none(tmp_path):
    texts = ("[1, 2]", "not json", json.dumps({"generate": "junk", "eval": {"signature": {"b": 1}}}))
    for i, text in enumerate(texts):
        d = tmp_path / str(i)
        d.mkdir()
        (d / "out.txt").write_text("data")
        (d / "signature.json").write_text(text)
        forget_checks()
        assert check_or_record(d, "generate", {"a": 1}) == "new"
        rec = json.loads((d / "signature.json").read_text())
        assert rec["generate"]["signature"] == {"a": 1}
    assert rec["eval"] == {"signature": {"b": 1}}


def test_check_or_record_uses_the_process_default_mode(tmp_path):
    d = tmp_path
    (d / "out.txt").write_text("data")
    (d / "signature.json").write_text(json.dumps({"generate": {"signature": {"a": 1}}}))
    set_default_mode("force")
    assert check_or_record(d, "generate", {"a": 2}) == "forced"
    forget_checks()
    assert check_or_record(d, "generate", {"a": 3}, mode="auto") == "forced"
    forget_checks()
    assert check_or_record(d, "generate", {"a": 4}, mode=" AUTO ") == "forced"
    assert json.loads((d / "signature.json").read_text())["generate"]["forced_over"] == [{"a": 1}, {"a": 2},
                                                                                          {"a": 3}]
    set_default_mode("fresh")
    forget_checks()
    assert check_or_record(d, "generate", {"a": 5}) == "fresh"
    assert not (d / "out.txt").exists()


def test_check_or_record_mismatch_message_names_the_directory_and_command(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    (d / "out.txt").write_text("data")
    (d / "signature.json").write_text(json.dumps({"eval": {"signature": {"a": 1}}}))
    with pytest.raises(SignatureMismatch) as e:
        check_or_record(str(d), "eval", {"a": 2})
    assert str(e.value) == mismatch_message(d, "eval", [("a", 1, 2)])
    assert str(e.value).startswith(f"{d}: the eval outputs here were written with different settings "
                                   "(a: 1 -> 2).")


def test_check_or_record_memo_is_per_directory_and_command_and_sorted(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert check_or_record(a, "generate", {"x": 1, "y": 2}) == "new"
    assert check_or_record(b, "generate", {"x": 1, "y": 2}) == "new"  # another directory: not memoised
    assert check_or_record(a, "eval", {"x": 1, "y": 2}) == "new"  # another command
    # the memo answers without reading the record again (key order does not matter)
    (a / "signature.json").unlink()
    assert check_or_record(a, "generate", {"y": 2, "x": 1}) == "match"
    assert not (a / "signature.json").exists()
    # a different signature is checked again
    assert check_or_record(a, "generate", {"x": 2, "y": 2}) == "new"
    # numpy values (a sweep's settings) are recorded and memoised
    assert check_or_record(b, "train", {"lr": np.float32(0.5)}) == "new"
    assert json.loads((b / "signature.json").read_text())["train"]["signature"] == {"lr": 0.5}


def test_check_or_record_rewrites_the_record_only_when_it_changes(tmp_path):
    d = tmp_path
    (d / "out.txt").write_text("data")
    rec = {"generate": {"signature": {"a": 1}, "recorded_utc": "then"}}
    (d / "signature.json").write_text(json.dumps(rec))
    assert check_or_record(d, "generate", {"a": 1}) == "match"
    assert json.loads((d / "signature.json").read_text()) == rec
    # a key added since (its old behaviour): a match, recorded with the key now
    forget_checks()
    assert check_or_record(d, "generate", {"a": 1, "scorer": {"shared_prefix": "off"}}) == "match"
    new = json.loads((d / "signature.json").read_text())["generate"]
    assert new["signature"] == {"a": 1, "scorer.shared_prefix": "off"} and new["recorded_utc"] != "then"
    # fresh with the same settings: outputs moved aside, recorded again
    (d / "signature.json").write_text(json.dumps(rec))
    forget_checks()
    before = datetime.now(timezone.utc).replace(microsecond=0)
    assert check_or_record(d, "generate", {"a": 1}, mode="fresh") == "fresh"
    new = json.loads((d / "signature.json").read_text())["generate"]
    assert set(new) == {"signature", "recorded_utc"} and new["signature"] == {"a": 1}
    when = datetime.fromisoformat(new["recorded_utc"])
    assert new["recorded_utc"].endswith("+00:00") and before <= when <= datetime.now(timezone.utc)


# ============================================================================================== lock


@pytest.fixture
def start_state(monkeypatch, prior):
    """Fresh tables of noted starts (lock._start_state) and remembered records; the process's locks, the
    Hydra config singleton and the resume mode as they were."""
    fresh: dict = {}
    monkeypatch.setattr(lock, "_start_state", fresh)
    held = set(lock._held)
    hydra_cfg = HydraConfig.instance().cfg
    yield fresh
    HydraConfig.instance().cfg = hydra_cfg
    for key in set(lock._held) - held:
        fd = lock._held.pop(key)[0]
        os.close(fd)


def _oserror(code: int, filename: str | None = None) -> OSError:
    return OSError(code, os.strerror(code), filename) if filename else OSError(code, os.strerror(code))


def test_describe_os_error_names_the_path_and_what_to_do():
    nospace = ("no space left writing /d/f (No space left on device, errno 28). Free space on that file "
               "system (or point hydra.run.dir / paths.cache_dir elsewhere) and rerun the same command: "
               "finished work is kept and resumed.")
    got = lock.describe_os_error(_oserror(errno.ENOSPC, "/d/f"), "/run", "generate")
    assert got == "sphere generate: " + nospace
    assert lock.describe_os_error(_oserror(errno.EDQUOT), "/run") == (
        f"sphere: no space left writing /run (Disk quota exceeded, errno {errno.EDQUOT}). Free space on that "
        "file system (or point hydra.run.dir / paths.cache_dir elsewhere) and rerun the same command: "
        "finished work is kept and resumed.")
    for code in (errno.EROFS, errno.EACCES, errno.EPERM):
        assert lock.describe_os_error(_oserror(code, "/ro/x"), "/run", "eval") == (
            f"sphere eval: cannot write /ro/x ({os.strerror(code)}, errno {code}): the run directory must be "
            "writable. Fix its permissions or mount, or choose another hydra.run.dir.")
    for code in (errno.ENOTDIR, errno.EEXIST):
        assert lock.describe_os_error(_oserror(code), Path("/f/run"), "train") == (
            f"sphere train: cannot create the run directory at /f/run ({os.strerror(code)}): a file is in "
            "the way. Choose another hydra.run.dir.")
    assert lock.describe_os_error(_oserror(errno.ENOENT)) == "sphere: No such file or directory (errno 2): ?"
    e = OSError("a message of its own")
    e.errno = errno.EIO
    got = lock.describe_os_error(e, "/run", "run")
    assert got == f"sphere run: a message of its own (errno {errno.EIO}): /run"


def test_cli_errors_turns_known_failures_into_one_line(tmp_path, start_state):
    with lock.cli_errors("generate", tmp_path):
        pass
    for exc in (lock.RunDirInUse("busy"), SignatureMismatch("differs")):
        with pytest.raises(SystemExit) as e:
            with lock.cli_errors("generate", tmp_path):
                raise exc
        assert e.value.code == f"sphere generate: {exc}" and e.value.__suppress_context__
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR):
        exc = _oserror(code)
        with pytest.raises(SystemExit) as e:
            with lock.cli_errors("eval", tmp_path / "r"):
                raise exc
        assert e.value.code == lock.describe_os_error(exc, tmp_path / "r", "eval")
        assert e.value.__suppress_context__
        assert f"{tmp_path / 'r'}" in e.value.code
    for exc in (_oserror(errno.ENOENT), _oserror(errno.EEXIST), ValueError("v"), KeyboardInterrupt()):
        with pytest.raises(type(exc)) as e:
            with lock.cli_errors("eval", tmp_path):
                raise exc
        assert e.value is exc


def test_cli_errors_undoes_a_failed_start_but_not_on_interrupt(tmp_path, start_state):
    d = tmp_path / "new-run"
    lock.note_start(d)
    _hydra_dir(d, "generate")
    (d / "generate.log").write_text("")
    with pytest.raises(KeyboardInterrupt):
        with lock.cli_errors("generate", d):
            raise KeyboardInterrupt
    assert d.is_dir()
    with pytest.raises(ValueError):
        with lock.cli_errors("generate", d):
            raise ValueError("failed")
    assert not d.exists()


def test_command_errors_name_the_output_path_or_the_extra():
    with lock.command_errors("report"):
        pass
    with pytest.raises(SystemExit) as e:
        with lock.command_errors("report"):
            raise _oserror(errno.ENOSPC, "/out/r.html")
    assert e.value.code == ("sphere report: error: no space left writing /out/r.html (No space left on "
                            "device, errno 28). Free space on that file system or choose another out=")
    assert e.value.__suppress_context__
    with pytest.raises(SystemExit) as e:
        with lock.command_errors("sweep", "--out"):
            raise _oserror(errno.EDQUOT)
    assert e.value.code == (f"sphere sweep: error: no space left writing ? (Disk quota exceeded, errno "
                            f"{errno.EDQUOT}). Free space on that file system or choose another --out")
    for code in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR):
        with pytest.raises(SystemExit) as e:
            with lock.command_errors("viz tree", "--out"):
                raise _oserror(code, "/ro/t.svg")
        assert e.value.code == (f"sphere viz tree: error: cannot write /ro/t.svg ({os.strerror(code)}, errno "
                                f"{code}): choose a writable --out")
    for exc in (_oserror(errno.ENOENT, "/in.jsonl"), SystemExit("own"), KeyboardInterrupt(), ValueError("v")):
        with pytest.raises(type(exc)) as e:
            with lock.command_errors("report"):
                raise exc
        assert e.value is exc
    for name, how in (("matplotlib.pyplot", "pip install 'sphere[report]'"),
                      ("ray", "pip install 'sphere[scale]'"), ("vllm", "pip install 'sphere[gpu (or cpu)]'"),
                      ("llm_reasoners", "pip install 'sphere[bench]'"),
                      ("mctx", "pip install 'sphere[bench]'"),
                      ("submitit", "pip install 'sphere[scale]'"),
                      ("hydra_plugins.x", "pip install 'sphere[scale]'"), ("yaml.cyaml", "pip install yaml")):
        with pytest.raises(SystemExit) as e:
            with lock.command_errors("report"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        top = name.split(".")[0]
        assert e.value.code == (f"sphere report: error: needs the Python package {top!r}, which is not "
                                f"installed: {how}")
        assert e.value.__suppress_context__
    with pytest.raises(SystemExit) as e:
        with lock.command_errors("report"):
            raise ModuleNotFoundError("no name")
    assert e.value.code == ("sphere report: error: needs the Python package '', which is not installed: "
                            "pip install ")


def test_note_start_remembers_whether_the_directory_existed_and_its_record(monkeypatch, tmp_path, start_state,
                                                                           prior):
    monkeypatch.chdir(tmp_path)
    lock.note_start("fresh-run")
    key = os.path.realpath(tmp_path / "fresh-run")
    assert start_state == {key: {"existed": False, "hydra": {}}} and prior == {key: {}}
    d = tmp_path / "old"
    h = _hydra_dir(d, "eval")
    (h / "eval").mkdir()
    (tmp_path / "link").symlink_to(d)
    lock.note_start(tmp_path / "link")
    rec = {"hydra.yaml": _hydra_yaml("eval"), "config.yaml": b"cfg: eval\n"}
    assert start_state[os.path.realpath(d)] == {"existed": True, "hydra": rec}
    assert prior[os.path.realpath(d)] == rec
    (tmp_path / "bare").mkdir()
    lock.note_start(tmp_path / "bare")
    assert start_state[os.path.realpath(tmp_path / "bare")] == {"existed": True, "hydra": {}}


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs Linux's /proc/self/mem")
def test_note_start_skips_a_record_file_it_cannot_read(tmp_path, start_state, prior):
    d = tmp_path / "run"
    h = _hydra_dir(d, "eval")
    (h / "unreadable.yaml").symlink_to("/proc/self/mem")  # a regular file whose read fails (EIO)
    lock.note_start(d)
    rec = {"hydra.yaml": _hydra_yaml("eval"), "config.yaml": b"cfg: eval\n"}
    assert start_state == {os.path.realpath(d): {"existed": True, "hydra": rec}}


def test_undo_failed_start_removes_a_new_directory_without_outputs(tmp_path, start_state):
    assert lock.undo_failed_start(None) is None  # not under Hydra
    assert lock.undo_failed_start(tmp_path) is None  # not noted
    d = tmp_path / "run"
    lock.note_start(d)
    assert lock.undo_failed_start(d) is None  # never created
    _hydra_dir(d, "generate")
    (d / "generate.log").write_text("log")
    (d / "empty.jsonl").write_text("")
    assert lock.undo_failed_start(str(d), ValueError()) == "removed" and not d.exists()
    d.mkdir()
    (d / "pairs.jsonl").write_text("p")
    assert lock.undo_failed_start(d, SignatureMismatch("x")) is None and (d / "pairs.jsonl").exists()
    # under Hydra: the job's output directory
    d2 = tmp_path / "hydra-run"
    lock.note_start(d2)
    d2.mkdir()
    HydraConfig.instance().set_config(_hydra_cfg(tmp_path / "elsewhere", d2))
    assert lock.undo_failed_start(None) == "removed" and not d2.exists()


def test_undo_failed_start_restores_the_record_after_a_refused_resume(tmp_path, start_state):
    d = tmp_path / "run"
    h = _hydra_dir(d, "generate", **{"overrides.yaml": b"- \xff\n"})
    (d / "pairs.jsonl").write_text("p")
    lock.note_start(d)
    # the refused command's Hydra rewrote the record
    (h / "config.yaml").write_bytes(b"cfg: new\n")
    (h / "extra.yaml").write_bytes(b"new file\n")
    (h / "generate").mkdir()
    assert lock.undo_failed_start(d, ValueError()) is None
    assert (h / "config.yaml").read_bytes() == b"cfg: new\n"
    assert lock.undo_failed_start(d, SignatureMismatch("x")) == "restored"
    assert _tree(h) == {"config.yaml": b"cfg: generate\n", "generate": None,
                        "hydra.yaml": _hydra_yaml("generate"), "overrides.yaml": "- \ufffd\n".encode()}
    shutil.rmtree(h)
    assert lock.undo_failed_start(d, SignatureMismatch("x")) is None and not h.exists()


def _hydra_cfg(run_dir, output_dir=None, config_name="generate", **values):
    cfg = OmegaConf.create({"hydra": OmegaConf.structured(HydraConf), **values})
    cfg.hydra.run.dir = str(run_dir)
    cfg.hydra.runtime.output_dir = str(output_dir if output_dir is not None else run_dir)
    cfg.hydra.job.config_name = config_name
    return cfg


def test_command_of_a_config():
    assert lock._command_of(_hydra_cfg("/r", config_name="pretrain_mini")) == "pretrain-mini"
    assert lock._command_of(_hydra_cfg("/r", config_name="bench_engine")) == "bench engine"
    assert lock._command_of(_hydra_cfg("/r", config_name="eval")) == "eval"
    assert lock._command_of(OmegaConf.create({"a": 1})) == ""
    assert lock._command_of(None) == ""


def test_run_dir_lock_callback_holds_the_run_directory(tmp_path, start_state):
    d = tmp_path / "run"
    cb = lock.RunDirLock()
    assert cb._run_dir is None and cb._job_dirs == []
    cfg = _hydra_cfg(d, config_name="pretrain_mini", resume="fresh")
    cb.on_run_start(cfg)
    assert cb._run_dir == str(d) and lock.is_held(d) and lock._held[os.path.realpath(d)][1] == 1
    assert lock.holder(d)["command"] == "pretrain-mini"
    assert start_state == {os.path.realpath(d): {"existed": False, "hydra": {}}}
    assert HydraConfig.get().run.dir == str(d)
    cb.on_job_start(cfg)
    assert resume.default_mode() == "fresh" and cb._job_dirs == [str(d)]
    assert lock._held[os.path.realpath(d)][1] == 2
    cb.on_job_end(cfg)
    assert cb._job_dirs == [] and lock.is_held(d)
    cb.on_job_end(cfg)  # nothing more to release
    assert lock.is_held(d)
    cb.on_run_end(cfg)
    assert cb._run_dir is None and not lock.is_held(d)
    cb.on_run_end(cfg)


def test_run_dir_lock_callback_multirun_jobs(tmp_path, start_state):
    cb = lock.RunDirLock()
    cb.on_run_start(OmegaConf.create({"resume": "force"}))  # no Hydra node: the jobs lock their directories
    assert cb._run_dir is None and start_state == {}
    set_default_mode("force")
    job = _hydra_cfg(tmp_path / "sweep", tmp_path / "sweep" / "0", config_name="generate")
    cb.on_job_start(job)  # no resume key: auto
    assert resume.default_mode() == "auto" and cb._job_dirs == [str(tmp_path / "sweep" / "0")]
    assert lock.holder(tmp_path / "sweep" / "0")["command"] == "generate"
    cb.on_job_end(job)
    assert not lock.is_held(tmp_path / "sweep" / "0")
    cb.on_job_start(OmegaConf.create({"resume": "bogus"}))  # the command itself names a bad resume value
    assert resume.default_mode() == "auto" and cb._job_dirs == []
    set_default_mode("force")
    cb.on_job_start(SimpleNamespace())  # a config without get(): auto
    assert resume.default_mode() == "auto" and cb._job_dirs == []
    bad = _hydra_cfg(tmp_path / "sweep", tmp_path / "sweep" / "1", search={"expansions": "abc"})
    with pytest.raises(SystemExit) as e:
        cb.on_job_start(bad)
    assert e.value.code == "sphere generate: config search.expansions='abc': expected an integer"
    assert e.value.__suppress_context__ and not (tmp_path / "sweep" / "1").exists()


def test_run_dir_lock_callback_checks_types_before_writing(tmp_path, start_state):
    d = tmp_path / "run"
    cb = lock.RunDirLock()
    with pytest.raises(SystemExit) as e:
        cb.on_run_start(_hydra_cfg(d, search={"expansions": "abc"}))
    assert e.value.code == "sphere generate: config search.expansions='abc': expected an integer"
    assert not d.exists() and start_state == {} and cb._run_dir is None
    # in run mode the values were checked once: a job does not check them again
    cb._run_dir = str(d)
    cb.on_job_start(_hydra_cfg(d, search={"expansions": "abc"}))
    assert cb._job_dirs == [str(d)]
    cb.on_job_end(None)
    assert not lock.is_held(d)
    # no command: not checked
    lock.RunDirLock._check_types(OmegaConf.create({"search": {"expansions": "abc"}}))


def test_run_dir_lock_callback_one_line_failures(tmp_path, start_state):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as e:
        lock.RunDirLock().on_run_start(_hydra_cfg(blocker / "run", config_name="eval"))
    assert e.value.code == (f"sphere eval: cannot create the run directory at {blocker / 'run'} (Not a "
                            "directory): a file is in the way. Choose another hydra.run.dir.")
    assert e.value.__suppress_context__
    # another holder (a second open file description of the lock file conflicts like another process)
    d = tmp_path / "busy"
    d.mkdir()
    fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        info = {"pid": 4242, "started": "then", "command": "run", "host": "elsewhere"}
        os.write(fd, json.dumps(info).encode())
        with pytest.raises(SystemExit) as e:
            lock.RunDirLock().on_run_start(_hydra_cfg(d, config_name="eval"))
        assert e.value.code == (f"sphere eval: run directory {d} is in use by PID 4242 on elsewhere "
                                "(started then, `sphere run`). Two writers would interleave their outputs: "
                                "wait for it to finish (or stop it), or choose another hydra.run.dir.")
        assert e.value.__suppress_context__ and not lock.is_held(d)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": 7, "host": socket.gethostname()}).encode(), 0)
        with pytest.raises(lock.RunDirInUse) as e2:
            lock.acquire(d)
        assert str(e2.value).startswith(f"run directory {d} is in use by PID 7 (started ?). Two writers")
    finally:
        os.close(fd)


def test_acquire_writes_the_holder_and_release_frees_the_lock(monkeypatch, tmp_path, start_state):
    monkeypatch.chdir(tmp_path)
    assert lock.holder(tmp_path / "none") is None
    d = tmp_path / "run"
    d.mkdir()
    (d / ".lock").write_text("")
    assert lock.holder(d) is None
    (d / ".lock").write_text("{torn")
    assert lock.holder(d) is None
    (d / ".lock").write_text("x" * 500)  # what an earlier holder left: overwritten whole
    before = datetime.now(timezone.utc).replace(microsecond=0)
    got = lock.acquire("run", "train")
    assert got == d and got.is_absolute()
    text = (d / ".lock").read_text()
    info = json.loads(text)
    assert text.endswith("}\n") and list(info) == ["pid", "started", "command", "host"]
    assert info["pid"] == os.getpid() and info["command"] == "train" and info["host"] == socket.gethostname()
    started = datetime.fromisoformat(info["started"])
    assert started.tzinfo is not None and started.microsecond == 0
    assert before <= started <= datetime.now(timezone.utc)
    umask = os.umask(0)
    os.umask(umask)
    assert lock.acquire(tmp_path / "created") == tmp_path / "created"  # the lock file made by acquire
    assert (tmp_path / "created" / ".lock").stat().st_mode & 0o777 == 0o644 & ~umask
    lock.release(tmp_path / "created")
    (tmp_path / "link").symlink_to(d)
    assert lock.is_held(tmp_path / "link") and lock.is_held("run")
    fd = lock._held[os.path.realpath(d)][0]
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    other = os.open(d / ".lock", os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.release(tmp_path / "link")
        assert not lock.is_held(d)
        with pytest.raises(OSError) as e:
            os.fstat(fd)
        assert e.value.errno == errno.EBADF
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free now
        # held elsewhere without a command, on this host
        os.ftruncate(other, 0)
        os.pwrite(other, json.dumps({"pid": 9, "started": "s", "command": "", "host": socket.gethostname()}
                                    ).encode(), 0)
        with pytest.raises(lock.RunDirInUse) as e2:
            lock.acquire(d, "eval")
        assert str(e2.value) == (f"run directory {d} is in use by PID 9 (started s). Two writers would "
                                 "interleave their outputs: wait for it to finish (or stop it), or choose "
                                 "another hydra.run.dir.")
        assert e2.value.__suppress_context__
        # a holder that has not written its details (yet): waited for about a second, then named as unknown
        os.ftruncate(other, 0)
        t0 = datetime.now(timezone.utc)
        with pytest.raises(lock.RunDirInUse) as e2:
            lock.acquire(d, "eval")
        assert datetime.now(timezone.utc) - t0 < timedelta(seconds=10)  # 20 tries 50 ms apart
        assert str(e2.value).startswith(f"run directory {d} is in use by PID ? (started ?). Two writers")
    finally:
        os.close(other)
    with lock.locked(d, "eval") as got:
        assert got == d and lock.holder(d)["command"] == "eval"
    assert not lock.is_held(d)
    assert lock.acquire(d) == d and lock.holder(d)["command"] == ""
    lock.release(d)
    # a lock whose descriptor was closed behind its back is still dropped without an error
    lock.acquire(d)
    os.close(lock._held[os.path.realpath(d)][0])
    lock.release(d)
    assert not lock.is_held(d)
    with lock.locked(d):
        assert lock.holder(d)["command"] == ""
    assert not lock.is_held(d)


def test_a_new_key_recorded_as_none_is_a_difference():
    # a key absent from the old record differs from an explicit None (only ADDED_KEYS read as their old value)
    assert differences({}, {"x": None}) == [("x", ABSENT, None)]
    assert differences({"x": None}, {"x": None}) == []
