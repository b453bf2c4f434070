"""Answer extraction and normalisation: pure string work, no sympy, safe on hostile text.

Everything here runs in the calling process, so every function is linear-time in the input (no
backtracking-prone regexes over model text, bounded scans) and never evaluates anything.

- ``extract_answer(text)``: the final answer a completion commits to, by priority
  1. the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces; ``\\boxed 5`` too),
  2. the last GSM8K ``#### N`` line,
  3. the last "final answer is ..." / "the answer is ..." / "answer: ...",
  4. the last number in the text (GSM8K calculator annotations ``<<48/2=24>>`` removed first).
- ``normalize_answer(s)``: a canonical string for comparison (units, percent, degrees, thousands
  separators, ``\\dfrac``/``\\tfrac``, ``\\text{}``, ``\\left``/``\\right``, spacing, trailing punctuation).
- ``parse_number(s)``: an exact ``Fraction`` for plain numbers (int, decimal, a/b, ``\\frac{a}{b}``).
- ``fast_verdict(pred, gold)``: True / False when the answer is decided without sympy, else None. It may
  only say False when both sides are exact numbers (integers or fractions, no decimals, no percent) that
  differ, so it can never contradict math-verify on a True.
"""

from __future__ import annotations

import re
import unicodedata
from collections import deque
from fractions import Fraction

from sphere.verify.arith import try_evaluate

# Longest answer (characters) the checker considers; longer extractions are not answers but runaway text.
MAX_ANSWER_CHARS = 1000
# Longest plain number (digits) turned into a Fraction; longer literals are compared as strings only.
MAX_NUMBER_DIGITS = 200
# How many trailing \boxed occurrences to try when the last one is unbalanced (truncated output).
_MAX_BOX_TRIES = 8

_BOX_CMDS = ("\\boxed", "\\fbox")
_GSM_ANNOT = re.compile(r"<<[^<>]{0,400}>>")
_GSM_HASH = re.compile(rf"####[ \t]*([^\n]{{0,{MAX_ANSWER_CHARS}}})")
# "final answer is", "the answer is", "answer:", "answer =" (case-insensitive); the answer runs to the end
# of the line, or to a sentence end (". " / "." at end).
_ANSWER_IS = re.compile(r"(?:final\s+answer|the\s+answer|answer)\s{0,3}(?:is|:|=)[ \t]*", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


_BRACE = re.compile(r"\\[{}]|[{}]")


def balanced_from(text: str, start: int) -> tuple[str, int] | None:
    """Content of the brace group opening at ``text[start] == '{'`` and the index after it, or None.

    Scans at most ``MAX_ANSWER_CHARS`` characters: a longer group is not an answer (and the bound keeps
    hostile input, e.g. 100k unclosed braces, cheap)."""
    depth = 0
    for m in _BRACE.finditer(text, start, start + MAX_ANSWER_CHARS + 2):
        c = m.group(0)
        if len(c) == 2:  # escaped \{ \} do not nest
            continue
        if c == "{":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return text[start + 1 : m.start()], m.end()
    return None


def has_open_box(text: str) -> bool:
    """True when the text's last ``\\boxed{`` / ``\\fbox{`` is never closed: the completion was cut while
    stating its answer (``... \\boxed{3``), so the digits after it are not an answer."""
    pos, cmd = max((text.rfind(c), c) for c in _BOX_CMDS)
    if pos < 0:
        return False
    j = pos + len(cmd)
    while j < len(text) and text[j] in " \t":
        j += 1
    return j >= len(text) or (text[j] == "{" and balanced_from(text, j) is None)


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (or ``\\boxed X``), else None."""
    end = len(text)
    for _ in range(_MAX_BOX_TRIES):
        pos, cmd = max((text.rfind(c, 0, end), c) for c in _BOX_CMDS)
        if pos < 0:
            return None
        j = pos + len(cmd)
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            got = balanced_from(text, j)
            if got is not None:
                return got[0].strip()
        elif j > pos + len(cmd) and j < len(text):
            # "\boxed 5": the argument is the next token (up to whitespace or "$")
            m = re.match(rf"[^\s$]{{1,{MAX_ANSWER_CHARS}}}", text[j:])
            if m:
                return m.group(0)
        end = pos
    return None


# ------------------------------------------------------------------ Unicode math (no eval, pure mapping)
_FULLWIDTH = {c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)}  # ０-９ Ａ-Ｚ ＋ － ／ ( ) ...: their ASCII forms
_FULLWIDTH[0x3000] = 0x20  # ideographic space
_SYMBOLS = {"\u2212": "-", "\u2013": "-", "\u00d7": "\\times ", "\u22c5": "\\cdot ", "\u00b7": "\\cdot ",
            "\u00f7": "\\div ", "\u03c0": "\\pi ", "\u221e": "\\infty ", "\u2264": "\\le ", "\u2265": "\\ge ",
            "\u2260": "\\ne ", "\u2044": "/", "\u2215": "/", "\u00a0": " "}
_SUPERSCRIPTS = {"\u2070": "0", "\u00b9": "1", "\u00b2": "2", "\u00b3": "3", **{chr(0x2070 + d): str(d) for d in range(4, 10)},
                 "\u207b": "-"}
_SUPER_RUN = re.compile("[" + "".join(_SUPERSCRIPTS) + "]+")
_VULGAR = re.compile(r"(\d*)([\u00bc-\u00be\u2150-\u215e\u2189])")
_ROOT = re.compile(r"([\u221a\u221b\u221c])\s*(\d+(?:\.\d+)?|[A-Za-z]|\{[^{}]{0,200}\}|\([^()]{0,200}\))")
_ROOT_INDEX = {"\u221a": "", "\u221b": "[3]", "\u221c": "[4]"}
_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def _vulgar(m: re.Match) -> str:
    num, _, den = unicodedata.normalize("NFKC", m.group(2)).partition("\u2044")
    whole = m.group(1)
    if whole:  # a mixed number 1½ = 3/2 (not 1 times 1/2)
        return f"\\frac{{{int(whole) * int(den) + int(num)}}}{{{den}}}"
    return f"\\frac{{{num}}}{{{den}}}"


def _root(m: re.Match) -> str:
    arg = m.group(2)
    if arg[0] in "{(":
        arg = arg[1:-1]
    return f"\\sqrt{_ROOT_INDEX[m.group(1)]}{{{arg}}}"


def unicode_math(s: str) -> str:
    """Unicode math written as the ASCII/LaTeX the checker reads: full-width forms (``４２`` -> ``42``),
    vulgar fractions (``½`` -> ``\\frac{1}{2}``, ``1½`` -> ``\\frac{3}{2}``), roots (``√2`` -> ``\\sqrt{2}``,
    ``∛x``), superscripts (``x²`` -> ``x^{2}``), ``−`` ``×`` ``÷`` ``π`` ``∞`` ``≤`` ... A pure character
    mapping: nothing is evaluated. ASCII text is returned unchanged."""
    if not isinstance(s, str) or not _NON_ASCII.search(s):
        return s
    s = s.translate(_FULLWIDTH)
    s = _VULGAR.sub(_vulgar, s)
    for k, v in _SYMBOLS.items():
        s = s.replace(k, v)
    s = _SUPER_RUN.sub(lambda m: "^{" + "".join(_SUPERSCRIPTS[c] for c in m.group(0)) + "}", s)
    s = _ROOT.sub(_root, s)
    return s.strip()


def _strip_math_delims(s: str) -> str:
    s = s.strip()
    for a, b in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(a) and s.endswith(b) and len(s) >= len(a) + len(b):
            s = s[len(a) : len(s) - len(b)].strip()
    return s


def _last(it):
    """The last item of an iterator, or None (constant memory)."""
    d = deque(it, maxlen=1)
    return d[0] if d else None


def _answer_is(text: str) -> str | None:
    last = _last(_ANSWER_IS.finditer(text))
    if last is None:
        return None
    rest = text[last.end() : last.end() + 4 * MAX_ANSWER_CHARS]
    rest = rest.split("\n", 1)[0]
    if rest.startswith("$"):  # "$...$": take the math span whole (it may contain ". ")
        close = rest.find("$", 1)
        if close > 0:
            return rest[1:close].strip() or None
    m = re.search(r"\.(?:\s|$)", rest)
    if m:
        rest = rest[: m.start()]
    rest = rest.strip().rstrip(".")
    return rest or None


def extract_answer(text: str) -> str | None:
    """The final answer of a completion (see the module docstring for the priority), or None.

    Returns the raw answer span (math delimiters stripped), not normalised. None when no answer is found
    or the span exceeds ``MAX_ANSWER_CHARS``."""
    if not isinstance(text, str) or not text:
        return None
    ans = last_boxed(text)
    if ans is None and has_open_box(text):
        return None  # "\\boxed{3" (cut while stating it): truncated, not the answer 3
    if ans is None:
        m = _last(_GSM_HASH.finditer(text))
        if m is not None and m.group(1).strip():
            ans = m.group(1).strip()
    if ans is None:
        ans = _answer_is(text)
        if ans is None:  # the last number: "x = −５" is -5 (the Unicode minus and digit read as ASCII first)
            last = _last(_NUMBER.finditer(_GSM_ANNOT.sub("", unicode_math(text[-4 * MAX_ANSWER_CHARS:]))))
            if last is not None:
                ans = last.group(0).rstrip(",")
    if ans is None:
        last = _last(_NUMBER.finditer(_GSM_ANNOT.sub("", text)))
        if last is not None:
            ans = last.group(0).rstrip(",")
    if ans is None:
        return None
    ans = _strip_math_delims(unicode_math(ans))
    if len(ans) > 4 and ans.startswith("**") and ans.endswith("**"):  # markdown bold "**73**"
        ans = ans[2:-2].strip()
    if not ans or len(ans) > MAX_ANSWER_CHARS:
        return None
    return ans


# ---------------------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------------------
_TEXT_CMDS = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\[,:;! ]|\\quad|\\qquad|~|\\displaystyle|\\left|\\right|\\big|\\Big")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree")
_THOUSANDS = re.compile(r"(?<![\d.])(\d{1,3})((?:,\d{3})+)(?![\d])")
_FRAC_SHORT = re.compile(r"\\frac\s*(\d)\s*(\d)")
_FRAC_SHORT2 = re.compile(r"\\frac\s*\{([^{}]*)\}\s*(\d)")
_SQRT_SHORT = re.compile(r"\\sqrt\s*(\d)")
_ASSIGN = re.compile(r"^(?:[a-zA-Z]|\\[a-zA-Z]+)\s*=\s*(?=[^=])")
# "12 square feet", "5 cm^2": a number followed by unit words (each word >= 2 letters, unambiguous split).
_UNIT_TAIL = re.compile(r"^(-?[\d.,/]+)\s*[a-zA-Z]{2,}\.?(?:\s+[a-zA-Z]{2,}\.?)*\s*(?:\^\{?[23]\}?)?$")
_LEADING_NUM = re.compile(r"^-?(?:\d+(?:\.\d*)?|\.\d+)$")


def normalize_answer(s: str) -> str:
    """Canonical comparison string of an answer (see module docstring). Never raises."""
    if not isinstance(s, str):
        return ""
    s = unicode_math(s[: 4 * MAX_ANSWER_CHARS]).replace("**", "")  # markdown bold: "**73**" (Math-Verify#76)
    s = _strip_math_delims(s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r",\\!\s*", ",", s)
    s = s.replace("{,}", ",")
    s = _SPACING.sub(" ", s)
    s = _DEGREES.sub("", s)
    s = s.replace("\\%", "").replace("%", "")
    for _ in range(3):  # nested \text{\textbf{x}}
        s2 = _TEXT_CMDS.sub(r" \1 ", s)
        if s2 == s:
            break
        s = s2
    s = s.strip()
    s = re.sub(r"\s*\b(?:degrees?|percent|dollars?|cents?|units?)\b\.?$", "", s, flags=re.IGNORECASE)
    m = _UNIT_TAIL.match(s.strip())
    if m:
        s = m.group(1)
    s = s.strip().rstrip(".,;:").strip()
    s = _THOUSANDS.sub(lambda m: m.group(1) + m.group(2).replace(",", ""), s)
    s = _ASSIGN.sub("", s, count=1)
    s = re.sub(r"\s+", "", s)
    s = _FRAC_SHORT.sub(r"\\frac{\1}{\2}", s)
    s = _FRAC_SHORT2.sub(r"\\frac{\1}{\2}", s)
    s = _SQRT_SHORT.sub(r"\\sqrt{\1}", s)
    if _LEADING_NUM.match(s) and "." in s:  # 0.50 -> 0.5, 3.0 -> 3, .5 -> 0.5
        neg = s.startswith("-")
        body = s.lstrip("-").rstrip("0").rstrip(".")
        if body.startswith("."):
            body = "0" + body
        body = body or "0"
        s = ("-" if neg and body != "0" else "") + body
    if re.fullmatch(r"[A-Za-z ]+|\([A-Za-z]\)", s):  # word answers ("Evelyn", "(C)") compare case-free
        s = s.lower()
    return s


_FRAC_FULL = re.compile(r"^(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}$")
_SLASH = re.compile(r"^(-?\d+)/(\d+)$")
_DEC = re.compile(r"^-?(?:\d+(?:\.\d*)?|\.\d+)$")


def parse_number(norm: str) -> tuple[Fraction, bool] | None:
    """``(value, exact)`` of a normalised plain number, else None. ``exact`` is False for decimals.

    Accepts ``12``, ``-3.25``, ``.5``, ``3/4``, ``\\frac{3}{4}``, ``-\\frac{3}{4}``; at most
    ``MAX_NUMBER_DIGITS`` characters so conversion stays cheap."""
    if not norm or len(norm) > MAX_NUMBER_DIGITS:
        return None
    try:
        if _DEC.match(norm):
            return Fraction(norm), "." not in norm
        m = _SLASH.match(norm)
        if m:
            den = int(m.group(2))
            return (Fraction(int(m.group(1)), den), True) if den else None
        m = _FRAC_FULL.match(norm)
        if m:
            den = int(m.group(3))
            if not den:
                return None
            v = Fraction(int(m.group(2)), den)
            return (-v if m.group(1) else v), True
    except (ValueError, ZeroDivisionError):
        return None
    return None


_PROSE_WORD = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}")


def is_prose(ans: str) -> bool:
    """True when an answer is mostly words (>= 3 words of >= 3 letters outside \\text{} and LaTeX commands),
    e.g. "f(x)=ax+b, where b is an arbitrary integer". math-verify picks a fragment out of such text
    (an "= 0" clause) and can then call it equal to an unrelated number, so prose is compared as strings."""
    s = _TEXT_CMDS.sub(" ", ans)
    return len(_PROSE_WORD.findall(s)) >= 3


def _value(norm: str):
    """Exact (Fraction) or approximate (float) value of a normalised arithmetic answer, else None."""
    if not norm or len(norm) > 300 or not _ARITH_CHARS.fullmatch(norm):
        return None
    return try_evaluate(norm)


# Characters an arithmetic answer may contain after normalisation (cheap gate before the parser).
_ARITH_CHARS = re.compile(r"[0-9.+\-*/^(){}\[\]!a-z\\]*")


def _has_top_level_comma(norm: str) -> bool:
    """A comma outside ``{...}`` groups: a tuple, list, set or interval ("(1,2)", "3,5,7", "[2,5)")."""
    depth = 0
    for c in norm:
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif c == "," and depth == 0:
            return True
    return False


_EXPR_CHARS = re.compile(r"[0-9a-zA-Z+\-*/^(){}\\ ]+")
_FREE_VAR = re.compile(r"(?<![\\a-zA-Z])[a-df-hj-zA-Z](?![a-zA-Z])")  # one letter, not e / i / a \command
_CONST_LETTER = re.compile(r"(?<![\\a-zA-Z])[ei](?![a-zA-Z])")


def _is_expression_in_variables(norm: str) -> bool:
    """An algebraic expression with a one-letter free variable ("x^3+3x-6", "(a+5)(b+2)", "8n^2+4n+1").
    Letters e and i (constants), subscripts, relations, decimals and multi-letter words are left out, so
    anything math-verify could still call equal to a number goes to it."""
    return bool(
        _EXPR_CHARS.fullmatch(norm)
        and _FREE_VAR.search(norm)
        and not _CONST_LETTER.search(norm)
        and not re.search(r"[a-zA-Z]{2,}", re.sub(r"\\[a-zA-Z]+", " ", norm))
    )


def fast_verdict(pred: str | None, gold: str) -> bool | None:
    """Decide cheap cases in the caller's process, or return None to ask math-verify.

    True (never wrong): equal normalised strings, or two arithmetic answers with equal exact values
    (``\\frac{6}{8}`` vs ``0.75``, ``2^{10}`` vs ``1024``).
    False: no answer; an exact number against a tuple / list / interval, or against an expression in a
    one-letter variable (``17`` vs ``x^3+3x-6``); two arithmetic answers whose values differ, when no
    decimal literal or percent is involved (math-verify rounds decimals, so ``0.3333333`` vs ``1/3`` is
    left to it) and, for irrational values, when they differ by more than 1e-6 relative (floats that close
    could still be symbolically equal). Known limit: an expression whose variables cancel (``x - x + 5``)
    is not simplified here, so it is False against 5 where math-verify would say True.

    ``pred`` is an extracted answer (``extract_answer``), ``gold`` the reference answer."""
    if pred is None:
        return False
    np_, ng = normalize_answer(pred), normalize_answer(gold)
    if not ng:
        return None
    if np_ == ng:
        return True
    a, b = _value(np_), _value(ng)
    if (a is None) != (b is None) and _has_top_level_comma(ng if a is not None else np_):
        return False  # a number against a tuple / list / interval: never equal (math-verify agrees)
    if (a is None) != (b is None):
        num, raw_num, other = (a, np_ + pred, ng) if a is not None else (b, ng + gold, np_)
        if (isinstance(num, Fraction) and "." not in raw_num and "%" not in raw_num
                and _is_expression_in_variables(other)):
            return False  # 17 vs x^3+3x-6: an exact number is not a polynomial in a variable
    if a is None or b is None:
        return None
    exact = isinstance(a, Fraction) and isinstance(b, Fraction)
    if exact and a == b:
        return True
    if "." in np_ or "." in ng or "%" in pred or "%" in gold:
        return None
    if exact:
        return False
    try:
        fa, fb = float(a), float(b)
    except OverflowError:  # a huge exact value (up to arith's bit cap) next to an irrational one
        return None
    if abs(fa - fb) > 1e-6 * max(1.0, abs(fa), abs(fb)):
        return False
    return None
