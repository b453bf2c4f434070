"""The typed ``construction``, ``prompt`` and ``model`` settings (sphere.schema): each field's type, default,
range and doc. ``construction`` has one dataclass per option of conf/construction/ (``name`` picks it);
``prompt`` one dataclass that every family of conf/prompt/ shares (registered once per option name);
``model`` one dataclass that every file of conf/model/ composes over. The code that reads a group keeps its
own checks (with the messages their tests pin): sphere/generate/constructions.py (``Construction.from_cfg``,
``check_construction_override``), sphere/prompts.py (``validate_family``); the ranges here repeat them so
that ``check_config`` refuses a bad value before anything runs. sphere/prompts.py (``load_family``) reads a
conf/prompt/ file outside Hydra over ``PromptSettings``' defaults (``sphere.schema.defaults``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from sphere.schema_fields import _f, _given, _name

# ======================================================================================== construction
_CONSTRUCTION = ("the pair construction: sphere | first_wrong_step | siblings | best_worst_of_n "
                 "(conf/construction/{}.yaml writes it; construction=NAME picks it)")
_SEARCH_FROM = ("a generate directory (or a `sphere run` round_1/) whose stage logs seed this run: no new "
                "search, pairs built from that one (its config_hash must match this run's); null = search")
_CUTS = ("step", "remainder")


def _cut(what: str) -> Any:
    return _f("remainder", f"remainder: {what} | step: the diverging step(s) only (then "
              "train.append_eos=false)", choices=_CUTS)


def _max_per_problem(order: str) -> Any:
    return _f(1, f"pairs kept per problem, {order} first (0 = all)", ge=0,
              word="an integer >= 0 (0 = every pair)")


@dataclass
class SphereConstructionSettings:
    """The paper's pairs (arXiv 2503.04813): Sol_max over Sol_min (stage 1), the corrected solution over the
    attempt (stage 2), the policy's right solution over the small model's most plausible wrong one
    (stage 3)."""

    name: str = _name(_CONSTRUCTION.format("sphere"))
    search_from: Optional[str] = _f(None, _SEARCH_FROM)


@dataclass
class FirstWrongStepConstructionSettings:
    """Step-DPO (Lai et al. 2024) over the policy's stage-1 tree: a wrong chain is cut at its first wrong step
    (the first step whose recorded step score is below step_threshold; its last step when the scores flag none
    and the answer check says wrong), paired with the right chain sharing its longest correct prefix. Prompt =
    problem + that prefix; chosen / rejected = the diverging step (cut: step) or the rest (cut: remainder)."""

    name: str = _name(_CONSTRUCTION.format("first_wrong_step"))
    step_threshold: float = _f(0.5, "a step scored below this (raw step score in [0, 1]) is wrong",
                               ge=0, le=1)
    cut: str = _cut("the rest of each chain (step: only when the chains part exactly at the first wrong "
                    "step)")
    max_per_problem: int = _max_per_problem("longest shared prefix")
    search_from: Optional[str] = _f(None, _SEARCH_FROM)


@dataclass
class SiblingsConstructionSettings:
    """Per-node sibling steps of the policy's stage-1 tree: at a node with several child steps, the child the
    step scorer ranks highest among those with a right chain below over the child it ranks lowest among those
    with only wrong chains below, when their step scores differ by at least ``margin``. Prompt = problem + the
    node's prefix."""

    name: str = _name(_CONSTRUCTION.format("siblings"))
    margin: float = _f(0.2, "minimum step-score gap between the chosen and the rejected sibling", ge=0)
    cut: str = _cut("the rest of the chains through the two steps")
    max_per_problem: int = _max_per_problem("widest score gap")
    search_from: Optional[str] = _f(None, _SEARCH_FROM)


@dataclass
class BestWorstOfNConstructionSettings:
    """RLHFlow-style online DPO: ``samples`` full solutions per problem from the random-pairs control's
    sampler (sphere.controls.sample_solutions: the evaluation harness at search.temperature, no tree), scored
    by the step scorer; the right sample it ranks highest over the wrong sample it ranks lowest. The samples
    are taken while the policy is loaded (best_worst_of_n/ in the generate directory; a rerun resumes
    them)."""

    name: str = _name(_CONSTRUCTION.format("best_worst_of_n"))
    samples: int = _f(4, "solutions sampled per problem (>= 2)", ge=2, word="an integer >= 2")
    search_from: Optional[str] = _f(None, _SEARCH_FROM + " (and its samples)")


CONSTRUCTION_OPTIONS: dict[str, type] = {
    "sphere": SphereConstructionSettings, "first_wrong_step": FirstWrongStepConstructionSettings,
    "siblings": SiblingsConstructionSettings, "best_worst_of_n": BestWorstOfNConstructionSettings}


# ============================================================================================== prompt
_BOXED = "Please reason step by step, and put your final answer within \\boxed{}."
_REFLECTION = ("{problem}\n\nHere is a solution to review:\n\n{attempt}\n\nReview this solution step "
               "by step. If a step is wrong, correct it and write a complete corrected solution; if every "
               "step is right, write the solution again. {instruction}")


@dataclass(kw_only=True)
class PromptSettings:
    """A prompt family (conf/prompt/<family>.yaml, sphere/prompts.py): how a problem and the steps so far
    become a prompt. Every family has these fields; the defaults are those of the chat families (qwen2_5,
    phi4, deepseek_r1), and a family's file writes only what differs."""

    name: str = _name("the prompt family: mini | qwen2_5 | qwen2_5_math | phi4 | deepseek_r1 "
                      "(conf/prompt/<name>.yaml writes it)")
    system: str = _f("", "system message (chat-template families only; \"\" = none, or the template's "
                     "default system message)")
    instruction: str = _f(_BOXED, "instruction appended to the problem in the user turn / available as "
                          "{instruction} in `template`")
    template: str = _given("plain prompt used when the tokenizer has no chat template or use_chat_template "
                           "is false. Placeholders: {problem} (required), {instruction}, {system}")
    assistant_prefix: str = _f("", "text the assistant turn starts with (e.g. \"<think>\\n\" for R1 "
                               "distills); \"\" = none")
    step_delimiter: str = _f("\n\n", "separator between solution steps; the backend stops each next-step "
                             "sample here (non-empty)")
    use_chat_template: bool = _f(True, "use the tokenizer's chat template when it has one (false: always "
                                 "`template`)")
    reflection: str = _f(_REFLECTION, "stage-2 (self-correction) prompt. Placeholders: {problem}, {attempt} "
                         "(steps joined by the delimiter), {instruction}. The corrected solution's steps "
                         "follow it")
    answer_after: str = _f("", "a step with a \\boxed{} answer ends the solution only after this marker (R1 "
                           "distills think first: a boxed answer inside the thinking block does not end the "
                           "search; the one after </think> does). \"\" = any boxed answer")


# every family of conf/prompt/ has the same fields (sphere.prompts.FAMILIES)
PROMPT_OPTIONS: dict[str, type] = {f: PromptSettings for f in
                                   ("mini", "qwen2_5", "qwen2_5_math", "phi4", "deepseek_r1")}


# =============================================================================================== model
@dataclass(kw_only=True)
class ModelSettings:
    """The models of a run (conf/model/<name>.yaml): the policy, the smaller model of stage 3, the step
    scorer's model and the prompt family. ``model=PATH_OR_NAME`` on the command line (not a file of
    conf/model/) sets ``policy`` over the default file and picks the family from the model's chat template
    (sphere/cli_overrides.py)."""

    policy: Optional[str] = _given("policy model: \"mini\" (built/cached locally), a stand-in name "
                                   "(assets/standin/), a local HF directory, or a hub name")
    small: Optional[str] = _given("smaller model of the same family, for stage 3 (diversity induction)")
    prm: Optional[str] = _given("step scorer's model: symbolic | rollout | a PRM model path/name (scorer=prm "
                                "uses it)")
    family: str = _given("prompt family (conf/prompt/; sphere.prompts.family_config: it wins over a composed "
                         "prompt of another name)")
    trust_remote_code: bool = _f(False, "never on unless a config says so: model repos can ship code")
    dtype: str = _f("float32", "float32 | bfloat16 | float16 (CPU: float32)")
    train_target: Optional[str] = _f(None, "train another model on this policy's pairs (transfer "
                                     "experiments); null = the policy")
    train_target_family: Optional[str] = _given("prompt family of train_target, for its evaluation (transfer "
                                                "experiments; absent = the policy's family)")
    extra_eval_benchmarks: Any = _given("benchmarks also evaluated every round (a list, e.g. [mini]: the "
                                        "stand-ins' own test split); absent = none")
