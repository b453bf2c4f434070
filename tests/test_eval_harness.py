"""The evaluation harness with Fake* backends: batching, outputs, resume, sampling metrics, replay."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sphere.backends.base import Candidate, SamplingParams
from sphere.backends.replay import ReplayBackend
from sphere.evaluation import EvalSettings, run_eval
from sphere.io import read_jsonl_tolerant

FAMILY = {"name": "fake", "system": "", "instruction": "", "template": "Q: {problem}\nA:",
          "assistant_prefix": "", "step_delimiter": "\n\n", "use_chat_template": False,
          "reflection": "{problem}"}


class FakeTokenizer:
    """Characters <-> code points; no chat template."""

    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


class FakeBackend:
    """Answers from a table problem -> list of completions (one per sample); records every call;
    raises on call number ``fail_on_call`` (1-based) to simulate a crash mid-benchmark."""

    name = "fake"

    def __init__(self, answers: dict[str, list[str]], fail_on_call: int | None = None):
        self.tokenizer = FakeTokenizer()
        self.answers = answers
        self.fail_on_call = fail_on_call
        self.calls: list[list[str]] = []  # problems sent, per call
        self.params: list[SamplingParams] = []

    def complete(self, prompts, params):
        if self.fail_on_call is not None and len(self.calls) + 1 == self.fail_on_call:
            raise RuntimeError("FakeBackend: simulated crash")
        texts = [self.tokenizer.decode(p) for p in prompts]
        problems = [t[len("Q: "):-len("\nA:")] for t in texts]
        self.calls.append(problems)
        self.params.append(params)
        out = []
        for prob in problems:
            comps = self.answers[prob]
            out.append([Candidate(text=c, token_ids=list(range(len(c))), logprob_sum=0.0, logprob_mean=0.0,
                                  finish="answer" if "boxed" in c else "eos") for c in comps[: params.n]])
        return out

    def next_steps(self, prompts, params):  # pragma: no cover - not used by eval
        raise NotImplementedError

    def score(self, prompts, continuations):  # pragma: no cover - not used by eval
        raise NotImplementedError

    def stats(self):
        return {"calls": len(self.calls)}

    def close(self):
        pass


def _problems(tmp_path: Path, n: int = 6) -> tuple[Path, dict[str, list[str]]]:
    """n problems `a+b`; the fake model is right on even ids, wrong on odd ones."""
    path = tmp_path / "toy.jsonl"
    answers = {}
    with open(path, "w") as f:
        for i in range(n):
            prob = f"What is {i}+{i + 1}?"
            f.write(json.dumps({"id": f"t{i}", "problem": prob, "answer": str(2 * i + 1)}) + "\n")
            answers[prob] = [f"{i}+{i + 1} = {2 * i + 1 + (i % 2)}.\n\n\\boxed{{{2 * i + 1 + (i % 2)}}}"]
    return path, answers


def _bench_entries(res: dict) -> dict:
    return {k: v for k, v in res.items() if k != "meta"}


def test_one_batched_call_and_output_files(tmp_path):
    path, answers = _problems(tmp_path)
    fb = FakeBackend(answers)
    res = run_eval(fb, [str(path)], tmp_path / "run", family_cfg=FAMILY, model_name="fake-model",
                   progress=False)
    assert len(fb.calls) == 1 and len(fb.calls[0]) == 6  # the whole benchmark in one call
    assert fb.params[0].temperature == 0.0 and fb.params[0].n == 1
    e = res["toy"]
    assert (e["n"], e["correct"], e["accuracy"]) == (6, 3, 0.5)
    assert e["ci95_low"] < 0.5 < e["ci95_high"]
    out = tmp_path / "run" / "eval"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["toy"] == e and on_disk["meta"]["model"] == "fake-model"
    assert on_disk["meta"]["backend"]["name"] == "fake"
    assert on_disk["meta"]["checker"]["math_verify"] and on_disk["meta"]["prompt"]["family"] == "fake"
    recs = read_jsonl_tolerant(out / "toy.jsonl")
    assert [r["id"] for r in recs] == [f"t{i}" for i in range(6)]
    assert [r["verdict"] for r in recs] == [i % 2 == 0 for i in range(6)]
    assert recs[1]["extracted"] == ["4"] and recs[1]["gold"] == "3"
    assert "\\boxed{4}" in recs[1]["completions"][0]
    md = (out / "results.md").read_text()
    assert "| toy | 6 | 3 | 50.0 |" in md


def test_batch_size_splits_calls(tmp_path):
    path, answers = _problems(tmp_path, 5)
    fb = FakeBackend(answers)
    run_eval(fb, [str(path)], tmp_path / "run", family_cfg=FAMILY, settings=EvalSettings(batch_size=2),
             progress=False)
    assert [len(c) for c in fb.calls] == [2, 2, 1]


def test_interrupted_run_resumes_without_regenerating(tmp_path):
    path, answers = _problems(tmp_path, 6)
    settings = EvalSettings(batch_size=2)
    ref = run_eval(FakeBackend(answers), [str(path)], tmp_path / "uninterrupted", family_cfg=FAMILY,
                   settings=settings, progress=False)

    crashing = FakeBackend(answers, fail_on_call=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_eval(crashing, [str(path)], tmp_path / "run", family_cfg=FAMILY, settings=settings,
                 progress=False)
    saved = read_jsonl_tolerant(tmp_path / "run" / "eval" / "toy.jsonl")
    assert [r["id"] for r in saved] == ["t0", "t1"]
    # a kill -9 mid-write leaves a torn last line: it must be ignored, not break the resume
    with open(tmp_path / "run" / "eval" / "toy.jsonl", "a") as f:
        f.write('{"id": "t2", "gold": "5", "verd')

    again = FakeBackend(answers)
    res = run_eval(again, [str(path)], tmp_path / "run", family_cfg=FAMILY, settings=settings, progress=False)
    sent = [p for call in again.calls for p in call]
    assert sent == ["What is 2+3?", "What is 3+4?", "What is 4+5?", "What is 5+6?"]  # t0, t1 not resent
    assert _bench_entries(res) == _bench_entries(ref)
    assert res["meta"]["runs"]["toy"]["reused"] == 2 and res["meta"]["runs"]["toy"]["generated"] == 4
    recs = read_jsonl_tolerant(tmp_path / "run" / "eval" / "toy.jsonl")
    assert sorted(r["id"] for r in recs) == [f"t{i}" for i in range(6)]

    # a complete rerun generates nothing
    idle = FakeBackend(answers)
    assert _bench_entries(run_eval(idle, [str(path)], tmp_path / "run", family_cfg=FAMILY, settings=settings,
                                   progress=False)) == _bench_entries(ref)
    assert idle.calls == []


def test_resume_refuses_records_from_other_settings(tmp_path):
    path, answers = _problems(tmp_path, 3)
    run_eval(FakeBackend(answers), [str(path)], tmp_path / "run", family_cfg=FAMILY, progress=False)
    with pytest.raises(RuntimeError, match="different settings.*resume=fresh"):
        run_eval(FakeBackend(answers), [str(path)], tmp_path / "run", family_cfg=FAMILY,
                 settings=EvalSettings(max_tokens=7), progress=False)
    fb = FakeBackend(answers)
    run_eval(fb, [str(path)], tmp_path / "run", family_cfg=FAMILY,
             settings=EvalSettings(max_tokens=7, resume=False),
             progress=False)
    assert len(fb.calls[0]) == 3


def test_sampling_reports_pass_at_k_and_maj_at_k(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"id": "a", "problem": "p1", "answer": "7"}) + "\n"
                    + json.dumps({"id": "b", "problem": "p2", "answer": "1"}) + "\n")
    answers = {"p1": ["\\boxed{7}", "\\boxed{8}", "\\boxed{7}", "\\boxed{9}"],  # 2/4 right, majority 7: right
               "p2": ["\\boxed{2}", "\\boxed{2}", "\\boxed{1}", "no answer"]}  # 1/4 right, majority 2: wrong
    fb = FakeBackend(answers)
    res = run_eval(fb, [str(path)], tmp_path / "run", family_cfg=FAMILY,
                   settings=EvalSettings(n=4, temperature=0.7), progress=False)
    assert fb.params[0].n == 4 and fb.params[0].temperature == 0.7
    e = res["s"]
    assert e["samples"] == 4 and e["correct"] == 1  # sample 0: right on a, wrong on b
    assert e["pass@1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert e["pass@4"] == 1.0
    assert e["pass@2"] == pytest.approx(((1 - 1 / 6) + (1 - 3 / 6)) / 2)
    assert e["maj@4"] == 0.5
    rec = read_jsonl_tolerant(tmp_path / "run" / "eval" / "s.jsonl")[1]
    assert rec["maj_answer"] == "2" and rec["maj_verdict"] is False and rec["extracted"][3] is None


def test_backend_returning_wrong_shapes_is_an_error(tmp_path):
    path, answers = _problems(tmp_path, 2)

    class FakeShortBackend(FakeBackend):
        def complete(self, prompts, params):
            return super().complete(prompts, params)[:1]

    with pytest.raises(RuntimeError, match="returned 1 lists for 2 prompts"):
        run_eval(FakeShortBackend(answers), [str(path)], tmp_path / "run", family_cfg=FAMILY, progress=False)


# ------------------------------------------------------------------------------------------- replay
def test_replay_file_grades_stored_completions(tmp_path):
    path, _ = _problems(tmp_path, 4)
    comp = tmp_path / "other_system.jsonl"
    comp.write_text("\n".join(json.dumps(r) for r in [
        {"id": "t0", "completion": "so \\boxed{1}"},
        {"id": "t1", "completion": "so \\boxed{4}"},
        {"id": "t2", "completion": "The answer is 5", "benchmark": "toy"},
        {"id": "t3", "completion": "\\boxed{7}", "benchmark": "elsewhere"},  # other benchmark: not used
    ]) + "\n")
    res = run_eval(ReplayBackend.from_file(comp), [str(path)], tmp_path / "run", progress=False)
    assert (res["toy"]["n"], res["toy"]["correct"], res["toy"]["skipped"]) == (3, 2, 1)
    res = run_eval(ReplayBackend.from_file(comp, missing="empty"), [str(path)], tmp_path / "run2",
                   progress=False)
    assert (res["toy"]["n"], res["toy"]["correct"], res["toy"]["no_answer"]) == (4, 2, 1)
    with pytest.raises(KeyError, match="no completion for toy problem 't3'"):
        run_eval(ReplayBackend.from_file(comp, missing="error"), [str(path)], tmp_path / "run3",
                 progress=False)


def test_replay_needs_enough_samples(tmp_path):
    path, _ = _problems(tmp_path, 1)
    rb = ReplayBackend({(None, "t0"): ["\\boxed{1}", "\\boxed{2}"]})
    two = EvalSettings(n=2, temperature=1.0)
    res = run_eval(rb, [str(path)], tmp_path / "run", settings=two, progress=False)
    assert res["toy"]["pass@2"] == 1.0 and res["toy"]["pass@1"] == 0.5
    with pytest.raises(ValueError, match="has 2 completion"):
        run_eval(rb, [str(path)], tmp_path / "run2", settings=EvalSettings(n=3, temperature=1.0),
                 progress=False)


@pytest.mark.parametrize("line, match", [
    ('{"id": "a"}', "needs 'completion'"),
    ('{"id": "a", "completion": 3}', "'completion' must be a string"),
    ('{"id": "a", "completions": []}', "non-empty list of strings"),
    ('{"completion": "x"}', r"r.jsonl:1: field 'id'"),
])
def test_replay_file_errors_name_the_record(tmp_path, line, match):
    p = tmp_path / "r.jsonl"
    p.write_text(line + "\n")
    with pytest.raises(ValueError, match=match):
        ReplayBackend.from_file(p)


def test_replay_without_inputs_says_what_to_set():
    with pytest.raises(ValueError, match="replay.path=FILE.jsonl .* or replay.references=true"):
        ReplayBackend()
    with pytest.raises(TypeError, match="complete_records"):
        ReplayBackend(references=True).complete([[1]], SamplingParams())


def test_replay_of_reference_solutions_scores_at_least_99_percent(tmp_path, capsys):
    """Issue #5, must-show 2: the benchmarks' own reference solutions, graded by the checker."""
    res = run_eval(ReplayBackend(references=True), ["math500", "gsm8k"], tmp_path / "run", progress=False)
    with capsys.disabled():
        for k in ("math500", "gsm8k"):
            e = res[k]
            print(f"\nreplay references {k}: {e['correct']}/{e['n']} = {100 * e['accuracy']:.2f}% "
                  f"(95% CI {100 * e['ci95_low']:.1f}-{100 * e['ci95_high']:.1f})")
    assert res["math500"]["n"] == 500 and res["gsm8k"]["n"] == 1319
    assert res["math500"]["accuracy"] >= 0.99
    assert res["gsm8k"]["accuracy"] >= 0.99


def test_cli_replay_writes_results(tmp_path):
    path, _ = _problems(tmp_path, 3)
    comp = tmp_path / "c.jsonl"
    comp.write_text("".join(json.dumps({"id": f"t{i}", "completion": f"\\boxed{{{2 * i + 1}}}"}) + "\n"
                            for i in range(3)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "sphere.cli", "eval", "backend=replay", f"replay.path={comp}",
           f"benchmarks=[{path}]", f"hydra.run.dir={tmp_path / 'out'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "eval" / "results.json").read_text())
    assert (res["toy"]["n"], res["toy"]["correct"]) == (3, 3)
    assert res["meta"]["backend"]["name"] == "replay"
    assert '"eval/accuracy": {"toy": 1.0}' in proc.stdout


def test_prompts_longer_than_the_context_window_are_graded_wrong_not_fatal(tmp_path, capsys):
    path, answers = _problems(tmp_path, 3)
    long_prob = "What is " + "9" * 50 + "?"
    with open(path, "a") as f:
        f.write(json.dumps({"id": "long", "problem": long_prob, "answer": "1"}) + "\n")
    fb = FakeBackend(answers)
    fb.max_model_len = 40  # "Q: What is 2+3?\nA:" fits, the long one does not
    res = run_eval(fb, [str(path)], tmp_path / "run", family_cfg=FAMILY, progress=False)
    assert fb.calls == [["What is 0+1?", "What is 1+2?", "What is 2+3?"]]
    e = res["toy"]
    assert (e["n"], e["correct"], e["overflow"]) == (4, 2, 1)
    rec = read_jsonl_tolerant(tmp_path / "run" / "eval" / "toy.jsonl")[-1]
    assert rec["id"] == "long" and rec["finish"] == ["overflow"] and rec["verdict"] is False
    # said, not silent (issue #29): one console line and a note in results.md
    err = capsys.readouterr().err
    assert "toy: 1 of 4 prompt(s) longer than the context window (40 tokens)" in err and "counted wrong" in err
    md = (tmp_path / "run" / "eval" / "results.md").read_text()
    assert "Counted wrong, not generated (the prompt alone is longer than the model's context window): toy: 1 of 4" in md


def test_progress_bar_forced_on_does_not_change_results(tmp_path, capsys):
    path, answers = _problems(tmp_path, 4)
    quiet = run_eval(FakeBackend(answers), [str(path)], tmp_path / "a", family_cfg=FAMILY, progress=False)
    shown = run_eval(FakeBackend(answers), [str(path)], tmp_path / "b", family_cfg=FAMILY, progress=True)
    assert _bench_entries(quiet) == _bench_entries(shown)
    assert "eval toy" in capsys.readouterr().err


def test_make_backend_dispatches_replay():
    from omegaconf import OmegaConf

    from sphere.backends import make_backend

    cfg = OmegaConf.create({"backend": {"name": "replay"}, "replay": {"references": True, "path": None,
                                                                      "missing": "error"}})
    be = make_backend(cfg, None)
    assert isinstance(be, ReplayBackend) and be.references and be.missing == "error"


def test_markdown_table_columns_and_reference_section():
    from sphere.evaluation.report import load_reference_results, markdown_table

    results = {
        "math500": {"title": "MATH-500", "n": 10, "correct": 3, "accuracy": 0.3, "ci95_low": 0.1,
                    "ci95_high": 0.6, "pass@1": 0.25, "pass@4": 0.5, "maj@4": 0.3, "maj@4_correct": 3},
        "meta": {"model": "m", "backend": {"name": "fake"}, "sampling": {"n": 4, "temperature": 0.8}},
    }
    md = markdown_table(results, load_reference_results())
    assert "| benchmark | n | correct | accuracy % | 95% CI (Wilson) | pass@1 % | pass@4 % | maj@4 % |" in md
    assert "| MATH-500 | 10 | 3 | 30.0 | 10.0–60.0 | 25.0 | 50.0 | 30.0 |" in md
    assert "Reported elsewhere (NOT measured here)" in md and "https://arxiv.org/abs/2409.12122" in md
    assert "GSM8K (test, 1,319)" not in md  # references are shown only next to benchmarks of the run


def test_reference_file_entries_all_have_sources():
    from sphere.evaluation.report import load_reference_results

    refs = load_reference_results()
    assert refs and all(r["url"].startswith("https://") and r["source"] for r in refs)
