"""sphere/train/pairs_file.py: what `sphere train` accepts as a pairs file and how chat pairs become DPO text,
asserted value by value (the mutation run, scripts/mutation.sh / docs/mutation.md; each test fails on a
mutant the rest of the suite let through)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from sphere.train.pairs_file import _overlap, load_pairs, render_chat_pairs


def _write(tmp_path, *recs, raw=None):
    p = tmp_path / "pairs.jsonl"
    p.write_text(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return p


def _pair(**kw):
    return {"prompt": "Q", "chosen": "right", "rejected": "wrong", **kw}


def _chat(role="user", content="Q"):
    return [{"role": role, "content": content}]


def test_text_pairs_load_with_their_stages(tmp_path):
    p = _write(tmp_path, _pair(stage=1, extra=1), _pair(stage=3), _pair(), _pair(stage=3, chosen="r2"))
    ps = load_pairs(p)
    assert len(ps) == 4 and ps.path == p and ps.conversational is False
    assert ps.rows[0] == {"prompt": "Q", "chosen": "right", "rejected": "wrong"}
    assert ps.stages == Counter({3: 2, 1: 1, 0: 1})


def test_chat_pairs(tmp_path):
    rec = {"prompt": _chat(), "chosen": _chat("assistant", "a"), "rejected": _chat("assistant", "b")}
    ps = load_pairs(_write(tmp_path, rec, {**rec, "stage": 2}))
    assert ps.conversational is True and ps.rows[1]["chosen"] == _chat("assistant", "a")
    assert ps.stages == Counter({0: 1, 2: 1})


@pytest.mark.parametrize("recs, msg", [
    ([{"chosen": "a", "rejected": "b"}], ":1: missing field 'prompt'; a pair needs 'prompt', 'chosen' and 'rejected'"),
    ([{"prompt": "a", "rejected": "b"}], ":1: missing field 'chosen'"),
    ([{"prompt": "a", "chosen": "b"}], ":1: missing field 'rejected'"),
    ([_pair(chosen="  ")], ":1: field 'chosen' is an empty string; expected non-empty text"),
    ([_pair(rejected=3)], ":1: field 'rejected' must be a string or a list of {'role','content'} messages (got int)"),
    ([_pair(), _pair(chosen="same", rejected="same")], ":2: 'chosen' and 'rejected' are identical; a pair must differ"),
    ([_pair(stage=4)], ":1: field 'stage' must be one of [1, 2, 3] (got 4)"),
    ([_pair(stage=0)], ":1: field 'stage' must be one of [1, 2, 3] (got 0)"),
    ([_pair(stage=True)], ":1: field 'stage' must be one of [1, 2, 3] (got True)"),
    ([_pair(), _pair(prompt=_chat())],
     ":2: field 'prompt' is conversational but {p}:1 set the file to plain text; a pairs file must be all plain "
     "text or all conversational"),
    ([_pair(prompt=_chat(), chosen="a", rejected="b")],
     ":1: field 'chosen' is plain text but {p}:1 set the file to conversational"),
])
def test_bad_records_name_file_line_and_field(tmp_path, recs, msg):
    p = _write(tmp_path, *recs)
    with pytest.raises(ValueError) as e:
        load_pairs(p)
    assert str(e.value) == str(p) + msg.replace("{p}", str(p)) or (
        str(e.value).startswith(str(p) + msg.split("{p}")[0]) and msg.replace("{p}", str(p)) in str(e.value))


def test_blank_lines_keep_their_numbers_and_empty_files_are_refused(tmp_path):
    p = _write(tmp_path, raw="\n" + json.dumps(_pair()) + "\n\n  \n" + json.dumps(_pair(stage=9)) + "\n")
    with pytest.raises(ValueError, match=r"pairs\.jsonl:5: field 'stage'"):
        load_pairs(p)
    p = _write(tmp_path, raw="\n\n")
    with pytest.raises(ValueError) as e:
        load_pairs(p)
    assert str(e.value) == (f"{p}: no preference pairs (file is empty); `sphere generate` found no chosen/rejected "
                            "pairs, so there is nothing to train on")
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl: pairs file not found \(config key `pairs`"):
        load_pairs(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError):
        load_pairs(tmp_path)  # a directory is not a pairs file


# ------------------------------------------------------------------ message checks
@pytest.mark.parametrize("prompt, msg", [
    ([], ":1: field 'prompt' is an empty message list; expected at least one message"),
    (["hi"], ":1: field 'prompt' message 0 must be an object with string 'role' and 'content' (got 'hi')"),
    ([{"role": "user", "content": "Q"}, {"role": 1, "content": "Q"}],
     ":1: field 'prompt' message 1 must be an object with string 'role' and 'content' (got {'role': 1, "
     "'content': 'Q'})"),
    ([{"role": "user"}],
     ":1: field 'prompt' message 0 must be an object with string 'role' and 'content' (got {'role': 'user'})"),
    ([{"role": "user", "content": None}],
     ":1: field 'prompt' message 0 must be an object with string 'role' and 'content' (got {'role': 'user', "
     "'content': None})"),
    ([{"content": "Q"}],
     ":1: field 'prompt' message 0 must be an object with string 'role' and 'content' (got {'content': 'Q'})"),
])
def test_bad_messages_name_the_field_and_the_message(tmp_path, prompt, msg):
    rec = {"prompt": prompt, "chosen": _chat("assistant", "a"), "rejected": _chat("assistant", "b")}
    p = _write(tmp_path, rec)
    with pytest.raises(ValueError) as e:
        load_pairs(p)
    assert str(e.value) == str(p) + msg


def test_long_messages_are_cut_at_80_characters_in_the_error(tmp_path):
    rec = {"prompt": _chat(), "chosen": [["a" * 100]], "rejected": _chat("assistant", "b")}
    p = _write(tmp_path, rec)
    with pytest.raises(ValueError) as e:
        load_pairs(p)
    got = repr(["a" * 100])[:80]
    assert len(got) == 80
    assert str(e.value) == (f"{p}:1: field 'chosen' message 0 must be an object with string 'role' and 'content' "
                            f"(got {got})")


# ------------------------------------------------------------------ rendering conversational pairs
_PROBE = "<<sphere-completion-probe>>"


class FakeChatTokenizer:
    """Test double for a HF tokenizer with a chat template (character-level ids, bos id 1).

    Renders ``bos + "<|role|>content\\n"`` per prompt message and ``"<|assistant|>" + content + eos +
    after_eos`` per assistant message; the generation prompt is ``"<|assistant|>" + gen_suffix``.
    mode: ``keep`` (the assistant text as given), ``drop`` (assistant turns left out, as some templates do),
    ``r1`` (only the text after the last ``</think>`` of an assistant turn, like DeepSeek-R1's template).
    ``auto_bos``: calling the tokenizer prepends the BOS id, as Llama tokenizers do."""

    bos_token_id = 1

    def __init__(self, mode="keep", *, bos="<s>", eos="</s>", template_bos=None, after_eos="\n", gen_suffix="",
                 auto_bos=False, turn_end=None, user_fmt="<|{role}|>{content}\n"):
        self.mode, self.bos_token, self.eos_token = mode, bos, eos
        self.template_bos = bos if template_bos is None else template_bos
        self.after_eos, self.gen_suffix, self.auto_bos = after_eos, gen_suffix, auto_bos
        self.turn_end = eos if turn_end is None else turn_end
        self.user_fmt = user_fmt
        self.calls: list[tuple] = []

    def __call__(self, text):
        return {"input_ids": ([1] if self.auto_bos else []) + [ord(c) + 10 for c in text]}

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
        self.calls.append((len(messages), add_generation_prompt))
        out = self.template_bos or ""
        for m in messages:
            role, content = m["role"], m["content"]
            if role == "assistant":
                if self.mode == "drop":
                    continue
                if self.mode == "r1":
                    content = content.split("</think>")[-1]
                out += "<|assistant|>" + content + (self.turn_end or "") + self.after_eos
            else:
                out += self.user_fmt.format(role=role, content=content)
        if add_generation_prompt:
            out += "<|assistant|>" + self.gen_suffix
        return [ord(c) for c in out] if tokenize else out


def _cpair(prompt=None, chosen="good", rejected="bad", **kw):
    return {"prompt": prompt or _chat(), "chosen": _chat("assistant", chosen),
            "rejected": _chat("assistant", rejected), **kw}


def test_render_keeps_the_template_prompt_and_appends_the_end_of_turn():
    tok = FakeChatTokenizer()
    rows = [_cpair([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], stage=2, problem_id="p"),
            _cpair(chosen="yes", rejected="no")]
    before = [dict(r) for r in rows]
    out, stats = render_chat_pairs(rows, tok)
    assert out == [
        {"prompt": "<s><|system|>S\n<|user|>Q\n<|assistant|>", "chosen": "good</s>", "rejected": "bad</s>",
         "stage": 2, "problem_id": "p"},
        {"prompt": "<s><|user|>Q\n<|assistant|>", "chosen": "yes</s>", "rejected": "no</s>"},
    ]
    assert stats == {"template_rewrites": 0}
    assert rows == before  # the input rows are not changed
    # per pair: generation prompt, the probe, TRL's rendering of the chosen turn
    assert tok.calls == [(2, True), (3, False), (3, False), (1, True), (2, False), (2, False)]


def test_render_without_a_newline_after_eos_and_with_eos_inside_the_text():
    tok = FakeChatTokenizer(after_eos="")
    out, stats = render_chat_pairs([_cpair(chosen="a</s>b", rejected="  b ")], tok)
    assert out == [{"prompt": "<s><|user|>Q\n<|assistant|>", "chosen": "a</s>b</s>", "rejected": "  b </s>"}]
    assert stats == {"template_rewrites": 0}


def test_render_keeps_the_turn_end_when_it_is_not_the_eos_token():
    # no eos token: the end of turn is kept as the template writes it, trailing newline included
    out, stats = render_chat_pairs([_cpair()], FakeChatTokenizer(eos=None, turn_end="<|end|>"))
    assert out == [{"prompt": "<s><|user|>Q\n<|assistant|>", "chosen": "good<|end|>\n", "rejected": "bad<|end|>\n"}]
    assert stats == {"template_rewrites": 0}
    # an eos token the turn does not end with: kept as well
    out, _ = render_chat_pairs([_cpair()], FakeChatTokenizer(eos="<eot>", turn_end="</s>"))
    assert out[0]["chosen"] == "good</s>\n" and out[0]["rejected"] == "bad</s>\n"
    # the turn ends with eos and trailing blanks: only those go
    out, _ = render_chat_pairs([_cpair()], FakeChatTokenizer(after_eos=" \n\n"))
    assert out[0]["chosen"] == "good</s>"
    # eos inside the turn end but not at its end: kept whole
    out, _ = render_chat_pairs([_cpair()], FakeChatTokenizer(turn_end="</s>x", after_eos="\n"))
    assert out[0]["chosen"] == "good</s>x\n"


def test_render_finds_the_probe_of_the_assistant_turn_even_if_a_prompt_quotes_it():
    out, stats = render_chat_pairs([_cpair(_chat(content="say " + _PROBE))], FakeChatTokenizer())
    assert out == [{"prompt": f"<s><|user|>say {_PROBE}\n<|assistant|>", "chosen": "good</s>",
                    "rejected": "bad</s>"}]
    assert stats == {"template_rewrites": 0}


def test_render_a_template_that_starts_with_the_assistant_text():
    # nothing before the assistant turn: the probe is found at position 0
    tok = FakeChatTokenizer(bos=None, template_bos="", user_fmt="")
    tok.apply_chat_template_orig = tok.apply_chat_template

    def tmpl(messages, add_generation_prompt=False, tokenize=True):
        s = tok.apply_chat_template_orig(messages, add_generation_prompt, tokenize)
        return s.replace("<|assistant|>", "")

    tok.apply_chat_template = tmpl
    out, stats = render_chat_pairs([_cpair()], tok)
    assert out == [{"prompt": "", "chosen": "good</s>", "rejected": "bad</s>"}]
    assert stats == {"template_rewrites": 0}


def test_render_refuses_a_template_that_drops_the_assistant_turn():
    with pytest.raises(ValueError) as e:
        render_chat_pairs([_cpair()], FakeChatTokenizer("drop"))
    assert str(e.value) == ("pairs: pair 0: the chat template drops the assistant turn; cannot render the "
                            "completion (use plain-text pairs for this model)")
    with pytest.raises(ValueError) as e:
        render_chat_pairs([_cpair()], FakeChatTokenizer("drop"), source="run/pairs.jsonl")
    assert str(e.value).startswith("run/pairs.jsonl: pair 0: the chat template drops the assistant turn;")


@pytest.mark.parametrize("key, ms, roles", [
    ("chosen", [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
     "['assistant', 'assistant']"),
    ("chosen", [{"role": "user", "content": "a"}], "['user']"),
    ("rejected", [], "[]"),
    ("rejected", [{"role": "system", "content": "a"}], "['system']"),
])
def test_render_refuses_completions_that_are_not_one_assistant_message(key, ms, roles):
    rows = [_cpair(), {**_cpair(), key: ms}]
    with pytest.raises(ValueError) as e:
        render_chat_pairs(rows, FakeChatTokenizer(), source="f.jsonl")
    assert str(e.value) == f"f.jsonl: pair 1: field {key!r} must be one assistant message (got roles {roles})"
    with pytest.raises(ValueError) as e:
        render_chat_pairs(rows[1:], FakeChatTokenizer())
    assert str(e.value).startswith(f"pairs: pair 0: field {key!r} must be one assistant message")


def test_render_r1_template_rewrites_are_counted_and_the_think_prefix_is_not_doubled():
    tok = FakeChatTokenizer("r1", bos="<｜begin｜>", eos="<｜end｜>", after_eos="", gen_suffix="<think>\n")
    rows = [
        _cpair(chosen="<think>\nr1\n</think>\n\nA1", rejected="<think>\nr2\n</think>\n\nB1"),  # both rewritten
        _cpair(chosen="<think>\nplain", rejected="<think>\nx</think>B2"),  # only the rejected one rewritten
        _cpair(chosen="no think", rejected="other"),  # neither (no overlap with the prompt's <think>\n)
        _cpair(chosen="k>\nfoo", rejected="<th"),  # a partial overlap with the prompt's end; none
    ]
    out, stats = render_chat_pairs(rows, tok)
    head = "<｜begin｜><|user|>Q\n<|assistant|><think>\n"
    assert out == [
        {"prompt": head, "chosen": "r1\n</think>\n\nA1<｜end｜>", "rejected": "r2\n</think>\n\nB1<｜end｜>"},
        {"prompt": head, "chosen": "plain<｜end｜>", "rejected": "x</think>B2<｜end｜>"},
        {"prompt": head, "chosen": "no think<｜end｜>", "rejected": "other<｜end｜>"},
        {"prompt": head, "chosen": "foo<｜end｜>", "rejected": "<th<｜end｜>"},
    ]
    # TRL would have trained pair 0 on "\n\nA1" after a prompt without "<think>\n", and pair 3 on "k>\nfoo"
    assert stats == {"template_rewrites": 2}


class _UncallableChatTokenizer(FakeChatTokenizer):
    def __call__(self, text):
        raise AssertionError("the tokenizer is only asked about its BOS when it has one")


def test_render_strips_a_bos_the_tokenizer_adds_by_itself():
    tok = FakeChatTokenizer(auto_bos=True)
    out, stats = render_chat_pairs([_cpair()], tok)
    assert out == [{"prompt": "<|user|>Q\n<|assistant|>", "chosen": "good</s>", "rejected": "bad</s>"}]
    assert stats == {"template_rewrites": 0}
    # an auto-BOS tokenizer whose template does not write the BOS: nothing to strip
    out, _ = render_chat_pairs([_cpair()], FakeChatTokenizer(auto_bos=True, template_bos="[S]"))
    assert out[0]["prompt"] == "[S]<|user|>Q\n<|assistant|>"
    # the tokenizer's first id is not the BOS id: the template's BOS stays
    tok = FakeChatTokenizer(auto_bos=True)
    tok.bos_token_id = 2
    out, _ = render_chat_pairs([_cpair()], tok)
    assert out[0]["prompt"] == "<s><|user|>Q\n<|assistant|>"
    # no BOS token at all: the tokenizer is not asked, the prompt is the template's
    out, _ = render_chat_pairs([_cpair()], _UncallableChatTokenizer(bos=None, template_bos="<s>", auto_bos=True))
    assert out[0]["prompt"] == "<s><|user|>Q\n<|assistant|>"
    out, _ = render_chat_pairs([_cpair()], FakeChatTokenizer(bos="", template_bos="<s>", auto_bos=True))
    assert out[0]["prompt"] == "<s><|user|>Q\n<|assistant|>"


def test_render_no_pairs():
    assert render_chat_pairs([], FakeChatTokenizer()) == ([], {"template_rewrites": 0})


@pytest.mark.parametrize("head, text, n", [
    ("abc<think>\n", "<think>\nxyz", 8),
    ("aaa", "aaaa", 3),
    ("abc", "abc", 3),
    ("xab", "abab", 2),
    ("xa", "ab", 1),
    ("ab", "", 0),
    ("", "ab", 0),
    ("abc", "xyz", 0),
    ("abcd", "cd", 2),
])
def test_overlap_is_the_longest_suffix_of_the_head_the_text_starts_with(head, text, n):
    assert _overlap(head, text) == n


def test_line_numbers_are_counted_on_bytes_so_a_bad_byte_is_reported_by_the_reader(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_bytes(json.dumps(_pair()).encode() + b"\n\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(ValueError) as e:
        load_pairs(p)
    assert str(e.value) == f"{p}:3: not UTF-8 (invalid start byte at byte 12)"
