"""Issue #28 item 3: every `sphere` command in docs/ (docs/scaling.md, docs/ARCHITECTURE.md, docs/examples/)
is checked. Each composes as `sphere <command> ... --cfg job` would (through the command line's own rewrites,
``sphere.cli.hydra_overrides``; a multirun's sweeps expanded job by job; `sphere sweep FILE` through the jobs
its blocks run), and the commands docs/scaling.md gives for one GPU and for an eight-GPU node compose to the
settings of `sphere run experiment=paper_qwen2_5_7b`: the same search, scorer, stages, data, prompt, sampling,
DPO recipe and evaluation; only the runner, the DPO process count and its accumulation steps differ, and the
global batch stays the paper's 32 pairs.
"""

from __future__ import annotations

import itertools
import re
import shlex
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from test_compose import GENERATE_NODES, eval_settings, plain, run_eval_settings

ROOT = Path(__file__).resolve().parents[1]
DOCS = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]  # every page's commands compose
STANDIN = ROOT / "assets" / "standin"

PAPER_SECTIONS = ("## The paper experiment on one GPU", "## Eight GPUs on one node")


# ------------------------------------------------------------------------------------------ extraction
def _code_lines(text: str):
    """(line number, text) of the lines of fenced and indented code blocks, continuation lines joined."""
    fence = False
    buf, start = "", 0
    for i, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if not (fence or line.startswith("    ")):
            continue
        if not buf:
            start = i
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        yield start, buf + line
        buf = ""


def _inline(text: str):
    """(line number, text) of inline code spans that start with `sphere `."""
    fence = False
    for i, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fence = not fence
        if fence or line.startswith("    "):
            continue
        for m in re.finditer(r"`(sphere [^`]+)`", line):
            yield i, m.group(1)


def _section(text: str, lineno: int) -> str:
    """The `## ` heading a line falls under."""
    head = ""
    for line in text.splitlines()[:lineno]:
        if line.startswith("## "):
            head = line.strip()
    return head


def doc_commands(path: Path) -> list[dict]:
    """Every `sphere` command of a markdown file: {file, line, section, text, argv} (argv: after `sphere`)."""
    text = path.read_text(encoding="utf-8")
    out = []
    for lineno, line, code in [*((n, t, True) for n, t in _code_lines(text)),
                               *((n, t, False) for n, t in _inline(text))]:
        line = line.split(" # ")[0].strip()  # a trailing shell comment
        m = re.search(r"(?:^|\s)(?:-m sphere\.cli|sphere)\s+(.*)$", line)
        if m is None or line.lstrip().startswith(("#", "python", "print")):
            continue
        if re.search(r"(?:^|\s)sphere\.\w", m.group(0)) and "sphere.cli" not in m.group(0):
            continue
        out.append({"file": path.relative_to(ROOT).as_posix(), "line": lineno,
                    "section": _section(text, lineno), "text": line, "rest": m.group(1),
                    "accelerate": "accelerate launch" in line, "code": code})
    return out


def _variables(path: Path, tmp: Path) -> dict[str, str]:
    """Shell variables the file assigns (``R=runs/qwen7b``), rooted under ``tmp``; the others (``$T``,
    ``$PWD``, ``$head``) get a path under ``tmp`` of their own."""
    out = {"PWD": str(tmp)}
    for _, line in _code_lines(path.read_text(encoding="utf-8")):
        m = re.match(r"^\s*([A-Z][A-Z0-9_]*)=(\S+)\s*$", line)
        if m and "$(" not in m.group(2):
            out[m.group(1)] = str(tmp / m.group(2))
    return out


def _substitute(s: str, variables: dict[str, str], tmp: Path) -> str:
    def var(m):
        if m.group(0).startswith("${") and m.string[m.end():m.end() + 1] == ":":
            return m.group(0)  # `${sphere_resource:...}`: an OmegaConf resolver (single-quoted), not a variable
        name = m.group(1) or m.group(2)
        return variables.get(name, str(tmp / f"var_{name}"))

    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?|\$\{([^}]+)\}", var, s)


def _split_top(value: str) -> list[str]:
    """``a,b`` -> [a, b]; commas inside [...] or {...} do not split (``benchmarks=[math500,gsm8k]``)."""
    out, depth, cur = [], 0, ""
    for ch in value:
        depth += ch in "[{(" and 1 or (ch in "]})" and -1 or 0)
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [*out, cur]


def expand(argv: list[str]) -> list[list[str]]:
    """A multirun's jobs: every combination of the comma-separated values (at most 16)."""
    choices = []
    for a in argv:
        if "=" in a and not a.startswith("-"):
            k, v = a.split("=", 1)
            choices.append([f"{k}={x}" for x in _split_top(v)])
        else:
            choices.append([a])
    return [list(c) for c in itertools.islice(itertools.product(*choices), 16)]


# words of the docs' generic forms: `sphere <command> [hydra overrides]`, `sphere bench <name>`
def _commands_of(words: list[str]) -> list[list[str]]:
    from sphere.cli import HYDRA_COMMANDS, PLAIN_COMMANDS

    if words and words[0] == "<command>":
        return [[*k, *words[1:]] for k in [*HYDRA_COMMANDS, *PLAIN_COMMANDS]]
    if len(words) > 1 and words[0] == "bench" and (words[1] == "<name>" or "|" in words[1]):
        names = ([k[1] for k in HYDRA_COMMANDS if k[0] == "bench"] if words[1] == "<name>"
                 else words[1].split("|"))
        return [["bench", n, *words[2:]] for n in names]
    return [words]


def _argv(cmd: dict, variables: dict, tmp: Path) -> list[list[str]]:
    words = shlex.split(_substitute(cmd["rest"], variables, tmp))
    words = [w for w in words if w not in ("...", "&", "-m", "--cfg", "job", "--resolve")
             and not w.endswith("=...")  # `experiment=...`: prose for "any value"
             and not ((w.startswith("[") or w.endswith("]")) and "=" not in w)]
    return _commands_of(words)


ALL = [c for p in DOCS for c in doc_commands(p)]


def test_the_docs_have_commands():
    """The extraction finds what the docs show (a regression in it would silently check nothing)."""
    files = {c["file"] for c in ALL}
    assert {"docs/scaling.md", "docs/ARCHITECTURE.md", "docs/examples/pruning_sweep_tiny/README.md"} <= files
    scaling = [c for c in ALL if c["file"] == "docs/scaling.md"]
    for sec in PAPER_SECTIONS:
        words = {c["rest"].split()[0] for c in scaling
                 if c["section"] == sec and c["code"] and not c["accelerate"]}
        assert {"run", "generate", "train", "eval"} <= words, f"{sec}: the four commands"
    assert len(ALL) >= 20


# ------------------------------------------------------------------------------------------ composition
def _compose(key: tuple[str, ...], args: list[str]):
    from hydra import compose, initialize_config_dir

    from sphere.cli import HYDRA_COMMANDS, conf_dir, hydra_overrides

    cdir = conf_dir()
    overrides = hydra_overrides(key, args, cdir)
    with initialize_config_dir(config_dir=str(cdir), version_base="1.3"):
        return compose(config_name=HYDRA_COMMANDS[key][0], overrides=overrides, return_hydra_config=True)


def _fake_merged_dirs(variables: dict[str, str]) -> None:
    """`model=$R/r1/train/merged` is a checkpoint `sphere train` wrote: here a copy of the Qwen stand-in's
    tokenizer files (the real chat template), as far as composing needs one."""
    for v in variables.values():
        merged = Path(v) / "r1" / "train" / "merged"
        if "runs" in v and not merged.exists():
            merged.mkdir(parents=True)
            for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
                shutil.copy(STANDIN / "standin-qwen2_5" / f, merged / f)


def check_command(cmd: dict, tmp: Path) -> list:
    """Compose every job of a doc command (or check a plain command exists); returns the composed configs."""
    from sphere.cli import HYDRA_COMMANDS, PLAIN_COMMANDS, _match

    variables = _variables(ROOT / cmd["file"], tmp)
    _fake_merged_dirs(variables)
    out = []
    for words in _argv(cmd, variables, tmp):
        where = f"{cmd['file']}:{cmd['line']}: sphere {' '.join(words)}"
        if words[:1] in (["--help"], ["-h"]):  # `sphere --help`
            from sphere.cli import _usage

            assert "usage: sphere <command>" in _usage()
            continue
        m = _match(words, {**HYDRA_COMMANDS, **PLAIN_COMMANDS})
        assert m is not None, f"{where}: not a sphere command"
        key, rest = m
        if any(a in ("-h", "--help") for a in rest):
            from sphere.cli import command_help, conf_dir

            assert key in PLAIN_COMMANDS or command_help(key, conf_dir())
            continue
        if key == ("sweep",) and rest:  # the jobs its blocks run
            from sphere.sweep import build_commands

            spec = OmegaConf.to_container(OmegaConf.load(ROOT / rest[0]), resolve=False)
            extra = [a for a in rest[1:] if not a.startswith("dir=")]
            for job in build_commands(spec, extra, str(tmp / "sweep")):
                jk, jrest = _match(job, HYDRA_COMMANDS)
                for args in expand([a for a in jrest if a != "-m"]):
                    out.append((jk, args, _compose(jk, args)))
            continue
        if key in PLAIN_COMMANDS:  # `sphere report DIR`, `sphere viz tree FILE`: need outputs to exist
            continue
        for args in expand(rest):
            try:
                out.append((key, args, _compose(key, args)))
            except Exception as e:  # noqa: BLE001 - the message names the command
                raise AssertionError(f"{where}: does not compose: {type(e).__name__}: {e}") from None
    return out


@pytest.mark.parametrize("cmd", ALL, ids=[f"{c['file']}:{c['line']}" for c in ALL])
def test_every_doc_command_composes(cmd, tmp_path):
    check_command(cmd, tmp_path)


# ------------------------------------------------------------------------------------- the paper's settings
PAPER_CMDS = [c for c in ALL if c["file"] == "docs/scaling.md" and c["section"] in PAPER_SECTIONS
              and c["code"]
              and not c["accelerate"] and c["rest"].split()[0] in ("run", "generate", "train", "eval")]
RUNNER_KEYS = {"runner"}  # the eight-GPU commands add runner=ray runner.workers=8


@pytest.mark.parametrize("cmd", PAPER_CMDS, ids=[f"{c['line']}:{c['rest'].split()[0]}" for c in PAPER_CMDS])
def test_one_and_eight_gpu_commands_give_the_papers_settings(cmd, tmp_path):
    from test_compose import compose as compose_cli

    run = compose_cli("run", "experiment=paper_qwen2_5_7b")
    ((key, args, cfg),) = check_command(cmd, tmp_path)
    eight = cmd["section"] == "## Eight GPUs on one node"
    assert "experiment=paper_qwen2_5_7b" in args
    if key in (("run",), ("generate",)):
        nodes = [n for n in GENERATE_NODES if n not in RUNNER_KEYS]
        for n in nodes:
            assert plain(cfg.get(n)) == plain(run.get(n)), f"{cmd['text']}: {n} differs from sphere run's"
        if eight:
            assert cfg.runner.name == "ray" and cfg.runner.workers == 8
        else:
            assert cfg.runner.name == "local"
    if key in (("run",), ("train",)):
        t, r = plain(cfg.train), plain(run.train)
        batch = {k: (t.pop(k), r.pop(k)) for k in ("processes", "grad_accum")}
        assert t == r, f"{cmd['text']}: the DPO recipe differs from sphere run's"
        assert plain(cfg.model) == plain(run.model)
        (p, p0), (a, a0) = batch["processes"], batch["grad_accum"]
        assert p * a * t["batch_size"] == p0 * a0 * r["batch_size"] == 32, "the paper's global batch"
        assert p == (8 if eight else 1)
    if key == ("run",):
        assert plain(cfg.eval) == plain(run.eval) and cfg.rounds == run.rounds
    if key == ("eval",):
        assert eval_settings(cfg) == run_eval_settings(run)
        assert Path(cfg.model.policy).name == "merged" and cfg.model.family == run.model.family == "qwen2_5"
        assert plain(cfg.backend) == plain(run.backend)
        assert cfg.runner.name == ("ray" if eight else "local")
