"""The mini model recipe: tokenizer, model builder, a tiny end-to-end `pretrain`, ensure_mini_model, the
shipped checkpoints' files and recorded figures."""

from __future__ import annotations

import json
import shutil

import pytest

from sphere.mini import assets_dir, ensure_mini_model, load_recipe, verify_checkpoint
from sphere.mini.examples import equation_slips, is_correct
from sphere.mini.model import build_model, train_tokenizer
from sphere.mini.world import STEP_DELIMITER, format_prompt, generate_problems


@pytest.fixture(scope="module")
def tok():
    probs = generate_problems(300, seed=7)
    return train_tokenizer([format_prompt(p["problem"]) + p["solution"] for p in probs], 400)


def test_tokenizer_round_trips_and_splits_digits(tok):
    p = generate_problems(1, seed=9)[0]
    text = format_prompt(p["problem"]) + p["solution"]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    pieces = tok.convert_ids_to_tokens(tok("so 477 + 12 = 489.", add_special_tokens=False)["input_ids"])
    digits = [t for t in pieces if any(ch.isdigit() for ch in t)]
    assert all(sum(ch.isdigit() for ch in t) == 1 for t in digits)  # one digit per token
    assert len(digits) == 8  # 477, 12, 489
    assert tok.bos_token is None and tok.eos_token == "<|endoftext|>" == tok.pad_token
    # no BOS/EOS is added by plain encoding (the prompts module encodes with add_special_tokens=True)
    assert tok("Problem:")["input_ids"] == tok("Problem:", add_special_tokens=False)["input_ids"]


def test_prompt_and_steps_tokenise_on_boundaries(tok):
    """prompt ids + step ids == ids of the concatenated text: the search's prompts (header + steps +
    delimiter)
    see exactly the token sequences the model was trained on."""
    p = generate_problems(1, seed=2)[0]
    head = format_prompt(p["problem"])
    steps = p["solution"].split(STEP_DELIMITER)
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    full = enc(head + p["solution"])
    assert enc(head) == full[: len(enc(head))]
    partial = head + steps[0] + STEP_DELIMITER
    assert enc(partial) == full[: len(enc(partial))]


def test_build_model_checks_head_dim(tok):
    arch = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    with pytest.raises(ValueError, match="head_dim >= 32"):
        build_model(arch, tok, seed=0)
    m = build_model({**arch, "num_attention_heads": 2}, tok, seed=0)
    assert m.config.head_dim == 32 and m.config.vocab_size == len(tok)


def test_answer_check_and_equation_slips():
    assert is_correct("a\n\nThe answer is \\boxed{48}.", "48")
    assert not is_correct("The answer is \\boxed{49}.", "48")
    assert not is_correct("no box", "48")
    assert equation_slips("so 4 * 12 = 48.\n\nso 48 - 5 = 42.\n\nso 42 / 6 = 7.") == (3, 1)


def test_drills_are_correct_equations_from_the_world():
    import re

    from sphere.mini.examples import DRILL_PROBLEM, drill_examples
    from sphere.mini.world import WorldSpec

    w = WorldSpec()
    d = drill_examples(20, 8, seed=5, world=w)
    assert d == drill_examples(20, 8, seed=5, world=w) and len(d) == 20
    for rec in d:
        assert rec["problem"] == DRILL_PROBLEM
        steps = rec["solution"].split(STEP_DELIMITER)
        assert len(steps) == 8
        for s in steps:
            a, op, b, c = re.fullmatch(r"(\d+) ([-+*/]) (\d+) = (\d+)\.", s).groups()
            assert equation_slips(s) == (1, 0)
            assert int(c) <= w.max_value
    assert drill_examples(0, 8, seed=5, world=w) == []


TINY = {
    "name": "mini-tiny",
    "seed": 3,
    "world": {
        "min_steps": 1,
        "max_steps": 2,
        "max_operand": 20,
        "max_factor": 3,
        "max_value": 60,
        "ops": ["+", "-"],
    },
    "tokenizer": {"seed": 7, "n_texts": 100, "vocab_size": 320},
    "model": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 1,
        "max_position_embeddings": 160,
    },
    "train": {
        "n_problems": 64,
        "n_drills": 16,
        "drill_equations": 4,
        "max_steps": 3,
        "batch_size": 8,
        "learning_rate": 1e-3,
        "lr_scheduler": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "threads": 1,
    },
    "eval": {
        "split": "dev",
        "n": 4,
        "pass_k": 2,
        "temperature": 0.8,
        "batch_size": 8,
        "max_new_tokens": 8,
        "seed": 0,
    },
}


def test_pretrain_end_to_end_tiny(tmp_path):
    from sphere.mini.pretrain import pretrain

    rec = pretrain(TINY, tmp_path / "m", progress=False)
    d = tmp_path / "m"
    assert verify_checkpoint(d) == []
    saved = json.loads((d / "recipe.json").read_text())
    assert saved["recipe"] == TINY and saved["seed"] == 3
    m = saved["metrics"]
    assert m["n"] == 4 and 0.0 <= m["greedy_accuracy"] <= m["pass@2"] <= 1.0
    assert rec["train"]["n_params"] > 0 and len(rec["train"]["loss_curve"]) >= 1
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoModelForCausalLM.from_pretrained(d).config.num_hidden_layers == 1
    assert AutoTokenizer.from_pretrained(d).eos_token == "<|endoftext|>"
    assert (
        json.loads((d / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    )
    cfgj = json.loads((d / "config.json").read_text())
    assert cfgj["use_cache"] is True and cfgj["max_position_embeddings"] >= 2048  # vLLM default max_model_len
    # corruption is detected
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-8] + b"\0" * 8)
    assert "sha256" in verify_checkpoint(d)[0]
    (d / "tokenizer.json").unlink()
    assert "tokenizer.json" in verify_checkpoint(d)[0]


def test_ensure_mini_model_rejects_unknown_which():
    with pytest.raises(ValueError, match="allowed"):
        ensure_mini_model(None, which="large")


def test_recipes_share_the_tokenizer_block():
    assert load_recipe("policy")["tokenizer"] == load_recipe("small")["tokenizer"]
    assert load_recipe("policy")["world"] == load_recipe("small")["world"]


SHIPPED = [n for n in ("mini", "mini-small") if (assets_dir() / n).is_dir()]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_is_complete_and_in_band(name):
    d = assets_dir() / name
    assert verify_checkpoint(d) == []
    rec = json.loads((d / "recipe.json").read_text())
    which = "policy" if name == "mini" else "small"
    assert rec["recipe"] == load_recipe(
        which
    ), f"{d}/recipe.json differs from conf/mini/{which}.yaml: retrain"
    m = rec["metrics"]
    assert m["n"] == 500 and m["split"] == "test"
    if name == "mini":  # the greedy band for the policy: room to improve, something to find
        assert 0.25 <= m["greedy_accuracy"] <= 0.65
        assert m["pass@16"] > m["greedy_accuracy"] + 0.2  # sampling finds many more correct solutions
    assert ensure_mini_model(None, which=which) == d
    assert sum(f.stat().st_size for f in d.iterdir()) < 8 * 2**20  # "a few MB"


def test_shipped_policy_meets_the_pass_at_16_target():
    d = assets_dir() / "mini"
    if not d.is_dir():
        pytest.skip("no shipped checkpoint")
    assert json.loads((d / "recipe.json").read_text())["metrics"]["pass@16"] >= 0.80


def test_shipped_small_is_weaker_than_policy():
    if len(SHIPPED) < 2:
        pytest.skip("shipped checkpoints absent")
    r = {n: json.loads((assets_dir() / n / "recipe.json").read_text())["metrics"] for n in SHIPPED}
    assert r["mini-small"]["greedy_accuracy"] < r["mini"]["greedy_accuracy"]


def test_ensure_mini_model_trains_into_cache_when_nothing_is_shipped(tmp_path, monkeypatch):
    """No shipped checkpoint -> trains with the recipe into <cache_dir>/mini/<name>-<hash> and reuses it."""
    import sphere.mini as mini

    monkeypatch.setattr(mini, "assets_dir", lambda: tmp_path / "no-assets")
    monkeypatch.setattr(mini, "load_recipe", lambda which: json.loads(json.dumps(TINY)))
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"paths": {"cache_dir": str(tmp_path / "cache")}})
    with pytest.raises(FileNotFoundError, match=r"sphere pretrain-mini mini=policy save_to=.*mini-tiny-"):
        mini.ensure_mini_model(cfg, "policy", progress=False)  # never a silent long job
    d = mini.ensure_mini_model(cfg, "policy", progress=False, build=True)
    assert d.parent == tmp_path / "cache" / "mini" and d.name.startswith("mini-tiny-")
    assert verify_checkpoint(d) == []
    mtime = (d / "model.safetensors").stat().st_mtime
    assert mini.ensure_mini_model(cfg, "mini", progress=False) == d  # cached: not retrained
    assert (d / "model.safetensors").stat().st_mtime == mtime
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    shutil.rmtree(d)


@pytest.mark.slow
@pytest.mark.nightly  # every CI run checks a bit-exact prefix instead (tests/test_build_prefix.py)
@pytest.mark.timeout(2700)  # a from-scratch pretrain: ~10 min on a quiet 2-core VM, far more on a busy one
def test_pretrain_mini_reproduces_the_shipped_policy(tmp_path):
    """Issue #6, must-show 1: `sphere pretrain-mini` from scratch (same seed) lands within +-3 points of the
    shipped checkpoint's recorded greedy accuracy and pass@16 (several minutes on one core), and with the same
    torch/transformers/trl it gives the shipped weights bit for bit (measured: it does)."""
    d = assets_dir() / "mini"
    if not d.is_dir():
        pytest.skip("no shipped checkpoint")
    from sphere.mini.pretrain import pretrain

    shipped = json.loads((d / "recipe.json").read_text())
    rec = pretrain(load_recipe("policy"), tmp_path / "mini", progress=False)
    if rec["versions"] == shipped["versions"]:  # same torch/transformers/trl: the very same bytes
        assert rec["weights_sha256"] == shipped["weights_sha256"]
    for k in ("greedy_accuracy", "pass@16"):
        assert abs(rec["metrics"][k] - shipped["metrics"][k]) <= 0.03, (
            k,
            rec["metrics"][k],
            shipped["metrics"][k],
        )


@pytest.mark.slow
def test_shipped_policy_figures_are_what_evaluation_measures():
    """The figures in recipe.json are re-measured, not copied: greedy decoding on CPU is deterministic."""
    d = assets_dir() / "mini"
    if not d.is_dir():
        pytest.skip("no shipped checkpoint")
    from sphere.mini.pretrain import evaluate

    rec = json.loads((d / "recipe.json").read_text())
    ev = {**rec["recipe"]["eval"], "pass_k": 1}  # greedy only (+1 sample): the cheap half
    m = evaluate(d, ev, rec["recipe"]["world"], progress=False)
    assert abs(m["greedy_accuracy"] - rec["metrics"]["greedy_accuracy"]) <= 0.01


def test_training_is_deterministic(tmp_path):
    """Same recipe and seed -> bit-identical weights (single thread, deterministic algorithms): the basis of
    `sphere pretrain-mini` reproducing the shipped checkpoints. A different seed gives different weights."""
    from sphere.mini.pretrain import pretrain, sha256_file

    shas = []
    for i, seed in enumerate((3, 3, 4)):
        pretrain({**TINY, "seed": seed}, tmp_path / str(i), progress=False, evaluate_after=False)
        shas.append(sha256_file(tmp_path / str(i) / "model.safetensors"))
    assert shas[0] == shas[1] != shas[2]
