"""``eval/results.md``: this run's numbers, then reference numbers reported elsewhere (with sources).

Reference numbers come from ``data/reference_results.json`` (or ``reference_results=PATH``): published
figures copied by hand with their source URL. They were NOT measured by this project, often use a
different prompt, checker or test split, and are printed in a separate, clearly labelled table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sphere.resources import resource_path

REF_FIELDS = ("model", "benchmark", "metric", "value", "setting", "source", "url")


def default_reference_path() -> Path:
    """The shipped ``data/reference_results.json``: the checkout's, or the copy inside an installed wheel."""
    return resource_path("data/reference_results.json", must_exist=False)


def load_reference_results(path: str | os.PathLike | None = None) -> list[dict]:
    """Entries of the reference file; each has ``model, benchmark, metric, value (percent), setting,
    source, url`` (+ optional ``related`` benchmark keys, ``note``). Missing file -> ``[]``."""
    p = Path(path) if path else default_reference_path()
    if not p.is_file():
        if path:  # an explicitly configured file must exist
            raise FileNotFoundError(f"reference_results: {p} not found")
        return []
    data = json.loads(p.read_text(encoding="utf-8"))
    entries = data.get("results") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{p}: expected an object with a 'results' list")
    for i, e in enumerate(entries):
        missing = [k for k in REF_FIELDS if k not in e]
        if missing:
            raise ValueError(f"{p}: results[{i}] lacks {missing}; every entry needs {list(REF_FIELDS)}")
        if not isinstance(e["value"], (int, float)) or not 0 <= e["value"] <= 100:
            raise ValueError(f"{p}: results[{i}].value must be a percentage in [0, 100], got {e['value']!r}")
        if not str(e["url"]).startswith("http"):
            raise ValueError(f"{p}: results[{i}].url must be a source URL, got {e['url']!r}")
    return entries


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown_table(results: dict, references: list[dict] | None = None) -> str:
    """This run's table (accuracy with Wilson 95% CI, pass@k / maj@k when sampled) and, below it, the
    reference numbers relevant to the run's benchmarks, each with its numbered source."""
    meta = results.get("meta", {})
    benches = {k: v for k, v in results.items() if k != "meta"}
    k_cols = {c for v in benches.values() for c in v
              if c.startswith(("pass@", "maj@")) and not c.endswith("_correct")}
    k_cols = sorted(k_cols, key=lambda c: (c.startswith("maj"), int(c.split("@")[1])))  # pass@k first
    lines = [
        "# Evaluation results",
        "",
        f"model: `{meta.get('model', '')}` · backend: `{(meta.get('backend') or {}).get('name', '')}` · "
        f"samples/problem: {(meta.get('sampling') or {}).get('n', 1)} · temperature: "
        f"{(meta.get('sampling') or {}).get('temperature', 0)}",
        "",
        "## Measured in this run",
        "",
    ]
    header = ["benchmark", "n", "correct", "accuracy %", "95% CI (Wilson)"] + [f"{c} %" for c in k_cols]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for key, v in benches.items():
        cells = [v.get("title", key), str(v["n"]), str(v["correct"]), _pct(v["accuracy"]),
                 f"{_pct(v['ci95_low'])}–{_pct(v['ci95_high'])}"]
        cells += [_pct(v[c]) if c in v else "" for c in k_cols]
        lines.append("| " + " | ".join(cells) + " |")
    skipped = {k: v.get("skipped", 0) for k, v in benches.items() if v.get("skipped")}
    if skipped:
        lines += ["", "Skipped (no completion to replay): "
                  + ", ".join(f"{k}: {n}" for k, n in skipped.items())]
    overflow = {k: v["overflow"] for k, v in benches.items() if v.get("overflow")}
    if overflow:
        lines += ["", "Counted wrong, not generated (the prompt alone is longer than the model's context window): "
                  + ", ".join(f"{k}: {n} of {benches[k]['n']}" for k, n in overflow.items())]
    refs = [r for r in (references or [])
            if r["benchmark"] in benches or any(b in benches for b in r.get("related", []))]
    if refs:
        lines += [
            "",
            "## Reported elsewhere (NOT measured here)",
            "",
            "Copied from the cited publications for orientation only: other prompts, checkers, decoding",
            "settings and sometimes other test sets (e.g. the 5,000-problem MATH test instead of MATH-500).",
            "",
            "| model | benchmark (as reported) | metric | value % | setting | source |",
            "|---|---|---|---|---|---|",
        ]
        sources: list[str] = []
        for r in refs:
            src = f"{r['source']} <{r['url']}>"
            if src not in sources:
                sources.append(src)
            lines.append(f"| {r['model']} | {r['benchmark']} | {r['metric']} | {r['value']:.1f} | "
                         f"{r['setting']} | [{sources.index(src) + 1}] |")
        lines += [""] + [f"[{i + 1}] {s}" for i, s in enumerate(sources)]
    return "\n".join(lines) + "\n"
