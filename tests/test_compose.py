"""Issue #28 item 3: `sphere generate|train|eval experiment=X` give exactly the settings
`sphere run experiment=X` uses for that phase, and `model=PATH_OR_HUB_NAME` takes its prompt family from the
model (its chat template), never the mini prompt. Item 7: `sphere generate` checks the GPU memory plan before any model loads.

Everything here composes configs the way the command line does (``sphere.cli.hydra_overrides``: the same
rewrites ``sphere <command> ...`` applies), without loading a model.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "tests" / "fixtures" / "chat_templates"
STANDIN = ROOT / "assets" / "standin"

PAPER = ["paper_qwen2_5_7b", "paper_phi4", "paper_deepseek_r1_distill_qwen_7b"]
TRANSFER = ["transfer_phi4", "transfer_qwen2_5_1_5b", "transfer_qwen2_5_math_7b"]
# the stand-in runs of the paper path (tests/test_paper_path.py) compose the same way
STANDIN_RUNS = [("paper_qwen2_5_7b", "standin_qwen2_5"), ("paper_phi4", "standin_phi4"),
                ("paper_deepseek_r1_distill_qwen_7b", "standin_deepseek_r1")]

# what each phase reads (the brief of issue #28: generate's nodes; train's recipe and model)
GENERATE_NODES = ("model", "search", "scorer", "stages", "filters", "data", "prompt", "backend", "sampling",
                  "seed", "engine_backend", "runner", "hardware", "paths", "output")
TRAIN_NODES = ("train", "model", "seed")


def compose(command: str, *args: str, note=None):
    """The config `sphere <command> <args>` runs with (``sphere.cli.hydra_overrides``, then Hydra)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from sphere.cli import conf_dir, hydra_overrides

    cdir = conf_dir()
    key = tuple(command.split())
    overrides = hydra_overrides(key, list(args), cdir, note=note)
    from sphere.cli import HYDRA_COMMANDS

    with initialize_config_dir(config_dir=str(cdir), version_base="1.3"):
        return hydra_compose(config_name=HYDRA_COMMANDS[key][0], overrides=overrides)


def plain(node):
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def run_eval_settings(run_cfg) -> tuple[dict, list[str], object, dict]:
    """What `sphere run` evaluates a round with (sphere/runners.py ``LocalRunner.evaluate``): the EvalSettings,
    the benchmarks (``eval.benchmarks``; ``round_benchmarks`` adds ``model.extra_eval_benchmarks``), the limit
    and the prompt family."""
    from sphere.evaluation.settings import expand_benchmarks, settings_from_config
    from sphere.prompts import family_config

    ev = OmegaConf.to_container(run_cfg.eval, resolve=True)
    samp = {**OmegaConf.to_container(run_cfg.sampling, resolve=True), "n": int(ev.pop("n", 1))}
    ecfg = OmegaConf.create({"sampling": samp, "seed": int(run_cfg.seed), **ev})
    s = asdict(settings_from_config(ecfg))
    s.pop("resume")  # how a rerun reuses records, not what is measured
    return s, expand_benchmarks(run_cfg.eval.benchmarks), run_cfg.eval.limit, family_config(run_cfg)


def eval_settings(eval_cfg) -> tuple[dict, list[str], object, dict]:
    """The same four for `sphere eval` (sphere/evaluation/harness.py ``evaluate``)."""
    from sphere.evaluation.settings import expand_benchmarks, settings_from_config
    from sphere.prompts import family_config

    s = asdict(settings_from_config(eval_cfg))
    s.pop("resume")
    return s, expand_benchmarks(eval_cfg.benchmarks), eval_cfg.limit, family_config(eval_cfg)


def assert_same_nodes(a, b, nodes, what):
    for k in nodes:
        assert plain(a.get(k)) == plain(b.get(k)), f"{what}: node {k!r} differs from sphere run's"


# ------------------------------------------------------------------------------ experiment=X per phase
@pytest.mark.parametrize("args", [[f"experiment={e}"] for e in PAPER + TRANSFER]
                         + [[f"experiment={e}", f"model={m}", "data.problems=mini"] for e, m in STANDIN_RUNS])
def test_generate_composes_to_runs_settings(args):
    run = compose("run", *args)
    gen = compose("generate", *args)
    assert_same_nodes(run, gen, GENERATE_NODES, f"sphere generate {' '.join(args)}")
    from sphere.prompts import family_config

    assert family_config(gen) == family_config(run)
    assert gen.search.expansions == 5 and gen.scorer.name == "prm" and gen.backend.name == "vllm"
    assert gen.stages.stage3 is True and gen.search.max_step_tokens in (512, 1024)


@pytest.mark.parametrize("args", [[f"experiment={e}"] for e in PAPER + TRANSFER]
                         + [[f"experiment={e}", f"model={m}"] for e, m in STANDIN_RUNS])
def test_train_composes_to_runs_recipe(args):
    run = compose("run", *args)
    tr = compose("train", *args, "pairs=p.jsonl")
    assert_same_nodes(run, tr, TRAIN_NODES, f"sphere train {' '.join(args)}")
    t = tr.train  # the paper's recipe, not lora.yaml's defaults (lr 5e-4, 2 epochs, 512 tokens, fp32)
    assert t.lora.enabled is True and t.lr == 5e-6 and t.epochs == 1 and t.loss.rpo_alpha == 0.0
    assert t.max_length >= 2048 and t.batch_size * t.grad_accum == 32
    if not any(a.startswith("model=") for a in args):  # the real 7B models (the CPU stand-ins may use fp32)
        assert t.dtype == "bfloat16"


@pytest.mark.parametrize("args", [[f"experiment={e}"] for e in PAPER]
                         + [[f"experiment={e}", f"model={m}"] for e, m in STANDIN_RUNS])
def test_eval_composes_to_runs_per_round_eval(args):
    run = compose("run", *args)
    ev = compose("eval", *args)
    assert eval_settings(ev) == run_eval_settings(run)
    assert_same_nodes(run, ev, ("model", "backend", "prompt", "paths", "seed"),
                      f"sphere eval {' '.join(args)}")
    settings, benches, limit, fam = eval_settings(ev)
    assert benches == ["math500", "gsm8k", "aime24", "aime25", "amc23", "olympiadbench"] and limit is None
    assert settings["n"] == 1 and settings["temperature"] == 0.0
    assert settings["max_tokens"] == run.sampling.max_solution_tokens
    assert fam["name"] == run.model.family != "mini"


@pytest.mark.parametrize("exp", TRANSFER)
def test_transfer_eval_of_the_target(exp, tmp_path):
    """A transfer run evaluates ``model.train_target`` in ``model.train_target_family``; `sphere eval
    experiment=transfer_X model=<target checkpoint>` gets that family from the checkpoint's chat template and
    the run's per-round settings."""
    from sphere.prompts import load_family

    run = compose("run", f"experiment={exp}")
    fam = str(run.model.train_target_family)
    target = _fake_model(tmp_path / "target", TEMPLATE_OF[fam])
    ev = compose("eval", f"experiment={exp}", f"model={target}")
    settings, benches, limit, got = eval_settings(ev)
    want = run_eval_settings(run)
    assert (settings, benches, limit) == want[:3]
    assert got == load_family(fam)


def test_every_experiment_composes_for_every_phase():
    """The other experiments (the mini worlds) compose for every phase too, and each names its DPO recipe
    (conf/run.yaml leaves the choice to the experiment)."""
    exps = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
    assert set(PAPER + TRANSFER) <= set(exps)
    for e in sorted(set(exps) - set(PAPER + TRANSFER)):
        extra = ["variant=no_stage3"] if e == "ablation" else []
        run = compose("run", f"experiment={e}", *extra)
        assert "lr" in run.train and "lora" in run.train, f"experiment={e} names no DPO recipe"
        compose("generate", f"experiment={e}", *extra)
        compose("train", f"experiment={e}", "pairs=p.jsonl", *extra)
        compose("eval", f"experiment={e}", *extra)
    compose("generate", "+experiment=paper_qwen2_5_7b")  # the spelling the issue tried


def test_phase_defaults_unchanged_without_experiment():
    """The slots the experiments need change nothing when no experiment is given."""
    gen = compose("generate")
    assert "train" not in gen and gen.prompt.name == "mini" and gen.model.family == "mini"
    tr = compose("train", "pairs=p.jsonl")
    assert tr.train.lora.enabled is True and tr.train.lr == 5e-4 and "search" not in tr
    ev = compose("eval")
    assert ev.benchmarks == ["mini"] and ev.limit is None and ev.sampling.n == 1 and ev.backend.name == "vllm"
    assert "search" not in ev and "train" not in ev
    # overrides of the top-level eval keys still work, and so do those of the eval node
    ev = compose("eval", "benchmarks=[math500]", "limit=3", "sampling.n=4")
    assert list(ev.benchmarks) == ["math500"] and ev.limit == 3 and ev.sampling.n == 4
    ev = compose("eval", "eval.benchmarks=[gsm8k]", "eval.n=2")
    assert list(ev.benchmarks) == ["gsm8k"] and ev.sampling.n == 2


def test_run_default_recipe_is_full_fine_tuning():
    """The recipe slot moved to conf/generate.yaml; `sphere run` still trains the mini default in full and
    `train_opts@train=` on the command line still wins over the experiment's."""
    assert compose("run").train.lora.enabled is False
    assert compose("run", "train_opts@train=lora").train.lora.enabled is True
    assert compose("run", "experiment=paper_qwen2_5_7b", "train_opts@train=full").train.lora.enabled is False


# ------------------------------------------------------------------------------ prompt family from the model
TEMPLATE_OF = {"qwen2_5": "Qwen-Qwen2.5-Instruct.jinja", "qwen2_5_math": "Qwen-Qwen2.5-Math-Instruct.jinja",
               "phi4": "microsoft-phi-4.jinja", "deepseek_r1": "deepseek-ai-DeepSeek-R1-Distill-Qwen.jinja"}
FIXTURE_FAMILY = {
    "Qwen-Qwen2.5-Instruct.jinja": "qwen2_5",
    "Qwen-Qwen2.5-Math-Instruct.jinja": "qwen2_5_math",
    "deepseek-ai-DeepSeek-R1-Distill-Qwen.jinja": "deepseek_r1",
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-first-release.jinja": "deepseek_r1",
    "microsoft-phi-4.jinja": "phi4",
    "microsoft-phi-4-first-release.jinja": "phi4",
    "microsoft-Phi-4-mini-instruct.jinja": "phi4",
}


def _fake_model(d: Path, template: str | None, how: str = "jinja") -> Path:
    """A model directory as far as the prompt family is concerned: config.json and a tokenizer config, with
    the chat template in chat_template.jinja (``how="jinja"``, what transformers 5 saves) or inside
    tokenizer_config.json (``"json"``, older checkpoints; ``"list"``: a list of named templates)."""
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    tc: dict = {"tokenizer_class": "PreTrainedTokenizerFast"}
    text = (TEMPLATES / template).read_text(encoding="utf-8") if template else None
    if text is not None and how == "jinja":
        (d / "chat_template.jinja").write_text(text, encoding="utf-8")
    elif text is not None and how == "json":
        tc["chat_template"] = text
    elif text is not None:
        tc["chat_template"] = [{"name": "tool_use", "template": "{{ tools }}"},
                               {"name": "default", "template": text}]
    (d / "tokenizer_config.json").write_text(json.dumps(tc), encoding="utf-8")
    return d


def test_every_real_template_names_its_family():
    from sphere.prompts import family_from_template

    have = {p.name for p in TEMPLATES.glob("*.jinja")}
    assert have == set(FIXTURE_FAMILY), "a new template fixture needs its family here"
    for name, fam in FIXTURE_FAMILY.items():
        assert family_from_template((TEMPLATES / name).read_text(encoding="utf-8"))[0] == fam, name
    assert family_from_template(None)[0] is None and family_from_template("")[0] is None


@pytest.mark.parametrize("how", ["jinja", "json", "list"])
@pytest.mark.parametrize("template,family", sorted(FIXTURE_FAMILY.items()))
def test_detect_family_of_a_checkpoint_directory(tmp_path, template, family, how):
    from sphere.prompts import detect_family

    assert detect_family(str(_fake_model(tmp_path / "m", template, how)))[0] == family


@pytest.mark.parametrize("name,family", [
    ("standin-qwen2_5", "qwen2_5"), ("standin-qwen2_5-small", "qwen2_5"), ("standin-phi4", "phi4"),
    ("standin-phi4-mini", "phi4"), ("standin-r1-distill", "deepseek_r1"),
    ("standin-r1-distill-small", "deepseek_r1")])
def test_detect_family_of_the_standins(name, family):
    """The stand-ins carry the real templates; their directories (what a merged checkpoint of one looks
    like) and their names both give the family conf/model/standin_*.yaml declares."""
    from sphere.prompts import detect_family

    assert detect_family(name)[0] == family
    assert detect_family(str(STANDIN / name))[0] == family


def test_detect_family_without_a_template_and_of_unknown_models(tmp_path, monkeypatch):
    from sphere.prompts import UnknownPromptFamily, detect_family

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fam, why = detect_family(str(ROOT / "assets" / "mini_honest" / "mini-honest"))
    assert fam is None and "no chat template" in why  # keeps the configured (plain) family
    unknown = _fake_model(tmp_path / "llama", None)
    (unknown / "chat_template.jinja").write_text("{% for m in messages %}<|start_header_id|>{{ m.content }}"
                                                 "{% endfor %}")
    with pytest.raises(UnknownPromptFamily, match="prompt=FAMILY"):
        detect_family(str(unknown))
    # hub names not at hand: the configs' models by name, anything else refused
    assert detect_family("Qwen/Qwen2.5-7B-Instruct")[0] == "qwen2_5"
    assert detect_family("Qwen/Qwen2.5-Math-7B-Instruct")[0] == "qwen2_5_math"
    assert detect_family("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B")[0] == "deepseek_r1"
    assert detect_family("microsoft/phi-4")[0] == "phi4"
    with pytest.raises(UnknownPromptFamily, match="meta-llama/Llama-3.1-8B-Instruct.*prompt=FAMILY"):
        detect_family("meta-llama/Llama-3.1-8B-Instruct")
    # a path that does not exist, or a word that is no model: left to the model loader, which names it
    assert detect_family(str(tmp_path / "missing"))[0] is None
    assert detect_family("PATH")[0] is None and detect_family("mini-small")[0] is None


def test_eval_of_a_merged_standin_uses_its_chat_template(tmp_path):
    """`sphere eval model=<merged dir of a stand-in>`: the stand-in's chat prompt, not the mini one. The
    directory is a copy of the stand-in's tokenizer files (what `sphere train` writes next to the weights)."""
    from transformers import AutoTokenizer

    from sphere.prompts import family_config, header_text, uses_chat

    merged = tmp_path / "merged"
    merged.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(STANDIN / "standin-qwen2_5" / f, merged / f)
    notes: list[str] = []
    cfg = compose("eval", f"model={merged}", note=notes.append)
    fam = family_config(cfg)
    assert cfg.model.policy == str(merged) and fam["name"] == "qwen2_5" and cfg.prompt.name == "qwen2_5"
    assert notes and "qwen2_5" in notes[0]
    tok = AutoTokenizer.from_pretrained(merged)
    assert uses_chat(tok, fam)
    head = header_text(tok, "What is 2+3?", fam)
    assert head.startswith("<|im_start|>system\nYou are Qwen") and head.endswith("<|im_start|>assistant\n")
    # an explicit prompt= wins, over the detection and over model.family
    cfg = compose("eval", f"model={merged}", "prompt=qwen2_5_math")
    assert family_config(cfg)["name"] == "qwen2_5_math"
    cfg = compose("eval", "model=qwen2_5_7b", "prompt=qwen2_5_math")
    assert family_config(cfg)["name"] == "qwen2_5_math"
    # a model option of conf/model/ keeps its own family
    assert family_config(compose("eval", "model=standin_phi4"))["name"] == "phi4"


@pytest.mark.parametrize("command", ["run", "generate", "train", "eval"])
def test_model_path_sets_the_family_for_every_phase(tmp_path, command):
    from sphere.prompts import family_config

    d = _fake_model(tmp_path / "r1", TEMPLATE_OF["deepseek_r1"])
    extra = ["pairs=p.jsonl"] if command == "train" else []
    cfg = compose(command, f"model={d}", *extra)
    assert cfg.model.policy == str(d) and cfg.model.family == "deepseek_r1"
    assert family_config(cfg)["name"] == "deepseek_r1"
    # with an experiment too: the model's template decides, not the experiment's family
    cfg = compose(command, "experiment=paper_qwen2_5_7b", f"model={d}", *extra)
    assert family_config(cfg)["name"] == "deepseek_r1"


def test_model_path_without_template_keeps_the_configured_family():
    from sphere.prompts import family_config

    mini = ROOT / "assets" / "mini_honest" / "mini-honest"
    assert family_config(compose("eval", f"model={mini}"))["name"] == "mini"
    cfg = compose("eval", "experiment=paper_qwen2_5_7b", f"model={mini}")
    assert family_config(cfg)["name"] == "qwen2_5"  # the experiment's family, its plain template


def test_unknown_family_is_refused_on_the_command_line(tmp_path):
    d = _fake_model(tmp_path / "other", None)
    (d / "chat_template.jinja").write_text("{{ messages[0].content }}")
    with pytest.raises(SystemExit, match="prompt=FAMILY"):
        compose("eval", f"model={d}")
    assert compose("eval", f"model={d}", "prompt=qwen2_5").model.family == "qwen2_5"


# ------------------------------------------------------------------------------ sphere generate: memory plan
def test_generate_checks_the_memory_plan_before_any_model(monkeypatch, tmp_path):
    from sphere.generate import local
    from sphere.memplan import MemoryPlanError

    def no_models(*a, **k):
        raise AssertionError("a model was opened before the memory check")

    import sphere.generate.generator as generator
    import sphere.lifecycle

    monkeypatch.setattr(sphere.lifecycle, "Models", no_models)
    monkeypatch.setattr(generator, "Generator", no_models)
    monkeypatch.setattr(local, "load_problems", no_models)
    cfg = compose("generate", "experiment=paper_qwen2_5_7b", "hardware.gpu_memory_gb=24")
    with pytest.raises(MemoryPlanError, match="does not fit hardware.gpu_memory_gb=24") as e:
        local.run_local(cfg, tmp_path)
    assert "phase train" not in str(e.value)  # sphere generate does not train
    plan = local.generate_memory_plan(compose("generate", "experiment=paper_qwen2_5_7b",
                                              "hardware.gpu_memory_gb=80"))
    assert plan["fits"] is True and set(plan["phases"]) == {"generate", "stage3"}
    # the same verdict as sphere run's plan for those phases
    from sphere.memplan import memory_plan

    run_plan = memory_plan(compose("run", "experiment=paper_qwen2_5_7b", "hardware.gpu_memory_gb=80"))
    assert {k: v for k, v in run_plan["phases"].items() if k != "train"} == plan["phases"]
    # no hardware: no verdict, and no train node needed (plain `sphere generate`)
    assert local.generate_memory_plan(compose("generate"))["fits"] is None


def test_model_sweep_on_the_command_line(tmp_path):
    """`sphere eval -m model=A,B` (a multirun over checkpoints, docs/scaling.md's SLURM example): paths become
    `model.policy=A,B` with their shared family; checkpoints of different families are refused."""
    from sphere.cli import conf_dir, hydra_overrides

    a = _fake_model(tmp_path / "a", TEMPLATE_OF["qwen2_5"])
    b = _fake_model(tmp_path / "b", TEMPLATE_OF["qwen2_5"])
    c = _fake_model(tmp_path / "c", TEMPLATE_OF["phi4"])
    ov = hydra_overrides(("eval",), ["-m", f"model={a},{b}", "benchmarks=[all]"], conf_dir())
    assert ov == ["-m", f"model.policy={a},{b}", "model.family=qwen2_5", "prompt=qwen2_5", "benchmarks=[all]"]
    with pytest.raises(SystemExit, match="different prompt families"):
        hydra_overrides(("eval",), ["-m", f"model={a},{c}"], conf_dir())
    assert hydra_overrides(("eval",), ["-m", f"model={a},{c}", "prompt=phi4"], conf_dir())[1] == \
        f"model.policy={a},{c}"
    # options of conf/model/ stay a group sweep
    assert hydra_overrides(("run",), ["-m", "model=standin_qwen2_5,standin_phi4"], conf_dir()) == \
        ["-m", "model=standin_qwen2_5,standin_phi4"]


@pytest.mark.parametrize("command", ["generate", "train", "eval"])
def test_phase_help_lists_the_experiments(command):
    from sphere.cli import command_help, conf_dir

    text = command_help((command,), conf_dir())
    assert re.search(r"^  experiment +\[none\] .*paper_qwen2_5_7b", text, re.M)
    assert "[null]" not in text  # the slots experiments need are not choices of this command


def test_sphere_eval_of_a_merged_standin_end_to_end(tmp_path):
    """The issue's example, run: `sphere eval model=<merged dir>` of a stand-in (a copy of its checkpoint, as
    `sphere train` writes one) evaluates in the stand-in's chat prompt; results.json records the family."""
    import os
    import subprocess
    import sys

    merged = tmp_path / "round_1" / "train" / "merged"
    shutil.copytree(STANDIN / "standin-qwen2_5", merged)
    out = tmp_path / "eval"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "sphere.cli", "eval", f"model={merged}", "backend=transformers",
                        "benchmarks=[mini]", "limit=2", f"hydra.run.dir={out}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "prompt family qwen2_5" in p.stderr
    meta = json.loads((out / "eval" / "results.json").read_text())["meta"]
    assert meta["prompt"]["family"] == "qwen2_5" and meta["model"] == str(merged)
