"""Security claims of SECURITY.md, each checked here (issue #11).

1. No eval/exec/compile/sympify/parse_expr/pickle/marshal/yaml.load(unsafe)/shell=True anywhere under sphere/;
   math-verify (sympy) is imported only by the sandboxed checker worker (sphere/verify/_worker.py).
2. torch.load always has weights_only=True; np.load always allow_pickle=False.
3. trust_remote_code: false in every config that has it, never a literal True in code, and every
   from_pretrained call that can load a downloaded model passes it from config.
4. Secrets: a W&B-looking key set in the environment and as a config override never reaches any file under
   the run directory (Hydra's .hydra/*.yaml included) nor stdout/stderr.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "sphere"
SOURCES = sorted(PKG.rglob("*.py"))

# The one module allowed to hand model text to sympy / math-verify: the checker worker, a separate process
# with a hard timeout, speaking JSON lines (sphere/verify/pool.py).
SANDBOXED = {PKG / "verify" / "_worker.py"}
# Models these modules load are ones this project built itself (the mini world, the tiny test models):
# local directories written by sphere, never downloaded, so they carry no remote code to trust. (Not the PRM
# scorer, sphere/rewards/prm.py: it loads downloaded PRMs, so it is checked like every other loader.)
SELF_BUILT = {PKG / "mini" / "pretrain.py", PKG / "standins" / "tiny.py", PKG / "standins" / "qwen2_5.py"}

BANNED_CALLS = {"eval", "exec", "compile", "sympify", "parse_expr", "parse_latex", "__import__"}
BANNED_ATTRS = {("pickle", "load"), ("pickle", "loads"), ("marshal", "load"), ("marshal", "loads"),
                ("dill", "load"), ("cloudpickle", "load"), ("joblib", "load"), ("yaml", "unsafe_load"),
                ("shelve", "open")}


def _trees():
    for p in SOURCES:
        yield p, ast.parse(p.read_text(encoding="utf-8"), filename=str(p))


def _call_name(node: ast.Call) -> tuple[str | None, str]:
    f = node.func
    if isinstance(f, ast.Name):
        return None, f.id
    if isinstance(f, ast.Attribute):
        base = f.value
        # a method of some expression (model.eval(), x.to(d).eval()) has owner "<expr>", never None
        owner = base.id if isinstance(base, ast.Name) else (base.attr if isinstance(base, ast.Attribute)
                                                            else "<expr>")
        return owner, f.attr
    return None, ""


def _kw(node: ast.Call, name: str) -> ast.expr | None:
    for k in node.keywords:
        if k.arg == name:
            return k.value
    return None


def test_sources_found():
    assert len(SOURCES) > 30 and (PKG / "verify" / "_worker.py") in SOURCES


def test_no_eval_exec_sympify_or_pickle_of_untrusted_data():
    bad = []
    for p, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                owner, name = _call_name(node)
                if owner is None and name in BANNED_CALLS:
                    bad.append(f"{p.relative_to(ROOT)}:{node.lineno}: {name}()")
                if owner is not None and name in ("sympify", "parse_expr", "parse_latex"):
                    bad.append(f"{p.relative_to(ROOT)}:{node.lineno}: {owner}.{name}()")
                if (owner, name) in BANNED_ATTRS:
                    bad.append(f"{p.relative_to(ROOT)}:{node.lineno}: {owner}.{name}()")
                if owner == "yaml" and name == "load":
                    loader = _kw(node, "Loader")
                    if not (isinstance(loader, ast.Attribute) and loader.attr == "SafeLoader"):
                        bad.append(f"{p.relative_to(ROOT)}:{node.lineno}: yaml.load without SafeLoader")
                shell = _kw(node, "shell")
                if isinstance(shell, ast.Constant) and shell.value is True:
                    bad.append(f"{p.relative_to(ROOT)}:{node.lineno}: shell=True")
                if owner == "os" and name in ("system", "popen"):
                    bad.append(f"{p.relative_to(ROOT)}:{node.lineno}: os.{name}()")
            if isinstance(node, ast.Import | ast.ImportFrom):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for m in mods:
                    top = m.split(".")[0]
                    if top in ("pickle", "dill", "cloudpickle", "marshal", "shelve"):
                        bad.append(f"{p.relative_to(ROOT)}:{node.lineno}: import {m}")
    assert not bad, "unsafe calls:\n" + "\n".join(bad)


def test_sympy_and_math_verify_only_in_the_sandboxed_worker():
    users = set()
    for p, tree in _trees():
        for node in ast.walk(tree):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            if any(m.split(".")[0] in ("sympy", "math_verify", "latex2sympy2_extended") for m in mods):
                users.add(p)
    assert users == SANDBOXED, sorted(str(u.relative_to(ROOT)) for u in users)


def test_torch_load_weights_only_and_np_load_no_pickle():
    bad, seen_np = [], 0
    for p, tree in _trees():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            owner, name = _call_name(node)
            if owner == "torch" and name == "load":
                v = _kw(node, "weights_only")
                if not (isinstance(v, ast.Constant) and v.value is True):
                    bad.append(f"{p.relative_to(ROOT)}:{node.lineno}: torch.load without weights_only=True")
            if owner in ("np", "numpy") and name == "load":
                seen_np += 1
                v = _kw(node, "allow_pickle")
                if not (isinstance(v, ast.Constant) and v.value is False):
                    bad.append(f"{p.relative_to(ROOT)}:{node.lineno}: np.load without allow_pickle=False")
    assert not bad, "\n".join(bad)
    assert seen_np >= 1  # the tree snapshots are read with np.load: the check above is live


def test_tree_snapshot_with_object_array_is_refused(tmp_path):
    """The claim behind np.load(allow_pickle=False): a snapshot carrying a pickled object is an error."""
    import numpy as np

    from sphere.viz.snapshot import load_tree_snapshot

    p = tmp_path / "evil.npz"
    np.savez(p, node_id=np.array([object()], dtype=object))
    # the refusal itself, not any error that happens to mention "object" (an AttributeError would)
    with pytest.raises(ValueError, match=r"not a valid tree snapshot .*allow_pickle=False"):
        load_tree_snapshot(p)


def test_trust_remote_code_false_in_every_config():
    found = {}
    for p in sorted((ROOT / "conf").rglob("*.yaml")):
        where = p.relative_to(ROOT)

        def walk(d, prefix="", where=where):
            if isinstance(d, dict):
                for k, v in d.items():
                    if k == "trust_remote_code":
                        found[f"{where}:{prefix}{k}"] = v
                    walk(v, f"{prefix}{k}.", where)
        walk(yaml.safe_load(p.read_text()) or {})
    # conf/ may set it (to false, or an interpolation); its default is ModelSettings' (checked below)
    # false, or an interpolation of another config's value (train_opts -> model.trust_remote_code)
    bad = {k: v for k, v in found.items()
           if v is not False and not (isinstance(v, str) and v.startswith("${"))}
    assert not bad, bad
    # conf/model/*.yaml compose over ModelSettings (sphere/schema_models.py), whose default is false
    import dataclasses

    from sphere.schema_models import ModelSettings

    field = {f.name: f for f in dataclasses.fields(ModelSettings)}["trust_remote_code"]
    assert field.default is False


def test_trust_remote_code_never_literal_true_and_passed_to_from_pretrained():
    bad = []
    for p, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                v = _kw(node, "trust_remote_code")
                if isinstance(v, ast.Constant) and v.value is True:
                    bad.append(f"{p.relative_to(ROOT)}:{node.lineno}: trust_remote_code=True literal")
                _, name = _call_name(node)
                if name == "from_pretrained" and p not in SELF_BUILT and v is None:
                    bad.append(f"{p.relative_to(ROOT)}:{node.lineno}: from_pretrained without "
                               "trust_remote_code")
            if isinstance(node, ast.FunctionDef):
                for arg, default in zip(reversed(node.args.args), reversed(node.args.defaults), strict=False):
                    if arg.arg == "trust_remote_code" and not (
                            isinstance(default, ast.Constant) and default.value is False):
                        bad.append(f"{p.relative_to(ROOT)}:{node.lineno}: default not False")
                for arg, default in zip(node.args.kwonlyargs, node.args.kw_defaults, strict=False):
                    if arg.arg == "trust_remote_code" and not (
                            isinstance(default, ast.Constant) and default.value is False):
                        bad.append(f"{p.relative_to(ROOT)}:{node.lineno}: default not False")
    assert not bad, "\n".join(bad)


def test_make_backend_passes_trust_remote_code_from_config(monkeypatch):
    """The value reaches the backend from cfg.model.trust_remote_code (False by default, True only if set)."""
    from omegaconf import OmegaConf

    import sphere.backends.transformers_backend as tb
    from sphere.backends import make_backend

    seen = []

    class FakeTransformersBackend:
        def __init__(self, path, trust_remote_code=False, **kw):
            seen.append(trust_remote_code)

    monkeypatch.setattr(tb, "TransformersBackend", FakeTransformersBackend)
    for flag in (False, True):
        cfg = OmegaConf.create({"backend": {"name": "transformers"}, "model": {"trust_remote_code": flag}})
        make_backend(cfg, "/nonexistent-model")
    assert seen == [False, True]


@pytest.mark.parametrize("command", ["eval", pytest.param("generate", marks=pytest.mark.slow)])
def test_secret_override_and_env_key_never_written_or_printed(command, tmp_path, tiny_model_dir):
    """A W&B-looking key in the environment and another passed as a config override: after a run (for
    generate, with W&B logging offline into the run directory), no file under the run directory (Hydra's
    saved config and wandb's files included), no file wandb wrote elsewhere, and neither output stream
    contains either."""
    env_key = "0123456789abcdef0123456789abcdef01234567"
    cfg_key = "fedcba9876543210fedcba9876543210fedcba98"
    out, home = tmp_path / "run", tmp_path / "wandb-home"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_API_KEY": env_key,
           "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(home),
           "WANDB_CACHE_DIR": str(home), "WANDB_CONFIG_DIR": str(home), "WANDB_DATA_DIR": str(home)}
    secrets = [f"+logger.api_key={cfg_key}", f"+backend.token={cfg_key}"]
    if command == "eval":
        args = ["eval", "backend=replay", "replay.references=true", "benchmarks=[mini]", "limit=3"]
        expect = out / "eval" / "results.json"
    else:
        args = ["generate", f"model={tiny_model_dir}", f"model.small={tiny_model_dir}", "data.mini_n=2",
                "search.max_depth=2", "search.max_step_tokens=16", "logger=wandb", "logger.mode=offline"]
        expect = out / "pairs.jsonl"
        secrets = secrets[:1]  # the transformers backend takes no token argument
    proc = subprocess.run([sys.executable, "-m", "sphere.cli", *args, *secrets, f"hydra.run.dir={out}"],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [p for root in (out, home) if root.exists() for p in root.rglob("*") if p.is_file()]
    assert (out / ".hydra" / "config.yaml") in files and expect in files
    if command == "generate":
        assert any(p.suffix == ".wandb" for p in files), "no offline W&B run was written"
    for key in (env_key, cfg_key):
        assert key not in proc.stdout and key not in proc.stderr
        leaks = [str(p) for p in files if key.encode() in p.read_bytes()]
        assert not leaks, leaks
    # redacted, not dropped: the override is still recorded (sphere report reads overrides.yaml)
    assert "+logger.api_key=***" in (out / ".hydra" / "overrides.yaml").read_text()


def test_secret_redaction_callback_rewrites_saved_files(tmp_path):
    """Unit check of the Hydra callback: without it the override would be in .hydra/ in clear."""
    from omegaconf import OmegaConf

    from sphere.loggers import RedactHydraFiles

    d = tmp_path / ".hydra"
    d.mkdir()
    (d / "overrides.yaml").write_text("- seed=1\n- +logger.api_key=SECRETSECRET\n")
    (d / "config.yaml").write_text("seed: 1\nlogger:\n  api_key: SECRETSECRET\n")
    cfg = OmegaConf.create({"hydra": {"output_subdir": ".hydra", "runtime": {"output_dir": str(tmp_path)}}})
    RedactHydraFiles().on_job_start(config=cfg)
    for name in ("overrides.yaml", "config.yaml"):
        assert "SECRETSECRET" not in (d / name).read_text()
    assert yaml.safe_load((d / "config.yaml").read_text()) == {"seed": 1, "logger": {"api_key": "***"}}
    assert yaml.safe_load((d / "overrides.yaml").read_text()) == ["seed=1", "+logger.api_key=***"]


# ------------------------------------------------------------------ redaction by key name and value shape
def test_redaction_is_by_key_name_and_value_shape_never_substring():
    """Issue #17: `token` as a substring erased `max_step_tokens` from every run record. Secrets are found by
    the key's last word(s) and by the value's shape; counts and tokenizer settings are kept."""
    from sphere.loggers import is_secret_key, redact

    for key in ("token", "api_key", "logger.api_key", "+secret_token", "hf_token", "HF_TOKEN", "WANDB_API_KEY",
                "OPENAI_API_KEY", "password", "db-password", "client_secret", "AWS_SECRET_ACCESS_KEY", "secret"):
        assert is_secret_key(key), key
    for key in ("max_step_tokens", "max_solution_tokens", "max_tokens", "max_new_tokens", "tokenizer",
                "token_budget", "eos_token", "pad_token", "TOKENIZERS_PARALLELISM", "sort_key", "benchmark_key",
                "keys", "secretary_count"):
        assert not is_secret_key(key), key
    wandb_key = "0123456789abcdef0123456789abcdef01234567"
    cfg = {"search": {"max_step_tokens": 77, "max_solution_tokens": 99, "tokenizer": "x"},
           "backend": {"api_key": "plain-looking", "base_url": "http://h", "headers": f"Bearer sk-{'a' * 30}"},
           "note": "hf_" + "A" * 34, "wandb": wandb_key, "model_sha256": "ab" * 32,
           "revision": wandb_key, "empty_key": {"api_key": None}}
    got = redact(cfg, set())
    assert got["search"] == cfg["search"]
    assert got["backend"] == {"api_key": "***", "base_url": "http://h", "headers": "***"}
    assert got["note"] == got["wandb"] == "***"
    assert got["model_sha256"] == cfg["model_sha256"] and got["revision"] == wandb_key  # hashes by key name
    assert got["empty_key"] == {"api_key": None}  # nothing to hide
    ovr = ["search.max_step_tokens=77", f"+secret_token=hf_{'b' * 34}", f"+x={wandb_key}", "seed=1"]
    assert redact(ovr, set()) == ["search.max_step_tokens=77", "+secret_token=***", "+x=***", "seed=1"]


def test_hydra_files_keep_budgets_and_hide_secrets(tmp_path):
    """Through the real CLI (`sphere run dry_run=true`: composes, validates, writes .hydra/, loads no model):
    `search.max_step_tokens=77` stays 77 in config.yaml, overrides.yaml and hydra.yaml, and a real-looking
    hub token passed as `+secret_token=hf_...` appears in none of them."""
    token = "hf_" + "Zq7" * 12
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "sphere.cli", "run", "dry_run=true", "search.max_step_tokens=77",
                           "sampling.max_solution_tokens=99", f"+secret_token={token}", f"hydra.run.dir={out}"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = {n: (out / ".hydra" / n).read_text() for n in ("config.yaml", "overrides.yaml", "hydra.yaml")}
    cfg = yaml.safe_load(files["config.yaml"])
    assert cfg["search"]["max_step_tokens"] == 77 and cfg["sampling"]["max_solution_tokens"] == 99
    assert cfg["secret_token"] == "***"
    assert "search.max_step_tokens=77" in yaml.safe_load(files["overrides.yaml"])
    assert "+secret_token=***" in yaml.safe_load(files["overrides.yaml"])
    hydra_cfg = yaml.safe_load(files["hydra.yaml"])["hydra"]
    assert "search.max_step_tokens=77" in hydra_cfg["overrides"]["task"]
    for name, text in files.items():
        assert token not in text, name
        assert "'***'" not in text.replace("secret_token: '***'", "").replace("+secret_token=***", ""), name
    assert token not in proc.stdout + proc.stderr


@pytest.mark.parametrize("multirun", [False, True])
def test_failed_job_prints_no_secret_override(multirun, tmp_path):
    """Issue #29: a job that fails outside the handled errors (here: an OpenAI-compatible server nobody
    answers) made Hydra print "Error executing job with overrides: [...]" with every override in clear,
    keys included (a multirun escapes them: `KEY\\:X`). Recognisable fake keys in the secret-bearing fields
    (`backend.api_key`, `+logger.api_key`, an `sk-...`-shaped value under a plain key) appear in neither
    output stream nor in any file under the run (or sweep) directory; the failure itself is still reported."""
    keys = ["sk-S29FAKEKEYaaaaaaaaaaaaaaaaaaaaaa", "S29-LOGGER:KEY=bbbbbbbb", "sk-S29SHAPEDdddddddddddddddddddddd"]
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env.pop("HYDRA_FULL_ERROR", None)
    # verbose=true: the unreachable server (a one-line error since the third reliability pass) is re-raised,
    # so Hydra prints its own failure line with the overrides
    args = ["eval", "backend=openai", "backend.base_url=http://127.0.0.1:9", "backend.retries=0",
            "benchmarks=[mini]", "limit=2", f"backend.api_key={keys[0]}", f"+logger.api_key='{keys[1]}'",
            f"+note={keys[2]}", "verbose=true"]
    args += [f"hydra.sweep.dir={out}", "-m"] if multirun else [f"hydra.run.dir={out}"]
    proc = subprocess.run([sys.executable, "-m", "sphere.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300, cwd=ROOT)
    assert proc.returncode != 0
    assert "127.0.0.1" in proc.stderr and "Connection refused" in proc.stderr  # the failure is reported
    files = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    for key in keys:
        assert key not in proc.stdout and key not in proc.stderr, proc.stderr[-2000:]
        leaks = [str(p) for p in files if key.encode() in p.read_bytes()]
        assert not leaks, leaks
    if not multirun:
        assert "backend.api_key=***" in proc.stderr  # redacted, not dropped
