"""Bad input through the real CLI (issue #11): broken data files (tests/bad_inputs/, plus a 50 MB line made at
test time), invalid configs, an unwritable output directory and a model directory without weights.

Each must exit non-zero, say on stderr which file and line (or which config key) is wrong and what is
allowed, and leave no output file behind: the run directory of a failed run holds only Hydra's own
``.hydra/`` record and the job log.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "bad_inputs"

# data file -> (line named in the error, words the message must contain)
DATA_CASES = {
    "missing_answer.jsonl": (2, ["'answer'", "non-empty string"]),
    "missing_id.jsonl": (2, ["'id'", "non-empty string"]),
    "empty_answer.jsonl": (1, ["'answer'", "non-empty string"]),
    "nonstring_answer.jsonl": (2, ["'answer'", "non-empty string"]),
    "null_answer.jsonl": (1, ["'answer'", "non-empty string"]),
    "list_answer.jsonl": (1, ["'answer'", "non-empty string"]),
    "blank_problem.jsonl": (1, ["'problem'", "non-empty string"]),
    "wrong_json.jsonl": (2, ["invalid JSON"]),
    "truncated_json.jsonl": (2, ["invalid JSON"]),
    "not_an_object.jsonl": (1, ["expected a JSON object"]),
    "non_utf8.jsonl": (2, ["not UTF-8"]),
    "utf8_bom.jsonl": (1, ["invalid JSON", "BOM"]),
    "duplicate_ids.jsonl": (3, ["repeats id 'a'", "(line 1)", "unique"]),
    "empty.jsonl": (None, ["no problem records", "id, problem, answer"]),
    "blank_lines.jsonl": (None, ["no problem records"]),
    "nonstring_solution.jsonl": (1, ["'solution'", "string or absent"]),
}

PAIR_CASES = {
    "pairs_missing_rejected.jsonl": (2, ["rejected"]),
    "pairs_chosen_equals_rejected.jsonl": (1, ["chosen"]),
    "pairs_bad_stage.jsonl": (1, ["stage"]),
    "pairs_mixed_kinds.jsonl": (2, []),
    "pairs_non_utf8.jsonl": (2, ["not UTF-8"]),
}

OUTPUT_OK = {".hydra"}  # Hydra's record of the composed config (written before the job starts)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "HYDRA_FULL_ERROR": "0"}


def _sphere(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sphere.cli", *args], capture_output=True, text=True,
                          env=_env(), timeout=timeout, cwd=ROOT)


def _outputs(run_dir: Path) -> list[str]:
    """Files a failed run left in its run directory, except Hydra's record and the job log."""
    if not run_dir.exists():
        return []
    out = []
    for p in run_dir.rglob("*"):
        rel = p.relative_to(run_dir)
        if p.is_file() and rel.parts[0] not in OUTPUT_OK and p.suffix != ".log":
            out.append(str(rel))
    return sorted(out)


def _assert_clean_failure(proc: subprocess.CompletedProcess, run_dir: Path | None,
                          needles: list[str]) -> None:
    err = proc.stderr
    assert proc.returncode != 0, f"exit 0 on bad input; stdout:\n{proc.stdout[-2000:]}"
    for n in needles:
        assert n in err, f"stderr lacks {n!r}:\n{err[-3000:]}"
    if run_dir is not None:
        assert _outputs(run_dir) == [], _outputs(run_dir)


# ---------------------------------------------------------------------------------------------- data files
def test_corpus_is_complete():
    files = {p.name for p in CORPUS.glob("*.jsonl")}
    assert set(DATA_CASES) | set(PAIR_CASES) <= files
    assert all(p.stat().st_size < 4096 for p in CORPUS.iterdir())  # small files; the 50 MB line is made here


@pytest.mark.parametrize("name", sorted(DATA_CASES))
def test_bad_data_file_loader_names_file_and_line(name):
    from sphere.data import load_benchmark

    line, words = DATA_CASES[name]
    path = CORPUS / name
    with pytest.raises(ValueError) as ei:
        load_benchmark(str(path))
    msg = str(ei.value)
    assert str(path) in msg
    if line is not None:
        assert f"{path}:{line}:" in msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("name", sorted(DATA_CASES))
def test_bad_data_file_through_sphere_eval(name, tmp_path):
    line, words = DATA_CASES[name]
    path = CORPUS / name
    out = tmp_path / "run"
    proc = _sphere("eval", "backend=replay", "replay.references=true", f"benchmarks=[{path}]",
                   f"hydra.run.dir={out}")
    _assert_clean_failure(proc, out, [f"{path}:{line}:" if line else str(path), *words])


@pytest.mark.parametrize("name", ["missing_answer.jsonl", "non_utf8.jsonl", "duplicate_ids.jsonl",
                                  "empty.jsonl"])
def test_bad_data_file_through_sphere_generate(name, tmp_path):
    line, words = DATA_CASES[name]
    path = CORPUS / name
    out = tmp_path / "run"
    proc = _sphere("generate", f"data.problems={path}", f"hydra.run.dir={out}")
    _assert_clean_failure(proc, out, [str(path), *words])


@pytest.mark.parametrize("name", sorted(PAIR_CASES))
def test_bad_pairs_file(name):
    from sphere.train.pairs_file import load_pairs

    line, words = PAIR_CASES[name]
    path = CORPUS / name
    with pytest.raises(ValueError) as ei:
        load_pairs(path)
    assert f"{path}:{line}" in str(ei.value)
    for w in words:
        assert w in str(ei.value)


def test_bad_pairs_file_through_sphere_train(tmp_path):
    from sphere.standins.tiny import tiny_model_path

    path = CORPUS / "pairs_missing_rejected.jsonl"
    out = tmp_path / "run"
    proc = _sphere("train", f"model={tiny_model_path()}", f"pairs={path}", f"hydra.run.dir={out}")
    _assert_clean_failure(proc, out, [f"{path}:2", "rejected"])


def test_replay_completions_file_with_non_string_completion(tmp_path):
    path = CORPUS / "replay_nonstring_completion.jsonl"
    out = tmp_path / "run"
    proc = _sphere("eval", "backend=replay", f"replay.path={path}", "benchmarks=[mini]", "limit=2",
                   f"hydra.run.dir={out}")
    _assert_clean_failure(proc, out, [str(path), "completion"])


@pytest.fixture(scope="module")
def fifty_mb_files(tmp_path_factory) -> dict[str, Path]:
    """A 50 MB line, made at test time (never committed): once a valid JSON record, once garbage."""
    d = tmp_path_factory.mktemp("big")
    ok = '{"id": "a", "problem": "1+1?", "answer": "2"}\n'
    valid = d / "huge_record.jsonl"
    with open(valid, "w") as f:
        f.write(ok)
        f.write(json.dumps({"id": "b", "problem": "x" * (50 * 1024 * 1024), "answer": "1"}) + "\n")
    garbage = d / "huge_garbage.jsonl"
    with open(garbage, "wb") as f:
        f.write(ok.encode())
        f.write(b"\xff" * (50 * 1024 * 1024) + b"\n")
    return {"valid": valid, "garbage": garbage}


@pytest.mark.parametrize("kind", ["valid", "garbage"])
def test_fifty_mb_line(kind, fifty_mb_files, tmp_path):
    from sphere.io import MAX_RECORD_BYTES

    path = fifty_mb_files[kind]
    out = tmp_path / "run"
    proc = _sphere("eval", "backend=replay", "replay.references=true", f"benchmarks=[{path}]",
                   f"hydra.run.dir={out}")
    _assert_clean_failure(proc, out, [f"{path}:2:", f"at most {MAX_RECORD_BYTES} bytes"])
    proc = _sphere("generate", f"data.problems={path}", f"hydra.run.dir={out}")
    _assert_clean_failure(proc, out, [f"{path}:2:", "at most"])


# ---------------------------------------------------------------------------------------------- configs
def _ids(x):
    return "+".join(x) if isinstance(x, list) and "=" in x[0] else None


GENERATE_CONFIGS = [
    (["search.expansions=0"], ["search.expansions", ">= 1"]),
    (["search.expansions=-3"], ["search.expansions", ">= 1"]),
    (["search.max_depth=0"], ["search.max_depth", ">= 1"]),
    (["search.batch_leaves=-1"], ["search.batch_leaves", ">= 1"]),
    (["search.mode=mcts", "search.simulations=0"], ["search.simulations", ">= 1"]),
    (["search.mode=mcts", "search.k=0"], ["search.k", ">= 1"]),
    (["search.pruning.policy=topk", "search.pruning.k=9"], ["search.pruning.k", "1..search.expansions (5)"]),
    (["search.pruning.policy=best"], ["search.pruning.policy", "minmax"]),
    (["search.mode=beam"], ["search.mode", "'paper' or 'mcts'"]),
    (["search.engine.rule=random"], ["search.engine.rule", "uct | puct"]),
    (["search.pruning.policy=threshold", "search.pruning.tau=1.5"], ["search.pruning.tau", "[0, 1]"]),
    (["search.pruning.policy=threshold", "search.pruning.tau=-0.1"], ["search.pruning.tau", "[0, 1]"]),
    (["search.top_p=0"], ["search.top_p", "(0, 1]"]),
    (["search.temperature=-1"], ["search.temperature", ">= 0"]),
    (["filters.min_edit_distance=1.5"], ["filters.min_edit_distance", "[0, 1]"]),
    (["filters.max_length_ratio=0.5"], ["filters.max_length_ratio", ">= 1"]),
    (["filters.chosen_min_step_score=2"], ["filters.chosen_min_step_score", "[0, 1]"]),
    (["stages.inverted=keep"], ["stages.inverted", "swap | drop"]),
    (["stages.small_expansions_factor=0"], ["stages.small_expansions_factor", ">= 1"]),
    (["data.limit=-5"], ["data.limit", ">= 0"]),
    (["data.limit=0"], ["config data.limit=0", "positive integer"]),  # blamed data.problems (issue #29)
    (["data.problems=hf:nosuch-org/nosuch-set"], ["data.problems=hf:nosuch-org/nosuch-set", "HF_HUB_OFFLINE=1",
                                                  "local Hugging Face cache", ".jsonl"]),  # was 30-54 lines
    (["engine_backend=rust"], ["engine_backend", "cpp | py"]),
    (["backend=tensorrt"], ["backend/tensorrt", "Available options", "transformers"]),
    (["scorer=oracle"], ["scorer/oracle", "symbolic"]),
    (["search=beam"], ["search/beam", "paper"]),
    (["runner=slurm"], ["runner/slurm", "local"]),
]


@pytest.mark.parametrize("overrides,needles", GENERATE_CONFIGS, ids=_ids)
def test_bad_generate_config(overrides, needles, tmp_path):
    out = tmp_path / "run"
    proc = _sphere("generate", "data.mini_n=4", *overrides, f"hydra.run.dir={out}")
    _assert_clean_failure(proc, out, needles)


EVAL_CONFIGS = [
    (["limit=-1"], ["limit", "positive integer"]),
    (["limit=0"], ["limit", "positive integer"]),
    (["sampling.n=0"], ["sampling.n", ">= 1"]),
    (["batch_size=0"], ["batch_size", "positive integer"]),
    (["max_tokens=0"], ["max_tokens", ">= 1"]),
    (["benchmarks=[]"], ["benchmarks", "empty"]),
    (["benchmarks=[nosuchbench]"], ["nosuchbench", "math500"]),
    (["replay.missing=guess"], ["replay.missing", "skip"]),
    (["backend=nosuch"], ["backend/nosuch", "Available options"]),
    (["resume=later"], ["resume='later'", "auto | fresh | force"]),
]


@pytest.mark.parametrize("overrides,needles", EVAL_CONFIGS, ids=_ids)
def test_bad_eval_config(overrides, needles, tmp_path):
    out = tmp_path / "run"
    proc = _sphere("eval", "backend=replay", "replay.references=true", *overrides, f"hydra.run.dir={out}")
    _assert_clean_failure(proc, out, needles)


RUN_CONFIGS = [
    (["rounds=-1"], ["rounds", ">= 0"]),
    (["eval.benchmarks=[]"], ["eval.benchmarks", "empty"]),
    (["search.expansions=0"], ["search.expansions", ">= 1"]),
    (["search.pruning.policy=topk", "search.pruning.k=6"], ["search.pruning.k", "1..search.expansions"]),
]


@pytest.mark.parametrize("overrides,needles", RUN_CONFIGS, ids=_ids)
def test_bad_run_config_fails_before_any_work(overrides, needles, tmp_path, tiny_model_dir):
    """Caught up front: no round-0 evaluation is spent before the generate settings are found wrong."""
    out = tmp_path / "run"
    proc = _sphere("run", "experiment=mini_planted", f"model={tiny_model_dir}", f"model.small={tiny_model_dir}",
                   "rounds=1",
                   "eval.limit=2",
                   *overrides, f"hydra.run.dir={out}")
    _assert_clean_failure(proc, out, needles)


# ---------------------------------------------------------------------------------------------- environment
@pytest.mark.parametrize("where", ["proc", "file"])
def test_unwritable_output_dir(where, tmp_path):
    # root ignores permission bits, so: a path under /proc (no new entries there) or under a regular file
    if where == "proc":
        out = Path("/proc/sphere-forbidden/run")
    else:
        f = tmp_path / "a-file"
        f.write_text("")
        out = f / "run"
    proc = _sphere("eval", "backend=replay", "replay.references=true", "limit=2", f"hydra.run.dir={out}")
    _assert_clean_failure(proc, None, [str(out.parent) if where == "proc" else str(f)])
    assert not out.exists()


def test_model_dir_without_weights(tmp_path, tiny_model_dir):
    model = tmp_path / "no-weights"
    model.mkdir()
    for p in tiny_model_dir.glob("*.json"):
        shutil.copy(p, model)
    out = tmp_path / "run"
    proc = _sphere("eval", "backend=transformers", f"model={model}", "limit=2", f"hydra.run.dir={out}")
    _assert_clean_failure(proc, out, [str(model), "model.safetensors"])
    proc = _sphere("generate", f"model={model}", f"model.small={model}", "data.mini_n=2",
                   f"hydra.run.dir={out}")
    _assert_clean_failure(proc, out, [str(model), "model.safetensors"])


def test_model_dir_without_tokenizer(tmp_path, tiny_model_dir):
    """Before: "You need to have sentencepiece or tiktoken installed" from deep in transformers, no directory
    named (issue #29). Weights and config are there, the tokenizer files are not."""
    model = tmp_path / "no-tokenizer"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, model)
    out = tmp_path / "run"
    proc = _sphere("eval", "backend=transformers", f"model={model}", "limit=2", f"hydra.run.dir={out}")
    _assert_clean_failure(proc, out, [str(model), "has no tokenizer", "tokenizer.json"])
    assert "sentencepiece" not in proc.stderr and "Traceback" not in proc.stderr


TRAIN_CONFIGS = [
    (["train.save_steps=-1"], ["train.save_steps", ">= 0"]),
    (["train.save_total_limit=0"], ["train.save_total_limit", ">= 1"]),
    (["train.epochs=0"], ["train.epochs", "> 0"]),
    (["train.max_steps=0"], ["train.max_steps", ">= 1"]),
    (["train.warmup_ratio=1.5"], ["train.warmup_ratio", "[0, 1)"]),
    (["resume=maybe"], ["resume='maybe'", "auto | fresh | force"]),
]


@pytest.mark.parametrize("overrides,needles", TRAIN_CONFIGS, ids=_ids)
def test_bad_train_config_fails_before_the_model_loads(overrides, needles, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "stage": 1}) + "\n")
    out = tmp_path / "run"
    proc = _sphere("train", f"pairs={path}", *overrides, f"hydra.run.dir={out}")
    _assert_clean_failure(proc, out, needles)
    assert not out.exists()  # a failed command leaves no run directory behind (issue #17)


# ------------------------------------------------------------------ issue #17 G: typed configs (sphere/schema.py)
TYPED_CONFIGS = [
    (["generate", "search.expansions=abc"], ["config search.expansions='abc'", "expected an integer"]),
    (["generate", "search.max_step_tokens=0"], ["config search.max_step_tokens=0", ">= 1"]),
    (["generate", "sampling.max_solution_tokens=-4"], ["config sampling.max_solution_tokens=-4", ">= 1"]),
    (["generate", "search.pruning.policy=topk", "search.pruning.k=1.5"], ["search.pruning.k=1.5", "an integer"]),
    (["generate", "search.top_p=high"], ["config search.top_p='high'", "expected a number"]),
    (["generate", "search.outcome_in_reward=maybe"], ["search.outcome_in_reward='maybe'", "true or false"]),
    (["generate", "search.engine.fpu=zero"], ["search.engine.fpu='zero'", "parent | value | inf"]),
    (["generate", "data.mini_n=0"], ["config data.mini_n=0", ">= 1"]),
    (["train", "pairs=p.jsonl", "train.lr=fast"], ["config train.lr='fast'", "expected a number"]),
    (["train", "pairs=p.jsonl", "train.batch_size=0"], ["config train.batch_size=0", ">= 1"]),
    (["train", "pairs=p.jsonl", "train.lora.r=0"], ["config train.lora.r=0", ">= 1"]),
    (["train", "pairs=p.jsonl", "train.loss.beta=0"], ["config train.loss.beta=0", "> 0"]),
    (["train", "pairs=p.jsonl", "train.max_length=4"], ["config train.max_length=4", ">= 8"]),
    (["eval", "limit=abc"], ["config limit='abc'", "an integer or null"]),
    (["eval", "max_tokens=2.5"], ["config max_tokens=2.5", "an integer"]),
    (["eval", "sampling.n=many"], ["config sampling.n='many'", "expected an integer"]),
    (["run", "rounds=two"], ["config rounds='two'", "an integer >= 0"]),
    (["run", "eval.n=0"], ["config eval.n=0", ">= 1"]),
]


@pytest.mark.parametrize("args,needles", TYPED_CONFIGS, ids=lambda x: "+".join(x) if "=" in x[-1] else None)
def test_typed_config_error_names_the_key_before_anything_is_written(args, needles, tmp_path):
    """Before: `search.expansions=abc` failed with `invalid literal for int()` and no key, and
    `search.max_step_tokens=0` only after the model loaded. Now the typed schemas are checked before Hydra
    creates the run directory: no directory, no log, no model load."""
    out = tmp_path / "run"
    proc = _sphere(*args, f"hydra.run.dir={out}", timeout=120)
    _assert_clean_failure(proc, None, needles)
    assert "invalid literal" not in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


# ----------------------------------------------------------------------- issue #17: errors that name their cause
def _corrupt_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    st = dst / "model.safetensors"
    st.chmod(0o644)
    with open(st, "r+b") as f:
        f.truncate(st.stat().st_size // 2)  # an interrupted copy
    return st


def test_corrupt_safetensors_is_named_with_what_to_do(tmp_path, tiny_model_dir):
    """Before: a bare `SafetensorError: incomplete metadata` from deep inside model loading, no file named."""
    from test_train_dpo import make_pairs, write_jsonl

    model = tmp_path / "truncated-model"
    st = _corrupt_copy(tiny_model_dir, model)
    needles = [str(st), "truncated or corrupt", "Copy or download it again"]
    out = tmp_path / "run"
    proc = _sphere("eval", "backend=transformers", f"model={model}", "limit=2", f"hydra.run.dir={out}")
    _assert_clean_failure(proc, out, needles)
    proc = _sphere("generate", f"model={model}", f"model.small={model}", "data.mini_n=2", f"hydra.run.dir={out}")
    _assert_clean_failure(proc, out, needles)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(4))
    proc = _sphere("train", f"model={model}", f"pairs={pairs}", f"hydra.run.dir={out}")
    _assert_clean_failure(proc, out, needles)
    assert not out.exists()


def _unshare_ok() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


needs_mount_ns = pytest.mark.skipif(not _unshare_ok(), reason="needs `unshare -m` (root in a mount namespace)")


def _sphere_in_mount_ns(mount: str, *args: str) -> subprocess.CompletedProcess:
    """The CLI in a private mount namespace after ``mount`` (a shell command): a real full or read-only file
    system, without touching the host's mounts."""
    cmd = " ".join([sys.executable, "-m", "sphere.cli", *(f"'{a}'" for a in args)])
    return subprocess.run(["unshare", "-m", "sh", "-c", f"{mount} && exec {cmd}"], capture_output=True,
                          text=True, env=_env(), timeout=300, cwd=ROOT)


@needs_mount_ns
def test_full_disk_names_the_file_and_what_to_do(tmp_path):
    """Before: `OSError: [Errno 28] No space left on device` without the path. A 128 KiB tmpfs fills while
    eval/gsm8k.jsonl is written."""
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "run"
    proc = _sphere_in_mount_ns(f"mount -t tmpfs -o size=128k tmpfs {disk}", "eval", "backend=replay",
                               "replay.references=true", "benchmarks=[gsm8k]", f"hydra.run.dir={out}")
    assert proc.returncode != 0
    for needle in (f"no space left writing {out / 'eval' / 'gsm8k.jsonl'}", "errno 28", "Free space",
                   "rerun the same command"):
        assert needle in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


@needs_mount_ns
def test_read_only_run_dir_names_the_dir_and_what_to_do(tmp_path):
    """Before: "Unable to configure handler 'file'" (Hydra's job log) and a traceback. A finished run
    directory remounted read-only, rerun in place."""
    out = tmp_path / "run"
    args = ["eval", "backend=replay", "replay.references=true", "limit=2", f"hydra.run.dir={out}"]
    assert _sphere(*args).returncode == 0
    before = sorted((p.relative_to(out), p.stat().st_size) for p in out.rglob("*") if p.is_file())
    proc = _sphere_in_mount_ns(f"mount --bind -o ro {out} {out}", *args)
    assert proc.returncode != 0
    for needle in (f"cannot write {out / '.lock'}", "Read-only file system", "must be writable",
                   "another hydra.run.dir"):
        assert needle in proc.stderr, proc.stderr[-3000:]
    assert "Unable to configure handler" not in proc.stderr and "Traceback" not in proc.stderr
    assert sorted((p.relative_to(out), p.stat().st_size) for p in out.rglob("*") if p.is_file()) == before


def test_model_path_missing(tmp_path):
    out = tmp_path / "run"
    proc = _sphere("eval", "backend=transformers", f"model={tmp_path / 'nope'}", "limit=2",
                   f"hydra.run.dir={out}")
    _assert_clean_failure(proc, out, [str(tmp_path / "nope"), "does not exist"])


# ------------------------------------------------------------------- keys added with `+` (issue #29)
ADDED_KEYS = [
    (["run", "dry_run=true", "+search.expansion=3"], ["+search.expansion", "did you mean search.expansions?"]),
    (["generate", "+stages.stage_2=false"], ["+stages.stage_2", "did you mean stages.stage2?"]),
    (["eval", "+sampling.temprature=0.5"], ["+sampling.temprature", "did you mean sampling.temperature?"]),
    # the typed runner / logger / backend options and controls (sphere/schema_groups.py); backend and logger
    # take new keyword arguments (below), so there only a near miss of a key they have is refused
    (["generate", "runner=ray", "+runner.worker=3"], ["+runner.worker", "did you mean runner.workers?"]),
    (["run", "dry_run=true", "logger=wandb", "+logger.projct=x"],
     ["+logger.projct", "did you mean logger.project?"]),
    (["eval", "backend=openai", "+backend.max_concurency=3"],
     ["+backend.max_concurency", "did you mean backend.max_concurrency?"]),
    (["run", "dry_run=true", "+controls.rtf=true"], ["+controls.rtf", "did you mean controls.rft?"]),
]


@pytest.mark.parametrize("args,needles", ADDED_KEYS, ids=lambda x: x[-1] if isinstance(x[-1], str) else None)
def test_typo_added_with_plus_is_refused_naming_the_nearest_key(args, needles, tmp_path):
    """Before: `sphere run dry_run=true +search.expansion=3` ran with E=5, rc 0 (Hydra's own hint for an
    unknown key says to add `+`). A `+` key under a sphere group (sphere/overrides.py: CLOSED) is refused
    in one line naming the nearest known key; nothing is produced."""
    out = tmp_path / "run"
    proc = _sphere(*args, f"hydra.run.dir={out}", timeout=120)
    _assert_clean_failure(proc, out, needles)
    assert "Traceback" not in proc.stderr
    assert len([ln for ln in proc.stderr.splitlines() if ln.startswith("sphere ")]) == 1, proc.stderr


def test_plus_keys_of_open_groups_still_accepted(tmp_path):
    """The groups open on purpose (sphere/overrides.py: OPEN) and the top level keep taking `+` keys."""
    proc = _sphere("run", "dry_run=true", "+logger.api_key=abcdefgh", "+backend.extra_flag=1", "+note=x",
                   f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ----------------------------------------------------------------------- issue #29: a round with no pairs
def test_round_with_zero_pairs_stops_cleanly(tmp_path):
    """Before: `sphere run experiment=mini_planted data.mini_n=1` (one problem, no pair survives) aborted with a
    RuntimeError traceback after the round-0 evaluation. Now: one line saying why, the round-0 evaluation kept
    in summary.json with the reason, exit 0 (a clean stop, not a crash)."""
    out = tmp_path / "run"
    proc = _sphere("run", "experiment=mini_planted", "data.mini_n=1", f"hydra.run.dir={out}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("sphere run: round 1")]
    assert len(lines) == 1 and "no preference pairs" in lines[0] and "data.mini_n" in lines[0], proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0]
    assert "no preference pairs" in summary["rounds"][0]["stopped"] and summary["rounds"][0]["eval"]


# ------------------------------------------- issue #29: sphere report / viz tree / sweep, one line each
def _one_line_failure(proc: subprocess.CompletedProcess, needles: list[str]) -> None:
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])


def _report_run(tmp_path: Path) -> Path:
    from test_report import _run_summary

    run = tmp_path / "a-run"
    _run_summary(run, [0.3, 0.4])
    return run


SWEEP_FILES = {
    "malformed.yaml": ("command: generate\nblocks: [1, 2\n", ["malformed.yaml", "line 3", "not valid YAML"]),
    "no_blocks.yaml": ("command: generate\noverrides: [data.mini_n=2]\n", ["no_blocks.yaml", "blocks", "missing"]),
    "a_list.yaml": ("- command\n- blocks\n", ["a_list.yaml", "mapping", "got a list"]),
    "blocks_list.yaml": ("command: generate\nblocks: [a, b]\n", ["blocks_list.yaml", "`blocks` must map"]),
}


@pytest.mark.parametrize("name", list(SWEEP_FILES))
def test_bad_sweep_file(name, tmp_path):
    """Before: a malformed sweep YAML or one without `blocks` ended `sphere sweep` in a traceback."""
    text, needles = SWEEP_FILES[name]
    f = tmp_path / name
    f.write_text(text)
    proc = _sphere("sweep", str(f), f"dir={tmp_path / 'out'}", timeout=120)
    _one_line_failure(proc, needles)
    assert not (tmp_path / "out").exists()


def test_truncated_tree_snapshot(tmp_path):
    """Before: zipfile.BadZipFile traceback from `sphere viz tree` on a cut copy of a snapshot."""
    from test_viz_tree import build_snapshot

    snap = tmp_path / "stage1.npz"
    build_snapshot(snap)
    data = snap.read_bytes()
    snap.write_bytes(data[: len(data) // 2])
    out = tmp_path / "tree.html"
    proc = _sphere("viz", "tree", str(snap), f"out={out}", timeout=120)
    _one_line_failure(proc, [str(snap), "truncated or corrupt"])
    assert not out.exists()


def test_report_without_matplotlib_names_the_extra(tmp_path):
    """A plain wheel install has no matplotlib: `sphere report` says which extra brings it (not a traceback)."""
    run = _report_run(tmp_path)
    code = ("import sys; sys.modules['matplotlib'] = None; from sphere.cli import main; "
            f"main(['report', {str(run)!r}])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120,
                          cwd=ROOT)
    _one_line_failure(proc, ["sphere report", "'matplotlib'", "pip install 'sphere[report]'"])


@pytest.mark.parametrize("command", ["report", "viz"])
def test_report_and_viz_into_an_unwritable_out(command, tmp_path):
    """`out=` under a regular file (root ignores permission bits): one line naming the path, no traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    if command == "report":
        proc = _sphere("report", str(_report_run(tmp_path)), f"out={blocker / 'rep'}", timeout=120)
    else:
        from test_viz_tree import build_snapshot

        snap = tmp_path / "t.npz"
        build_snapshot(snap)
        proc = _sphere("viz", "tree", str(snap), f"out={blocker / 'x' / 'tree.html'}", timeout=120)
    _one_line_failure(proc, [str(blocker), "choose a writable out="])


@needs_mount_ns
def test_report_on_a_full_disk_leaves_no_empty_png(tmp_path):
    """Before: a traceback and a 0-byte accuracy_per_round.png. A 64 KiB tmpfs, mostly filled, runs out while
    the figures are written: one line naming the file and what to do, and no PNG is left half-written."""
    run = _report_run(tmp_path)
    disk = tmp_path / "disk"
    disk.mkdir()
    rep = disk / "rep"
    script = (f"mount -t tmpfs -o size=64k tmpfs {disk} && dd if=/dev/zero of={disk}/fill bs=1k count=44 "
              f"2>/dev/null; {sys.executable} -m sphere.cli report {run} out={rep}; echo RC=$? >&2; "
              f"for f in {rep}/*.png; do [ -e \"$f\" ] && echo PNG $(tail -c 8 \"$f\" | head -c 4) $f >&2; done; true")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=_env(),
                          timeout=300, cwd=ROOT)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "RC=1" in lines, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errs = [ln for ln in lines if ln.startswith("sphere report")]
    assert len(errs) == 1 and "no space left writing" in errs[0] and f"{rep}/" in errs[0], proc.stderr[-3000:]
    assert "choose another out=" in errs[0]
    pngs = [ln for ln in lines if ln.startswith("PNG")]
    assert all(ln.startswith("PNG IEND ") for ln in pngs), pngs  # whole figures only (IEND), never a cut one


def test_resume_bogus_in_a_dry_run_is_one_line(tmp_path):
    """Before: `sphere run dry_run=true resume=bogus` printed the ValueError with a traceback (the resume mode
    was read outside the one-line error handling)."""
    out = tmp_path / "run"
    proc = _sphere("run", "dry_run=true", "resume=bogus", f"hydra.run.dir={out}", timeout=120)
    _assert_clean_failure(proc, out, ["config resume='bogus'", "auto | fresh | force"])
    assert "Traceback" not in proc.stderr


# ------------------------------------------- third reliability pass: a backend server nobody answers
def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("secret", [False, True], ids=["plain-url", "url-with-credentials"])
def test_backend_server_refusing_connections_is_one_line(secret, tmp_path):
    """Before: `sphere eval backend=openai backend.base_url=http://127.0.0.1:9` ended in Hydra's "Error
    executing job" line and a 20-line traceback (BackendUnavailableError was not a handled error), and a
    user:password@ or ?key= part of the URL was printed. Now: one line naming the URL without them, what
    failed and what to check; no traceback, no run directory left behind."""
    port = _closed_port()
    url = (f"http://sphereuser:S3cretPassw0rd@127.0.0.1:{port}/?api_key=QueryKey12345" if secret
           else f"http://127.0.0.1:{port}")
    out = tmp_path / "run"
    proc = _sphere("eval", "backend=openai", f"backend.base_url='{url}'", "backend.retries=0",
                   "benchmarks=[mini]", "limit=2", f"hydra.run.dir={out}", timeout=120)
    _assert_clean_failure(proc, out, [f"http://127.0.0.1:{port}", "backend.base_url", "server is running"])
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr, proc.stderr[-3000:]
    errs = [ln for ln in proc.stderr.splitlines() if ln.startswith("sphere eval: error:")]
    assert len(errs) == 1, proc.stderr[-3000:]
    if secret:
        for s in ("S3cretPassw0rd", "sphereuser", "QueryKey12345"):
            assert s not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    else:
        assert "Connection refused" in errs[0], errs[0]
        assert not out.exists()


# ------------------------------------------------- third reliability pass: a full disk during `sphere train`
TRAIN_ON_A_DISK = ["train.max_steps=6", "train.batch_size=2", "train.lora.r=4", "train.save_steps=2",
                   "train.warmup_ratio=0.0"]


@needs_mount_ns
@pytest.mark.parametrize("size,what,where", [
    ("300k", "a training checkpoint", "trainer/checkpoint-"),  # checkpoint-2 fits, a later one does not
    ("700k", "the merged model", ".merged.tmp"),  # every checkpoint fits, the published model does not
], ids=["checkpoint", "merged"])
def test_full_disk_during_train_names_the_path_and_what_was_written(size, what, where, tmp_path,
                                                                     tiny_model_dir):
    """Before: a 42-line traceback ending in `SafetensorError: ... No space left on device (os error 28)` or
    torch's `RuntimeError: basic_ios::clear: iostream error`, no path. Now one line naming the directory, what
    was being written and what to do; after the space is freed (the tmpfs remounted larger) the same command
    resumes from the last complete checkpoint and finishes after train.max_steps steps (not one more: resuming
    from the last step's checkpoint trained a 7th step of 6 before)."""
    from test_train_dpo import make_pairs, write_jsonl

    pairs = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(16))
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "run"
    cmd = " ".join([sys.executable, "-m", "sphere.cli", "train", f"model={tiny_model_dir}", f"pairs={pairs}",
                    *TRAIN_ON_A_DISK, f"hydra.run.dir={out}"])
    script = (f"mount -t tmpfs -o size={size} tmpfs {disk} && {{ {cmd}; echo RC1=$? >&2; "
              f"mount -o remount,size=16m {disk} && {cmd} >/dev/null; echo RC2=$? >&2; "
              f"cat {out}/train_metrics.json >&2; }}")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=_env(),
                          timeout=600, cwd=ROOT)
    err = proc.stderr
    first = err[:err.index("RC1=")]
    assert "RC1=1" in err and "Traceback" not in first, err[-3000:]
    lines = [ln for ln in first.splitlines() if ln.startswith("sphere train:")]
    assert len(lines) == 1, first[-3000:]
    for needle in (f"no space left writing {out / where}", f"while writing {what}", "errno 28", "Free space",
                   "rerun the same command"):
        assert needle in lines[0], lines[0]
    assert "RC2=0" in err, err[-3000:]
    m = json.loads(err[err.index("RC2=0") + 5:])
    # a full disk while publishing: the rerun publishes the last checkpoint without training a 7th step (it did)
    assert m["steps"] == 6 and m["resumed_from_step"] in ((2, 4) if where.startswith("trainer") else (6,)), m


def test_disk_error_reads_the_writers_own_messages(tmp_path, monkeypatch):
    """Without a small file system: safetensors' and torch.save's failures (which name no file) and Python's
    own ENOSPC become one OSError naming the path and what was written; other errors are not disk errors."""
    import errno as errno_

    from sphere.train import checkpoints
    from sphere.train.checkpoints import disk_error, writing

    target = tmp_path / "trainer" / "checkpoint-4"
    rust = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    e = disk_error(rust, target, "a training checkpoint")
    assert e.errno == errno_.ENOSPC and e.filename == str(target) and "while writing a training checkpoint" in e.strerror
    torch_err = RuntimeError("basic_ios::clear: iostream error")
    monkeypatch.setattr(checkpoints, "_free_bytes", lambda p: 4096)  # a full file system
    assert disk_error(torch_err, target, "x").errno == errno_.ENOSPC
    monkeypatch.setattr(checkpoints, "_free_bytes", lambda p: 10 << 30)  # 10 GiB free: not a full disk
    assert disk_error(torch_err, target, "x") is None
    py = OSError(errno_.ENOSPC, "No space left on device")  # a write() names no file
    assert disk_error(py, target, "y").filename == str(target)
    assert disk_error(OSError(errno_.ENOENT, "gone"), target, "y") is None
    assert disk_error(ValueError("bad value"), target, "y") is None
    with pytest.raises(OSError) as ei, writing(target, "the merged model"):
        raise rust
    assert ei.value.errno == errno_.ENOSPC and ei.value.filename == str(target)
    with pytest.raises(KeyError), writing(target, "z"):
        raise KeyError("other")
