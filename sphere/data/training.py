"""The paper's training pools: NuminaMath-CoT and MetaMathQA, sampled, decontaminated, from local files only.

SPHERE (arXiv 2503.04813) samples ~20K problems from NuminaMath and MetaMath. Neither dataset has an answer
column, so the generic ``hf:`` loader cannot read them; this module can:

- ``NuminaMath-CoT`` (columns ``source, problem, solution, messages``): gold = the content of the LAST
  ``\\boxed{...}`` / ``\\fbox{...}`` of ``solution`` (brace-balanced, ``sphere.verify.extract.last_boxed``).
  A last box that is unbalanced or empty means no gold: the row is dropped (never an earlier box).
- ``MetaMathQA`` (``type, query, original_question, response``): gold = the text after the last
  ``The answer is:`` of ``response`` (to the end of that line).

Rows without a gold answer are dropped and counted. Files: parquet, JSONL, a JSON list (MetaMathQA-395K.json),
a directory of them (a hub snapshot: files with ``train`` in the name, else all), or ``hf:OWNER/NAME`` when
that dataset is already in the local hub cache. Nothing is ever downloaded; a missing file is an error that
names the pool and how to provide it.

Sampling (``sample_training``): ``n`` problems split over the pools by ``mix`` (largest-remainder quotas),
each pool walked in a seeded random order, taking rows that have a gold answer, are not duplicates (of an
earlier sampled problem, normalised text) and are not contaminated, until its quota is met. Deterministic in
(files, n, mix, seed, decontamination settings), and independent of batch sizes. The returned manifest
records the seed, mix, quotas, sampled ids and every drop count.

Decontamination (``Decontaminator``) against the six evaluation benchmarks (MATH-500, GSM8K test, AIME
2024/2025, AMC 2023, OlympiadBench): problems are normalised (NFKC, lower case, LaTeX spacing commands
removed, ``\\dfrac`` = ``\\frac``) and split into words (runs of letters/digits, so whitespace, case and
punctuation do not matter). A training problem is contaminated when it shares a run of
``k = min(n, len(train), len(bench))`` consecutive words with a benchmark problem (n = 13 by default, the
GPT-3 / Llama practice): a shared 13-gram for long problems, whole-problem containment either way for
shorter ones, and an exact normalised match for problems under ``MIN_WINDOW_TOKENS`` words. Windows are
64-bit polynomial hashes in NumPy over the concatenated token streams (one pass per window length), and
every hit is confirmed on the words themselves, so a hash collision cannot drop a problem.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Problems (training or benchmark) shorter than this many normalised words are matched exactly only:
# containment of a 1-2 word text ("Find x.") says nothing. Benchmark problems this short do not exist
# (the shortest MATH-500 problems have 3 words: "Simplify $\sqrt{242}$.").
MIN_WINDOW_TOKENS = 3
DEFAULT_NGRAM = 13
# Boilerplate: a benchmark window that is common phrasing rather than a problem's own text ("a line (B)
# circle (C) parabola (D) ellipse (E) hyperbola. Enter the letter", "where m and n are relatively prime
# positive integers. Find m+n", Asymptote labels) matches nothing. A window is boilerplate when it occurs in
# more than MAX_BENCHMARK_DF distinct benchmark problems or in at least BACKGROUND_DF distinct problems of the
# background corpus (BACKGROUND: the shipped MATH train + GSM8K train, ordinary competition/grade-school
# phrasing).
# Without this, 2.7% of the shipped MATH train (disjoint from MATH-500 by construction) is dropped, mostly for
# such sentences; with it, 1.3% of half of it (background = the other half), mostly same-template problems
# that share the numbers too. A real copy still shares its problem-specific windows, and exact copies are
# always caught.
MAX_BENCHMARK_DF = 1
BACKGROUND_DF = 2
BACKGROUND = ("math_train", "gsm8k_train")
# Longest gold answer kept (characters), as in sphere.verify.extract.MAX_ANSWER_CHARS.
MAX_GOLD_CHARS = 1000
SUPPORTED_SUFFIXES = (".parquet", ".jsonl", ".json")
ANSWER_MARKER = "The answer is:"


@dataclass(frozen=True)
class PoolSchema:
    name: str  # pool key: data.training.<name>, data.training.mix.<name>, source "<name>:PATH"
    title: str  # dataset name for messages and the problem's "source" field
    hub: str  # hub repository, for the "how to provide it" message
    problem: str  # column with the problem text
    text: str  # column the gold answer is read from (also kept as the problem's "solution")
    origin: str  # provenance column kept as "origin" (NuminaMath source, MetaMathQA type)
    extra: tuple[str, ...] = field(default=())  # further provenance columns kept verbatim when present
    example_file: str = ""


POOLS: dict[str, PoolSchema] = {
    "numina": PoolSchema("numina", "NuminaMath-CoT", "AI-MO/NuminaMath-CoT", "problem", "solution", "source",
                         example_file="data/train-0000*-of-00005.parquet"),
    "metamath": PoolSchema("metamath", "MetaMathQA", "meta-math/MetaMathQA", "query", "response", "type",
                           extra=("original_question",), example_file="MetaMathQA-395K.json"),
}


# ---------------------------------------------------------------------------------------------- gold answers
def numina_gold(solution: Any) -> str | None:
    """Content of the LAST ``\\boxed{...}``/``\\fbox{...}`` of a NuminaMath solution (nested braces kept),
    or None when there is none, it is unbalanced, empty or longer than ``MAX_GOLD_CHARS``."""
    from sphere.verify.extract import last_boxed

    if not isinstance(solution, str):
        return None
    pos = max(solution.rfind("\\boxed"), solution.rfind("\\fbox"))
    if pos < 0:
        return None
    # only the last command: last_boxed on the suffix cannot fall back to an earlier box
    ans = last_boxed(solution[pos:])
    if ans is None:
        return None
    ans = ans.strip()
    return ans if 0 < len(ans) <= MAX_GOLD_CHARS else None


def metamath_gold(response: Any) -> str | None:
    """Text after the last ``The answer is:`` of a MetaMathQA response (to the end of that line, math
    delimiters and a final full stop removed), or None."""
    if not isinstance(response, str):
        return None
    pos = response.rfind(ANSWER_MARKER)
    if pos < 0:
        return None
    ans = response[pos + len(ANSWER_MARKER):].strip().split("\n", 1)[0].strip()
    for a, b in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if ans.startswith(a) and ans.endswith(b) and len(ans) >= len(a) + len(b):
            ans = ans[len(a):len(ans) - len(b)].strip()
    if ans.endswith(".") and not ans.endswith(".."):
        ans = ans[:-1].rstrip()
    return ans if 0 < len(ans) <= MAX_GOLD_CHARS else None


GOLD = {"numina": numina_gold, "metamath": metamath_gold}


def count_boxed(text: str) -> int:
    return text.count("\\boxed") + text.count("\\fbox") if isinstance(text, str) else 0


# ---------------------------------------------------------------------------------------------- files
def _how_to_provide(schema: PoolSchema, key: str) -> str:
    return (f"sphere never downloads data at run time. Provide {schema.title} locally: on a machine with hub "
            f"access run `huggingface-cli download --repo-type dataset {schema.hub} --local-dir DIR` "
            f"(or copy "
            f"{schema.example_file}), then point {key} at DIR or the file (parquet, JSONL or a JSON list)")


def resolve_pool_path(spec: str, schema: PoolSchema, key: str) -> list[Path]:
    """The data files of a pool: a file, a directory of parquet/JSONL/JSON files (those with ``train`` in
    the name when there are any; hidden folders skipped), or ``hf:OWNER/NAME`` from the local hub cache."""
    spec = str(spec)
    if spec.startswith("hf:"):
        repo = spec[3:]
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(repo_id=repo, repo_type="dataset", local_files_only=True))
        except Exception as e:  # noqa: BLE001 - any failure means "not in the local cache"
            raise FileNotFoundError(
                f"{schema.title} ({key}={spec}): {repo!r} is not in the local hub cache "
                f"({type(e).__name__}). {_how_to_provide(schema, key)}") from None
    else:
        path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUPPORTED_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        train = [p for p in files if "train" in p.name]
        if train or files:
            return train or files
        raise FileNotFoundError(f"{schema.title} ({key}={spec}): the directory {path} holds no "
                                f"{'/'.join(SUPPORTED_SUFFIXES)} files. {_how_to_provide(schema, key)}")
    raise FileNotFoundError(
        f"{schema.title} ({key}={spec}): {path} not found. {_how_to_provide(schema, key)}")


def pool_available(spec: str | None, schema: PoolSchema) -> tuple[bool, str]:
    """(True, "") when ``resolve_pool_path`` would find files, else (False, the reason)."""
    if spec is None or str(spec) in ("", "None", "null"):
        return False, f"no path configured for {schema.title}"
    try:
        resolve_pool_path(str(spec), schema, f"data.training.{schema.name}")
    except FileNotFoundError as e:
        return False, str(e).split(". sphere never downloads")[0]
    return True, ""


def _read_file(path: Path, cols: Sequence[str], required: Sequence[str], title: str) -> dict[str, list]:
    """Columns ``cols`` of one file as lists (absent optional columns: None)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        missing = [c for c in required if c not in names]
        if missing:
            raise ValueError(f"{path}: not a {title} file: columns {missing} missing (found {names})")
        table = pq.read_table(path, columns=[c for c in cols if c in names])
        n = table.num_rows
        return {c: table.column(c).to_pylist() if c in names else [None] * n for c in cols}
    rows: list
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            if "Extra data" not in str(e):
                raise ValueError(f"{path}: not valid JSON ({e})") from None
            rows = None  # JSON lines in a .json file
        if rows is not None and not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of {title} records, got {type(rows).__name__}")
    else:
        rows = None
    if rows is None:
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
    first = next((r for r in rows if isinstance(r, dict)), None)
    if rows and first is None:
        raise ValueError(f"{path}: expected {title} records (JSON objects)")
    if first is not None:
        missing = [c for c in required if c not in first]
        if missing:
            raise ValueError(f"{path}: not a {title} file: fields {missing} missing in the first record "
                             f"(found {sorted(first)})")
    return {c: [r.get(c) if isinstance(r, dict) else None for r in rows] for c in cols}


def read_pool(spec: str, pool: str, key: str | None = None) -> tuple[dict[str, list], list[Path]]:
    """All rows of a pool as columns ``problem, text, origin, <extra>`` plus the files read."""
    schema = POOLS[pool]
    key = key or f"data.training.{pool}"
    files = resolve_pool_path(spec, schema, key)
    src_cols = (schema.problem, schema.text, schema.origin, *schema.extra)
    out: dict[str, list] = {k: [] for k in ("problem", "text", "origin", *schema.extra)}
    for f in files:
        got = _read_file(f, src_cols, (schema.problem, schema.text), schema.title)
        out["problem"] += got[schema.problem]
        out["text"] += got[schema.text]
        out["origin"] += got[schema.origin]
        for c in schema.extra:
            out[c] += got[c]
    return out, files


# ------------------------------------------------------------------------------------------ decontamination
_LATEX_NOISE = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|big|Big|bigg|Bigg|displaystyle)"
                          r"(?![A-Za-z])")
_FRAC = re.compile(r"\\[dt]frac(?![A-Za-z])")
_WORD = re.compile(r"[^\W_]+")
_ASY = re.compile(r"\[asy\].*?\[/asy\]", re.DOTALL | re.IGNORECASE)  # Asymptote diagram code
_MASK = (1 << 64) - 1
_P = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier of the polynomial window hash


def normalize_words(text: str) -> list[str]:
    """Words of a problem for overlap tests: NFKC, ``[asy]...[/asy]`` diagram code and LaTeX sizing commands
    dropped, ``\\dfrac``/``\\tfrac`` = ``\\frac``, lower case, runs of letters and digits (so whitespace,
    case and punctuation are ignored)."""
    t = unicodedata.normalize("NFKC", text if isinstance(text, str) else "")
    t = _ASY.sub(" ", t)
    t = _FRAC.sub(r"\\frac", _LATEX_NOISE.sub(" ", t))
    return _WORD.findall(t.lower())


class _Vocab:
    """Word -> pseudo-random 64-bit id (blake2b), stable across processes."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def encode(self, docs: Sequence[list[str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids = self.ids
        flat: list[int] = []
        for d in docs:
            for w in d:
                v = ids.get(w)
                if v is None:
                    v = ids[w] = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
                flat.append(v)
        lens = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        starts = np.zeros(len(docs), dtype=np.int64)
        if len(docs) > 1:
            np.cumsum(lens[:-1], out=starts[1:])
        return np.array(flat, dtype=np.uint64), starts, lens


def _windows(ids: np.ndarray, starts: np.ndarray, lens: np.ndarray, L: int,
             doc_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hash, doc, position) of every window of ``L`` words lying inside one document (docs in doc_mask)."""
    M = len(ids) - L + 1
    empty = (np.empty(0, np.uint64), np.empty(0, np.int64), np.empty(0, np.int64))
    if M <= 0 or L <= 0:
        return empty
    h = np.zeros(M, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(L):  # Horner: h = sum ids[i+j] * P^(L-1-j)  (mod 2^64)
            h = h * _P + ids[j:j + M]
    doc = np.repeat(np.arange(len(lens), dtype=np.int64), lens)[:M]
    pos = np.arange(M, dtype=np.int64) - starts[doc]
    ok = pos + L <= lens[doc]
    if doc_mask is not None:
        ok &= doc_mask[doc]
    return h[ok], doc[ok], pos[ok]


def _doc_freq(h: np.ndarray, doc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct hashes, number of distinct documents holding each)."""
    if len(h) == 0:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    pairs = np.unique(np.stack([h, doc.astype(np.uint64)], axis=1), axis=0)
    return np.unique(pairs[:, 0], return_counts=True)


@dataclass
class _Table:
    """Sorted window hashes of the benchmark side with their (doc, position)."""

    h: np.ndarray
    doc: np.ndarray
    pos: np.ndarray

    @classmethod
    def build(cls, h: np.ndarray, doc: np.ndarray, pos: np.ndarray) -> _Table:
        o = np.argsort(h, kind="stable")
        return cls(h[o], doc[o], pos[o])

    def lookup(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(indices into q that hit, first table index of each hit)."""
        if len(self.h) == 0 or len(q) == 0:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        idx = np.searchsorted(self.h, q)
        idx_c = np.minimum(idx, len(self.h) - 1)
        hit = (idx < len(self.h)) & (self.h[idx_c] == q)
        return np.nonzero(hit)[0], idx_c[hit]


@dataclass(frozen=True)
class Match:
    benchmark: str
    benchmark_id: str
    rule: str  # "exact" | "ngram" | "contains_benchmark" | "inside_benchmark"


class Decontaminator:
    """Index of benchmark problems; ``find(texts)`` says which training texts overlap one (see the module
    docstring for the rule). ``benchmarks``: name -> problem records (``id``, ``problem``)."""

    def __init__(self, benchmarks: dict[str, list[dict]], ngram: int = DEFAULT_NGRAM,
                 min_tokens: int = MIN_WINDOW_TOKENS, max_benchmark_df: int = MAX_BENCHMARK_DF,
                 background: Sequence[str] = (), background_df: int = BACKGROUND_DF):
        if int(ngram) < 1:
            raise ValueError(f"decontamination n-gram size must be >= 1, got {ngram!r}")
        self.n = int(ngram)
        self.min_tokens = int(min_tokens)
        self.max_df = int(max_benchmark_df)  # 0 = no benchmark-side boilerplate rule
        self.background_df = int(background_df)  # 0 = no background rule
        self.background_size = len(background)
        self.boilerplate: dict[int, int] = {}  # L -> distinct benchmark windows ignored as boilerplate
        self.vocab = _Vocab()
        self._bg = self.vocab.encode([normalize_words(t) for t in background])
        self.names: list[str] = []
        self.bids: list[str] = []
        self.btoks: list[list[str]] = []
        for name, recs in benchmarks.items():
            for r in recs:
                self.names.append(name)
                self.bids.append(str(r["id"]))
                self.btoks.append(normalize_words(r["problem"]))
        self.benchmark_sizes = {name: len(recs) for name, recs in benchmarks.items()}
        self.exact: dict[str, int] = {}
        for i, t in enumerate(self.btoks):
            self.exact.setdefault(" ".join(t), i)
        self._ids, self._starts, self._lens = self.vocab.encode(self.btoks)
        self._grams: dict[int, _Table] = {}  # L -> windows of benchmark problems with >= L words
        self._full: dict[int, _Table] = {}  # L < n -> whole benchmark problems of exactly L words
        for L in sorted({int(x) for x in self._lens if self.min_tokens <= x < self.n}):
            self._full[L] = _Table.build(*_windows(self._ids, self._starts, self._lens, L, self._lens == L))

    def _bench_grams(self, L: int) -> _Table:
        """Windows of L words of the benchmark problems, less boilerplate (see ``MAX_BENCHMARK_DF``)."""
        if L not in self._grams:
            h, doc, pos = _windows(self._ids, self._starts, self._lens, L)
            common = [np.empty(0, np.uint64)]
            if len(h) and self.max_df > 0:
                uh, df = _doc_freq(h, doc)
                common.append(uh[df > self.max_df])
            if len(h) and self.background_df > 0 and self.background_size:
                bh, bdoc, _ = _windows(*self._bg, L)
                m = np.isin(bh, h)
                uh, df = _doc_freq(bh[m], bdoc[m])
                common.append(uh[df >= self.background_df])
            common_h = np.unique(np.concatenate(common))
            self.boilerplate[L] = int(len(common_h))
            if len(common_h):
                keep = ~np.isin(h, common_h)
                h, doc, pos = h[keep], doc[keep], pos[keep]
            self._grams[L] = _Table.build(h, doc, pos)
        return self._grams[L]

    def _confirm(self, tab: _Table, first: int, h: int, twords: list[str], tpos: int, L: int) -> int | None:
        """Benchmark doc whose window equals the training words (scan the run of equal hashes)."""
        seg = twords[tpos:tpos + L]
        k = first
        while k < len(tab.h) and tab.h[k] == h:
            b, bp = int(tab.doc[k]), int(tab.pos[k])
            if self.btoks[b][bp:bp + L] == seg:
                return b
            k += 1
        return None

    def find(self, texts: Sequence[str]) -> list[Match | None]:
        """For each text: the first benchmark problem it overlaps, or None."""
        toks = [normalize_words(t) for t in texts]
        out: list[Match | None] = [None] * len(toks)
        for i, t in enumerate(toks):
            b = self.exact.get(" ".join(t))
            if b is not None:
                out[i] = Match(self.names[b], self.bids[b], "exact")
        ids, starts, lens = self.vocab.encode(toks)
        todo = np.array([m is None for m in out], dtype=bool)

        def probe(L: int, tab: _Table, mask: np.ndarray, rule: str) -> None:
            if not mask.any() or len(tab.h) == 0:
                return
            h, doc, pos = _windows(ids, starts, lens, L, mask & todo)
            qi, ti = tab.lookup(h)
            for q, first in zip(qi.tolist(), ti.tolist(), strict=True):
                d = int(doc[q])
                if out[d] is not None:
                    continue
                b = self._confirm(tab, first, int(h[q]), toks[d], int(pos[q]), L)
                if b is not None:
                    out[d] = Match(self.names[b], self.bids[b], rule)
                    todo[d] = False

        # long training problems: a shared n-gram with a long benchmark problem
        probe(self.n, self._bench_grams(self.n), lens >= self.n, "ngram")
        # a short benchmark problem (min_tokens <= L < n words) contained in the training problem
        for L, tab in self._full.items():
            probe(L, tab, lens >= L, "contains_benchmark")
        # a short training problem contained in a benchmark problem
        for L in sorted({int(x) for x in lens[todo] if self.min_tokens <= x < self.n}):
            probe(L, self._bench_grams(L), lens == L, "inside_benchmark")
        return out


def load_decontaminator(data_dir: str | os.PathLike | None, ngram: int = DEFAULT_NGRAM,
                        benchmarks: Iterable[str] | None = None,
                        background: Iterable[str] | None = BACKGROUND) -> Decontaminator:
    """A ``Decontaminator`` over the six paper benchmarks (``sphere.data.benchmarks.PAPER_BENCHMARKS``) read
    from ``data_dir`` (the shipped data/benchmarks by default), with the boilerplate background corpus
    ``background`` (registered names; None or () = none). A missing benchmark or background file is an
    error."""
    from sphere.data.benchmarks import PAPER_BENCHMARKS, load_benchmark

    def load(name: str, role: str) -> list[dict]:
        try:
            return load_benchmark(name, data_dir)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"decontamination needs every {role}: {e} "
                                    "(or turn it off: data.training.decontaminate=false)") from None

    recs = {name: load(name, "evaluation benchmark") for name in (benchmarks or PAPER_BENCHMARKS)}
    bg = [r["problem"] for name in (background or ()) for r in load(name, "background set (boilerplate)")]
    return Decontaminator(recs, ngram, background=bg)


# ---------------------------------------------------------------------------------------------- sampling
def quotas(n: int, mix: dict[str, float]) -> dict[str, int]:
    """Split ``n`` by the weights of ``mix`` (largest remainder; ties in mix order). Sums to ``n``."""
    w = {k: float(v) for k, v in mix.items()}
    bad = {k: v for k, v in w.items() if not (v >= 0 and math.isfinite(v))}
    if bad:
        raise ValueError(f"data.training.mix: weights must be finite and >= 0, got {bad}")
    total = sum(w.values())
    if total <= 0:
        raise ValueError(f"data.training.mix: at least one weight must be > 0, got {dict(mix)}")
    raw = {k: n * v / total for k, v in w.items()}
    q = {k: int(math.floor(x)) for k, x in raw.items()}
    left = n - sum(q.values())
    for k in sorted(raw, key=lambda k: -(raw[k] - q[k]))[:left]:  # sorted() is stable: ties keep mix order
        q[k] += 1
    return q


def _seed_for(seed: int, pool: str) -> np.random.Generator:
    salt = int.from_bytes(hashlib.sha256(pool.encode()).digest()[:8], "little")
    return np.random.default_rng([int(seed) & _MASK, salt])


def sample_training(
    pools: dict[str, str],
    *,
    n: int | None,
    mix: dict[str, float],
    seed: int,
    decontaminate: bool = True,
    ngram: int = DEFAULT_NGRAM,
    data_dir: str | os.PathLike | None = None,
    decontaminator: Decontaminator | None = None,
    batch: int = 4096,
    keys: dict[str, str] | None = None,
) -> tuple[list[dict], dict]:
    """Sample ``n`` problems (None = every usable row) from ``pools`` (pool name -> file spec), split by
    ``mix``.

    Returns ``(problems, manifest)``. Problems carry ``id`` (``<pool>-<row>``), ``problem``, ``answer``,
    ``solution``, ``source`` (dataset title), ``origin`` (NuminaMath source / MetaMathQA type), ``row``,
    ``n_boxed`` (NuminaMath) or ``original_question`` (MetaMathQA), in a seeded shuffled order (so
    ``data.limit`` keeps the mix). The manifest records seed, mix, quotas, per-pool drop counts, the
    contaminated problems per benchmark and the sampled ids. ``keys``: the config key naming each pool's path,
    for error messages (default ``data.training.<pool>``)."""
    unknown = [k for k in list(mix) + list(pools) if k not in POOLS]
    if unknown:
        raise ValueError(f"data.training: unknown pool(s) {sorted(set(unknown))}; allowed {', '.join(POOLS)}")
    active = {k: float(v) for k, v in mix.items() if float(v) > 0}
    if n is not None and int(n) < 0:
        raise ValueError(f"data.training.n={n}: allowed null or an integer >= 0")
    q = quotas(int(n), active) if n is not None else {k: None for k in active}
    missing = [k for k in active if k not in pools]
    if missing:
        raise ValueError(f"data.training.mix names {missing} but no path is configured for it")
    decon = None
    if decontaminate:
        decon = decontaminator or load_decontaminator(data_dir, ngram)
    seen: set[str] = set()
    per_pool: dict[str, dict] = {}
    dropped: list[dict] = []
    per_bench = {name: 0 for name in (decon.benchmark_sizes if decon else {})}
    out: list[dict] = []
    for pool in active:
        schema = POOLS[pool]
        cols, files = read_pool(pools[pool], pool, (keys or {}).get(pool))
        rows = len(cols["problem"])
        want = q[pool]
        perm = _seed_for(seed, pool).permutation(rows)
        st = {"path": str(pools[pool]), "files": [str(f) for f in files], "rows": rows, "quota": want,
              "examined": 0, "sampled": 0, "dropped_no_answer": 0, "dropped_malformed": 0,
              "dropped_duplicate": 0, "dropped_contaminated": 0}
        got: list[dict] = []
        gold_fn = GOLD[pool]
        for b0 in range(0, rows, batch):
            if want is not None and len(got) >= want:
                break
            idx = perm[b0:b0 + batch].tolist()
            golds = [gold_fn(cols["text"][i]) for i in idx]
            probs = [cols["problem"][i] for i in idx]
            ok = [isinstance(p, str) and p.strip() != "" for p in probs]
            checks = [g is not None and o for g, o in zip(golds, ok, strict=True)]
            hits = decon.find([p for p, c in zip(probs, checks, strict=True) if c]) if decon else []
            hit_iter = iter(hits)
            for i, g, p, o, c in zip(idx, golds, probs, ok, checks, strict=True):
                if want is not None and len(got) >= want:
                    break
                m = next(hit_iter) if (c and decon) else None
                st["examined"] += 1
                if not o:
                    st["dropped_malformed"] += 1
                    continue
                if g is None:
                    st["dropped_no_answer"] += 1
                    continue
                if m is not None:
                    st["dropped_contaminated"] += 1
                    per_bench[m.benchmark] = per_bench.get(m.benchmark, 0) + 1
                    dropped.append({"id": f"{pool}-{i}", "benchmark": m.benchmark,
                                    "benchmark_id": m.benchmark_id, "rule": m.rule})
                    continue
                key = " ".join(normalize_words(p))
                if key in seen:
                    st["dropped_duplicate"] += 1
                    continue
                seen.add(key)
                text = cols["text"][i]
                rec = {"id": f"{pool}-{i}", "problem": p, "answer": g, "solution": text,
                       "source": schema.title, "origin": cols["origin"][i], "row": i}
                if pool == "numina":
                    rec["n_boxed"] = count_boxed(text)
                for c in schema.extra:
                    if cols[c][i] is not None:
                        rec[c] = cols[c][i]
                got.append(rec)
        st["sampled"] = len(got)
        if want is not None and len(got) < want:
            st["shortfall"] = want - len(got)
            log.warning("%s: only %d usable problems for a quota of %d (%s)", schema.title, len(got), want,
                        st)
        per_pool[pool] = st
        out.extend(got)
    order = _seed_for(seed, "__order__").permutation(len(out)).tolist()
    out = [out[i] for i in order]
    manifest = {
        "kind": "sphere.training_sample",
        "seed": int(seed),
        "n_requested": None if n is None else int(n),
        "n": len(out),
        "mix": {k: float(v) for k, v in mix.items()},
        "quotas": q,
        "decontamination": {
            "enabled": bool(decontaminate),
            "ngram": int(decon.n) if decon else int(ngram),
            "min_tokens": int(decon.min_tokens) if decon else MIN_WINDOW_TOKENS,
            "benchmarks": dict(decon.benchmark_sizes) if decon else {},
            "dropped_per_benchmark": per_bench,
            "dropped": dropped,
        },
        "pools": per_pool,
        "ids": [p["id"] for p in out],
    }
    return out, manifest


# ---------------------------------------------------------------------------------------------- config glue
TRAINING_SOURCE = "training"


def is_training_source(src: str) -> bool:
    """``training`` (the mix of ``data.training``) or ``<pool>:PATH`` (one pool file: numina, metamath)."""
    return src == TRAINING_SOURCE or any(src.startswith(f"{p}:") for p in POOLS)


def _tcfg(dcfg: Any) -> Any:
    t = dcfg.get("training") if hasattr(dcfg, "get") else None
    if t is None:
        raise ValueError("config data.training is missing: the training sources need data.training.{n, mix, "
                         "seed, decontaminate, ngram} (see conf/generate.yaml)")
    return t


def _plain(x: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(x, resolve=True) if OmegaConf.is_config(x) else x


def _pools_for(src: str, dcfg: Any) -> tuple[dict[str, str], dict[str, float]]:
    t = _tcfg(dcfg)
    if src == TRAINING_SOURCE:
        mix = {str(k): float(v) for k, v in (_plain(t.mix) or {}).items()}
        pools = {}
        for k in mix:
            if k not in POOLS:
                raise ValueError(f"data.training.mix: unknown pool {k!r}; allowed {', '.join(POOLS)}")
            spec = t.get(k)
            if spec is None:
                raise ValueError(f"data.training.{k}: no path configured for the pool in data.training.mix")
            pools[k] = str(spec)
        return pools, mix
    pool, _, path = src.partition(":")
    if not path:
        raise ValueError(f"config data.problems: {src!r} needs a path ({pool}:PATH)")
    return {pool: path}, {pool: 1.0}


def training_available(dcfg: Any) -> tuple[bool, str]:
    """Whether every pool of ``data.training.mix`` (weight > 0) has local files, and if not why."""
    pools, mix = _pools_for(TRAINING_SOURCE, dcfg)
    reasons = []
    for k, w in mix.items():
        if w > 0:
            ok, why = pool_available(pools[k], POOLS[k])
            if not ok:
                reasons.append(why)
    return (not reasons), "; ".join(reasons)


def _fallback(dcfg: Any) -> list[str] | None:
    fb = _plain(_tcfg(dcfg).get("fallback"))
    if fb is None:
        return None
    return [str(s) for s in fb] if isinstance(fb, (list, tuple)) else [str(fb)]


def sample_from_config(src: str, dcfg: Any) -> tuple[list[dict], dict]:
    """``sample_training`` with the settings of ``data.training`` for source ``src``."""
    t = _tcfg(dcfg)
    pools, mix = _pools_for(src, dcfg)
    n = t.get("n")
    keys = None if src == TRAINING_SOURCE else {k: f"data.problems={src}" for k in pools}
    return sample_training(pools, n=None if n is None else int(n), mix=mix, seed=int(t.seed),
                           decontaminate=bool(t.decontaminate), ngram=int(t.ngram),
                           data_dir=str(dcfg.data_dir), keys=keys)


def _write_manifest(dcfg: Any, manifest: dict) -> Path | None:
    """Write the manifest to ``data.training.manifest`` (relative: in the Hydra run directory; no run
    directory: not written). Returns the path written."""
    name = _tcfg(dcfg).get("manifest")
    if not name:
        return None
    path = Path(str(name))
    if not path.is_absolute():
        try:
            from hydra.core.hydra_config import HydraConfig

            path = Path(HydraConfig.get().runtime.output_dir) / path
        except Exception:  # noqa: BLE001 - no Hydra run (library use): the caller keeps the dict
            return None
    from sphere.io import atomic_write_json

    atomic_write_json(path, manifest)
    return path


def _summary(manifest: dict) -> str:
    d = manifest["decontamination"]
    pools = ", ".join(f"{k} {v['sampled']}/{v['quota']} (no answer {v['dropped_no_answer']}, duplicate "
                      f"{v['dropped_duplicate']}, contaminated {v['dropped_contaminated']})"
                      for k, v in manifest["pools"].items())
    dec = (f"decontaminated ({d['ngram']}-grams): {d['dropped_per_benchmark']}" if d["enabled"]
           else "decontamination off")
    head = f"training sample seed={manifest['seed']} mix={manifest['mix']}: {manifest['n']} problems"
    return f"{head}; {pools}; {dec}"


def load_source(src: str, dcfg: Any, seed: int, limit: int | None) -> list[dict]:
    """Problems of a training source for ``sphere.generate.run.load_problems`` (writes the manifest).
    ``training`` with a pool missing uses ``data.training.fallback`` (logged and recorded), else fails."""
    if src == TRAINING_SOURCE:
        ok, why = training_available(dcfg)
        if not ok:
            fb = _fallback(dcfg)
            if fb is None:
                # the clear error of the loader (names the pool and how to provide it)
                sample_from_config(src, dcfg)
            log.warning("data.problems=training: %s; using data.training.fallback=%s", why, fb)
            out, dropped = _fallback_problems(dcfg, seed)
            _write_manifest(dcfg, {"kind": "sphere.training_sample", "fallback": fb, "reason": why,
                                   "decontamination": dropped})
            return out if limit is None else out[:limit]
    problems, manifest = sample_from_config(src, dcfg)
    where = _write_manifest(dcfg, manifest)
    log.info("%s%s", _summary(manifest), f" (manifest: {where})" if where else "")
    return problems if limit is None else problems[:limit]


def _fallback_problems(dcfg: Any, seed: int) -> tuple[list[dict], dict]:
    """The fallback sources' problems, decontaminated against the six benchmarks like the pools when
    ``data.training.decontaminate`` is on (the shipped MATH train holds exact copies of a MATH-500 and two
    OlympiadBench problems); returns (problems, drop counts per benchmark)."""
    from sphere.data.problems import load_source as _load_source

    out: list[dict] = []
    for s in _fallback(dcfg) or []:
        out.extend(_load_source(s, dcfg, seed, None))
    t = _tcfg(dcfg)
    if not bool(t.get("decontaminate", True)):
        return out, {"enabled": False}
    dec = load_decontaminator(dcfg.get("data_dir"), int(t.get("ngram", DEFAULT_NGRAM)))
    hits = dec.find([p["problem"] for p in out])
    per: dict[str, int] = {}
    for h in hits:
        if h is not None:
            per[h.benchmark] = per.get(h.benchmark, 0) + 1
    kept = [p for p, h in zip(out, hits) if h is None]
    if per:
        log.warning("data.training.fallback: dropped %d problems overlapping the evaluation benchmarks %s",
                    len(out) - len(kept), per)
    return kept, {"enabled": True, "ngram": dec.n, "dropped_per_benchmark": per, "kept": len(kept)}


def count_source(src: str, dcfg: Any, seed: int) -> int:
    """Number of problems ``load_source`` gives (before data.limit), reading local files only (dry runs).
    With the pools present this runs the sampling and decontamination (seconds for the full datasets)."""
    if src == TRAINING_SOURCE and not training_available(dcfg)[0] and _fallback(dcfg) is not None:
        from omegaconf import OmegaConf

        from sphere.data.problems import count_problems

        if bool(_tcfg(dcfg).get("decontaminate", True)):
            return len(_fallback_problems(dcfg, seed)[0])
        sub = OmegaConf.merge(dcfg, {"problems": _fallback(dcfg), "limit": None})
        return count_problems(sub, seed)
    return len(sample_from_config(src, dcfg)[0])


def describe_source(dcfg: Any) -> dict:
    """What ``data.problems`` reads, for the dry-run plan: ``{"uses": ..., "reason": ...}``."""
    from sphere.data.problems import sources as _sources

    srcs = _sources(dcfg)
    if TRAINING_SOURCE not in srcs:
        return {"uses": srcs, "reason": "data.problems"}
    ok, why = training_available(dcfg)
    t = _tcfg(dcfg)
    if ok:
        pools, mix = _pools_for(TRAINING_SOURCE, dcfg)
        return {"uses": " + ".join(POOLS[k].title for k, w in mix.items() if w > 0),
                "reason": "data.problems=training and every pool of data.training.mix has local files",
                "pools": pools, "n": t.get("n"), "mix": mix, "seed": int(t.seed),
                "decontaminate": bool(t.decontaminate), "ngram": int(t.ngram)}
    fb = _fallback(dcfg)
    if fb is None:
        return {"uses": None, "reason": f"{why}; no data.training.fallback: loading fails"}
    return {"uses": fb, "reason": f"fallback: {why}"}
