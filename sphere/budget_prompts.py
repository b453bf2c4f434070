"""The prompt side of the length budgets: the problems a run reads, the models' tokenizers where local
(never downloaded), and the longest / typical prompt of each model (measured, estimated or an allowance)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from sphere.budget_windows import (
    CHARS_PER_TOKEN,
    LONGEST_SAMPLE,
    PROMPT_ALLOWANCE,
    TEMPLATE_ALLOWANCE,
    TYPICAL_ALLOWANCE,
    TYPICAL_SAMPLE,
    Prompt,
)
from sphere.data.benchmarks import load_benchmark, load_problems_jsonl
from sphere.data.selection import NAMED, sources
from sphere.data.training import describe_source
from sphere.evaluation.settings import round_benchmarks
from sphere.mini.world import training_problems
from sphere.modelinfo import local_model_dir
from sphere.prompts import build_reflection_ids, encode, family_config, header_text, load_family

_TOKENIZERS: dict[str, Any] = {}


def local_tokenizer(name: str) -> Any | None:
    """The tokenizer of ``name`` when its files are here (local directory, stand-in, mini model, or the local
    Hugging Face cache); None otherwise. Never downloads; no remote code."""
    if name in _TOKENIZERS:
        return _TOKENIZERS[name]
    tok = None
    d = local_model_dir(name)
    if d is not None and ((d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file()):
        try:
            if (d / "tokenizer.json").is_file():  # the fast tokenizer alone: no torch import in a dry run
                from transformers import PreTrainedTokenizerFast

                tok = PreTrainedTokenizerFast.from_pretrained(str(d), trust_remote_code=False)
            else:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(str(d), trust_remote_code=False)
        except Exception:  # noqa: BLE001 - an unreadable tokenizer: the lengths are estimated instead
            tok = None
    _TOKENIZERS[name] = tok
    return tok


def problem_texts(cfg: Any) -> tuple[list[str] | None, str]:
    """The texts of the problems ``data.problems`` gives, from local files (no hub, no pools: None)."""
    d = cfg.data
    out: list[str] = []
    for src in sources(d):
        if src == "mini":
            out += [p["problem"] for p in training_problems(int(d.mini_n), seed=int(d.mini_seed) + int(cfg.seed))]
        elif src == "training":
            uses = describe_source(d).get("uses")
            if not isinstance(uses, list) or any(u not in NAMED for u in uses):
                return None, "the NuminaMath / MetaMathQA pools"
            for u in uses:
                out += [p["problem"] for p in load_problems_jsonl(f"{d.data_dir}/{NAMED[u]}")]
        elif src.startswith(("hf:", "numina:", "metamath:")):
            return None, src
        else:
            path = f"{d.data_dir}/{NAMED[src]}" if src in NAMED else src
            out += [p["problem"] for p in load_problems_jsonl(path)]
    if d.get("limit") is not None:
        out = out[: int(d.limit)]
    return out, "training"


def benchmark_texts(cfg: Any) -> list[str] | None:
    """The problems evaluated every round (``eval.benchmarks`` + the model's extra ones, ``eval.limit``)."""
    if cfg.get("eval") is None:
        return None
    out: list[str] = []
    for b in round_benchmarks(cfg):
        out += [p["problem"] for p in load_benchmark(b, cfg.paths.data_dir, cfg.eval.get("limit"))]
    return out


def prm_input_ids(tokenizer: Any, system: str, step_tag: str, problem: str, steps: list[str]) -> list[int]:
    """The PRM's input for (problem, steps): what ``sphere.rewards.prm.PRMScorer.build_ids`` builds (kept
    equal by tests/test_budgets.py; that module imports torch, a dry run does not)."""
    clean = [st.replace(step_tag, "").strip() for st in steps]
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": problem},
        {"role": "assistant", "content": step_tag.join(clean) + step_tag},
    ]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(f"{system}\n\n{problem}\n\n{msgs[-1]['content']}")["input_ids"])


def prompt_lengths(texts: list[str] | None, src: str, tok: Any, tok_name: str,
                   count: Callable[[Any, str], int], extra_chars: int) -> Prompt:
    """Longest and typical prompt over ``texts`` (see the module docstring for the three ways)."""
    if not texts:
        return Prompt(PROMPT_ALLOWANCE, TYPICAL_ALLOWANCE,
                      f"allowance: {src} not read in a dry run")
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    n = len(order)
    longest = order[-LONGEST_SAMPLE:]
    spread = sorted({order[round(k * (n - 1) / (TYPICAL_SAMPLE - 1))] for k in range(TYPICAL_SAMPLE)})
    if tok is not None:
        def f(t: str) -> int:
            return count(tok, t)

        how = f"measured with {tok_name}'s tokenizer over {n:,} {src} problems"
    else:
        def f(t: str) -> int:
            return math.ceil((len(t) + extra_chars) / CHARS_PER_TOKEN) + TEMPLATE_ALLOWANCE

        how = (f"estimated over {n:,} {src} problems as characters / {CHARS_PER_TOKEN:g} + {TEMPLATE_ALLOWANCE} "
               f"template tokens ({tok_name}'s tokenizer is not local)")
    typ = sorted(f(texts[i]) for i in spread)
    top = tuple(sorted((f(texts[i]) for i in longest), reverse=True))
    return Prompt(top[0], typ[len(typ) // 2], how, n, top)


def measure_prompts(cfg: Any, names: dict[str, str], step: dict, measure: bool) -> dict[str, Prompt]:
    """Longest and typical prompt of every model that reads one (``names``: role -> model); sets
    ``step["delimiter_tokens"]`` from the policy's tokenizer where it is local."""
    fam = family_config(cfg)
    tfam_name = cfg.model.get("train_target_family")
    tfam = load_family(str(tfam_name)) if tfam_name else fam
    if not measure:
        texts, src, bench = None, "the problems", None
    else:
        texts, src = problem_texts(cfg)
        bench = benchmark_texts(cfg)
    instr = len(fam.get("instruction") or "") + len(fam.get("system") or "")

    def header(f: dict) -> Callable[[Any, str], int]:
        return lambda tok, t: len(encode(tok, header_text(tok, t, f), f))

    def tok(role: str) -> tuple[Any, str]:
        name = names.get(role)
        return (local_tokenizer(name) if measure and name else None), str(name)

    out: dict[str, Prompt] = {}
    t, n = tok("policy")
    out["policy"] = prompt_lengths(texts, src, t, n, header(fam), instr)
    refl = fam.get("reflection") or ""
    out["reflection"] = prompt_lengths(texts, src, t, n, lambda k, x: len(build_reflection_ids(k, x, [], fam)),
                                       instr + len(refl))
    if t is not None:
        step["delimiter_tokens"] = max(1, len(t(fam["step_delimiter"], add_special_tokens=False)["input_ids"]))
    if "small" in names:
        t2, n2 = tok("small")
        out["small"] = prompt_lengths(texts, src, t2, n2, header(fam), instr)
    if "prm" in names:
        sc = cfg.scorer
        system, tag = str(sc.get("system") or ""), str(sc.get("step_tag") or "<extra_0>")
        t3, n3 = tok("prm")
        out["prm"] = prompt_lengths(texts, src, t3, n3,
                                    lambda k, x: len(prm_input_ids(k, system, tag, x, [""])) - 1, len(system))
    t4, n4 = tok("train_target")
    out["train"] = prompt_lengths(texts, src, t4, n4, header(tfam),
                                  len(tfam.get("instruction") or "") + len(tfam.get("system") or ""))
    if "eval" in names:
        efam = tfam if cfg.model.get("train_target") else fam
        t5, n5 = tok("eval")
        out["eval"] = prompt_lengths(bench, "benchmark", t5, n5, header(efam),
                                     len(efam.get("instruction") or "") + len(efam.get("system") or ""))
    return out
