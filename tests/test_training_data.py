"""The paper's training pools (sphere/data/training/): NuminaMath-CoT / MetaMathQA gold extraction, seeded
sampling with a source mix and a manifest, n-gram decontamination against the six evaluation benchmarks,
the `data.problems` hooks (training, numina:PATH, metamath:PATH, fallback) and the paper dry run.

Fixtures are in the datasets' exact schemas: tests/fixtures/numina_mini.jsonl (source, problem, solution,
messages: NuminaMath-CoT) and tests/fixtures/metamath_mini.json (a JSON list of query, response, type,
original_question: MetaMathQA-395K.json). Benchmarks are the shipped data/benchmarks copies."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sphere.data import training as T

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"
NUMINA = FIX / "numina_mini.jsonl"
METAMATH = FIX / "metamath_mini.json"
DATA = ROOT / "data" / "benchmarks"
POOLS = {"numina": str(NUMINA), "metamath": str(METAMATH)}


@pytest.fixture(scope="module")
def decon():
    return T.load_decontaminator(DATA)


def _bench(name: str) -> list[dict]:
    with open(DATA / name / "test.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------- fixtures
def test_fixtures_have_the_exact_upstream_schemas():
    rows = [json.loads(line) for line in NUMINA.read_text(encoding="utf-8").splitlines()]
    assert rows and all(set(r) == {"source", "problem", "solution", "messages"} for r in rows)
    assert all(r["messages"] == [{"content": r["problem"], "role": "user"},
                                 {"content": r["solution"], "role": "assistant"}] for r in rows)
    meta = json.loads(METAMATH.read_text(encoding="utf-8"))
    assert isinstance(meta, list) and meta
    assert all(set(r) == {"query", "response", "type", "original_question"} for r in meta)


# ---------------------------------------------------------------------------------------------- gold answers
@pytest.mark.parametrize("solution,gold", [
    ("so the answer is $\\boxed{100}$.", "100"),
    ("hence $\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),  # nested braces
    ("$\\boxed{\\{x \\mid -2 < x < \\sqrt{4}\\}}$", "\\{x \\mid -2 < x < \\sqrt{4}\\}"),  # escaped + nested
    ("(1) $\\boxed{3}$. (2) $\\boxed{7}$.", "7"),  # several: the last
    ("first \\fbox{2}, then \\boxed{5}, finally \\fbox{9}", "9"),
    ("we get $x = \\boxed 3$.", "3"),
    ("a proof without any final answer.", None),
    ("$\\boxed{23}$ ... and $\\boxed{29 is the next", None),  # last box unbalanced: no fallback to 23
    ("$\\boxed{}$", None),
    (None, None),
])
def test_numina_gold_is_the_last_balanced_box(solution, gold):
    assert T.numina_gold(solution) == gold


@pytest.mark.parametrize("response,gold", [
    ("Tom has 3 + 5 = 8 apples.\n#### 8\nThe answer is: 8", "8"),
    ("... = \\frac{3}{4}$.\nThe answer is: \\frac{3}{4}", "\\frac{3}{4}"),
    ("The answer is: 9 is not it.\nRechecking, the sum is 14.\nThe answer is: 14", "14"),  # the last one
    ("$\\dbinom{8}{4} = 70$.\nThe answer is:   $70$  ", "70"),
    ("The answer is: 12.", "12"),
    ("2X = 10 so X = 5.\nThe answer is:", None),  # nothing after the marker
    ("The train travels 60 * 3 = 180 miles.", None),  # no marker
    ("the answer is: 5", None),  # MetaMathQA's marker is case-exact
])
def test_metamath_gold_after_the_last_marker(response, gold):
    assert T.metamath_gold(response) == gold


# ---------------------------------------------------------------------------------------------- whole pools
def test_all_rows_counts_gold_and_contamination(decon):
    both = {"numina": 1, "metamath": 1}
    probs, man = T.sample_training(POOLS, n=None, mix=both, seed=0, decontaminator=decon)
    by_id = {p["id"]: p for p in probs}
    nm, mm = man["pools"]["numina"], man["pools"]["metamath"]
    assert (nm["rows"], nm["examined"], nm["dropped_no_answer"], nm["dropped_contaminated"],
            nm["dropped_duplicate"], nm["sampled"]) == (14, 14, 2, 3, 1, 8)
    assert (mm["rows"], mm["examined"], mm["dropped_no_answer"], mm["dropped_contaminated"],
            mm["dropped_duplicate"], mm["sampled"]) == (8, 8, 2, 1, 0, 5)
    assert len(probs) == man["n"] == 13 and sorted(man["ids"]) == sorted(by_id)
    # gold answers and provenance
    assert by_id["numina-1"]["answer"] == "\\frac{1}{2}" and by_id["numina-2"]["answer"] == "7"
    assert by_id["numina-13"]["answer"] == "3" and by_id["numina-2"]["n_boxed"] == 2
    assert by_id["metamath-3"]["answer"] == "14" and by_id["metamath-5"]["answer"] == "70"
    for bad in ("numina-3", "numina-5", "metamath-2", "metamath-6"):  # no gold answer
        assert bad not in by_id
    assert len({"numina-0", "numina-11"} & set(by_id)) == 1  # the same problem twice: one kept
    p = by_id["numina-1"]
    assert {"id", "problem", "answer", "solution", "source", "origin", "row"} <= set(p)
    assert p["source"] == "NuminaMath-CoT" and p["origin"] == "cn_k12" and p["row"] == 1
    m = by_id["metamath-1"]
    assert m["source"] == "MetaMathQA" and m["origin"] == "MATH_AnsAug" and "original_question" in m
    # every problem is a valid sphere problem record
    assert all(isinstance(p[k], str) and p[k] for p in probs for k in ("id", "problem", "answer"))
    # decontamination: planted copies, with the benchmark problem they copy
    dec = man["decontamination"]
    got = {d["id"]: (d["benchmark"], d["benchmark_id"]) for d in dec["dropped"]}
    assert got == {"numina-6": ("math500", "test/prealgebra/1622.json"),
                   "numina-7": ("aime24", "aime2024-I-1"),
                   "numina-8": ("math500", "test/prealgebra/1302.json"),  # "Simplify $\sqrt{242}$." inside
                   "metamath-4": ("gsm8k", "gsm8k-test-0")}
    assert dec["dropped_per_benchmark"] == {"math500": 2, "gsm8k": 1, "aime24": 1, "aime25": 0, "amc23": 0,
                                            "olympiadbench": 0}
    assert dec["enabled"] and dec["ngram"] == 13
    assert dec["benchmarks"] == {"math500": 500, "gsm8k": 1319, "aime24": 30, "aime25": 30, "amc23": 40,
                                 "olympiadbench": 675}


def test_decontamination_off_keeps_the_planted_copies():
    both = {"numina": 1, "metamath": 1}
    probs, man = T.sample_training(POOLS, n=None, mix=both, seed=0, decontaminate=False)
    ids = {p["id"] for p in probs}
    assert {"numina-6", "numina-7", "numina-8", "metamath-4"} <= ids and len(probs) == 17
    assert man["decontamination"]["enabled"] is False and man["decontamination"]["dropped"] == []


# ---------------------------------------------------------------------------------------------- sampling
def test_quotas_largest_remainder():
    assert T.quotas(6, {"numina": 0.5, "metamath": 0.5}) == {"numina": 3, "metamath": 3}
    assert T.quotas(7, {"a": 1, "b": 1, "c": 1}) == {"a": 3, "b": 2, "c": 2}
    assert T.quotas(10, {"a": 0.7, "b": 0.3}) == {"a": 7, "b": 3}
    assert T.quotas(5, {"a": 2, "b": 1}) == {"a": 3, "b": 2}
    for n in range(0, 40):
        assert sum(T.quotas(n, {"a": 0.37, "b": 0.21, "c": 0.42}).values()) == n
    with pytest.raises(ValueError, match="mix"):
        T.quotas(5, {"a": 0, "b": 0})
    with pytest.raises(ValueError, match="mix"):
        T.quotas(5, {"a": -1, "b": 2})


def test_sampling_is_deterministic_and_follows_the_mix(decon):
    kw = dict(n=6, mix={"numina": 0.5, "metamath": 0.5}, decontaminator=decon)
    a, ma = T.sample_training(POOLS, seed=3, **kw)
    b, mb = T.sample_training(POOLS, seed=3, **kw)
    assert [p["id"] for p in a] == [p["id"] for p in b] == ma["ids"] == mb["ids"]
    assert a == b
    assert ma["seed"] == 3 and ma["mix"] == {"numina": 0.5, "metamath": 0.5} and ma["n_requested"] == 6
    assert ma["quotas"] == {"numina": 3, "metamath": 3}
    assert sum(i.startswith("numina-") for i in ma["ids"]) == 3
    assert sum(i.startswith("metamath-") for i in ma["ids"]) == 3
    assert ma["pools"]["numina"]["sampled"] == ma["pools"]["metamath"]["sampled"] == 3
    json.dumps(ma)  # the manifest is plain JSON
    # another seed draws another sample (some seed among a few must differ)
    others = [T.sample_training(POOLS, seed=s, **kw)[1]["ids"] for s in (4, 5, 6)]
    assert any(sorted(o) != sorted(ma["ids"]) for o in others)
    # an uneven mix, and a pool with weight 0
    _, m2 = T.sample_training(POOLS, seed=3, n=6, mix={"numina": 2, "metamath": 1}, decontaminator=decon)
    assert m2["quotas"] == {"numina": 4, "metamath": 2}
    assert sum(i.startswith("numina-") for i in m2["ids"]) == 4
    _, m3 = T.sample_training(POOLS, seed=3, n=5, mix={"numina": 1, "metamath": 0}, decontaminator=decon)
    assert all(i.startswith("numina-") for i in m3["ids"]) and len(m3["ids"]) == 5
    # the sample never contains a dropped row, and the batch size does not change it
    a_small, _ = T.sample_training(POOLS, seed=3, batch=2, **kw)
    assert [p["id"] for p in a_small] == ma["ids"]


def test_quota_larger_than_the_pool_is_a_recorded_shortfall(decon):
    both = {"numina": 1, "metamath": 1}
    probs, man = T.sample_training(POOLS, seed=0, n=30, mix=both, decontaminator=decon)
    assert man["quotas"] == {"numina": 15, "metamath": 15}
    assert man["pools"]["numina"]["shortfall"] == 15 - 8 and man["pools"]["metamath"]["shortfall"] == 15 - 5
    assert len(probs) == 13


def test_unknown_pool_and_bad_n():
    with pytest.raises(ValueError, match="unknown pool"):
        T.sample_training({"gsm": str(NUMINA)}, n=3, mix={"gsm": 1}, seed=0, decontaminate=False)
    with pytest.raises(ValueError, match="data.training.n"):
        T.sample_training(POOLS, n=-1, mix={"numina": 1}, seed=0, decontaminate=False)


# ------------------------------------------------------------------------------------------ decontamination
def test_decontamination_catches_planted_math500_and_aime24_copies(decon):
    hexagon = next(r for r in _bench("math500") if r["id"] == "test/prealgebra/1622.json")
    aime = next(r for r in _bench("aime24") if r["id"] == "aime2024-I-1")
    assert hexagon["problem"].startswith("A regular hexagon")
    assert aime["problem"].startswith("Every morning Aya")
    # whitespace, case and punctuation changed; the AIME copy also embedded in other text, \frac -> \dfrac
    hex_copy = "  a REGULAR hexagon can be divided into six  equilateral\ntriangles!  if the perimeter of " \
               "one of the triangles is 21 inches -- what is the perimeter (in inches) of the Regular Hexagon"
    aime_copy = ("Problem 1 (AIME I):\n" + aime["problem"].upper().replace("$", "").replace(",", " ;")
                 .replace("\\FRAC", "\\dfrac").replace("  ", " ") + "\nGive your answer as an integer.")
    res = decon.find([hex_copy, aime_copy])
    assert res[0] is not None and (res[0].benchmark, res[0].benchmark_id) == ("math500", hexagon["id"])
    assert res[1] is not None and (res[1].benchmark, res[1].benchmark_id) == ("aime24", aime["id"])
    assert res[1].rule == "ngram"
    # every benchmark problem is caught verbatim (exact rule) and embedded in a longer text
    for name in ("math500", "aime24", "aime25", "amc23", "gsm8k", "olympiadbench"):
        recs = _bench(name)[:40]
        for wrap in ("{}", "Here is a problem. {} Good luck!"):
            hits = decon.find([wrap.format(r["problem"]) for r in recs])
            assert all(h is not None and h.benchmark == name for h in hits), (name, wrap)


def test_decontamination_keeps_unrelated_problems(decon):
    # clean fixture problems, and a problem whose longest shared run with AIME 2024 I-1 is 12 words
    cols, _ = T.read_pool(str(NUMINA), "numina")
    clean = [cols["problem"][i] for i in (0, 1, 2, 9, 10, 12, 13)]
    assert decon.find(clean) == [None] * len(clean)
    near_miss = cols["problem"][9]
    assert "constant speed of $s$ kilometers per hour" in near_miss
    assert T.load_decontaminator(DATA, ngram=12).find([near_miss])[0].benchmark_id == "aime2024-I-1"
    # of the first 500 problems of the shipped GSM8K train only the two same-template near-copies of GSM8K
    # test problems (the stamps story with other numbers; "The first movie is 1 hour and 30 minutes long
    # while the second movie is ...") are dropped
    with open(DATA / "gsm8k" / "train.jsonl", encoding="utf-8") as f:
        gsm = [json.loads(line)["problem"] for line in f][:500]
    hits = [m.benchmark_id for m in decon.find(gsm) if m is not None]
    assert sorted(hits) == ["gsm8k-test-581", "gsm8k-test-632"]
    # answer-format boilerplate shared with many AIME problems is not evidence
    boiler = ("A jar holds 7 red and 9 blue marbles. Two are drawn at random without replacement. The "
              "probability that both are red is $\\tfrac{m}{n}$, where $m$ and $n$ are relatively prime "
              "positive integers. Find $m+n$.")
    assert decon.find([boiler]) == [None]
    from sphere.data.benchmarks import PAPER_BENCHMARKS, load_benchmark

    plain = T.Decontaminator({b: load_benchmark(b, DATA) for b in PAPER_BENCHMARKS}, max_benchmark_df=0)
    assert plain.find([boiler])[0] is not None  # the plain rule (every benchmark window counts) drops it


def test_problems_under_min_window_match_exactly_only():
    dec = T.Decontaminator({"b": [{"id": "b1", "problem": "Compute $7!$."},
                                  {"id": "b2", "problem": "Find $x$ if $x + 12 = 30$ and $x > 0$, please."}]})
    assert len(T.normalize_words("Compute $7!$.")) < T.MIN_WINDOW_TOKENS
    got = dec.find(["  COMPUTE 7 ! ", "Compute 7 and then 8.", "x 12", "Find x"])
    assert got[0] == T.Match("b", "b1", "exact")
    assert got[1:] == [None, None, None]  # too short to be evidence by containment either way


def _words_oracle(t: list[str], b: list[str], n: int, min_tokens: int) -> bool:
    """Plain-Python rule: exact match, or a shared run of min(n, len(t), len(b)) >= min_tokens words."""
    if t == b:
        return True
    k = min(n, len(t), len(b))
    if k < min_tokens:
        return False
    grams = {tuple(b[i:i + k]) for i in range(len(b) - k + 1)}
    return any(tuple(t[i:i + k]) in grams for i in range(len(t) - k + 1))


@pytest.mark.parametrize("n", [13, 5])
def test_decontamination_equals_the_plain_rule_on_random_texts(n):
    rng = random.Random(n)
    bench_recs = _bench("math500")[:80] + _bench("aime24")[:10]
    vocab = "the of a x y find sum value integer prime circle 1 2 3 4 5 is and where".split()
    bench = {"b": bench_recs}
    dec = T.Decontaminator(bench, ngram=n, max_benchmark_df=0)  # no boilerplate rule: the plain definition
    btoks = [T.normalize_words(r["problem"]) for r in bench_recs]
    texts = []
    for _ in range(400):
        parts = []
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.5:
                src = rng.choice(btoks)
                i = rng.randrange(len(src))
                parts += src[i:i + rng.randint(1, n + 3)]
            else:
                parts += [rng.choice(vocab) for _ in range(rng.randint(1, 12))]
        texts.append(" ".join(parts))
    got = [m is not None for m in dec.find(texts)]
    want = [any(_words_oracle(T.normalize_words(t), b, n, T.MIN_WINDOW_TOKENS) for b in btoks) for t in texts]
    assert sum(want) > 20 and sum(not w for w in want) > 20  # both outcomes exercised
    assert got == want


def test_decontamination_speed_on_a_synthetic_20k_set(decon):
    rng = random.Random(0)
    with open(DATA / "math" / "train.jsonl", encoding="utf-8") as f:
        words = [w for line in f for w in json.loads(line)["problem"].split()][:200_000]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 120))) for _ in range(20_000)]
    planted = _bench("math500")[:20]
    for i, r in enumerate(planted):
        texts[i * 1000] = "Note: " + r["problem"].upper() + " Good luck."
    t0 = time.perf_counter()
    res = decon.find(texts)
    dt = time.perf_counter() - t0
    print(f"decontamination: 20,000 problems x {sum(decon.benchmark_sizes.values())} benchmark problems "
          f"in {dt:.2f} s")
    found = [res[i * 1000] and res[i * 1000].benchmark_id for i in range(len(planted))]
    assert found == [r["id"] for r in planted]
    assert dt < 120  # ~3-6 s on one shared core; a per-pair Python scan would take hours


# ---------------------------------------------------------------------------------------------- files
def test_missing_files_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        T.sample_training({"numina": str(tmp_path / "nope.parquet")}, n=3, mix={"numina": 1}, seed=0,
                          decontaminate=False)
    msg = str(e.value)
    assert "NuminaMath-CoT" in msg and "nope.parquet" in msg and "data.training.numina" in msg
    assert "huggingface-cli download --repo-type dataset AI-MO/NuminaMath-CoT" in msg
    assert "never downloads" in msg
    with pytest.raises(FileNotFoundError, match="MetaMathQA.*meta-math/MetaMathQA"):
        T.read_pool(str(tmp_path / "missing.json"), "metamath")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no"):
        T.read_pool(str(tmp_path / "empty"), "numina")
    with pytest.raises(FileNotFoundError, match="not in the local hub cache"):
        T.read_pool("hf:sphere-test/definitely-not-cached-dataset", "numina")


def test_wrong_schema_is_named(tmp_path):
    p = tmp_path / "problems.jsonl"
    p.write_text(json.dumps({"id": "a", "problem": "1+1?", "answer": "2"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"not a MetaMathQA file.*\['query', 'response'\]"):
        T.read_pool(str(p), "metamath")
    with pytest.raises(ValueError, match=r"not a NuminaMath-CoT file.*\['solution'\]"):
        T.read_pool(str(p), "numina")


def test_parquet_directory_equals_jsonl(tmp_path, decon):
    import pyarrow as pa  # a dependency of `datasets` (declared): never skipped
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in NUMINA.read_text(encoding="utf-8").splitlines()]
    d = tmp_path / "numina" / "data"
    d.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), d / "train-00000-of-00001.parquet")
    junk = [{"source": "x", "problem": "junk test row", "solution": "\\boxed{1}", "messages": []}]
    pq.write_table(pa.Table.from_pylist(junk), d / "test-00000-of-00001.parquet")
    (tmp_path / "numina" / ".cache").mkdir()
    pq.write_table(pa.Table.from_pylist(junk), tmp_path / "numina" / ".cache" / "train-x.parquet")
    kw = dict(n=5, mix={"numina": 1}, seed=1, decontaminator=decon)
    a, ma = T.sample_training({"numina": str(tmp_path / "numina")}, **kw)
    b, _ = T.sample_training({"numina": str(NUMINA)}, **kw)
    assert [p["id"] for p in a] == [p["id"] for p in b]
    assert [p["answer"] for p in a] == [p["answer"] for p in b]
    assert ma["pools"]["numina"]["rows"] == 14 and len(ma["pools"]["numina"]["files"]) == 1


# ---------------------------------------------------------------------------------------------- config hooks
_POOL_OVERRIDES = (f"data.training.numina={NUMINA}", f"data.training.metamath={METAMATH}")


def _cfg(*overrides: str):
    from hydra import compose, initialize_config_dir

    from sphere.cli import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="generate", overrides=[f"paths.data_dir={DATA}", *overrides])


def test_generate_config_training_source(tmp_path):
    from sphere.data.problems import count_problems, load_problems

    man = tmp_path / "manifest.json"
    cfg = _cfg("data.problems=training", *_POOL_OVERRIDES, "data.training.n=6", "data.training.seed=11",
               f"data.training.manifest={man}")
    probs = load_problems(cfg.data, int(cfg.seed))
    assert len(probs) == 6 == count_problems(cfg.data, int(cfg.seed))
    m = json.loads(man.read_text(encoding="utf-8"))
    assert m["ids"] == [p["id"] for p in probs] and m["seed"] == 11
    assert m["quotas"] == {"numina": 3, "metamath": 3}
    assert m["decontamination"]["enabled"] is True
    # data.limit keeps a prefix of the (shuffled, mixed) sample
    cfg.data.limit = 4
    assert [p["id"] for p in load_problems(cfg.data, 0)] == m["ids"][:4] and count_problems(cfg.data, 0) == 4
    # one pool file alone, every usable row, next to a shipped set
    cfg = _cfg(f"data.problems=[numina:{NUMINA},gsm8k_train]", "data.training.n=null", "data.limit=10")
    probs = load_problems(cfg.data, 0)
    assert len(probs) == 10 and all(p["id"].startswith("numina-") for p in probs[:8])
    assert probs[8]["id"].startswith("gsm8k-train")
    assert count_problems(cfg.data, 0) == 10


def test_fallback_and_describe(tmp_path):
    from sphere.data.problems import count_problems, load_problems

    missing = tmp_path / "no_numina"
    base = ["data.problems=training", f"data.training.numina={missing}", f"data.training.metamath={METAMATH}"]
    cfg = _cfg(*base)
    # no fallback: refused in one line naming the missing pool's key and path and the override that allows it
    for fn in (load_problems, count_problems, lambda d, _s: T.require_training(d)):
        with pytest.raises(T.MissingPoolsError, match="NuminaMath-CoT.*no_numina") as e:
            fn(cfg.data, 0)
        msg = str(e.value)
        assert "\n" not in msg and "data.training.numina=" in msg and T.FALLBACK_OVERRIDE in msg
        assert "MetaMathQA" not in msg  # the pool that is present is not named
    d = T.describe_source(cfg.data)
    assert d["uses"] is None and "no_numina" in d["reason"] and T.FALLBACK_OVERRIDE in d["reason"]
    cfg = _cfg(*base, "data.training.fallback=[gsm8k_train]", "data.limit=5")
    probs = load_problems(cfg.data, 0)
    assert [p["id"] for p in probs] == [f"gsm8k-train-{i}" for i in range(5)]
    assert count_problems(cfg.data, 0) == 5
    cfg.data.limit = None
    assert count_problems(cfg.data, 0) == 7473 - 2  # the fallback is decontaminated too (2 GSM8K-test overlaps)
    d = T.describe_source(cfg.data)
    assert d["uses"] == ["gsm8k_train"] and d["reason"].startswith("fallback") and "no_numina" in d["reason"]
    cfg = _cfg("data.problems=training", *_POOL_OVERRIDES)
    d = T.describe_source(cfg.data)
    assert d["uses"] == "NuminaMath-CoT + MetaMathQA" and d["n"] == 20000 and d["decontaminate"] is True
    d = T.describe_source(_cfg("data.problems=math_train").data)
    assert d == {"uses": ["math_train"], "reason": "data.problems"}


def _dry_run_process(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "sphere.cli", "run", "experiment=paper_qwen2_5_7b", "dry_run=true",
           f"hydra.run.dir={tmp_path}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _dry_run(tmp_path: Path, *overrides: str) -> dict:
    r = _dry_run_process(tmp_path, *overrides)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.JSONDecoder().raw_decode(r.stdout[r.stdout.index("{"):])[0]  # the plan: the first JSON object


def test_paper_dry_run_says_which_training_data(tmp_path):
    # no local pools (this checkout) and no fallback (the paper config's): refused, one line naming the
    # missing files and the override that allows the shipped sets; never a silent substitute
    r = _dry_run_process(tmp_path / "r", "data.training.numina=/nonexistent/numina")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    line = next(x for x in r.stderr.splitlines() if "error:" in x)
    assert "data.training.numina=/nonexistent/numina" in line and "MetaMathQA" in line
    assert "data.training.fallback=[math_train,gsm8k_train]" in line
    # the override named there: the shipped MATH train + GSM8K train, and the plan says so
    plan = _dry_run(tmp_path / "a", "data.training.numina=/nonexistent/numina",
                    "data.training.fallback=[math_train,gsm8k_train]")
    assert plan["data"] == "training" and plan["problems"] == 11998 + 7473 - 87  # decontaminated fallback
    assert plan["data_source"]["uses"] == ["math_train", "gsm8k_train"]
    reason = plan["data_source"]["reason"]
    assert "fallback" in reason and "/nonexistent/numina" in reason
    # pools present: NuminaMath-CoT + MetaMathQA, sampled and decontaminated
    plan = _dry_run(tmp_path / "b", *_POOL_OVERRIDES, "data.training.n=6")
    assert plan["data_source"]["uses"] == "NuminaMath-CoT + MetaMathQA" and plan["problems"] == 6
    assert plan["data_source"]["mix"] == {"numina": 0.5, "metamath": 0.5}
    assert not (tmp_path / "b" / "training_manifest.json").exists()  # a dry run writes nothing


def test_paper_rounds_agree_with_docs():
    import yaml

    cfg = yaml.safe_load((ROOT / "conf" / "experiment" / "paper_qwen2_5_7b.yaml").read_text(encoding="utf-8"))
    doc = (ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
    assert f"`rounds: {cfg['rounds']}` in that config" in doc
    words = {1: "one round", 2: "two self-evolution rounds"}
    assert words[cfg["rounds"]] in doc
    assert "two self-evolution rounds" not in doc or cfg["rounds"] == 2
