"""Bit-exact prefixes of the shipped checkpoints' builds: the reproducibility check every CI run makes.

The full check rebuilds the shipped mini policy (``sphere pretrain-mini mini=policy``, ~13 min on one core)
and the Qwen-shaped stand-in family (``python -m sphere.standins.qwen2_5 OUT``, ~8 min) from nothing and
compares them with the shipped checkpoints. Those two tests carry the ``nightly`` marker and run in the
nightly job (``bash scripts/nightly.sh``), not in every CI run (issue #16: CI in ~45 minutes).

Every CI run checks a prefix instead: the same builds, schedules unchanged, stopped after ``STEPS`` optimizer
steps, must give the weights recorded in ``assets/build_prefix_digests.json``. A prefix exercises everything
a build does except the remaining steps -- problem and drill generation, the tokenizer, initialisation, the
Llama -> Qwen2 conversion, the data order, the optimizer and the LR schedule -- so a change to any of them
fails CI in about a minute.

Within a tolerance, not bit for bit (issue "Tests that catch a wrong pick"): the same library builds on
another CPU of the supported kind sum floats in another order, so the sha256 differs there (seen: AMD EPYC vs
the recording machine) although nothing changed. Each tensor is recorded as its RMS and ``PROJECTIONS``
seeded random projections (float64 dot products with Gaussian vectors, divided by sqrt(size): each moves by
about the RMS of a weight difference). A prefix reproduces when every projection is within ``REL_TOL`` x the
tensor's RMS of the recorded one. The tolerance (``--calibrate``): torch's generic CPU kernels against its
AVX2 ones (``ATEN_CPU_CAPABILITY``: another summation order, as on another CPU) move the projections by the
"kernels" drift after the prefix; a real change (one optimizer step fewer) by at least the "one step" drift;
``REL_TOL`` sits between them (figures in assets/build_prefix_digests.json, "calibration"). The sha256 are kept and reported: equal means bit-identical.

The training loss curve is compared too: every step's loss must be within ``LOSS_REL_TOL`` of the recorded
one, relative. Calibrated the same way: the kernels' drift of the losses, against a real change, the curve
read one step off (a batch or a schedule shifted by one), the smallest such change over a build's models.

The digests are written by ``python -m sphere.standins.build_prefix --write`` from the same commit as a
nightly run that reproduced the shipped checkpoints; without ``--write`` it compares (what the CI test does)
and exits 1 on a difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import tokenizers
from safetensors.numpy import load_file

from sphere.mini import load_recipe
from sphere.mini.pretrain import sha256_file
from sphere.mini.training import train
from sphere.resources import resource_path
from sphere.standins import qwen2_5 as S

# optimizer steps of each prefix: past the warmup (50 steps for the mini policy, 20 for the stand-ins), so
# the cosine part of every schedule is exercised too
STEPS = {"mini": 60, "standin": 25}
PROJECTIONS = 4
REL_TOL = 3e-3  # see the module docstring and --calibrate (the stand-ins: kernels 6.2e-4, one step 0.14)
LOSS_REL_TOL = 1e-3  # of a logged training loss; see the module docstring and --calibrate


def digests_path() -> Path:
    return resource_path("assets") / "build_prefix_digests.json"


def _versions() -> dict:
    import torch
    import transformers
    import trl

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "trl": trl.__version__}


def fingerprint(path: Path) -> dict[str, list[float]]:
    """{tensor: [rms, projection_1, ...]} of a safetensors file (module docstring)."""
    out = {}
    for name, t in sorted(load_file(str(path)).items()):
        x = np.asarray(t, dtype=np.float64).ravel()
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        scale = np.sqrt(max(1, x.size))
        out[name] = [float(np.sqrt((x * x).mean()))] + [
            float(x @ rng.standard_normal(x.size) / scale) for _ in range(PROJECTIONS)]
    return out


def _model(path: Path) -> dict:
    return {"sha256": sha256_file(path), "fingerprint": fingerprint(path)}


def mini_prefix(out: Path, steps: int = STEPS["mini"]) -> dict[str, dict]:
    """{"mini": {sha256, fingerprint, loss}} of the shipped mini policy's recipe stopped after ``steps`` steps
    (``loss``: [step, training loss] of every step, as the trainer logs it)."""
    stats = train(load_recipe("policy"), out / "mini", progress=False, stop_after=steps, log_every=1)
    return {"mini": {**_model(out / "mini" / "model.safetensors"),
                     "loss": [[int(k), float(v)] for k, v in stats["loss_curve"]]}}


def standin_prefix(out: Path, steps: int = STEPS["standin"]) -> dict[str, dict]:
    """{stand-in name: {sha256, fingerprint, loss}} of the stand-in build (policy, small, PRM) after ``steps``
    (``loss``: [step, training loss] of every step)."""
    curves = S.build(out, evaluate=False, stop_after=steps)["loss_curves"]
    names = [S.DIR_OF[r] for r in ("policy", "small", "prm")]
    return {n: {**_model(out / n / "model.safetensors"),
                "loss": [[i + 1, float(v)] for i, v in enumerate(curves[n])]} for n in names}


BUILDS = {"mini": mini_prefix, "standin": standin_prefix}


def compute(which: str, out: Path, steps: int | None = None) -> dict:
    got = BUILDS[which](out, STEPS[which] if steps is None else steps)
    return {"steps": STEPS[which] if steps is None else steps,
            "sha256": {n: m["sha256"] for n, m in got.items()},
            "fingerprint": {n: m["fingerprint"] for n, m in got.items()},
            "loss": {n: m["loss"] for n, m in got.items()}}


def drift(a: dict[str, list[float]], b: dict[str, list[float]]) -> float:
    """Largest |projection difference| / the tensor's RMS between two fingerprints (inf: other tensors)."""
    if sorted(a) != sorted(b):
        return float("inf")
    worst = 0.0
    for name, fa in a.items():
        fb = b[name]
        rms = max(abs(fb[0]), 1e-12)
        worst = max(worst, abs(fa[0] - fb[0]) / rms, *(abs(x - y) / rms for x, y in zip(fa[1:], fb[1:])))
    return worst


def loss_drift(a: list[list[float]], b: list[list[float]]) -> float:
    """Largest |loss difference| / |recorded loss| over the logged steps of two loss curves (inf: the curves
    were logged at other steps)."""
    if [s for s, _ in a] != [s for s, _ in b]:
        return float("inf")
    return max((abs(x - y) / max(abs(y), 1e-12) for (_, x), (_, y) in zip(a, b)), default=0.0)


def recorded() -> dict:
    p = digests_path()
    if not p.is_file():
        raise FileNotFoundError(f"{p}: missing; write it with "
                                "`python -m sphere.standins.build_prefix --write`")
    return json.loads(p.read_text())


def compare(which: str, got: dict) -> list[str]:
    """Differences between a computed prefix and the recorded one ([] = reproduced)."""
    rec = recorded()
    want = rec["builds"][which]
    problems = []
    if got["steps"] != want["steps"]:
        problems.append(f"{which}: prefix of {got['steps']} steps, recorded {want['steps']}")
    for name, fp in want["fingerprint"].items():
        if got["sha256"].get(name) == want["sha256"].get(name):
            continue  # bit-identical
        d = drift(got["fingerprint"].get(name) or {}, fp)
        if not d <= REL_TOL:
            problems.append(f"{which}/{name}: weights after {want['steps']} steps differ from the recorded ones "
                            f"by {d:.3g} of a tensor's RMS > tolerance {REL_TOL:g} (sha256 "
                            f"{got['sha256'].get(name)}, recorded {want['sha256'].get(name)})")
    for name, curve in want.get("loss", {}).items():
        mine = got.get("loss", {}).get(name) or []
        d = loss_drift(mine, curve)
        if not d <= LOSS_REL_TOL:
            problems.append(f"{which}/{name}: training loss curve differs from the recorded one by {d:.3g} of "
                            f"a loss > tolerance {LOSS_REL_TOL:g} (logged at steps {[s for s, _ in mine]}, "
                            f"recorded {[s for s, _ in curve]})")
    if problems and rec.get("versions") != _versions():
        problems.append(f"(recorded with {rec.get('versions')}, running {_versions()}: bitwise reproduction "
                        "holds only for the same library builds)")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sphere.standins.build_prefix", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help=f"record the digests into {digests_path()}")
    ap.add_argument("--only", choices=sorted(BUILDS), help="one build (default: both)")
    ap.add_argument("--calibrate", action="store_true",
                    help="measure the drift of another summation order (2 threads vs 1) and of one step fewer")
    a = ap.parse_args(argv)
    builds = [a.only] if a.only else sorted(BUILDS)
    if a.calibrate:
        return calibrate(builds)
    got = {}
    with tempfile.TemporaryDirectory(prefix="sphere-prefix-") as tmp:
        for which in builds:
            got[which] = compute(which, Path(tmp) / which)
            print(f"{which}: {json.dumps(got[which])}", file=sys.stderr)
    if a.write:
        old = recorded() if digests_path().is_file() else {}
        rec = old.get("builds", {})
        rec.update(got)
        digests_path().write_text(json.dumps({
            "about": old.get("about", "sha256 of the shipped builds' weights after a prefix of their optimizer "
                                      "steps; see sphere/standins/build_prefix.py"),
            "versions": _versions(), "builds": dict(sorted(rec.items())),
            **({"calibration": old["calibration"]} if "calibration" in old else {})}, indent=1) + "\n")
        print(f"wrote {digests_path()}")
        return 0
    problems = [p for which in builds for p in compare(which, got[which])]
    print("\n".join(problems) if problems else "prefixes reproduced")
    return 1 if problems else 0


def _compute_in(which: str, out: Path, steps: int, env: dict) -> dict:
    """``compute`` in a fresh interpreter with ``env`` added (torch reads ATEN_CPU_CAPABILITY at start-up)."""
    code = ("import json, sys; from pathlib import Path; from sphere.standins import build_prefix as B; "
            f"print(json.dumps(B.compute({which!r}, Path({str(out)!r}), {steps})))")
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                       check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def calibrate(builds: list[str]) -> int:
    """Print, per build, the drift (``drift``) between torch's generic CPU kernels and its AVX2 kernels
    (``ATEN_CPU_CAPABILITY``: other vector widths, so another summation order, as on another CPU) and of one
    optimizer step fewer (a real change): what ``REL_TOL`` is chosen between."""
    for which in builds:
        with tempfile.TemporaryDirectory(prefix="sphere-prefix-") as tmp:
            avx2 = _compute_in(which, Path(tmp) / "avx2", STEPS[which], {"ATEN_CPU_CAPABILITY": "avx2"})
            generic = _compute_in(which, Path(tmp) / "generic", STEPS[which], {"ATEN_CPU_CAPABILITY": "default"})
            short = _compute_in(which, Path(tmp) / "short", STEPS[which] - 1, {"ATEN_CPU_CAPABILITY": "avx2"})
        fa = avx2["fingerprint"]
        kernels = max(drift(generic["fingerprint"][n], fa[n]) for n in fa)
        step = min(drift(short["fingerprint"][n], fa[n]) for n in fa)
        la = avx2["loss"]
        loss_kernels = max(loss_drift(generic["loss"][n], la[n]) for n in la)
        # a real change to the data or the schedule: the curve read one logged step off (each logged loss
        # against the next one), the smallest such change over the build's models
        loss_step = min(loss_drift([[s, v] for (s, _), (_, v) in zip(la[n], la[n][1:])], la[n][:-1]) for n in la)
        print(json.dumps({"build": which, "kernels_drift": kernels, "one_step": step,
                          "loss_kernels_drift": loss_kernels, "loss_one_step_off": loss_step,
                          "bit_identical_kernels": avx2["sha256"] == generic["sha256"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
