"""Issue "The paper's path at the paper's lengths", item 6: a transfer run trains ``model.train_target`` on the
policy's pairs and evaluates it with the target's own prompt family; the pairs must be rendered in that same
prompt. Compared token by token: the prompt DPO trains on (the pair's prompt rendered by the trainer) against the
prompt ``sphere eval`` feeds the target for the same problem.

The policy is the named test double of tests/test_generate.py (FakeStepBackend, plain mini prompt); the
target's tokenizer and chat templates are the shipped stand-ins' (phi-4's and Qwen2.5's real templates).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_generate import FakeStepBackend, _cfg, _problems

from sphere.generate.generator import Generator
from sphere.prompts import build_prompt_ids, load_family
from sphere.train.pairs_file import load_pairs, render_chat_pairs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("target,family", [("standin-phi4", "phi4"), ("standin-qwen2_5", "qwen2_5_math"),
                                           ("standin-r1-distill", "deepseek_r1")])
def test_transfer_pairs_are_rendered_in_the_prompt_the_target_is_evaluated_with(tmp_path, target, family,
                                                                                scorer, verifier):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ROOT / "assets" / "standin" / target)
    fam = load_family(family)
    cfg = _cfg()
    probs = _problems(24, seed=2)
    Generator(cfg, tmp_path, pair_family=fam, pair_tokenizer=tok).run(
        probs, FakeStepBackend(p_right=None), scorer, verifier,
        small_backend_factory=lambda: FakeStepBackend(p_right=0.3))
    pairs = load_pairs(tmp_path / "pairs.jsonl")
    assert pairs.conversational and len(pairs) > 0
    rows, _ = render_chat_pairs(pairs.rows, tok, "pairs")
    ids = [json.loads(x)["problem_id"] for x in (tmp_path / "pairs.jsonl").read_text().splitlines() if x.strip()]
    by_id = {p["id"]: p for p in probs}
    for row, pid in zip(rows, ids, strict=True):
        train_ids = tok(row["prompt"], add_special_tokens=True)["input_ids"]
        eval_ids = build_prompt_ids(tok, by_id[pid]["problem"], [], fam)
        assert train_ids == eval_ids, (tok.decode(train_ids), tok.decode(eval_ids))
        if fam.get("system"):  # e.g. phi-4's system message: training sees what evaluation shows
            assert fam["system"] in row["prompt"]


def test_without_a_pair_family_the_pairs_keep_the_policys_prompt(tmp_path, scorer, verifier):
    cfg = _cfg()
    Generator(cfg, tmp_path).run(_problems(12, seed=2), FakeStepBackend(p_right=None), scorer, verifier)
    pairs = load_pairs(tmp_path / "pairs.jsonl")
    assert not pairs.conversational and pairs.rows[0]["prompt"].startswith("Problem: ")
