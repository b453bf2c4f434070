"""`sphere train`: pairs.jsonl checking, loss mapping onto TRL, and real DPO runs on the tiny Llama.

The behaviour tests train on a fixed set of correct-vs-corrupted arithmetic solutions and then measure,
independently of TRL's own metrics, that the saved merged checkpoint prefers the chosen completions more
than the starting policy did (implicit DPO reward margin), which fails if training, merging or saving is
broken.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sphere.train.pairs_file import load_pairs

# ----------------------------------------------------------------------------------------------- data


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    """n pairs on the tiny model's format: chosen = correct solution, rejected = first step off by a few,
    the error carried through to a wrong boxed answer."""
    from sphere.standins.tiny import DELIM, PROMPT_TEMPLATE, arithmetic_problem

    rng = random.Random(seed)
    out = []
    for i in range(n):
        problem, steps, _, _ = arithmetic_problem(rng)
        m = re.match(r"First, (-?\d+) ([+-]) (-?\d+) = (-?\d+)\.", steps[0])
        a, op1, b, r1 = int(m[1]), m[2], int(m[3]), int(m[4])
        m2 = re.match(r"Then, (-?\d+) ([+*]) (-?\d+) = (-?\d+)\.", steps[1])
        op2, c = m2[2], int(m2[3])
        w1 = r1 + rng.choice([-3, -2, -1, 1, 2, 3])
        w2 = w1 + c if op2 == "+" else w1 * c
        bad = [f"First, {a} {op1} {b} = {w1}.", f"Then, {w1} {op2} {c} = {w2}.",
               f"The answer is \\boxed{{{w2}}}."]
        out.append({"prompt": PROMPT_TEMPLATE.format(problem=problem), "chosen": DELIM.join(steps),
                    "rejected": DELIM.join(bad), "stage": 1 + i % 3, "problem_id": f"p{i}",
                    "extra": {"x": i}})
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


class FakeLogger:
    def __init__(self):
        self.calls: list[tuple[dict, int | None]] = []

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.calls.append((dict(metrics), step))


def seq_margins(model_dir: Path, pairs: list[dict]) -> list[float]:
    """log p(chosen) - log p(rejected) (completion tokens + EOS) under the model in ``model_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def logp(prompt: str, completion: str) -> float:
        p = tok(prompt)["input_ids"]
        ids = tok(prompt + completion)["input_ids"] + [tok.eos_token_id]
        x = torch.tensor([ids])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
        tgt = x[0, 1:]
        return float(lp[torch.arange(len(tgt)), tgt][len(p) - 1:].sum())

    return [logp(r["prompt"], r["chosen"]) - logp(r["prompt"], r["rejected"]) for r in pairs]


FAST = {"epochs": 6, "batch_size": 4, "progress": False, "seed": 0, "warmup_ratio": 0.0,
        "scheduler": "constant", "logging_steps": 1, "trust_remote_code": False}


# ------------------------------------------------------------------------------------ pairs validation
BAD_LINES = [
    ({"prompt": "p", "rejected": "r"}, "missing field 'chosen'"),
    ({"prompt": "p", "chosen": "", "rejected": "r"}, "field 'chosen' is an empty string"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"}, "field 'chosen' must be a string or a list"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "stage": 4}, "field 'stage' must be one of"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "all plain text or all conversational"),
    ({"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": "r"}, "string 'role' and 'content'"),
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
]


@pytest.mark.parametrize("bad,msg", BAD_LINES)
def test_bad_pairs_line_names_file_line_and_field(tmp_path, bad, msg):
    good = {"prompt": "Problem: 1+1\n\nSolution:\n", "chosen": "2", "rejected": "3", "stage": 1}
    # line 1 good, line 2 blank, line 3 bad: the error must say line 3
    p = write_jsonl(tmp_path / "pairs.jsonl", [good, "", bad])
    with pytest.raises(ValueError, match=re.escape(f"{p}:3") + ".*" + re.escape(msg)):
        load_pairs(p)


def test_zero_pairs_is_a_clear_error(tmp_path):
    p = write_jsonl(tmp_path / "pairs.jsonl", ["", ""])
    with pytest.raises(ValueError, match=re.escape(str(p)) + ".*no preference pairs"):
        load_pairs(p)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_pairs(tmp_path / "missing.jsonl")


def test_pairs_keep_only_trainer_fields_and_count_stages(tmp_path):
    rows = make_pairs(6)
    ps = load_pairs(write_jsonl(tmp_path / "pairs.jsonl", rows))
    assert len(ps) == 6 and not ps.conversational
    assert all(set(r) == {"prompt", "chosen", "rejected"} for r in ps.rows)
    assert ps.rows[2]["chosen"] == rows[2]["chosen"]
    assert dict(ps.stages) == {1: 2, 2: 2, 3: 2}
    conv = [{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
             "rejected": [{"role": "assistant", "content": "b"}]}]
    assert load_pairs(write_jsonl(tmp_path / "c.jsonl", conv)).conversational


# ------------------------------------------------------------------------------------------ loss mapping
@pytest.mark.parametrize("loss,types,weights,eps", [
    ({"type": "sigmoid"}, ["sigmoid"], None, 0.0),
    ({"type": "ipo", "beta": 0.5}, ["ipo"], None, 0.0),
    ({"type": "sigmoid", "label_smoothing": 0.2}, ["sigmoid", "robust"], [1.6, -0.6], 0.2),
    ({"type": "sigmoid", "rpo_alpha": 0.5}, ["sigmoid", "sft"], [1.0, 0.5], 0.0),
    ({"type": "ipo", "rpo_alpha": 1.0}, ["ipo", "sft"], [1.0, 1.0], 0.0),
    ({"type": "sigmoid", "label_smoothing": 0.1, "rpo_alpha": 2.0}, ["sigmoid", "robust", "sft"],
     [1.8, -0.8, 2.0], 0.1),
])
def test_loss_options_reach_dpo_config(tmp_path, loss, types, weights, eps):
    from sphere.train.train_config import dpo_config, resolve_train_cfg

    t = resolve_train_cfg({"loss": loss, "lr": 1e-3, "batch_size": 3, "grad_accum": 2, "max_length": 77,
                           "epochs": 5, "seed": 7, "progress": False})
    args = dpo_config(t, tmp_path)
    assert args.loss_type == types
    if weights is None:
        assert args.loss_weights is None
    else:
        assert args.loss_weights == pytest.approx(weights)
    assert args.label_smoothing == eps
    assert args.beta == loss.get("beta", 0.1)
    assert (args.learning_rate, args.per_device_train_batch_size, args.gradient_accumulation_steps,
            args.max_length, args.num_train_epochs, args.seed) == (1e-3, 3, 2, 77, 5.0, 7)
    assert args.gradient_checkpointing is False and args.bf16 is False and args.dataloader_num_workers == 0


@pytest.mark.parametrize("cfg,msg", [
    ({"loss": {"type": "ipo", "label_smoothing": 0.1}}, "train.loss.label_smoothing"),
    ({"loss": {"type": "kto"}}, "train.loss.type='kto'"),
    ({"loss": {"label_smoothing": 0.5}}, r"must be in \[0, 0.5\)"),
    ({"loss": {"rpo_alpha": -1}}, "train.loss.rpo_alpha"),
    ({"lr": 0}, "train.lr"),
    ({"bogus": 1}, "train.bogus: unknown"),
    ({"lora": {"rank": 8}}, "train.lora.rank: unknown"),
])
def test_bad_train_options_name_the_key(tmp_path, cfg, msg):
    from sphere.train.train_config import dpo_config, resolve_train_cfg

    with pytest.raises(ValueError, match=msg):
        dpo_config(resolve_train_cfg(cfg), tmp_path)


def test_cdpo_weights_reproduce_the_cdpo_loss_in_trl(tmp_path, tiny_model_dir):
    """With batch 1 TRL logs this step's loss and beta*delta (rewards/margins): the loss must equal
    -(1-e) logsig(m) - e logsig(-m), computed by TRL's real loss code with our weights."""
    from sphere.train.dpo import train_dpo

    eps = 0.2
    pairs = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(4, seed=3))
    log = FakeLogger()
    train_dpo({**FAST, "batch_size": 1, "max_steps": 4, "lr": 5e-3, "precompute_ref": False,
               "loss": {"type": "sigmoid", "beta": 0.5, "label_smoothing": eps}},
              tiny_model_dir, pairs, tmp_path / "out", logger=log)
    steps = [m for m, _ in log.calls if "train/loss" in m]
    assert len(steps) == 4

    def ls(x):
        return -math.log1p(math.exp(-x))

    moved = 0
    for m in steps:
        x = m["train/rewards/margins"]
        moved += abs(x) > 1e-3
        assert m["train/loss"] == pytest.approx(-(1 - eps) * ls(x) - eps * ls(-x), rel=1e-4, abs=1e-5)
    assert moved >= 2  # the check is only meaningful away from margin 0 (where every loss is log 2)


# ------------------------------------------------------------------------------------------ training
def _check_merged(merged: Path, policy: Path | None = None) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    assert (merged / "DONE").is_file()
    if policy is not None:  # the next policy gets the tokenizer files of this one, byte for byte
        for f in ("tokenizer.json", "tokenizer_config.json"):
            assert (merged / f).read_bytes() == (policy / f).read_bytes(), f
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    cfg = json.loads((merged / "config.json").read_text())
    assert cfg["dtype"] == "float32" and cfg["use_cache"] is True
    assert not any("peft" in k or "adapter" in k for k in cfg), cfg.keys()
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert next(model.parameters()).dtype == torch.float32
    assert not any("lora" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_dpo_raises_the_chosen_margin_and_saves_a_loadable_checkpoint(tmp_path, tiny_model_dir, mode):
    from sphere.train.dpo import train_dpo

    rows = make_pairs(16, seed=1)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    opts = {**FAST, "lr": 3e-3} if mode == "lora" else {**FAST, "lr": 3e-4, "lora": {"enabled": False}}
    log = FakeLogger()
    out = tmp_path / "out"
    merged = train_dpo(opts, tiny_model_dir, pairs, out, logger=log)

    assert merged == out / "merged"
    _check_merged(merged, tiny_model_dir)
    assert (out / "adapter" / "adapter_config.json").is_file() == (mode == "lora")
    assert not (out / ".merged.tmp").exists() and not (out / "trainer").exists()

    # independent measurement on the saved checkpoint: chosen-vs-rejected log-prob margin went up
    before, after = seq_margins(tiny_model_dir, rows), seq_margins(merged, rows)
    gain = [a - b for a, b in zip(after, before)]
    assert sum(gain) / len(gain) > 1.0, gain
    assert sum(g > 0 for g in gain) >= 14, gain

    m = json.loads((out / "train_metrics.json").read_text())
    assert m["pairs"] == 16 and m["steps"] == 24 and m["lora"] == (mode == "lora")
    assert m["loss_final"] < m["loss_first"] and m["rewards_margins_final"] > 0.1
    assert m["rewards_accuracies_final"] >= 0.75
    assert m["pairs_by_stage"] == {"1": 6, "2": 5, "3": 5}

    # train/* metrics went to the logger, one record per optimizer step, then a final summary
    per_step = [(mm, s) for mm, s in log.calls if "train/loss" in mm]
    assert [s for _, s in per_step] == list(range(1, 25))
    assert {"train/rewards/margins", "train/rewards/accuracies", "train/learning_rate"} <= set(per_step[0][0])
    assert "train/final/wall_s" in log.calls[-1][0]

    # resume: a complete out_dir is returned without training again
    mtime = (merged / "model.safetensors").stat().st_mtime_ns
    log2 = FakeLogger()
    assert train_dpo(opts, tiny_model_dir, pairs, out, logger=log2) == merged
    assert (merged / "model.safetensors").stat().st_mtime_ns == mtime and log2.calls == []


def test_incomplete_merged_dir_is_retrained(tmp_path, tiny_model_dir):
    from sphere.train.dpo import train_dpo

    pairs = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(4))
    out = tmp_path / "out"
    (out / "merged").mkdir(parents=True)
    (out / "merged" / "config.json").write_text("{}")  # a crash left a half-written dir (no DONE)
    merged = train_dpo({**FAST, "max_steps": 1}, tiny_model_dir, pairs, out)
    _check_merged(merged)


def test_conversational_pairs_prompt_truncation_and_eos_policy(tmp_path, tiny_model_dir):
    """Chat-format pairs train through the tokenizer's chat template; max_prompt_length cuts prompts."""
    from sphere.standins.tiny import CHATML
    from sphere.train.dpo import train_dpo

    model = tmp_path / "chat_model"
    shutil.copytree(tiny_model_dir, model)
    tc = json.loads((model / "tokenizer_config.json").read_text())
    tc["chat_template"] = CHATML
    del tc["pad_token"]  # like the mini tokenizer: no pad token (the trainer pads with EOS on its copy)
    (model / "tokenizer_config.json").write_text(json.dumps(tc))
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in make_pairs(8)]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "out"
    train_dpo({**FAST, "max_steps": 2, "max_prompt_length": 8, "append_eos": False, "max_length": 4096},
              model, pairs, out)
    m = json.loads((out / "train_metrics.json").read_text())
    assert m["pairs_kept"] == 8 and m["prompts_truncated"] == 8 and m["steps"] == 2
    assert m["max_length"] == 1024  # capped at the model's max_position_embeddings
    _check_merged(out / "merged", model)
    from transformers import AutoTokenizer

    merged_tok = AutoTokenizer.from_pretrained(out / "merged")
    assert merged_tok.pad_token is None and merged_tok.chat_template == CHATML  # the policy's tokenizer as is

    # plain-text pairs for a tokenizer without a chat template work; chat pairs do not
    with pytest.raises(ValueError, match="no chat template"):
        train_dpo(FAST, tiny_model_dir, pairs, tmp_path / "out2")


@pytest.mark.parametrize("append_eos", [True, False])
def test_eos_policy_on_plain_completions(tmp_path, tiny_model_dir, append_eos):
    """append_eos=true ends every plain completion with EOS (full solutions); false leaves them open
    (step-level pairs, where the policy must go on after the step)."""
    from sphere.train.dpo import train_dpo

    pairs = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(4))
    train_dpo({**FAST, "max_steps": 1, "append_eos": append_eos}, tiny_model_dir, pairs, tmp_path / "out")
    m = json.loads((tmp_path / "out" / "train_metrics.json").read_text())
    assert m["completions_with_eos"] == (8 if append_eos else 0)


def test_prompts_filling_max_length_are_reported(tmp_path, tiny_model_dir):
    from sphere.train.dpo import train_dpo

    pairs = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(4))
    with pytest.raises(ValueError, match="every pair was dropped.*train.max_length=8"):
        train_dpo({**FAST, "max_length": 8}, tiny_model_dir, pairs, tmp_path / "out")


@pytest.mark.slow  # a fresh interpreter imports torch/trl/hydra: 40-65 s on a loaded 2-core machine
def test_sphere_train_cli(tmp_path, tiny_model_dir):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(8))
    run_dir = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "sphere.cli", "train", f"pairs={pairs}", f"model={tiny_model_dir}",
         f"hydra.run.dir={run_dir}", "train.max_steps=2", "train.batch_size=4", "train.loss.rpo_alpha=0.5"],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last["steps"] == 2 and last["pairs"] == 8
    assert Path(last["merged"]) == run_dir / "merged" and (run_dir / "merged" / "DONE").is_file()
    m = json.loads((run_dir / "train_metrics.json").read_text())
    assert m["loss"]["loss_type"] == ["sigmoid", "sft"] and m["loss"]["loss_weights"] == [1.0, 0.5]


# ---------------------------------------------------------------------------------------------- vLLM
@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_greedy_on_the_merged_checkpoint_equals_transformers(tmp_path, tiny_model_dir):
    """The merged checkpoint is what the next round's vLLM engine loads: vLLM's greedy continuation of a
    handful of prompts equals transformers' greedy continuation on the same merged weights, token for token
    (float32 both). vLLM runs in a child process so this session keeps its single in-process engine
    (tests/conftest.py)."""
    from conftest import require_vllm

    require_vllm()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sphere.standins.tiny import PROMPT_TEMPLATE, arithmetic_problem
    from sphere.train.dpo import train_dpo

    pairs = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(8))
    merged = train_dpo({**FAST, "max_steps": 2}, tiny_model_dir, pairs, tmp_path / "out")
    rng = random.Random(123)
    prompts = [PROMPT_TEMPLATE.format(problem=arithmetic_problem(rng)[0]) for _ in range(6)]
    prompts.append("Problem: Ann has 3 coins. Ann gets 4, then gets 2. How many coins now?\n\nSolution:\n")
    max_new = 24
    code = (
        "import json, sys\n"
        "from vllm import LLM, SamplingParams\n"
        f"llm = LLM(model={str(merged)!r}, dtype='float32', max_model_len=512, block_size=32, "
        "enforce_eager=True, seed=0)\n"
        f"outs = llm.generate({prompts!r}, SamplingParams(temperature=0, max_tokens={max_new}))\n"
        "print(json.dumps([list(o.outputs[0].token_ids) for o in outs]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])

    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    eos = tok.eos_token_id
    want = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt")["input_ids"]
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new, pad_token_id=eos)[0, ids.shape[1]:].tolist()
            want.append(out[:out.index(eos) + 1] if eos in out else out)  # vLLM stops at (and keeps) EOS
    strip = lambda t: t[:-1] if t and t[-1] == eos else t  # noqa: E731
    assert [strip(g) for g in got] == [strip(w) for w in want]
    assert all(len(g) > 0 for g in got)


# --------------------------------------------------------------------------------------------- config
def test_train_configs_compose_and_resolve():
    """conf/train.yaml with both recipes composes, every train.* key is known to train_dpo, and the
    recipes differ where they should."""
    from hydra import compose, initialize_config_dir

    from sphere.cli import conf_dir
    from sphere.train.train_config import resolve_train_cfg

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        lora = resolve_train_cfg(compose("train", overrides=["pairs=p.jsonl", "seed=5"]).train)
        full = resolve_train_cfg(compose("train", overrides=["pairs=p.jsonl", "train_opts@train=full",
                                                             "train.loss.type=ipo"]).train)
    assert lora["lora"]["enabled"] is True and full["lora"]["enabled"] is False
    assert full["lr"] < lora["lr"] and lora["seed"] == 5 and full["loss"]["type"] == "ipo"
    assert lora["trust_remote_code"] is False


def test_train_metrics_reach_an_offline_wandb_run(tmp_path, tiny_model_dir):
    """train/* metrics through the project's W&B logger (offline): one history row per optimizer step."""
    from omegaconf import OmegaConf

    from sphere.loggers import make_logger
    from sphere.wandb_runs import read_offline_run
    from sphere.train.dpo import train_dpo

    pairs = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(8))
    cfg = OmegaConf.create({"logger": {"name": "wandb", "mode": "offline", "project": "sphere-test"}})
    logger = make_logger(cfg, tmp_path / "run", "train")
    try:
        train_dpo({**FAST, "max_steps": 3}, tiny_model_dir, pairs, tmp_path / "out", logger=logger)
    finally:
        logger.finish()
    hist = read_offline_run(tmp_path / "run")["history"]
    rows = [h for h in hist if "train/loss" in h]
    assert len(rows) == 3 and all("train/rewards/margins" in h for h in rows)
    assert any(h.get("train/final/steps") == 3 for h in hist)


_TEMPLATES = Path(__file__).resolve().parent / "fixtures" / "chat_templates"


@pytest.mark.parametrize("template,rewrites", [
    ("deepseek-ai-DeepSeek-R1-Distill-Qwen.jinja", 1),  # keeps only the text after </think> in assistant turns
    ("deepseek-ai-DeepSeek-R1-Distill-Qwen-first-release.jinja", 1),
    ("Qwen-Qwen2.5-Instruct.jinja", 0),
    ("microsoft-phi-4.jinja", 0),
])
def test_chat_pairs_train_on_the_text_generation_produced(template, rewrites):
    """Conversational pairs reach the trainer as the generation prompt + the whole assistant text + the turn's
    end. Before, TRL re-rendered prompt + completion with the template, and the R1 distills' template cut every
    chosen/rejected to what follows </think>: DPO never saw the reasoning the search compared."""
    from transformers import AutoTokenizer

    from sphere.resources import resource_path
    from sphere.train.pairs_file import render_chat_pairs

    tok = AutoTokenizer.from_pretrained(resource_path("assets/standin/standin-qwen2_5"))
    tok.chat_template = (_TEMPLATES / template).read_text()
    r1 = template.startswith("deepseek")
    prefix = "<think>\n" if r1 else ""
    reasoning = "2 + 2 = 4.\n\nSo the sum is 4.\n</think>\n\n" if r1 else "2 + 2 = 4.\n\n"
    row = {"prompt": [{"role": "user", "content": "What is 2 + 2?"}],
           "chosen": [{"role": "assistant", "content": prefix + reasoning + "The answer is \\boxed{4}."}],
           "rejected": [{"role": "assistant", "content": prefix + "2 + 2 = 5.\n\nThe answer is \\boxed{5}."}]}
    (out,), stats = render_chat_pairs([row], tok)
    head = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
    assert out["prompt"] == head
    assert out["chosen"].startswith(reasoning if head.endswith("<think>\n") else prefix + reasoning)
    turn_end = "<｜end▁of▁sentence｜>" if r1 else "<|im_end|>"  # the template's end of an assistant turn
    assert out["chosen"].endswith("The answer is \\boxed{4}." + turn_end)
    assert "2 + 2 = 5." in out["rejected"]
    assert (out["prompt"] + out["chosen"]).count("<think>") == (1 if r1 else 0)  # the prompt's or the text's
    assert stats == {"template_rewrites": rewrites}


@pytest.mark.parametrize("model", ["standin-r1-distill", "standin-phi4-mini", "standin-qwen2_5"])
def test_dpo_prompt_tokens_are_the_generation_prompt_tokens(model):
    """What the trainer tokenises (prompt text, then prompt + completion, with the tokenizer's own special
    tokens, as TRL does for text) starts with exactly the ids generation fed the model: one BOS for R1's
    tokenizer (which adds one itself and whose template renders one too), none for the others."""
    from transformers import AutoTokenizer

    from sphere.model_paths import resolve_model
    from sphere.prompts import build_prompt_ids, load_family
    from sphere.train.pairs_file import render_chat_pairs

    fam = load_family({"standin-r1-distill": "deepseek_r1", "standin-phi4-mini": "phi4"}.get(model, "qwen2_5"))
    tok = AutoTokenizer.from_pretrained(resolve_model(model))
    problem = "Ann has 3 apples and gets 4 more. How many apples does she have?"
    gen_ids = build_prompt_ids(tok, problem, [], fam)
    msgs = ([{"role": "system", "content": fam["system"]}] if fam.get("system") else []) + [
        {"role": "user", "content": problem + "\n" + fam["instruction"]}]
    prefix = fam.get("assistant_prefix") or ""
    row = {"prompt": msgs, "chosen": [{"role": "assistant", "content": prefix + "3 + 4 = 7.\n\nThe answer is 7."}],
           "rejected": [{"role": "assistant", "content": prefix + "3 + 4 = 8.\n\nThe answer is 8."}]}
    (out,), _ = render_chat_pairs([row], tok)
    ids = tok(out["prompt"])["input_ids"]
    full = tok(out["prompt"] + out["chosen"])["input_ids"]
    assert ids == gen_ids and full[: len(gen_ids)] == gen_ids
    if model == "standin-r1-distill":
        assert full.count(tok.bos_token_id) == 1
