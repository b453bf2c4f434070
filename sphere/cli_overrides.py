"""The overrides `sphere <command>` rewrites before Hydra composes (sphere.cli): the default option of each
config group a primary config (and its default experiment) picks, ``model=PATH`` as ``model.policy=PATH``,
and the prompt family a model brings (``family_overrides``)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from sphere.prompts import UnknownPromptFamily, detect_family


def defaults_groups(cdir: Path, config_name: str, seen: set | None = None) -> dict[str, str]:
    """group -> default option of a primary config, following its parent configs (``- config``). A group
    under another package keeps it in the key (``train_opts@train``: what an override must spell). The
    default experiment's own ``override /group: option`` entries are the effective defaults, so they win."""
    seen = set() if seen is None else seen
    if config_name in seen or not (cdir / f"{config_name}.yaml").is_file():
        return {}
    seen.add(config_name)
    out: dict[str, str] = {}
    for item in OmegaConf.to_container(OmegaConf.load(cdir / f"{config_name}.yaml")).get("defaults", []):
        if isinstance(item, str):
            if item != "_self_":
                out.update(defaults_groups(cdir, item, seen))
            continue
        for k, v in item.items():
            group = k.replace("override ", "").strip().lstrip("/")
            out[group] = "null" if v is None else str(v)
    exp = out.get("experiment")
    if exp and exp != "null":
        out.update({g: v for g, v in _experiment_overrides(cdir, exp).items() if g in out})
    return out


def _experiment_overrides(cdir: Path, exp: str, seen: set | None = None) -> dict[str, str]:
    """group -> option an experiment's ``override /group: option`` entries set, after those of the
    experiments it includes (``- mini_planted`` in conf/experiment/loop_check.yaml), which it overrides."""
    seen = set() if seen is None else seen
    path = cdir / "experiment" / f"{exp}.yaml"
    if exp in seen or not path.is_file():
        return {}
    seen.add(exp)
    out: dict[str, str] = {}
    for item in OmegaConf.to_container(OmegaConf.load(path)).get("defaults", []):
        if isinstance(item, str):
            if item != "_self_":
                out.update(_experiment_overrides(cdir, item, seen))
            continue
        for k, v in item.items():
            if k.startswith("override "):
                out[k.replace("override ", "").strip().lstrip("/")] = "null" if v is None else str(v)
    return out


def _model_values(val: str, cdir: Path) -> list[str] | None:
    """The models of ``model=VAL`` that are paths or hub names (a multirun sweep ``a,b`` gives several);
    None when VAL names options of conf/model/ (or mixes them with paths: Hydra reports that)."""
    vals = [v.strip() for v in val.split(",")] if val else []
    if not vals or any(not v or (cdir / "model" / f"{v}.yaml").is_file() for v in vals):
        return None
    return vals


def rewrite_model_override(args: list[str], cdir: Path) -> list[str]:
    """``model=X`` with X not in conf/model/ becomes ``model.policy=X`` (a path or a hub name); a sweep
    ``model=X,Y`` of such values becomes ``model.policy=X,Y``."""
    out = []
    for a in args:
        if a.startswith("model=") and _model_values(a.split("=", 1)[1], cdir) is not None:
            a = f"model.policy={a.split('=', 1)[1]}"
        out.append(a)
    return out


def _value(args: list[str], key: str) -> str | None:
    """The value of the last ``key=VALUE`` override in ``args`` (None if absent)."""
    vals = [a.split("=", 1)[1] for a in args if a.split("=", 1)[0].lstrip("+") == key and "=" in a]
    return vals[-1] if vals else None


def family_overrides(args: list[str], cdir: Path, note=None) -> list[str]:
    """The prompt family follows the model (``sphere.prompts.detect_family``).

    - ``model=X`` with X a local directory or hub name (not an option of conf/model/): X's chat template
      decides (Qwen2.5-Instruct -> qwen2_5, R1 distill -> deepseek_r1, phi-4 -> phi4, ...) and
      ``model.family=F prompt=F`` are added; a model without a chat template keeps the configured family
      (its plain ``template``); one whose family cannot be told is refused unless ``prompt=`` is given.
    - ``prompt=F`` given explicitly wins: ``model.family=F`` is added (``sphere.prompts.family_config``
      otherwise prefers ``model.family``), unless ``model.family=`` is given too.
    ``note(msg)`` receives one line saying what was decided (the CLI prints it to stderr)."""
    prompt = _value(args, "prompt")
    if prompt is not None and "," in prompt:
        return []
    if _value(args, "model.family") is not None:
        return []
    if prompt is not None:
        return [f"model.family={prompt}"]
    model = _value(args, "model")
    models = _model_values(model, cdir) if model is not None else None
    if not models:
        return []
    found = {}
    for m in models:
        try:
            found[m] = detect_family(m)
        except UnknownPromptFamily as e:
            raise SystemExit(f"sphere: {e}") from None
    fams = {fam for fam, _ in found.values()}
    if len(fams) > 1:  # a sweep over models of different families: one prompt cannot serve them all
        raise SystemExit(f"sphere: model={model}: the models want different prompt families ("
                         + ", ".join(f"{m}: {f or 'configured'}" for m, (f, _) in found.items())
                         + "); sweep them in separate commands or pass prompt=FAMILY")
    fam, why = next(iter(found.values()))
    if fam is None:
        if note is not None:
            note(f"sphere: model={model}: {why}; the configured prompt family is kept")
        return []
    if note is not None:
        note(f"sphere: model={model}: prompt family {fam} ({why}); prompt=FAMILY overrides it")
    return [f"model.family={fam}", f"prompt={fam}"]
