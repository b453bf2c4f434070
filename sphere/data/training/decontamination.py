"""Decontamination against the six evaluation benchmarks (moved out of sphere/data/training/, issue #18; the
rule is in the package docstring): ``normalize_words``, the n-gram window hashes in NumPy, the boilerplate
rules (``MAX_BENCHMARK_DF``, the ``BACKGROUND`` corpus), ``Decontaminator`` (``find(texts)`` -> a ``Match``
or None per text, every hash hit confirmed on the words) and ``load_decontaminator`` (the paper benchmarks
read from ``data_dir``)."""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from sphere.data.benchmarks import PAPER_BENCHMARKS, load_benchmark

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
    def load(name: str, role: str) -> list[dict]:
        try:
            return load_benchmark(name, data_dir)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"decontamination needs every {role}: {e} "
                                    "(or turn it off: data.training.decontaminate=false)") from None

    recs = {name: load(name, "evaluation benchmark") for name in (benchmarks or PAPER_BENCHMARKS)}
    bg = [r["problem"] for name in (background or ()) for r in load(name, "background set (boilerplate)")]
    return Decontaminator(recs, ngram, background=bg)
