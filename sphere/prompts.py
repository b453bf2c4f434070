"""Prompt families: (problem, steps so far) -> prompt text / token ids; the stage-2 reflection prompt.

A family is a config in ``conf/prompt/<family>.yaml`` (fields documented there): ``system``,
``instruction``, ``template`` (used without a chat template), ``assistant_prefix``, ``step_delimiter``,
``use_chat_template``, ``reflection``. The composed config carries the chosen family as ``cfg.prompt``
(``sphere ... prompt=qwen2_5_math``); ``family_config(cfg)`` returns it.

The prompt for a partial solution is the family header followed by the steps, each followed by the
delimiter, so the model's next tokens are the next step::

    <header><step 1><delim><step 2><delim>          -> the backend samples <step 3> up to <delim>

Token ids are produced once here and handed to the backend; nothing is tokenised twice.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sphere.model_paths import looks_like_path, model_files
from sphere.resources import resource_path
from sphere.schema import defaults
from sphere.schema_models import PromptSettings

FAMILIES = ("mini", "qwen2_5", "qwen2_5_math", "phi4", "deepseek_r1")
REQUIRED = ("system", "instruction", "template", "assistant_prefix", "step_delimiter", "use_chat_template",
            "reflection")


def _conf_dir() -> Path:
    return resource_path("conf")


def load_family(name: str) -> dict:
    """Read ``conf/prompt/<name>.yaml`` as a plain dict (outside Hydra: scripts, tests): the file over
    ``PromptSettings``' defaults (sphere/schema_models.py; the file writes only what differs), as Hydra
    composes it (``- /settings/prompt/<name>@_here_``), in the fields' order."""
    path = _conf_dir() / "prompt" / f"{name}.yaml"
    if not path.is_file():
        have = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise FileNotFoundError(f"prompt family {name!r}: {path} not found; available: {have}")
    own = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    own.pop("defaults", None)
    merged = {**defaults(PromptSettings), **own}
    order = [f.name for f in dataclasses.fields(PromptSettings)]
    fam = {**{k: merged[k] for k in order if k in merged},
           **{k: v for k, v in merged.items() if k not in order}}
    return validate_family(fam, str(path))


def validate_family(fam: Mapping[str, Any], where: str = "prompt") -> dict:
    fam = dict(fam)
    missing = [k for k in REQUIRED if k not in fam]
    if missing:
        raise KeyError(f"{where}: prompt family config lacks {missing}; required fields: {list(REQUIRED)}")
    if not isinstance(fam["step_delimiter"], str) or not fam["step_delimiter"]:
        raise ValueError(f"{where}: step_delimiter must be a non-empty string, got {fam['step_delimiter']!r}")
    if "{problem}" not in fam["template"]:
        raise ValueError(f"{where}: template must contain {{problem}}, got {fam['template']!r}")
    return fam


def family_config(cfg) -> dict:
    """The prompt family of a composed config.

    ``cfg.prompt`` (conf/prompt/<name>.yaml, with any command-line overrides) when its ``name`` equals
    ``cfg.model.family``; otherwise ``model.family`` wins and conf/prompt/<model.family>.yaml is loaded, so
    ``model=qwen2_5_7b`` alone picks the Qwen prompts (override fields with ``prompt=qwen2_5 prompt.x=...``).
    """
    model = cfg.get("model") if hasattr(cfg, "get") else None
    family = model.get("family") if model is not None else None
    node = cfg.get("prompt") if hasattr(cfg, "get") else None
    if node is None or (family and node.get("name") != family):
        return load_family(family or "mini")
    data = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    return validate_family(data, "cfg.prompt")


# --- which prompt family a model wants (`model=PATH_OR_HUB_NAME` on the command line, sphere/cli.py)
# Markers of the chat templates the families are written for (tests/fixtures/chat_templates/, the real models'
# templates byte for byte): checked in this order, the first that matches decides.
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within"  # then \\boxed{} (escaped)
TEMPLATE_RULES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("deepseek_r1", ("<｜Assistant｜>",), "DeepSeek-R1 distill chat template (<｜User｜>/<｜Assistant｜> turns)"),
    ("phi4", ("<|im_sep|>",), "phi-4 chat template (<|im_start|>role<|im_sep|>)"),
    ("phi4", ("<|assistant|>", "<|end|>"), "Phi-4-mini / Phi-3 chat template (<|role|> ... <|end|>)"),
    ("qwen2_5_math", ("<|im_start|>", QWEN_MATH_SYSTEM),
     "Qwen2.5-Math chat template (ChatML, default system message 'Please reason step by step ...')"),
    ("qwen2_5", ("<|im_start|>", QWEN_DEFAULT_SYSTEM),
     "Qwen2.5-Instruct chat template (ChatML, default system message 'You are Qwen ...')"),
)
# Hub names whose files are not at hand (offline, not in the local cache): the families the configs name
# (conf/model/*.yaml). Matched on the lower-cased name; first match wins.
NAME_RULES: tuple[tuple[str, str], ...] = (
    ("deepseek-r1-distill", "deepseek_r1"),
    ("qwen2.5-math", "qwen2_5_math"),
    ("qwen2.5-", "qwen2_5"),
    ("phi-4", "phi4"),
)


class UnknownPromptFamily(ValueError):
    """A model's prompt family cannot be told from its files or name (the message says what to pass)."""


def family_from_template(template: str | None) -> tuple[str | None, str]:
    """``(family, why)`` for a chat template text; ``(None, why)`` when it matches no family's markers."""
    if not template:
        return None, "no chat template"
    for fam, markers, what in TEMPLATE_RULES:
        if all(m in template for m in markers):
            return fam, what
    return None, "a chat template that matches none of the prompt families (conf/prompt/)"


def _template_of(files: Mapping[str, Any]) -> str | None:
    """The chat template among a model's files: ``chat_template.jinja`` (transformers >= 4.47 writes it there)
    or ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of named templates: ``default``)."""
    jinja = files.get("chat_template.jinja")
    if jinja is not None and Path(jinja).is_file():
        return Path(jinja).read_text(encoding="utf-8")
    tc = files.get("tokenizer_config.json")
    if tc is None or not Path(tc).is_file():
        return None
    try:
        ct = json.loads(Path(tc).read_text(encoding="utf-8")).get("chat_template")
    except (ValueError, OSError):
        return None
    if isinstance(ct, list):
        named = {d.get("name"): d.get("template") for d in ct if isinstance(d, dict)}
        ct = named.get("default") or next(iter(named.values()), None)
    return ct if isinstance(ct, str) else None


def detect_family(model: str) -> tuple[str | None, str]:
    """The prompt family a model wants, from its chat template: ``(family, why)``.

    ``model`` is a local HF directory, a stand-in name or a hub name ``org/name``. A local directory (or a hub
    model in the local cache, or one fetched when the hub is reachable: two small JSON/Jinja files) is read:
    its chat template decides (``TEMPLATE_RULES``). A model without a chat template returns ``(None, "no chat
    template")``: the caller keeps the configured family (the plain ``template``). A hub name whose files are
    not at hand is matched by name (``NAME_RULES``). Raises ``UnknownPromptFamily`` when nothing decides (a
    chat template of another family, an unknown hub name), never falling back to the mini prompt. A local
    path that does not exist (or a word that is neither a path nor a hub name) returns ``(None, why)``:
    loading the model fails later with it named; ``mini`` / ``mini-small`` have no chat template."""
    s = str(model).strip()
    if s in ("mini", "mini-small"):  # sphere's own mini models: no chat template
        return None, f"{s}: the mini world's model, no chat template"
    found, where = model_files(s, ("chat_template.jinja", "tokenizer_config.json"))
    hub_name = not looks_like_path(s) and s.count("/") == 1 and not Path(s).expanduser().exists()
    if found is None and not hub_name:  # a missing path or an unknown word: loading the model fails, naming it
        return None, f"{where}: loading it will fail, naming it"
    if found is not None:
        fam, why = family_from_template(_template_of(found))
        if fam is not None or why == "no chat template":
            return fam, f"{why} ({where})"
        raise UnknownPromptFamily(f"model={model}: {why} ({where}); pass prompt=FAMILY "
                                  f"({' | '.join(FAMILIES)})")
    low = str(model).lower()
    for needle, fam in NAME_RULES:
        if needle in low:
            return fam, f"by its name ({where})"
    raise UnknownPromptFamily(f"model={model}: cannot tell its prompt family ({where}; not a known model "
                              f"name); pass prompt=FAMILY ({' | '.join(FAMILIES)})")


def user_text(fam: Mapping[str, Any], problem: str) -> str:
    instr = fam.get("instruction") or ""
    return f"{problem}\n{instr}".strip() if instr else problem


def uses_chat(tokenizer, fam: Mapping[str, Any]) -> bool:
    return bool(fam.get("use_chat_template")) and bool(getattr(tokenizer, "chat_template", None))


def _with_assistant_prefix(head: str, fam: Mapping[str, Any]) -> str:
    """``head`` followed by the family's ``assistant_prefix``, unless ``head`` already ends with it: DeepSeek's
    updated R1-distill chat templates end the generation prompt with ``<think>\n`` themselves, the first
    release did not, and either revision must give one ``<think>\n``, never two."""
    prefix = fam.get("assistant_prefix") or ""
    return head if prefix and head.endswith(prefix) else head + prefix


def header_text(tokenizer, problem: str, fam: Mapping[str, Any]) -> str:
    """The prompt before the first step (chat template when the tokenizer has one and the family wants it)."""
    if uses_chat(tokenizer, fam):
        msgs = []
        if fam.get("system"):
            msgs.append({"role": "system", "content": fam["system"]})
        msgs.append({"role": "user", "content": user_text(fam, problem)})
        head = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return _with_assistant_prefix(head, fam)
    return _with_assistant_prefix(fam["template"].format(problem=problem, instruction=fam.get("instruction") or "",
                                                         system=fam.get("system") or ""), fam)


def steps_text(steps: Sequence[str], delimiter: str) -> str:
    """Steps so far, each followed by the delimiter ("" when there are none)."""
    return "".join(f"{s}{delimiter}" for s in steps)


def build_prompt_text(tokenizer, problem: str, steps: Sequence[str], fam: Mapping[str, Any]) -> str:
    return header_text(tokenizer, problem, fam) + steps_text(steps, fam["step_delimiter"])


def encode(tokenizer, text: str, fam: Mapping[str, Any]) -> list[int]:
    # A chat template renders its own BOS; a plain template gets the tokenizer's special tokens.
    return list(tokenizer(text, add_special_tokens=not uses_chat(tokenizer, fam))["input_ids"])


def build_prompt_ids(tokenizer, problem: str, steps: Sequence[str], fam: Mapping[str, Any]) -> list[int]:
    """Token ids of the prompt for the next step after ``steps`` (``[]`` -> the first step)."""
    return encode(tokenizer, build_prompt_text(tokenizer, problem, steps, fam), fam)


def build_reflection_text(tokenizer, problem: str, steps: Sequence[str], fam: Mapping[str, Any],
                          continue_steps: Sequence[str] = ()) -> str:
    """Stage 2 (self-correction): the family's ``reflection`` template around a flawed attempt, then the
    corrected solution starts (``continue_steps`` are steps of the corrected solution so far)."""
    delim = fam["step_delimiter"]
    attempt = delim.join(steps)
    body = fam["reflection"].format(problem=problem, attempt=attempt, instruction=fam.get("instruction") or "")
    if uses_chat(tokenizer, fam):
        msgs = []
        if fam.get("system"):
            msgs.append({"role": "system", "content": fam["system"]})
        msgs.append({"role": "user", "content": body})
        head = _with_assistant_prefix(tokenizer.apply_chat_template(msgs, tokenize=False,
                                                                    add_generation_prompt=True), fam)
    else:
        head = body
    return head + steps_text(continue_steps, delim)


def build_reflection_ids(tokenizer, problem: str, steps: Sequence[str], fam: Mapping[str, Any],
                         continue_steps: Sequence[str] = ()) -> list[int]:
    return encode(tokenizer, build_reflection_text(tokenizer, problem, steps, fam, continue_steps), fam)
