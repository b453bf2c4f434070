"""Bit-exact prefixes of the shipped checkpoints' builds: the reproducibility check every CI run makes.

The full check rebuilds the shipped mini policy (``sphere pretrain-mini mini=policy``, ~13 min on one core)
and the Qwen-shaped stand-in family (``python -m sphere.testing.standin OUT``, ~8 min) from nothing and
compares them with the shipped checkpoints. Those two tests carry the ``nightly`` marker and run in the
nightly job (``bash scripts/nightly.sh``), not in every CI run (issue #16: CI in ~45 minutes).

Every CI run checks a prefix instead: the same builds, schedules unchanged, stopped after ``STEPS`` optimizer
steps, must give weights whose sha256 equal the digests recorded in ``assets/build_prefix_digests.json``. A
prefix exercises everything a build does except the remaining steps -- problem and drill generation, the
tokenizer, initialisation, the Llama -> Qwen2 conversion, the data order, the optimizer and the LR schedule --
so a change to any of them fails CI in about a minute.

The digests are written by ``python -m sphere.testing.build_prefix --write`` from the same commit as a
nightly run that reproduced the shipped checkpoints; without ``--write`` it compares (what the CI test does)
and exits 1 on a difference.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

# optimizer steps of each prefix: past the warmup (50 steps for the mini policy, 20 for the stand-ins), so
# the cosine part of every schedule is exercised too
STEPS = {"mini": 60, "standin": 25}


def digests_path() -> Path:
    from sphere.resources import resource_path

    return resource_path("assets") / "build_prefix_digests.json"


def _versions() -> dict:
    import tokenizers
    import torch
    import transformers
    import trl

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "trl": trl.__version__}


def mini_prefix(out: Path, steps: int = STEPS["mini"]) -> dict[str, str]:
    """{"mini": sha256} of the shipped mini policy's recipe stopped after ``steps`` steps."""
    from sphere.mini import load_recipe
    from sphere.mini.pretrain import sha256_file, train

    train(load_recipe("policy"), out / "mini", progress=False, stop_after=steps)
    return {"mini": sha256_file(out / "mini" / "model.safetensors")}


def standin_prefix(out: Path, steps: int = STEPS["standin"]) -> dict[str, str]:
    """{stand-in name: sha256} of the stand-in build (policy, small, PRM) stopped after ``steps`` steps."""
    from sphere.mini.pretrain import sha256_file
    from sphere.testing import standin as S

    S.build(out, evaluate=False, stop_after=steps)
    names = [S.DIR_OF[r] for r in ("policy", "small", "prm")]
    return {n: sha256_file(out / n / "model.safetensors") for n in names}


BUILDS = {"mini": mini_prefix, "standin": standin_prefix}


def compute(which: str, out: Path) -> dict:
    return {"steps": STEPS[which], "sha256": BUILDS[which](out)}


def recorded() -> dict:
    p = digests_path()
    if not p.is_file():
        raise FileNotFoundError(f"{p}: missing; write it with "
                                "`python -m sphere.testing.build_prefix --write`")
    return json.loads(p.read_text())


def compare(which: str, got: dict) -> list[str]:
    """Differences between a computed prefix and the recorded one ([] = reproduced)."""
    rec = recorded()
    want = rec["builds"][which]
    problems = []
    if got["steps"] != want["steps"]:
        problems.append(f"{which}: prefix of {got['steps']} steps, recorded {want['steps']}")
    for name, sha in want["sha256"].items():
        if got["sha256"].get(name) != sha:
            problems.append(f"{which}/{name}: weights after {want['steps']} steps have sha256 "
                            f"{got['sha256'].get(name)}, recorded {sha}")
    if problems and rec.get("versions") != _versions():
        problems.append(f"(recorded with {rec.get('versions')}, running {_versions()}: bitwise reproduction "
                        "holds only for the same library builds)")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sphere.testing.build_prefix", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help=f"record the digests into {digests_path()}")
    ap.add_argument("--only", choices=sorted(BUILDS), help="one build (default: both)")
    a = ap.parse_args(argv)
    builds = [a.only] if a.only else sorted(BUILDS)
    got = {}
    with tempfile.TemporaryDirectory(prefix="sphere-prefix-") as tmp:
        for which in builds:
            got[which] = compute(which, Path(tmp) / which)
            print(f"{which}: {json.dumps(got[which])}", file=sys.stderr)
    if a.write:
        rec = recorded()["builds"] if digests_path().is_file() else {}
        rec.update(got)
        digests_path().write_text(json.dumps({
            "about": "sha256 of the shipped builds' weights after a prefix of their optimizer steps; "
                     "see sphere/testing/build_prefix.py",
            "versions": _versions(), "builds": dict(sorted(rec.items()))}, indent=1) + "\n")
        print(f"wrote {digests_path()}")
        return 0
    problems = [p for which in builds for p in compare(which, got[which])]
    print("\n".join(problems) if problems else "prefixes reproduced")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
