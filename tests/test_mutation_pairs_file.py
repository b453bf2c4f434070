"""sphere/train/pairs_file.py: what `sphere train` accepts as a pairs file and how chat pairs become DPO text,
asserted value by value (the mutation run, scripts/mutation.sh / docs/mutation.md; each test fails on a
mutant the rest of the suite let through)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from sphere.train.pairs_file import load_pairs, render_chat_pairs


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
