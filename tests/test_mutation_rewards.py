"""sphere/rewards/ (symbolic, prm, shared_prefix, mini_world, rollout): the step scores the search ranks by,
asserted value by value (the mutation run, scripts/mutation.sh / docs/mutation.md; each test fails on a
mutant the rest of the suite let through)."""

from __future__ import annotations

import hashlib

import pytest
from omegaconf import OmegaConf

import sphere.rewards.rollout as rollout_mod
from sphere.backends import Candidate, SamplingParams
from sphere.prompts import load_family
from sphere.resources import ModelNotFoundError
from sphere.rewards.mini_world import _apply, reference_chain
from sphere.rewards.symbolic import SymbolicStepScorer


@pytest.mark.parametrize("step, score", [
    ("3 * 12 = 36", 1.0), ("3 * 12 = 37", 0.0), ("2 + 3 = 5. Then 4 + 4 = 9.", 0.5), ("2 + 3 = 5 = 5", 1.0),
    ("2 + 3 = 5 = 6", 0.5), ("The answer is \\boxed{5}.", 0.5), ("10 / 3 = 3.33", 1.0), ("10 / 3 = 3.4", 0.0),
    ("2 / 3 = 0.67", 1.0), ("2 / 3 = 0.66", 1.0), ("2 / 3 = 0.6", 1.0), ("2 / 3 = 0.5", 0.0),
    ("x + 3 = 5", 0.5), ("2x = 6", 0.5), ("1,000 + 1 = 1,001", 1.0), ("3 x 4 = 12", 1.0),
    ("\\sqrt{2} \\approx 1.41", 1.0), ("\\sqrt{2} = 1.5", 0.0), ("2^{2^{100}} = 1", 0.5),
    ("<<48/2=24>> 48 / 2 = 24", 1.0), ("3 * 12 apples = 36", 1.0), ("$5 + $5 = $10", 1.0),
])
def test_step_scores(step, score):
    assert SymbolicStepScorer().step_score(step) == score


def test_settings_and_their_bounds():
    s = SymbolicStepScorer(OmegaConf.create({"scorer": {"neutral_score": 0.25, "decimal_tolerance": False,
                                                          "max_bits": 64, "max_equations": 1}}))
    assert (s.neutral_score, s.decimal_tolerance, s.max_bits, s.max_equations) == (0.25, False, 64, 1)
    assert s.step_score("no equation") == 0.25
    assert s.step_score("10 / 3 = 3.33") == 0.0  # no decimal tolerance
    assert s.step_score("1 + 1 = 2. So 1 + 1 = 3") == 1.0  # one equation checked
    assert s.step_score("2^{70} = 2^{70}") == 0.25  # over 64 bits: skipped
    d = SymbolicStepScorer()
    assert (d.neutral_score, d.decimal_tolerance, d.max_bits, d.max_equations) == (0.5, True, 4096, 64)
    assert SymbolicStepScorer(neutral_score=0.0).neutral_score == 0.0
    assert SymbolicStepScorer({"neutral_score": 1.0}).neutral_score == 1.0
    for bad in [dict(neutral_score=-0.01), dict(neutral_score=1.01)]:
        with pytest.raises(ValueError, match=r"scorer\.neutral_score must be in \[0, 1\]"):
            SymbolicStepScorer(**bad)
    for bad in [dict(max_bits=63), dict(max_equations=0)]:
        with pytest.raises(ValueError, match="max_bits must be >= 64 and scorer.max_equations >= 1"):
            SymbolicStepScorer(**bad)
    SymbolicStepScorer(max_bits=64, max_equations=1)


def test_score_counts_calls_and_steps():
    s = SymbolicStepScorer()
    assert s.score([("p", ["1 + 1 = 2", "1 + 1 = 3"]), ("q", ["prose"])]) == [[1.0, 0.0], [0.5]]
    assert s.stats() == {"scorer/calls": 1, "scorer/steps": 3}
    s.score([("p", ["a"])])
    assert s.stats() == {"scorer/calls": 2, "scorer/steps": 4}


# --------------------------------------------------------------------------------------------------------
# sphere/rewards/__init__.py: make_scorer / _full_config
# --------------------------------------------------------------------------------------------------------
from fractions import Fraction  # noqa: E402

import torch  # noqa: E402

import sphere.rewards as rewards_pkg  # noqa: E402
from sphere.rewards import _full_config, make_scorer  # noqa: E402
from sphere.rewards.mini_world import MiniWorldStepScorer, _op_patterns  # noqa: E402
from sphere.rewards.symbolic import _rounds_to  # noqa: E402


def test_full_config_of_each_form():
    assert _full_config(None) is None
    whole = OmegaConf.create({"scorer": {"name": "prm", "m": 2}, "model": {"prm": "x"}})
    assert _full_config(whole) is whole  # already the whole config
    assert _full_config(whole.scorer) is whole  # a node of a whole config: its root
    # a whole config that also has a top-level name is not "already whole": wrapped as a scorer node
    named = OmegaConf.create({"name": "prm", "scorer": {"name": "x"}})
    got = _full_config(named)
    assert OmegaConf.to_container(got) == {"scorer": {"name": "prm", "scorer": {"name": "x"}}}
    # a detached node (its own root): wrapped, interpolations kept literal (resolve=False)
    node = OmegaConf.create({"name": "prm", "m": 3, "k": "${m}"})
    got = _full_config(node)
    assert OmegaConf.to_container(got, resolve=False) == {"scorer": {"name": "prm", "m": 3, "k": "${m}"}}
    # a node whose root has no scorer key: wrapped too
    other = OmegaConf.create({"s": {"name": "prm", "m": 1}})
    got = _full_config(other.s)
    assert OmegaConf.to_container(got) == {"scorer": {"name": "prm", "m": 1}}
    # a plain dict: wrapped
    got = _full_config({"name": "rollout", "m": 4})
    assert OmegaConf.to_container(got) == {"scorer": {"name": "rollout", "m": 4}}
    # a plain dict holding a scorer node: already whole
    d = {"scorer": {"name": "rollout"}}
    assert _full_config(d) is d


class _Spy:
    """Test double for a scorer class: records what make_scorer hands it."""

    def __init__(self, *a, **kw):
        self.args, self.kw = a, kw


def test_make_scorer_passes_settings_through(monkeypatch):
    s = make_scorer(OmegaConf.create({"name": "symbolic"}), neutral_score=0.25)
    assert isinstance(s, SymbolicStepScorer) and s.neutral_score == 0.25
    s = make_scorer(OmegaConf.create({"scorer": {"name": "symbolic", "max_equations": 3}}), max_bits=100)
    assert (s.max_equations, s.max_bits) == (3, 100)
    s = make_scorer({"name": "mini_world", "flip_rate": 0.25, "seed": 7})
    assert isinstance(s, MiniWorldStepScorer) and (s.flip_rate, s.seed) == (0.25, 7)
    s = make_scorer(OmegaConf.create({"scorer": {"name": "mini_world", "flip_rate": 0.5}}))
    assert s.flip_rate == 0.5
    monkeypatch.setattr(rewards_pkg, "RolloutScorer", _Spy)
    backend = object()
    cfg = OmegaConf.create({"scorer": {"name": "rollout", "m": 2}})
    spy = make_scorer(cfg, backend, m=5)
    assert spy.args == (cfg,) and spy.kw == {"backend": backend, "m": 5}
    spy = make_scorer(cfg.scorer, backend)
    assert spy.args == (cfg,) and spy.kw == {"backend": backend}
    import sphere.rewards.prm as prm_mod

    monkeypatch.setattr(prm_mod, "PRMScorer", _Spy)
    spy = make_scorer({"name": "prm"}, None, batch_size=3)
    assert OmegaConf.to_container(spy.args[0]) == {"scorer": {"name": "prm"}}
    assert spy.kw == {"batch_size": 3}


@pytest.mark.parametrize("cfg, shown", [
    (None, "''"), ({}, "''"), ({"scorer": {}}, "''"), ({"scorer": {"m": 1}}, "''"),
    ({"name": "oracle"}, "'oracle'"),
    ({"scorer": {"name": "exact"}}, "'exact'"), ({"name": ""}, "''"),
])
def test_make_scorer_unknown_name(cfg, shown):
    with pytest.raises(ValueError) as e:
        make_scorer(cfg)
    assert str(e.value) == f"scorer.name={shown} (conf/scorer/): allowed symbolic, prm, rollout, mini_world"


def test_make_scorer_node_without_scorer_key_is_the_node():
    # a config with neither name nor scorer: the node itself is read (no name -> refused, not a crash)
    with pytest.raises(ValueError, match=r"scorer\.name=''"):
        make_scorer(OmegaConf.create({"flip_rate": 0.1}))


# --------------------------------------------------------------------------------------------------------
# sphere/rewards/mini_world.py
# --------------------------------------------------------------------------------------------------------
def test_op_patterns_exactly():
    got = [(op, p.pattern) for op, p in _op_patterns()]
    he = r"(?:he|she)"
    b = r"(?P<b>\d+)"
    assert got == [
        ("+", rf"^Then\ {he}\ finds\ {b}\ more\.$"),
        ("+", rf"^Then\ {he}\ gets\ {b}\ more\ from\ a\ friend\.$"),
        ("+", rf"^Then\ {he}\ buys\ {b}\ more\.$"),
        ("-", rf"^Then\ {he}\ gives\ away\ {b}\.$"),
        ("-", rf"^Then\ {he}\ loses\ {b}\.$"),
        ("-", rf"^Then\ {he}\ sells\ {b}\.$"),
        ("*", rf"^Then\ the\ number\ of\ [a-z]+\ becomes\ {b}\ times\ as\ large\.$"),
        ("*", rf"^Then\ {he}\ makes\ {b}\ times\ as\ many\.$"),
        ("/", rf"^Then\ {he}\ splits\ them\ into\ {b}\ equal\ groups\ and\ keeps\ one\ group\.$"),
        ("/", rf"^Then\ {he}\ packs\ them\ into\ {b}\ equal\ boxes\ and\ keeps\ one\ box\.$"),
    ]
    pats = dict(_op_patterns())  # the last pattern of each op
    assert pats["*"].match("Then he makes 3 times as many.")["b"] == "3"
    assert not pats["*"].match("Then he makes 3 times as many. ")
    assert not pats["*"].match("x Then he makes 3 times as many.")


def test_mini_world_stats_keys():
    s = MiniWorldStepScorer()
    p = "Ann has 4 apples. Then she finds 2 more. How many apples does Ann have now?"
    steps = ["Ann finds 2 more, so 4 + 2 = 6.", "The answer is \\boxed{6}."]
    assert s.score([(p, steps), (p, [])]) == [[1.0, 1.0], []]
    assert s.stats() == {"scorer/calls": 1, "scorer/steps": 2}


# --------------------------------------------------------------------------------------------------------
# sphere/rewards/symbolic.py: _rounds_to
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("exact, literal, places, want", [
    (Fraction(1, 8), Fraction(13, 100), 2, True),  # exactly half a unit away: rounds
    (Fraction(1, 8), Fraction(12, 100), 2, True),  # truncated
    (Fraction(1, 8), Fraction(14, 100), 2, False),
    (Fraction(-1, 8), Fraction(-12, 100), 2, True),  # truncated toward zero
    (Fraction(1, 8), 0.13, 2, True),  # a float literal: float comparison with slack
    (0.125, Fraction(13, 100), 2, True),
    (0.5, 1.0, 0, True),
    (1.4999999995, 2.0, 0, True),  # exactly the slack: still rounds
    (1.49999999, 2.0, 0, False),
    (0.129, 0.12, 2, True),  # truncated
    (0.129, 0.11, 2, False),
    (-0.129, -0.12, 2, True),
    (0.9, -1e-12, 0, False),  # truncation leaves 1e-12: not < 1e-12
    (0.9, -1e-13, 0, True),
    (2.5, 1.9, 0, False),
])
def test_rounds_to(exact, literal, places, want):
    assert _rounds_to(exact, literal, places) is want


def test_make_scorer_top_level_name_wins_over_a_scorer_node():
    cfg = OmegaConf.create({"name": "symbolic", "scorer": {"name": "mini_world"}})
    assert isinstance(make_scorer(cfg), SymbolicStepScorer)
    with pytest.raises(ValueError, match=r"scorer\.name='prm '"):
        make_scorer({"name": "prm ", "scorer": {"name": "symbolic"}})


# --------------------------------------------------------------------------------------------------------
# sphere/rewards/prm.py: the PRM step scorer around its model (a character tokenizer and a formula model
# stand in for the checkpoint, so every id, window and score is known exactly)
# --------------------------------------------------------------------------------------------------------
import sys  # noqa: E402
import types  # noqa: E402

import sphere.rewards.prm as prm_mod  # noqa: E402
from sphere.rewards.prm import DEFAULT_SYSTEM, PRMScorer, _scorer_settings  # noqa: E402

TAG, TAG_ID = "<t>", 1


class CharTokenizer:
    """PRM tokenizer double: one token per character (its code point), the reward tag ``<t>`` one token (1),
    a leading special token 2 unless ``add_special_tokens=False``."""

    unk_token_id = 0

    def __init__(self, chat: bool = False, pad: int | None = None, tag_id: int | None = TAG_ID):
        self.chat_template = "{{ chat }}" if chat else None
        self.pad_token_id = pad
        self.tag_id = tag_id
        self.calls: list[tuple[str, bool]] = []

    def convert_tokens_to_ids(self, t):
        return self.tag_id if t in (TAG, "<extra_0>") else self.unk_token_id

    def __call__(self, text, add_special_tokens=True):
        self.calls.append((text, add_special_tokens))
        ids = [2] if add_special_tokens else []
        for k, part in enumerate(text.split(TAG)):
            ids += ([TAG_ID] if k else []) + [ord(c) for c in part]
        return {"input_ids": ids}

    def apply_chat_template(self, msgs, tokenize=True, add_generation_prompt=True):
        assert tokenize is False and add_generation_prompt is False
        return "".join(f"[{m['role']}]{m['content']}" for m in msgs)


def _z(t: int, n: int) -> float:
    """The formula model's class-1 logit at position t of a row of n real tokens."""
    return 0.1 * t - 0.01 * n


def _p(t: int, n: int) -> float:
    return float(torch.softmax(torch.tensor([0.0, _z(t, n)]), dim=-1)[1])


class FormulaPRM(torch.nn.Module):
    """PRM model double: logits [B, T, 2], class 1 logit ``_z(position, real tokens of the row)``; records
    its calls."""

    def __init__(self, wrap: bool = False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.wrap = wrap
        self.calls: list[dict] = []
        self.moved_to = None
        self.evaluated = False

    def to(self, device):  # noqa: D102 - records the device
        self.moved_to = device
        return self

    def eval(self):  # noqa: D102
        self.evaluated = True
        return self

    def forward(self, input_ids, attention_mask=None, **kw):
        self.calls.append({"input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist(), **kw})
        B, T = input_ids.shape
        n = attention_mask.sum(dim=1).double()
        z = 0.1 * torch.arange(T, dtype=torch.float64)[None, :] - 0.01 * n[:, None]
        logits = torch.stack([torch.zeros_like(z), z], dim=-1)
        return types.SimpleNamespace(logits=logits) if self.wrap else logits


def _model_dir(tmp_path):
    d = tmp_path / "prm"
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "tokenizer.json").write_text("{}")
    return d


@pytest.fixture
def fake_hf(monkeypatch):
    """transformers' loaders replaced by the doubles above; returns what they were asked and handed out."""
    import transformers

    seen = {"tok": [], "cfg": [], "qwen": [], "tokcls": []}
    hf = types.SimpleNamespace(max_position_embeddings=64, architectures=["Qwen2ForProcessRewardModel"])
    box = {"tokenizer": CharTokenizer(), "hf": hf}

    def tok_load(path, **kw):
        seen["tok"].append((path, kw))
        return box["tokenizer"]

    def cfg_load(path, **kw):
        seen["cfg"].append((path, kw))
        return box["hf"]

    class QwenDouble:
        @staticmethod
        def from_pretrained(path, **kw):
            seen["qwen"].append((path, kw))
            box["model"] = FormulaPRM()
            return box["model"]

    class TokClsDouble:
        @staticmethod
        def from_pretrained(path, **kw):
            seen["tokcls"].append((path, kw))
            box["model"] = FormulaPRM(wrap=True)
            return box["model"]

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tok_load)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", cfg_load)
    monkeypatch.setattr(transformers, "AutoModelForTokenClassification", TokClsDouble)
    monkeypatch.setattr(prm_mod, "QwenProcessRewardModel", QwenDouble)
    box["seen"] = seen
    return box


def _mk(tmp_path, **kw):
    kw.setdefault("step_tag", TAG)
    kw.setdefault("shared_prefix", "off")
    return PRMScorer(None, _model_dir(tmp_path), engine="transformers", **kw)


def test_prm_scorer_settings_dict():
    assert _scorer_settings(None, {"a": 1}) == {"a": 1}
    assert _scorer_settings({"scorer": {"m": 1, "k": 2}}, {"k": 3}) == {"m": 1, "k": 3}
    assert _scorer_settings(OmegaConf.create({"x": 5, "scorer": {"m": "${x}"}}), {}) == {"m": 5}
    detached = OmegaConf.create({"x": 5, "scorer": {"m": "${x}", "n": 2, "s": "x${x}"}}).scorer
    detached._set_parent(None)
    assert _scorer_settings({"scorer": detached}, {"o": 1}) == {"n": 2, "s": "x${x}", "o": 1}
    assert _scorer_settings(OmegaConf.create({"y": 1}), {}) == {}
    assert _scorer_settings(object(), {"b": 2}) == {"b": 2}


def test_prm_defaults_and_what_the_loaders_get(tmp_path, fake_hf):
    s = PRMScorer(None, _model_dir(tmp_path), engine="transformers")
    path = (tmp_path / "prm").resolve()
    assert s.model_path == path and s.engine == "transformers"
    assert (s.step_tag, s.system, s.batch_size, s.dedup_items, s.sort_by_length, s.shared_prefix,
            s.shared_prefix_min) == ("<extra_0>", DEFAULT_SYSTEM, 16, True, True, "kv", 16)
    assert DEFAULT_SYSTEM == "Please reason step by step, and put your final answer within \\boxed{}."
    assert s.tag_id == TAG_ID
    assert (s.max_length, s.long_chains, s._llm, s._key, s._ids_cache) == (64, "end", None, None, {})
    assert s.stats() == {"calls": 0, "items": 0, "items_scored": 0, "tokens": 0, "tokens_computed": 0,
                         "tokens_shared": 0, "groups": 0, "forward_passes": 0, "seconds": 0.0,
                         "items_truncated": 0}
    seen = fake_hf["seen"]
    assert seen["tok"] == [(path, {"trust_remote_code": False})]
    assert seen["cfg"] == [(path, {"trust_remote_code": False})]
    assert seen["qwen"] == [(path, {"dtype": torch.float32, "trust_remote_code": False})]
    assert seen["tokcls"] == []
    assert s._token_cls is False and s.device == torch.device("cpu")
    assert fake_hf["model"].moved_to == torch.device("cpu") and s._model is fake_hf["model"]


def test_prm_settings_are_read(tmp_path, fake_hf):
    fake_hf["hf"] = types.SimpleNamespace(architectures=["LlamaForTokenClassification"])
    s = PRMScorer(None, _model_dir(tmp_path), engine=None, step_tag=TAG, system="Sys", batch_size=3,
                  dedup_items=False, sort_by_length=False, shared_prefix=False, shared_prefix_min=1,
                  trust_remote_code=True, dtype="float64", device="cpu", long_chains="recent")
    assert (s.engine, s.step_tag, s.tag_id, s.system, s.batch_size, s.dedup_items, s.sort_by_length,
            s.shared_prefix, s.shared_prefix_min, s.long_chains) == (
        "transformers", TAG, TAG_ID, "Sys", 3, False, False, "off", 1, "recent")
    assert s.max_length == 4096  # no max_position_embeddings in the config
    path = (tmp_path / "prm").resolve()
    seen = fake_hf["seen"]
    assert seen["tok"] == [(path, {"trust_remote_code": True})]
    assert seen["cfg"] == [(path, {"trust_remote_code": True})]
    assert seen["tokcls"] == [(path, {"dtype": torch.float64, "trust_remote_code": True})]
    assert seen["qwen"] == [] and s._token_cls is True and fake_hf["model"].evaluated
    s2 = PRMScorer(OmegaConf.create({"scorer": {"max_length": 20, "shared_prefix": "packed",
                                                "step_tag": TAG}}), _model_dir(tmp_path / "b"))
    assert (s2.max_length, s2.shared_prefix) == (20, "packed")
    fake_hf["hf"] = types.SimpleNamespace(max_position_embeddings=77, architectures=None)
    s3 = _mk(tmp_path / "c", max_length=0)
    assert s3.max_length == 77 and s3._token_cls is False


def test_prm_model_comes_from_the_config(tmp_path, fake_hf):
    d = _model_dir(tmp_path)
    s = PRMScorer(OmegaConf.create({"scorer": {"model": str(d), "step_tag": TAG}}))
    assert s.model_path == d.resolve()
    s = PRMScorer(OmegaConf.create({"scorer": {"step_tag": TAG}, "model": {"prm": str(d)}}))
    assert s.model_path == d.resolve()
    s = PRMScorer(OmegaConf.create({"scorer": {"model": str(d), "step_tag": TAG}, "model": {"prm": "nope"}}))
    assert s.model_path == d.resolve()
    for cfg in [None, OmegaConf.create({"scorer": {}}),
                OmegaConf.create({"scorer": {}, "model": {"prm": ""}}),
                OmegaConf.create({"scorer": {"model": ""}, "model": {}})]:
        with pytest.raises(ValueError) as e:
            PRMScorer(cfg)
        assert str(e.value) == "PRMScorer: no model (config key scorer.model or model.prm)"


@pytest.mark.parametrize("kw, msg", [
    (dict(engine="onnx"), "scorer.engine='onnx': allowed 'transformers' | 'vllm'"),
    (dict(shared_prefix="tree"), "scorer.shared_prefix='tree': allowed off | kv | packed"),
    (dict(shared_prefix_min=0), "scorer.shared_prefix_min=0: allowed an integer >= 1"),
    (dict(long_chains="start"), "scorer.long_chains='start': allowed end | recent"),
])
def test_prm_bad_settings(tmp_path, fake_hf, kw, msg):
    kw = dict(kw)
    engine = kw.pop("engine", "transformers")
    with pytest.raises(ValueError) as e:
        PRMScorer(None, _model_dir(tmp_path), engine=engine, step_tag=TAG, **kw)
    assert str(e.value) == msg


@pytest.mark.parametrize("tag_id", [None, 0])
def test_prm_tokenizer_without_the_reward_token(tmp_path, fake_hf, tag_id):
    fake_hf["tokenizer"] = CharTokenizer(tag_id=tag_id)
    with pytest.raises(ValueError) as e:
        _mk(tmp_path)
    path = (tmp_path / "prm").resolve()
    assert str(e.value) == (f"PRM {path}: the tokenizer has no token '<t>' (config key scorer.step_tag)")
    fake_hf["tokenizer"] = CharTokenizer(tag_id=5)
    assert _mk(tmp_path / "b").tag_id == 5


def test_prm_build_ids(tmp_path, fake_hf):
    s = _mk(tmp_path, system="S")
    tok = fake_hf["tokenizer"]
    ids = s.build_ids("P", [" ab<t> ", "c"])
    assert ids == [2] + [ord(c) for c in "S\n\nP\n\nab"] + [TAG_ID, ord("c"), TAG_ID]
    assert tok.calls == [("S\n\nP\n\nab<t>c<t>", True)]
    fake_hf["tokenizer"] = tok = CharTokenizer(chat=True)
    s = _mk(tmp_path / "b", system="S")
    assert s.build_ids("P", ["a", "b"]) == [ord(c) for c in "[system]S[user]P[assistant]a"] + [
        TAG_ID, ord("b"), TAG_ID]
    assert tok.calls == [("[system]S[user]P[assistant]a<t>b<t>", False)]
    s.system = ""
    assert s.build_ids("P", ["a"]) == [ord(c) for c in "[user]P[assistant]a"] + [TAG_ID]


def _lens_scorer(tmp_path, **kw):
    """system 'S', problem 'P': a row is 7 tokens + each step's characters + one tag per step."""
    return _mk(tmp_path, system="S", **kw)


def test_prm_window_end_and_recent(tmp_path, fake_hf):
    steps = ["a", "b", "cccccccccc", "d", "e"]  # rows: 7 + [2, 2, 11, 2, 2]
    s = _lens_scorer(tmp_path, max_length=26)
    assert s._fit("P", steps) == (s.build_ids("P", steps), 0)
    assert len(s.build_ids("P", steps)) == 26
    assert s._fit("P", []) == ([], 0)
    s.max_length = 25
    assert s._fit("P", steps) is None  # long_chains: end
    s.long_chains = "recent"
    for max_len, k in [(25, 1), (24, 1), (23, 2), (22, 2), (21, 3), (11, 3), (10, 4), (9, 4)]:
        s.max_length = max_len
        assert s._fit("P", steps) == (s.build_ids("P", steps[k:]), k), max_len
    s.max_length = 8
    assert s._fit("P", steps) is None  # not even the newest step fits
    s.max_length = 9
    assert s._fit("P", ["a"]) == (s.build_ids("P", ["a"]), 0)
    s.max_length = 8
    assert s._fit("P", ["a"]) is None
    s.max_length = 6
    assert s._fit("P", []) == ([], 0)


def test_prm_fits_keeps_the_ids_for_score(tmp_path, fake_hf):
    s = _lens_scorer(tmp_path, max_length=12, long_chains="recent")
    tok = fake_hf["tokenizer"]
    items = [("P", ["a", "b"]), ("P", ["cccccccccc"]), ("P", ["a", "cccc", "b"])]
    assert s.fits(items) == [True, False, True]
    assert s._ids_cache == {("P", ("a", "b")): (s.build_ids("P", ["a", "b"]), 0),
                            ("P", ("a", "cccc", "b")): (s.build_ids("P", ["b"]), 2)}
    n = len(tok.calls)
    got = s.score([items[0], items[2]])
    assert len(tok.calls) == n  # nothing tokenised again
    assert s._ids_cache == {}  # used once
    assert got == [pytest.approx([_p(8, 11), _p(10, 11)], abs=1e-6), pytest.approx([_p(8, 9)] * 3, abs=1e-6)]
    assert s.stats()["items_truncated"] == 1
    assert s.fits([("P", ["b"])]) == [True]
    assert list(s._ids_cache) == [("P", ("b",))]  # a new fits() forgets the last one's ids
    with pytest.raises(ValueError) as e:
        s.score([items[1]])
    assert str(e.value) == (f"PRM {s.model_path}: an item of 18 tokens > max_length 12 (config key "
                            "scorer.max_length; scorer.long_chains); ask fits() first")


def test_prm_score_rows_batches_and_stats(tmp_path, fake_hf):
    s = _lens_scorer(tmp_path, batch_size=2)
    model = fake_hf["model"]
    items = [("P", ["a"]), ("P", ["bbb", "c"]), ("P", []), ("P", ["a"]), ("P", ["dd", "e", "f"])]
    got = s.score(items)
    assert got == [pytest.approx([_p(8, 9)], abs=1e-6), pytest.approx([_p(10, 13), _p(12, 13)], abs=1e-6), [],
                   pytest.approx([_p(8, 9)], abs=1e-6),
                   pytest.approx([_p(9, 14), _p(11, 14), _p(13, 14)], abs=1e-6)]
    # three distinct non-empty rows (9, 13, 14 tokens), longest first, two per pass
    assert [len(c["input_ids"]) for c in model.calls] == [2, 1]
    assert [len(c["input_ids"][0]) for c in model.calls] == [14, 9]
    first = model.calls[0]
    assert first["input_ids"][1] == s.build_ids("P", ["bbb", "c"]) + [0]  # right-padded with 0
    assert first["attention_mask"] == [[1] * 14, [1] * 13 + [0]]
    assert s.stats() | {"seconds": 0} == {"calls": 1, "items": 5, "items_scored": 3, "tokens": 36,
                                         "tokens_computed": 28 + 9, "tokens_shared": 0, "groups": 0,
                                         "forward_passes": 2, "seconds": 0, "items_truncated": 0}
    assert s.stats()["seconds"] > 0
    s.score([("P", ["a"])])
    assert (s.stats()["calls"], s.stats()["items"], s.stats()["forward_passes"]) == (2, 6, 3)


def test_prm_score_without_dedup_or_sorting(tmp_path, fake_hf):
    fake_hf["tokenizer"] = CharTokenizer(pad=5)
    s = _lens_scorer(tmp_path, batch_size=4, dedup_items=False, sort_by_length=False)
    model = fake_hf["model"]
    items = [("P", ["a"]), ("P", ["bbb", "c"]), ("P", ["a"])]
    got = s.score(items)
    assert got[0] == got[2] == pytest.approx([_p(8, 9)], abs=1e-6)
    assert [r[:2] for r in model.calls[0]["input_ids"]] == [[2, ord("S")]] * 3
    assert model.calls[0]["input_ids"][0] == s.build_ids("P", ["a"]) + [5] * 4  # pad token 5, input order
    assert s.stats()["items_scored"] == 3 and s.stats()["tokens_computed"] == 39


def test_prm_scores_of_left_out_steps_and_clamping(tmp_path, fake_hf):
    s = _lens_scorer(tmp_path, max_length=10, long_chains="recent")
    got = s.score([("P", ["aa", "b", "c"])])
    assert got == [pytest.approx([_p(8, 9)] * 3, abs=1e-6)]  # two left out: they repeat the first score
    assert s.stats()["items_truncated"] == 1 and s.stats()["tokens"] == 9
    s._probs_hf = lambda rows: [[1.5, -0.5]] * len(rows)
    s.max_length = 100
    assert s.score([("P", ["a", "b"])]) == [[1.0, 0.0]]
    with pytest.raises(RuntimeError) as e:
        s.score([("P", ["a"]), ("P", ["a", "b", "c"])])
    assert str(e.value) == f"PRM {s.model_path}: item 0: 2 reward tokens for 1 steps"


def test_prm_wrapped_logits(tmp_path, fake_hf):
    fake_hf["hf"] = types.SimpleNamespace(max_position_embeddings=64,
                                          architectures=["XForTokenClassification"])
    s = _lens_scorer(tmp_path)
    assert s.score([("P", ["a", "b"])]) == [pytest.approx([_p(8, 11), _p(10, 11)], abs=1e-6)]


def test_prm_shared_prefix_hands_its_settings_on(tmp_path, fake_hf, monkeypatch):
    got = {}

    def shared(model, rows, tag_id, **kw):
        got.update(model=model, rows=rows, tag_id=tag_id, **kw)
        return [[0.25] * r.count(TAG_ID) for r in rows]

    monkeypatch.setattr(prm_mod, "probs_shared", shared)
    fake_hf["tokenizer"] = CharTokenizer(pad=9)
    s = _lens_scorer(tmp_path, shared_prefix="packed", shared_prefix_min=3, batch_size=5)
    assert s.score([("P", ["a", "b"])]) == [[0.25, 0.25]]
    assert got == {"model": fake_hf["model"], "rows": [s.build_ids("P", ["a", "b"])], "tag_id": TAG_ID,
                   "device": torch.device("cpu"), "pad_id": 9, "batch_size": 5, "mode": "packed",
                   "min_shared": 3, "stats": s._stats}


class FakeVLLMEngine:
    """vLLM ``LLM`` double for the pooling runner: ``encode`` returns, per prompt, ``data`` built by
    ``make``."""

    def __init__(self, make):
        self.make = make
        self.calls = []

    def encode(self, prompts, params, **kw):
        self.calls.append((prompts, params, kw))
        return [types.SimpleNamespace(outputs=types.SimpleNamespace(data=self.make(p["prompt_token_ids"])))
                for p in prompts]


@pytest.fixture
def fake_vllm(monkeypatch, fake_hf):
    """The vllm package and the engine cache replaced by doubles (importing vllm takes tens of seconds)."""
    mod = types.ModuleType("vllm")
    inputs = types.ModuleType("vllm.inputs")

    class PoolingParams:
        def __init__(self, **kw):
            self.kw = kw

    def TokensPrompt(**kw):  # noqa: N802 - vLLM's name
        return dict(kw)

    mod.PoolingParams, inputs.TokensPrompt, mod.inputs = PoolingParams, TokensPrompt, inputs
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    box = {"require": [], "cpu_env": [], "engines": [], "released": [], "cpu": True}
    monkeypatch.setattr(prm_mod, "require_vllm", lambda *a: box["require"].append(a))
    monkeypatch.setattr(prm_mod, "is_cpu_build", lambda: box["cpu"])
    monkeypatch.setattr(prm_mod, "configure_cpu_env", lambda *a: box["cpu_env"].append(a))

    def get_engine(path, **kw):
        box["engines"].append((path, kw))
        box["llm"] = FakeVLLMEngine(box.get("make"))
        return box["llm"], ("key", len(box["engines"]))

    monkeypatch.setattr(prm_mod, "get_engine", get_engine)
    monkeypatch.setattr(prm_mod, "release_engine", lambda key: box["released"].append(key))
    return box


def test_prm_vllm_engine_settings(tmp_path, fake_vllm):
    s = PRMScorer(None, _model_dir(tmp_path), engine="vllm", step_tag=TAG)
    path = str((tmp_path / "prm").resolve())
    assert fake_vllm["require"] == [("scorer.engine=vllm", "scorer.engine=transformers")]
    assert fake_vllm["cpu_env"] == [(1, "nobind")]
    assert fake_vllm["engines"] == [(path, {"runner": "pooling", "dtype": "float32",
                                            "trust_remote_code": False, "enable_prefix_caching": False,
                                            "enforce_eager": True, "seed": 0, "gpu_memory_utilization": 0.3})]
    assert s._llm is fake_vllm["llm"] and s._key == ("key", 1) and s.engine == "vllm"
    assert not hasattr(s, "_model")
    fake_vllm["cpu"] = False
    PRMScorer(OmegaConf.create({"scorer": {"engine": "vllm", "step_tag": TAG, "dtype": "bfloat16",
                                           "enforce_eager": False, "gpu_memory_utilization": "0.5",
                                           "max_model_len": "512", "block_size": 32, "cpu_kvcache_gib": 4,
                                           "trust_remote_code": True}}), _model_dir(tmp_path / "b"))
    assert fake_vllm["cpu_env"] == [(1, "nobind")]  # a GPU build: the CPU settings are left alone
    assert fake_vllm["engines"][1][1] == {"runner": "pooling", "dtype": "bfloat16", "trust_remote_code": True,
                                          "enable_prefix_caching": False, "enforce_eager": False, "seed": 0,
                                          "gpu_memory_utilization": 0.5, "max_model_len": 512,
                                          "block_size": 32}
    fake_vllm["cpu"] = True
    PRMScorer(None, _model_dir(tmp_path / "c"), engine="vllm", step_tag=TAG, cpu_kvcache_gib=3,
              cpu_omp_threads_bind="0-3", max_model_len=0, block_size=None)
    assert fake_vllm["cpu_env"][-1] == (3, "0-3")
    kw = fake_vllm["engines"][2][1]
    assert "max_model_len" not in kw and "block_size" not in kw


def test_prm_vllm_scores_from_either_output_shape(tmp_path, fake_vllm):
    def make(ids):  # class-1 probability 0.01 * position: all tokens, or the reward tokens (STEP pooling)
        n = len(ids)
        probs = torch.tensor([[1 - 0.01 * j, 0.01 * j] for j in range(n)], dtype=torch.float64)
        return probs if n % 2 else probs[[j for j, t in enumerate(ids) if t == TAG_ID]]

    fake_vllm["make"] = make
    s = PRMScorer(None, _model_dir(tmp_path), engine="vllm", step_tag=TAG, system="S")
    items = [("P", ["a", "b"]), ("P", ["bb"]), ("P", []), ("P", ["a", "b"])]  # rows of 11 and 10 tokens
    assert s.score(items) == [[0.08, 0.1], [0.09], [], [0.08, 0.1]]
    prompts, params, kw = fake_vllm["llm"].calls[0]
    assert prompts == [{"prompt_token_ids": s.build_ids("P", ["a", "b"])},
                       {"prompt_token_ids": s.build_ids("P", ["bb"])}]
    assert params.kw == {"step_tag_id": TAG_ID}
    assert kw == {"pooling_task": "token_classify", "use_tqdm": False}
    st = s.stats()
    assert (st["tokens_computed"], st["forward_passes"], st["items_scored"], st["tokens"]) == (21, 1, 2, 21)
    assert s.score([("P", ["a"])]) == [[0.08]]
    st = s.stats()
    assert (st["tokens_computed"], st["forward_passes"], st["items_scored"], st["tokens"]) == (30, 2, 3, 30)
    fake_vllm["llm"].make = lambda ids: torch.zeros((3, 2))
    with pytest.raises(RuntimeError) as e:
        s.score([("P", ["a"])])
    assert str(e.value) == f"PRM {s.model_path}: vLLM returned (3, 2) for 9 tokens / 1 reward tokens"
    s.close()
    assert fake_vllm["released"] == [("key", 1)] and s._key is None and s._llm is None
    s.close()
    assert fake_vllm["released"] == [("key", 1)]


def test_prm_close_of_the_transformers_engine_releases_nothing(tmp_path, fake_vllm):
    s = _mk(tmp_path)
    s.close()
    assert fake_vllm["released"] == [] and s._llm is None


# --------------------------------------------------------------------------------------------------------
# sphere/rewards/shared_prefix.py: the packed (tree-attention) form, on a model double that reads the mask
# --------------------------------------------------------------------------------------------------------
from sphere.rewards.shared_prefix import (  # noqa: E402
    PrefixCache,
    _pad,
    _tags,
    common_prefix_len,
    group_rows,
    probs_shared,
)


class TreePRM(torch.nn.Module):
    """Model double: class-1 logit 0.1 * position id + 0.01 * how many keys the query may read. Scored
    separately, a token at index j of a row gets 0.1 j + 0.01 (j + 1); the tree mask must give the same."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, dtype=dtype))
        self.calls: list[dict] = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kw):
        self.calls.append(dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               **kw))
        seen = (attention_mask[:, 0] == 0).sum(-1)
        z = 0.1 * position_ids.double() + 0.01 * seen.double()
        return torch.stack([torch.zeros_like(z), z], dim=-1)


def _sep(j: int) -> float:
    return float(torch.softmax(torch.tensor([0.0, 0.1 * j + 0.01 * (j + 1)], dtype=torch.float64), -1)[1])


def test_packed_tree_mask_positions_and_scores():
    model = TreePRM()
    rows = [[5, 1, 7, 1], [5, 1, 8, 8, 1], [9, 1]]
    st = {"tokens_computed": 3, "forward_passes": 1}
    got = probs_shared(model, rows, 1, device=torch.device("cpu"), pad_id=4, batch_size=4, mode="packed",
                       min_shared=2, stats=st)
    assert got == [pytest.approx([_sep(1), _sep(3)], abs=1e-6), pytest.approx([_sep(1), _sep(4)], abs=1e-6),
                   pytest.approx([_sep(1)], abs=1e-6)]
    assert st == {"tokens_computed": 3 + 14, "forward_passes": 2, "tokens_shared": 2, "groups": 2}
    (call,) = model.calls
    assert call["input_ids"].dtype == torch.long and call["position_ids"].dtype == torch.long
    assert call["input_ids"].tolist() == [[5, 1, 7, 1, 8, 8, 1], [9, 1, 4, 4, 4, 4, 4]]
    assert call["position_ids"].tolist() == [[0, 1, 2, 3, 2, 3, 4], [0, 1, 0, 0, 0, 0, 0]]
    assert set(call) == {"input_ids", "attention_mask", "position_ids"}
    mask = call["attention_mask"]
    assert mask.dtype == torch.float64 and mask.shape == (2, 1, 7, 7)
    allowed = [[[1, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0],
                [1, 1, 0, 0, 1, 0, 0], [1, 1, 0, 0, 1, 1, 0], [1, 1, 0, 0, 1, 1, 1]],
               [[1, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0]] + [[1, 0, 0, 0, 0, 0, 0]] * 5]
    assert (mask[:, 0] == 0).int().tolist() == allowed
    assert set(mask[mask != 0].tolist()) == {torch.finfo(torch.float64).min}


def test_packed_reads_a_reward_token_at_the_start_and_splits_batches():
    model = TreePRM(dtype=torch.float32)
    rows = [[1, 5, 1], [1, 5, 6, 1], [2, 2, 1]]
    st = {}
    got = probs_shared(model, rows, 1, device=torch.device("cpu"), pad_id=0, batch_size=2, mode="packed",
                       min_shared=2, stats=st)
    assert got == [pytest.approx([_sep(0), _sep(2)], abs=1e-6), pytest.approx([_sep(0), _sep(3)], abs=1e-6),
                   pytest.approx([_sep(2)], abs=1e-6)]
    assert [c["input_ids"].tolist() for c in model.calls] == [[[1, 5, 1, 6, 1]], [[2, 2, 1]]]
    assert model.calls[0]["attention_mask"].dtype == torch.float32
    assert st == {"tokens_computed": 8, "forward_passes": 2, "tokens_shared": 2, "groups": 2}
    assert probs_shared(model, [], 1, device=torch.device("cpu"), pad_id=0, batch_size=2, mode="packed") == []
    with pytest.raises(ValueError) as e:
        probs_shared(model, rows, 1, device=torch.device("cpu"), pad_id=0, batch_size=2, mode="off")
    assert str(e.value) == "scorer.shared_prefix='off': allowed off | kv | packed"


def test_shared_prefix_helpers():
    assert common_prefix_len([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_len([1, 2], [1, 2, 3]) == 2 and common_prefix_len([], [1]) == 0
    assert common_prefix_len([3], [4]) == 0
    x, m = _pad([[1, 2, 3], [], [4]], 9)
    assert x.dtype == torch.long and x.tolist() == [[1, 2, 3], [9, 9, 9], [4, 9, 9]]
    assert m.tolist() == [[1, 1, 1], [0, 0, 0], [1, 0, 0]]
    x, m = _pad([[]], 7)
    assert x.tolist() == [[7]] and m.tolist() == [[0]]
    assert _tags([1, 0, 1, 1, 0], 1, 0, 5) == [0, 2, 3] and _tags([1, 0, 1, 1, 0], 1, 1, 3) == [2]
    assert group_rows([]) == []
    assert group_rows([[1, 2, 3]]) == [(3, [0])]
    # two rows sharing 16 tokens: one group at the default min_shared (16 + 2 + 2 + 16 <= 2 * (18 + 16))
    a, b = list(range(16)) + [100, 101], list(range(16)) + [200, 201]
    assert group_rows([b, a]) == [(16, [1, 0])]
    assert group_rows([a[:15] + [7], b[:15] + [8]]) == [(16, [0]), (16, [1])]
    # one group computes 6 tokens, two rows alone 10
    assert group_rows([[1, 2, 3], [1, 2, 4]], min_shared=2) == [(2, [0, 1])]


# --------------------------------------------------------------------------------------------------------
# sphere/rewards/rollout.py: score_records
# --------------------------------------------------------------------------------------------------------
from sphere.rewards.rollout import RolloutScorer  # noqa: E402


class NoRolloutBackend:
    """Backend double for steps that all state their answer: the scorer must not sample anything."""

    tokenizer = None

    def complete(self, prompts, params):
        raise AssertionError("no rollouts expected")


def test_score_records_pairs_records_with_their_steps():
    s = RolloutScorer(None, NoRolloutBackend(), family={"step_delimiter": "\n\n"})
    recs = [{"problem": "p1", "answer": "20"}, {"problem": "p2", "answer": "7"}]
    steps = [["So \\boxed{20}.", "Again \\boxed{21}."], ["\\boxed{7}"]]
    assert s.score_records(recs, steps) == [[1.0, 0.0], [1.0]]
    assert s.score_records(recs[::-1], steps) == [[0.0, 0.0], [0.0]]
    assert s.score_records(recs, [[], ["\\boxed{20}"]]) == [[], [0.0]]


def test_score_records_reads_a_numeric_answer_as_set_golds_does():
    """A record's answer may be a number (JSON): set_golds keeps str(answer); score_records did not, and the
    verifier counts a non-string gold as no match, so every step scored 0."""
    s = RolloutScorer(None, NoRolloutBackend(), family={"step_delimiter": "\n\n"})
    assert s.score_records([{"problem": "p", "answer": 7}], [["So \\boxed{7}."]]) == [[1.0]]
    s.set_golds([{"problem": "p", "answer": 7}])
    assert s.score([("p", ["So \\boxed{7}."])]) == [[1.0]]


class DeviceProbe(torch.nn.Module):
    """Model double that records the device of every tensor it is handed and answers logits 0 on the CPU
    (so a run on the ``meta`` device shows that every input was moved to the scorer's device)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.devices: list[tuple[str, str]] = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kw):
        given = (("input_ids", input_ids), ("attention_mask", attention_mask), ("position_ids", position_ids))
        for k, v in given:
            if v is not None:
                self.devices.append((k, v.device.type))
        return torch.zeros((*input_ids.shape, 2))


@pytest.mark.parametrize("mode", ["packed", "kv"])
def test_shared_prefix_inputs_go_to_the_device(mode):
    model = DeviceProbe()
    rows = [[5, 1, 7, 1], [5, 1, 8, 1]]
    got = probs_shared(model, rows, 1, device=torch.device("meta"), pad_id=0, batch_size=4, mode=mode,
                       min_shared=2)
    assert got == [[0.5, 0.5], [0.5, 0.5]]
    assert model.devices and {d for _, d in model.devices} == {"meta"}
    assert {k for k, _ in model.devices} == {"input_ids", "attention_mask", "position_ids"}


def test_prm_rows_go_to_the_scorer_device(tmp_path, fake_hf):
    s = _lens_scorer(tmp_path)
    s._model, s.device = DeviceProbe(), torch.device("meta")
    assert s.score([("P", ["a", "b"])]) == [[0.5, 0.5]]
    assert s._model.devices == [("input_ids", "meta"), ("attention_mask", "meta")]


@pytest.fixture(scope="module")
def random_prm():
    """A 2-layer Qwen2 PRM with random weights (seed 0), built in memory: the real attention, cache and
    position handling of the shared-prefix forms, at a size that runs in milliseconds."""
    from transformers import Qwen2Config

    from sphere.rewards.prm_model import QwenProcessRewardModel

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=32, max_position_embeddings=64)
    return QwenProcessRewardModel(cfg).eval().requires_grad_(False)


def _separately(model, rows, tag=1):
    out = []
    for r in rows:
        x = torch.tensor([r])
        p = torch.softmax(model(input_ids=x, attention_mask=torch.ones_like(x)).float(), dim=-1)[0, :, 1]
        out.append([float(p[j]) for j, t in enumerate(r) if t == tag])
    return out


@pytest.mark.parametrize("mode, batch_size, stats", [
    ("kv", 2, {"tokens_computed": 16, "tokens_shared": 8, "forward_passes": 4, "groups": 2}),
    ("kv", 8, {"tokens_computed": 20, "tokens_shared": 8, "forward_passes": 2, "groups": 2}),
    ("packed", 2, {"tokens_computed": 15, "tokens_shared": 8, "forward_passes": 2, "groups": 2}),
    ("packed", 8, {"tokens_computed": 26, "tokens_shared": 8, "forward_passes": 1, "groups": 2}),
])
def test_shared_prefix_forms_give_separate_scores(random_prm, mode, batch_size, stats):
    rows = [[5, 1, 7, 1, 9, 9, 1], [5, 1, 7, 1, 8, 1], [5, 1, 7, 1, 8, 8, 8, 1], [3, 1]]
    ref = _separately(random_prm, rows)
    st = {}
    got = probs_shared(random_prm, rows, 1, device=torch.device("cpu"), pad_id=0, batch_size=batch_size,
                       mode=mode, min_shared=2, stats=st)
    assert [len(g) for g in got] == [3, 3, 3, 1]
    assert max(abs(a - b) for g, r in zip(got, ref, strict=True) for a, b in zip(g, r, strict=True)) < 1e-6
    assert st == stats


# --------------------------------------------------------------------------------------------------------
# sphere/rewards/prm_model.py: the Qwen PRM layout, saved and loaded back from a temporary directory
# --------------------------------------------------------------------------------------------------------
def _save_prm(model, d, shards: int = 1, extra: dict | None = None, drop: tuple = ()):
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(d)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k not in drop}
    state.update(extra or {})
    if shards == 1:
        save_file(state, str(d / "model.safetensors"))
        return
    keys = sorted(state)
    wm = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[s::shards]}
        save_file(part, str(d / name))
        wm.update({k: name for k in part})
    import json

    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))


def test_prm_model_layout_and_forward(random_prm):
    from sphere.rewards.prm_model import QwenProcessRewardModel

    assert isinstance(random_prm, QwenProcessRewardModel) and random_prm.config.hidden_size == 16
    score = random_prm.score
    assert [type(m).__name__ for m in score] == ["Linear", "ReLU", "Linear"]
    assert (score[0].in_features, score[0].out_features) == (16, 16)
    assert (score[2].in_features, score[2].out_features) == (16, 2)
    x = torch.tensor([[5, 1, 7, 1]])
    out = random_prm(x, attention_mask=torch.ones_like(x))
    hidden = random_prm.model(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state
    assert out.shape == (1, 4, 2) and torch.equal(out, score(hidden))
    # position ids are passed to the body: other relative positions change the output
    shifted = random_prm(x, attention_mask=torch.ones_like(x), position_ids=torch.tensor([[0, 5, 9, 20]]))
    assert not torch.allclose(shifted, out)
    from transformers import DynamicCache

    cache = DynamicCache()
    random_prm(x[:, :2], attention_mask=torch.ones((1, 2), dtype=torch.long), past_key_values=cache,
               use_cache=True)
    assert cache.get_seq_length() == 2  # the cache is filled in place
    tail = random_prm(x[:, 2:], attention_mask=torch.ones_like(x), past_key_values=cache, use_cache=True,
                      position_ids=torch.tensor([[2, 3]]))
    assert torch.allclose(tail, out[:, 2:], atol=1e-6)
    cfg3 = random_prm.config.__class__(**{**random_prm.config.to_dict(), "num_labels": 3})
    assert QwenProcessRewardModel(cfg3).score[2].out_features == 3


@pytest.mark.parametrize("shards", [1, 2])
def test_prm_model_loads_back(random_prm, tmp_path, shards):
    from sphere.rewards.prm_model import QwenProcessRewardModel

    extra = {"lm_head.weight": torch.zeros(40, 16)}
    _save_prm(random_prm, tmp_path / "m", shards=shards, extra=extra)
    got = QwenProcessRewardModel.from_pretrained(tmp_path / "m")
    assert not got.training and not any(p.requires_grad for p in got.parameters())
    want = random_prm.state_dict()
    assert set(got.state_dict()) == set(want)
    assert all(torch.equal(got.state_dict()[k], want[k]) for k in want)
    half = QwenProcessRewardModel.from_pretrained(str(tmp_path / "m"), dtype=torch.float64)
    assert {p.dtype for p in half.parameters()} == {torch.float64}


def test_prm_model_refuses_a_wrong_checkpoint(random_prm, tmp_path):
    from sphere.rewards.prm_model import QwenProcessRewardModel

    d = tmp_path / "bad"
    _save_prm(random_prm, d, drop=("score.0.bias",), extra={"value_head.weight": torch.zeros(1)})
    with pytest.raises(ValueError) as e:
        QwenProcessRewardModel.from_pretrained(d)
    assert str(e.value) == (f"PRM checkpoint {d}: does not match the Qwen PRM layout "
                            "(missing ['score.0.bias'], unexpected ['value_head.weight'])")
    _save_prm(random_prm, tmp_path / "sh", shards=2)
    (tmp_path / "sh" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as e:
        QwenProcessRewardModel.from_pretrained(tmp_path / "sh")
    assert str(e.value) == (f"PRM checkpoint {tmp_path / 'sh'}: weight file model-00002-of-00002.safetensors "
                            "missing")


class WrappedProbe(DeviceProbe):
    """DeviceProbe whose output carries the logits in ``.logits`` (as a transformers ModelOutput does),
    class 1 at 1.0."""

    def forward(self, *a, **kw):
        z = super().forward(*a, **kw)
        z[..., 1] = 1.0
        return types.SimpleNamespace(logits=z)


def test_probs_shared_defaults_stats_and_batch_boundary(random_prm):
    p1 = float(torch.softmax(torch.tensor([0.0, 1.0]), -1)[1])
    model = WrappedProbe()
    st = {"groups": 5, "tokens_shared": 7, "forward_passes": 1, "tokens_computed": 0}
    got = probs_shared(model, [[2, 1], [3, 1]], 1, device=torch.device("cpu"), pad_id=0, batch_size=2,
                       mode="packed", stats=st)
    assert got == [[p1], [p1]]
    # one pass: the 2 rows fit a batch of 2 exactly
    assert st == {"groups": 7, "tokens_shared": 7, "forward_passes": 2, "tokens_computed": 4}
    # the defaults: the kv form, min_shared 16 (two rows sharing exactly 16 tokens are one group)
    rows = [list(range(2, 18)) + [1, 20, 1], list(range(2, 18)) + [21, 1]]
    st = {}
    got = probs_shared(random_prm, rows, 1, device=torch.device("cpu"), pad_id=0, batch_size=4, stats=st)
    ref = _separately(random_prm, rows)
    assert max(abs(a - b) for g, r in zip(got, ref, strict=True) for a, b in zip(g, r, strict=True)) < 1e-6
    assert st == {"groups": 1, "tokens_shared": 16, "forward_passes": 2, "tokens_computed": 16 + 2 * 3}


def test_kv_longest_continuations_first_and_a_reward_token_at_the_start(random_prm):
    pre = [5, 1, 7, 1]
    rows = [pre + [9, 9, 9, 9, 1], pre + [1], pre + [8, 8, 8, 1]]  # continuations of 5, 1 and 4 tokens
    st = {}
    got = probs_shared(random_prm, rows, 1, device=torch.device("cpu"), pad_id=0, batch_size=2, mode="kv",
                       min_shared=2, stats=st)
    ref = _separately(random_prm, rows)
    assert max(abs(a - b) for g, r in zip(got, ref, strict=True) for a, b in zip(g, r, strict=True)) < 1e-6
    # the prefix (4), then the continuations longest first in pairs: [5, 4] padded to 5, then [1]
    assert st == {"groups": 1, "tokens_shared": 8, "forward_passes": 3, "tokens_computed": 4 + 10 + 1}
    rows = [[1, 5, 1, 7, 1], [1, 5, 1, 8, 8, 1]]
    got = probs_shared(random_prm, rows, 1, device=torch.device("cpu"), pad_id=0, batch_size=2, mode="kv",
                       min_shared=2)
    ref = _separately(random_prm, rows)
    assert [len(g) for g in got] == [3, 3]
    assert max(abs(a - b) for g, r in zip(got, ref, strict=True) for a, b in zip(g, r, strict=True)) < 1e-6


# --------------------------------------------------------------------------------------------------------
# sphere/rewards/rollout.py: RolloutScorer settings, errors and the score arithmetic (a scripted backend)
# --------------------------------------------------------------------------------------------------------
class ScriptedBackend:
    """Rollout backend double: a character tokenizer, and per prompt the first ``params.n`` scripted
    completion texts; records every ``complete`` call."""

    def __init__(self, texts):
        self.tokenizer = CharTokenizer()
        self.texts = texts
        self.calls = []

    def complete(self, prompts, params):
        self.calls.append((prompts, params))
        return [[Candidate(t, [], 0.0, 0.0, "answer") for t in self.texts[: params.n]] for _ in prompts]


def _settings(s: RolloutScorer) -> tuple:
    return (s.m, s.mode, s.temperature, s.top_p, s.max_tokens, s.seed, s.verify_timeout_s)


def test_rollout_defaults_config_and_overrides():
    b = ScriptedBackend([])
    d = RolloutScorer(None, b)
    assert _settings(d) == (8, "soft", 0.8, 1.0, 512, None, 5.0)
    assert d.family == load_family("mini") and d.delim == "\n\n" and d.backend is b and d.rollouts == 0
    cfg = OmegaConf.create({"seed": 3, "scorer": {"m": 1, "mode": "hard", "temperature": 0.0, "top_p": 0.5,
                                                  "max_tokens": 7, "seed": "${seed}",
                                                  "verify_timeout_s": 2.5}})
    assert _settings(RolloutScorer(cfg, b)) == (1, "hard", 0.0, 0.5, 7, 3, 2.5)
    over = RolloutScorer(cfg, b, m=2, top_p=0.25, max_tokens=9, verify_timeout_s=1.5)
    assert _settings(over) == (2, "hard", 0.0, 0.25, 9, 3, 1.5)
    assert _settings(RolloutScorer({"scorer": {"top_p": 0.75, "max_tokens": 33}}, b)) == (
        8, "soft", 0.8, 0.75, 33, None, 5.0)
    # a value the config leaves missing (???) may be given as an override
    missing = OmegaConf.create({"scorer": {"m": "???", "seed": 1}})
    assert _settings(RolloutScorer(missing, b, m=3)) == (3, "soft", 0.8, 1.0, 512, 1, 5.0)
    # an object without .get is not read as a config: defaults, the mini family
    ns = RolloutScorer(types.SimpleNamespace(scorer={"m": 2}), b)
    assert _settings(ns) == (8, "soft", 0.8, 1.0, 512, None, 5.0) and ns.family == load_family("mini")


def test_rollout_family_comes_from_the_config():
    b = ScriptedBackend([])
    qwen = load_family("qwen2_5")
    assert qwen != load_family("mini")
    assert RolloutScorer(OmegaConf.create({"model": {"family": "qwen2_5"}}), b).family == qwen
    assert RolloutScorer({"model": {"family": "qwen2_5"}}, b).family == qwen
    fam = {"step_delimiter": " | "}
    s = RolloutScorer(OmegaConf.create({"model": {"family": "qwen2_5"}}), b, family=fam)
    assert s.family is fam and s.delim == " | "


def test_rollout_bad_arguments():
    with pytest.raises(ValueError) as e:
        RolloutScorer(None, None)
    assert str(e.value) == "RolloutScorer needs a generation backend (sphere.backends.make_backend(cfg))"
    b = ScriptedBackend([])
    with pytest.raises(ValueError) as e:
        RolloutScorer(None, b, m=0)
    assert str(e.value) == "scorer.m must be >= 1, got 0"
    assert RolloutScorer(None, b, m=1).m == 1
    with pytest.raises(ValueError) as e:
        RolloutScorer(None, b, mode="Soft")
    assert str(e.value) == "scorer.mode='Soft': allowed 'soft' | 'hard'"
    s = RolloutScorer(None, b, family={"step_delimiter": "\n\n"})
    with pytest.raises(ValueError) as e:
        s.score([("p", ["a"]), ("q", ["b"])], ["1"])
    need = "RolloutScorer.score needs one gold answer per item (golds=...), got"
    assert str(e.value) == f"{need} 1 for 2 items"
    with pytest.raises(ValueError) as e:
        s.score([("p", ["a"])])
    assert str(e.value) == f"{need} None for 1 items"
    long = "Ann has " + "7" * 100 + " apples. How many?"
    s.set_golds([{"problem": "p", "answer": 1}])
    with pytest.raises(KeyError) as e:
        s.score([("p", ["a"]), (long, ["b"])])
    assert e.value.args[0] == (f"RolloutScorer: no gold answer registered for problem {long[:80]!r} "
                               "(call set_golds(records) or pass golds=)")


@pytest.fixture
def answer_spy(monkeypatch):
    """Records what the scorer hands the (real) batch answer checker."""
    seen = []
    real = rollout_mod.check_answers

    def spy(pairs, **kw):
        seen.append((list(pairs), kw))
        return real(pairs, **kw)

    monkeypatch.setattr(rollout_mod, "check_answers", spy)
    return seen


def test_rollout_score_sampling_and_checking(answer_spy):
    b = ScriptedBackend(["So \\boxed{20}.", "So \\boxed{7}.", "unused"])
    s = RolloutScorer(None, b, m=2, temperature=0.5, top_p=0.5, max_tokens=7, seed=3, verify_timeout_s=2.5)
    assert s.score([("p", ["a", "The answer is \\boxed{20}."])], ["20"]) == [[0.5, 1.0]]
    prompts, params = b.calls[0]
    assert params == SamplingParams(n=2, temperature=0.5, top_p=0.5, max_tokens=7, seed=3)
    assert prompts == [[2] + [ord(c) for c in "Problem: p\n\nSolution:\na\n\n"]]
    assert answer_spy == [([("So \\boxed{20}.", "20"), ("So \\boxed{7}.", "20"),
                            ("a\n\nThe answer is \\boxed{20}.", "20")], {"timeout_s": 2.5})]
    assert s.rollouts == 2
    assert s.score([("p", ["a", "b"])], ["7"]) == [[0.5, 0.5]]
    assert s.rollouts == 6  # counted over calls


class EmptyRowsBackend(ScriptedBackend):
    """A backend whose rollouts do not come back (an empty row per prompt)."""

    def complete(self, prompts, params):
        self.calls.append((prompts, params))
        return [[] for _ in prompts]


def test_rollout_steps_without_any_verdict_score_zero(answer_spy):
    s = RolloutScorer(None, EmptyRowsBackend([]), m=2)
    assert s.score([("p", ["a", "b"]), ("q", [])], ["1", "2"]) == [[0.0, 0.0], []]
    assert s.rollouts == 0
    assert answer_spy == []  # nothing to check: the checker is not called


# --------------------------------------------------------------------------------------------------------
# sphere/rewards/mini_world.py: the chain parser, the scorer's cache, errors and flip_rate
# --------------------------------------------------------------------------------------------------------
_ANN = "Ann has 4 apples."
_HOW = "How many apples does Ann have now?"


def test_mini_apply_and_reference_chain_edges():
    assert (_apply("/", 6, 3), _apply("/", 7, 2), _apply("/", 6, 0), _apply("-", 7, 2)) == (2, None, None, 5)
    assert reference_chain(f"{_ANN} {_HOW}") == []
    assert reference_chain(f"Ann has 3 bags with 4 apples each. {_HOW}") == [(3, "*", 4, 12)]
    assert reference_chain(f"{_ANN} Then she finds 2 more. {_HOW}") == [(4, "+", 2, 6)]
    assert reference_chain(f"{_ANN} Then she finds 2 more.") is None  # no question
    assert reference_chain("") is None
    assert reference_chain(_HOW) is None
    split = "Then she splits them into 3 equal groups and keeps one group."
    assert reference_chain(f"{_ANN} {split} {_HOW}") is None  # 4 / 3 is not exact
    two = [(4, "+", 2, 6), (6, "/", 3, 2)]
    assert reference_chain(f"{_ANN} Then she finds 2 more. {split} {_HOW}") == two
    s = MiniWorldStepScorer()
    assert s.step_right([], 0, "The answer is \\boxed{4}.") is False  # no equation: no result to answer
    assert s.score_steps(f"{_ANN} {_HOW}", ["The answer is \\boxed{4}."]) == [0.0]


def test_mini_scorer_settings_cache_and_errors():
    s = MiniWorldStepScorer()
    assert (s.flip_rate, s.seed) == (0.0, 0)
    assert (MiniWorldStepScorer({"flip_rate": 0.25}).seed, MiniWorldStepScorer({"seed": 4}).seed) == (0, 4)
    with pytest.raises(ValueError) as e:
        MiniWorldStepScorer({"flip_rate": 0.6})
    assert str(e.value) == ("scorer.flip_rate=0.6 (conf/scorer/mini_world.yaml): allowed [0, 0.5] "
                            "(the chance a step verdict is flipped; 0 = exact)")
    p = f"{_ANN} Then she finds 2 more. {_HOW}"
    ch = s.chain(p)
    assert ch == [(4, "+", 2, 6)] and s.chain(p) is ch and s._chains == {p: ch}  # parsed once, then cached
    bad = "x" * 150 + "y" * 100
    with pytest.raises(ValueError) as e:
        s.chain(bad)
    assert str(e.value) == ("scorer=mini_world scores only mini-world problems (sphere.mini.world's sentence "
                            f"templates); this problem is not one: {bad[:200]!r}. Use scorer=symbolic or "
                            "scorer=prm for other data.")
    assert s._chains == {p: ch}
    s.score([(p, ["a"])])
    s.score([(p, ["a", "b"]), (p, [])])
    assert s.stats() == {"scorer/calls": 2, "scorer/steps": 3}


def _draw(seed, problem: str, steps: list[str], t: int) -> float:
    """The documented flip draw: blake2b (8 bytes) of seed, problem and the prefix, read as a fraction."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{seed}\x00{problem}\x00".encode())
    h.update("\x00".join(steps[: t + 1]).encode())
    return int.from_bytes(h.digest(), "big") / 2**64


_FLIP_PROBLEM = f"{_ANN} Then she finds 2 more. Then she loses 1. Then she makes 3 times as many. {_HOW}"
_FLIP_STEPS = ["Ann finds 2, so 4 + 2 = 6.", "Ann loses 1, so 6 - 1 = 5.", "So 5 * 3 = 16.",
               "The answer is \\boxed{15}.", "Extra step."]
_RIGHT = [True, True, False, False, False]


def test_mini_flip_rate_flips_by_the_documented_draw():
    for seed in range(6):
        s = MiniWorldStepScorer({"flip_rate": 0.5, "seed": seed})
        draws = [_draw(seed, _FLIP_PROBLEM, _FLIP_STEPS, t) for t in range(len(_RIGHT))]
        want = [float(ok != (u < 0.5)) for ok, u in zip(_RIGHT, draws, strict=True)]
        assert s.score([(_FLIP_PROBLEM, _FLIP_STEPS)]) == [want]
    d = MiniWorldStepScorer({"flip_rate": 0.5})  # seed 0 by default
    want = [float(ok != (_draw(0, _FLIP_PROBLEM, _FLIP_STEPS, t) < 0.5)) for t, ok in enumerate(_RIGHT)]
    assert d.score_steps(_FLIP_PROBLEM, _FLIP_STEPS) == want
    assert MiniWorldStepScorer().score_steps(_FLIP_PROBLEM, _FLIP_STEPS) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_mini_flip_needs_a_draw_strictly_below_the_rate():
    draws = [_draw(1, _FLIP_PROBLEM, _FLIP_STEPS, t) for t in range(len(_FLIP_STEPS))]
    rate = max(u for u in draws if u <= 0.5)
    s = MiniWorldStepScorer({"flip_rate": rate, "seed": 1})
    assert s.flip_rate == rate
    want = [float(ok != (u < rate)) for ok, u in zip(_RIGHT, draws, strict=True)]
    assert s.score_steps(_FLIP_PROBLEM, _FLIP_STEPS) == want
    t = draws.index(rate)
    assert want[t] == float(_RIGHT[t])  # the step whose draw equals the rate keeps its verdict


# --------------------------------------------------------------------------------------------------------
# sphere/rewards/prm.py, prm_model.py, shared_prefix.py: where the model comes from, the device, counters
# over calls, the checkpoint loader's defaults and the cost rule of the shared-prefix groups
# --------------------------------------------------------------------------------------------------------
def test_prm_model_name_is_resolved_with_the_config(tmp_path, fake_hf, monkeypatch):
    d = _model_dir(tmp_path)
    asked = []

    def resolve(name, cfg=None):
        asked.append((name, cfg))
        return d

    monkeypatch.setattr(prm_mod, "resolve_model", resolve)
    cfg = OmegaConf.create({"scorer": {"model": "mini", "step_tag": TAG, "shared_prefix": "off"}})
    assert PRMScorer(cfg).model_path == d.resolve()
    assert len(asked) == 1 and asked[0][0] == "mini" and asked[0][1] is cfg
    # an object without .get is not read as a config (nor its model.prm): the model comes from the overrides
    ns = types.SimpleNamespace(model={"prm": "other"})
    assert PRMScorer(ns, model="m2", step_tag=TAG).model_path == d.resolve()
    assert asked[1][0] == "m2" and asked[1][1] is ns


def test_prm_missing_model_dir_is_named_the_prm_model(tmp_path, fake_hf):
    gone = tmp_path / "none"
    with pytest.raises(ModelNotFoundError) as e:
        PRMScorer(None, gone, engine="transformers", step_tag=TAG)
    assert str(e.value) == (f"PRM model path {str(gone)!r} does not exist (expected a local HF model "
                            "directory with config.json, 'mini', or a hub name org/name)")


def test_prm_device_setting_and_auto(tmp_path, fake_hf, monkeypatch):
    s = _mk(tmp_path, device="meta")
    assert s.device == torch.device("meta") and fake_hf["model"].moved_to == torch.device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # auto picks the GPU (never touched here)
    s = _mk(tmp_path / "b")
    assert s.device == torch.device("cuda") and fake_hf["model"].moved_to == torch.device("cuda")
    assert _mk(tmp_path / "c", device="cpu").device == torch.device("cpu")


def test_prm_config_without_architectures_is_the_qwen_layout(tmp_path, fake_hf):
    fake_hf["hf"] = types.SimpleNamespace(max_position_embeddings=32)
    s = _mk(tmp_path)
    assert (s._token_cls, s.max_length, len(fake_hf["seen"]["qwen"]), fake_hf["seen"]["tokcls"]) == (
        False, 32, 1, [])


class PlainTokenizer(CharTokenizer):
    """CharTokenizer without any ``chat_template`` attribute (a tokenizer class older than chat templates)."""

    def __init__(self):
        super().__init__()
        del self.chat_template


def test_prm_build_ids_with_a_tokenizer_without_chat_templates(tmp_path, fake_hf):
    fake_hf["tokenizer"] = PlainTokenizer()
    s = _mk(tmp_path, system="S")
    assert s.build_ids("P", ["a"]) == [2] + [ord(c) for c in "S\n\nP\n\na"] + [TAG_ID]


def test_prm_counters_add_up_over_calls(tmp_path, fake_hf, monkeypatch):
    ticks = iter([10.0, 10.5, 20.0, 20.25])
    monkeypatch.setattr(prm_mod, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    s = _lens_scorer(tmp_path, max_length=10, long_chains="recent")
    s.score([("P", ["aa", "b"])])  # 12 tokens: the first step left out
    assert (s.stats()["seconds"], s.stats()["items_truncated"]) == (0.5, 1)
    s.score([("P", ["aa", "b", "c"]), ("P", ["a"])])  # 14 tokens: two steps left out; 9 tokens: whole
    assert (s.stats()["seconds"], s.stats()["items_truncated"]) == (0.75, 2)


def test_prm_item_without_steps_is_not_fitted_to_the_window(tmp_path, fake_hf):
    s = _lens_scorer(tmp_path, long_chains="recent")
    s.max_length = -1  # no row fits: an item without steps has no row to fit
    assert s.score([("P", [])]) == [[]]
    assert s.stats()["items_scored"] == 0 and fake_hf["tokenizer"].calls == []


class _BodyDouble:
    """transformers.AutoModel double: the PRM body is the identity (hidden states = inputs)."""

    @staticmethod
    def from_config(config):
        return torch.nn.Identity()


@pytest.mark.parametrize("labels, want", [({}, 2), ({"num_labels": 0}, 2), ({"num_labels": None}, 2),
                                          ({"num_labels": 5}, 5)])
def test_prm_model_head_has_two_labels_unless_the_config_says(monkeypatch, labels, want):
    import transformers

    from sphere.rewards.prm_model import QwenProcessRewardModel

    monkeypatch.setattr(transformers, "AutoModel", _BodyDouble)
    m = QwenProcessRewardModel(types.SimpleNamespace(hidden_size=4, **labels))
    assert isinstance(m.model, torch.nn.Identity)
    assert [(x.in_features, x.out_features) for x in (m.score[0], m.score[2])] == [(4, 4), (4, want)]


class BodySpy(torch.nn.Module):
    """PRM body double: records the keyword arguments of each call; hidden states 1 ([B, T, 4])."""

    def __init__(self):
        super().__init__()
        self.calls: list[dict] = []

    def forward(self, **kw):
        self.calls.append(kw)
        return types.SimpleNamespace(last_hidden_state=torch.ones((*kw["input_ids"].shape, 4)))


def test_prm_model_forward_hands_the_body_its_arguments(monkeypatch):
    import transformers

    from sphere.rewards.prm_model import QwenProcessRewardModel

    monkeypatch.setattr(transformers, "AutoModel", _BodyDouble)
    m = QwenProcessRewardModel(types.SimpleNamespace(hidden_size=4))
    m.model = body = BodySpy()
    x = torch.tensor([[3, 1]])
    out = m(x)
    assert torch.equal(out, m.score(torch.ones((1, 2, 4)))) and out.shape == (1, 2, 2)
    # no cache unless asked for: a scoring pass must not build one
    assert body.calls == [{"input_ids": x, "attention_mask": None, "position_ids": None,
                           "past_key_values": None, "use_cache": False}]
    mask, pos, cache = torch.ones_like(x), torch.tensor([[4, 5]]), object()
    m(x, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
    assert body.calls[1] == {"input_ids": x, "attention_mask": mask, "position_ids": pos,
                             "past_key_values": cache, "use_cache": True}


def test_prm_model_loader_defaults_rotary_buffers_and_long_key_lists(random_prm, tmp_path, monkeypatch):
    import transformers

    from sphere.rewards.prm_model import QwenProcessRewardModel

    real, seen = transformers.AutoConfig.from_pretrained, []

    def config_spy(path, **kw):
        seen.append(kw)
        return real(path, **kw)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", config_spy)

    class PersistentRotaryPRM(QwenProcessRewardModel):
        """The PRM with its rotary frequencies in the state dict (as older transformers kept them)."""

        def __init__(self, config):
            super().__init__(config)
            self.model.rotary_emb._non_persistent_buffers_set.discard("inv_freq")

    d = tmp_path / "m"
    _save_prm(random_prm, d)
    QwenProcessRewardModel.from_pretrained(d)
    QwenProcessRewardModel.from_pretrained(d, trust_remote_code=True)
    assert seen == [{"trust_remote_code": False}, {"trust_remote_code": True}]
    got = PersistentRotaryPRM.from_pretrained(d)  # the checkpoint has no inv_freq: recomputed, not missing
    assert "model.rotary_emb.inv_freq" in got.state_dict()
    assert torch.equal(got.model.rotary_emb.inv_freq, random_prm.model.rotary_emb.inv_freq)
    drop = tuple(k for k in random_prm.state_dict() if k.startswith("model.layers.0."))[:6]
    extra = {f"value_head.{i}": torch.zeros(1) for i in range(6)}
    _save_prm(random_prm, tmp_path / "bad", drop=drop, extra=extra)
    with pytest.raises(ValueError) as e:
        QwenProcessRewardModel.from_pretrained(tmp_path / "bad")
    assert str(e.value) == (f"PRM checkpoint {tmp_path / 'bad'}: does not match the Qwen PRM layout "
                            f"(missing {list(drop[:5])}, unexpected {list(extra)[:5]})")


def test_group_rows_weighs_a_nested_group_against_the_whole():
    # a and b share 7 tokens, c shares 2 with them (min_shared 2): {a, b} costs 16 - 7 + 2 = 11 and c 3 + 2,
    # all three as one group 19 - 2 * 2 + 2 = 17 > 16: two groups
    a, b, c = [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 9], [1, 2, 9]
    assert group_rows([c, a, b], min_shared=2) == [(7, [1, 2]), (3, [0])]
    # sharing 6: {a, b} 14 - 6 + 2 = 10, c 5, the whole 17 - 4 + 2 = 15: a tie keeps one group
    a, b = [1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 8]
    assert group_rows([c, a, b], min_shared=2) == [(2, [1, 2, 0])]
    # two pairs sharing 3, all four sharing 2: the pairs cost 2 * (8 - 3 + 2) = 14, the whole 16 - 6 + 2 = 12
    rows = [[1, 2, 6, 8], [1, 2, 3, 4], [1, 2, 6, 7], [1, 2, 3, 5]]
    assert group_rows(rows, min_shared=2) == [(2, [1, 3, 2, 0])]


class CacheProbe(torch.nn.Module):
    """Model double for the kv form: when asked to use the cache it is handed, writes its input ids there as
    keys and values ([B, 1, T, 1]) and records what the cache gives back (a PrefixCache: the group's prefix
    followed by the new keys); logits 0 on the CPU."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.calls: list[dict] = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False):
        call = {"cache": type(past_key_values).__name__, "use_cache": use_cache}
        if isinstance(past_key_values, PrefixCache):
            call["rows"] = past_key_values.layers[0].rows
        if use_cache:
            k = input_ids[:, None, :, None].float()
            call["keys"] = past_key_values.update(k, k, 0)[0]
        self.calls.append(call)
        return torch.zeros((*input_ids.shape, 2))


def test_kv_form_fills_the_cache_then_reads_it():
    rows = [[5, 1, 7, 1], [5, 1, 8, 8, 1]]
    model = CacheProbe()
    got = probs_shared(model, rows, 1, device=torch.device("cpu"), pad_id=0, batch_size=4, mode="kv",
                       min_shared=2)
    assert got == [[0.5, 0.5], [0.5, 0.5]]
    pre, cont = model.calls
    assert (pre["cache"], pre["use_cache"], cont["cache"], cont["use_cache"]) == (
        "DynamicCache", True, "PrefixCache", True)
    assert pre["keys"][:, 0, :, 0].tolist() == [[5, 1]]
    assert cont["rows"].tolist() == [0, 0]
    assert cont["keys"][:, 0, :, 0].tolist() == [[5, 1, 8, 8, 1], [5, 1, 7, 1, 0]]
    model = CacheProbe()  # on another device, the rows' group indices go there too
    probs_shared(model, rows, 1, device=torch.device("meta"), pad_id=0, batch_size=4, mode="kv", min_shared=2)
    assert model.calls[1]["rows"].device == torch.device("meta")
