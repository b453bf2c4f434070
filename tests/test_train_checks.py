"""What `sphere train` refuses to do silently (issue #28 items 5 and 8): cut a pair that does not fit
``train.max_length`` (it is dropped and counted instead), run an optimizer step at lr 0 (HF's warmup starts at
0, so a 1-step run published the base weights with rc 0), and publish a model whose weights did not change.
train_metrics.json records the weight change and the DPO margin on the training pairs after training."""

from __future__ import annotations

import json
import math

import pytest
from test_train_dpo import make_pairs, write_jsonl

from sphere.standins.tiny import DELIM


def _long(rows: list[dict], which: dict[int, str]) -> list[dict]:
    """Pairs ``i`` get a long ``which[i]`` completion (its steps written out three more times): ~140 tokens
    where the others take ~60."""
    out = []
    for i, r in enumerate(rows):
        r = dict(r)
        if i in which:
            k = which[i]
            r[k] = DELIM.join([f"Check {j}: " + r[k].replace(DELIM, " ") for j in range(3)] + [r[k]])
        out.append(r)
    return out


def _token_lengths(tok, rows):
    """prompt + the longer completion + EOS, in tokens, as the trainer counts them."""
    return [len(tok(r["prompt"] + max(r["chosen"], r["rejected"], key=len))["input_ids"]) + 1 for r in rows]


# ------------------------------------------------------------------------------------- item 5: lengths
def test_pairs_longer_than_max_length_are_dropped_and_counted_never_cut(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from sphere.train.dpo import train_dpo

    rows = _long(make_pairs(8, seed=2), {1: "chosen", 4: "rejected", 6: "chosen"})
    lengths = _token_lengths(AutoTokenizer.from_pretrained(tiny_model_dir), rows)
    max_length = 100
    assert sum(n > max_length for n in lengths) == 3 and max(n for n in lengths if n <= max_length) < 80
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "out"
    train_dpo({"max_steps": 1, "batch_size": 8, "progress": False, "max_length": max_length, "lr": 3e-3},
              tiny_model_dir, pairs, out)
    m = json.loads((out / "train_metrics.json").read_text())
    # dropped, not truncated: the long pairs are not trained on at all, every kept completion keeps its EOS
    assert m["pairs"] == 8 and m["pairs_kept"] == 5 and m["pairs_dropped_too_long"] == 3
    assert m["longest_pair_tokens"] == max(lengths) > max_length >= m["longest_kept_pair_tokens"]
    assert m["completions_with_eos"] == 2 * 5 and m["margin_pairs"] == 5
    assert m["max_length"] == max_length


def test_every_pair_too_long_is_one_line_naming_max_length_and_the_longest_pair(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from sphere.train.dpo import train_dpo

    rows = make_pairs(4, seed=3)
    lengths = _token_lengths(AutoTokenizer.from_pretrained(tiny_model_dir), rows)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    limit = min(lengths) - 1
    with pytest.raises(ValueError) as ei:
        train_dpo({"max_length": limit, "progress": False}, tiny_model_dir, pairs, tmp_path / "out")
    msg = str(ei.value)
    assert "\n" not in msg and "every pair was dropped" in msg
    assert f"train.max_length={limit} tokens" in msg and f"longest pair {max(lengths)} tokens" in msg
    assert not (tmp_path / "out" / "merged").exists()


# ----------------------------------------------------------------------------- item 8: short trainings
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_one_optimizer_step_with_warmup_changes_the_weights(tmp_path, tiny_model_dir, mode):
    """max_steps=1 with the default warmup (10%, rounded up to 1 step) and cosine schedule: the step trains,
    the published weights differ from the base (checked on the files, independently of the metrics), and the
    metrics say by how much and that the DPO margin on the training pairs rose from 0."""
    import torch
    from safetensors.torch import load_file

    from sphere.train.dpo import train_dpo

    pairs = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(8, seed=4))
    opts = {"max_steps": 1, "batch_size": 8, "progress": False, "warmup_ratio": 0.1, "scheduler": "cosine"}
    opts.update({"lr": 3e-3} if mode == "lora" else {"lr": 3e-4, "lora": {"enabled": False}})
    out = tmp_path / "out"
    train_dpo(opts, tiny_model_dir, pairs, out)
    base = load_file(tiny_model_dir / "model.safetensors")
    new = load_file(out / "merged" / "model.safetensors")
    changed = [k for k in base if k in new and not torch.equal(base[k], new[k])]
    assert changed, "the 1-step training published the base weights"
    m = json.loads((out / "train_metrics.json").read_text())
    assert m["steps"] == 1
    assert m["weight_change_rel"] > 1e-4 and m["weight_change_max_abs"] > 0
    assert m["weight_change_tensors"] == len(changed)
    assert m["weight_change_scope"] == "trained"
    if mode == "lora":  # the merged LoRA changes the adapted linear layers only
        assert all(k.endswith("proj.weight") for k in changed)
        assert m["weight_change_tensors_compared"] == 14  # 2 layers x (q, k, v, o, gate, up, down)
    diff = math.sqrt(sum(float(((new[k].double() - base[k].double()) ** 2).sum()) for k in changed))
    if mode == "full":
        norm = math.sqrt(sum(float((base[k].double() ** 2).sum()) for k in base))
        assert m["weight_change_rel"] == pytest.approx(diff / norm, rel=1e-3)
    assert m["margin_after"] > 0 and m["margin_rose"] is True and m["margin_pairs"] == 8
    assert 0 <= m["reward_accuracy_after"] <= 1


@pytest.mark.parametrize("name", ["cosine", "linear", "constant_with_warmup"])
@pytest.mark.parametrize("total,ratio", [(1, 0.1), (2, 0.1), (3, 0.5), (24, 0.1), (10, 0.9)])
def test_no_optimizer_step_runs_at_lr_zero(name, total, ratio):
    """HF's warmup gives step 0 the factor 0; after shift_warmup step s < W runs at (s + 1) / W (HF's linear
    warmup one step earlier: 1/W, ..., 1) and later steps at HF's own value: every step of every schedule
    trains, also when the warmup is as long as the run (linear decay would give its step W factor 0)."""
    import torch
    from transformers import get_scheduler

    from sphere.train.trainer import shift_warmup

    w = math.ceil(total * ratio)

    def lrs(shift: bool) -> list[float]:
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([p], lr=1.0)
        sched = get_scheduler(name, optimizer=opt, num_warmup_steps=w, num_training_steps=total)
        if shift:
            shift_warmup(sched, w)
        out = []
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    hf, ours = lrs(False), lrs(True)
    assert hf[0] == 0.0  # what the shift is for
    assert all(lr > 0 for lr in ours), ours
    assert ours[:w] == pytest.approx([(s + 1) / w for s in range(min(w, total))])
    assert ours[w:] == pytest.approx(hf[w:])
    assert max(ours) == pytest.approx(1.0)


def test_a_training_that_leaves_the_weights_unchanged_is_not_published(tmp_path, tiny_model_dir):
    """lr 1e-30: the optimizer step is below float32 resolution, the weights stay the base's: refused, nothing
    published (no DONE, no merged/, no metrics), so `sphere run` cannot pass the base model on as trained."""
    from sphere.train.dpo import train_dpo

    pairs = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(4, seed=5))
    out = tmp_path / "out"
    with pytest.raises(RuntimeError,
                       match=r"not publishing .*merged: its weights equal the base model's after 1 "
                             r"optimizer step"):
        train_dpo({"max_steps": 1, "batch_size": 4, "progress": False, "lr": 1e-30,
                   "lora": {"enabled": False}}, tiny_model_dir, pairs, out)
    assert not (out / "merged").exists() and not (out / ".merged.tmp").exists()
    assert not (out / "train_metrics.json").exists() and not (out / "trainer").exists()


def test_weight_change_counts_training_not_the_dtype_cast(tmp_path):
    """weight_change compares the published tensors with the base cast to their dtype: a float32 base
    published in bfloat16 without training is unchanged (the cast is no training); a real update is measured
    over the named tensors only."""
    import torch
    from safetensors.torch import save_file

    from sphere.train.weights import weight_change

    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(64, 64, generator=g), "b.weight": torch.randn(8, generator=g)}
    (tmp_path / "base").mkdir()
    save_file(base, tmp_path / "base" / "model.safetensors")
    (tmp_path / "cast").mkdir()
    save_file({k: v.to(torch.bfloat16) for k, v in base.items()}, tmp_path / "cast" / "model.safetensors")
    m = weight_change(tmp_path / "base", tmp_path / "cast")
    assert m["weight_change_max_abs"] == 0 and m["weight_change_rel"] == 0 and m["weight_change_tensors"] == 0

    (tmp_path / "new").mkdir()
    new = {"a.weight": base["a.weight"] + 1e-3, "b.weight": base["b.weight"] + 5.0}
    save_file(new, tmp_path / "new" / "model.safetensors")
    m = weight_change(tmp_path / "base", tmp_path / "new", ["a.weight"])
    assert m["weight_change_scope"] == "trained" and m["weight_change_tensors_compared"] == 1
    assert m["weight_change_rel"] == pytest.approx(1e-3 * 64 / float(base["a.weight"].norm()), rel=1e-3)
    assert m["weight_change_max_abs"] == pytest.approx(1e-3, rel=1e-2)
    assert weight_change(tmp_path / "base", tmp_path / "new")["weight_change_max_abs"] == pytest.approx(5.0)
