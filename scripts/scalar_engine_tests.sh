#!/usr/bin/env bash
# Build the C++ engine WITHOUT its SSE2 path (CMake option SPHERE_NO_SIMD=ON: the scalar child-scoring loop that
# aarch64 / Apple-silicon builds compile) into a temporary build directory, and run the engine tests against it,
# so the fallback other machines run is checked bit for bit against the Python reference on x86-64 CI too.
#   bash scripts/scalar_engine_tests.sh            # prints PASS or FAIL last; exit code 0 on PASS
# The normal editable/venv install is not touched: the scalar module is put first on the import path through a
# private copy of the `sphere` package (symlinks to the sources plus the scalar _core), as
# scripts/asan_engine_tests.sh does. The tests must see sphere._core.SIMD == "scalar" (SPHERE_EXPECT_SIMD,
# tests/test_engine_api.py), so a build that silently kept SSE2 fails instead of testing the wrong path.
# CI: `bash scripts/scalar_engine_tests.sh` (about 1-2 minutes on 2 cores: the -O3 build and the three test files).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-${SPHERE_VENV:-$ROOT/.venv}/bin/python}
if [ -n "${SPHERE_SCALAR_BUILD:-}" ]; then
  BUILD=$SPHERE_SCALAR_BUILD
else
  BUILD=$(mktemp -d /tmp/sphere-scalar.XXXXXX)
  trap 'rm -rf "$BUILD"' EXIT
fi
STAGE=$BUILD/stage
LOG=$BUILD/logs
mkdir -p "$LOG"
fail() { echo "scalar_engine_tests: FAIL ($1)"; exit 1; }
start=$(date +%s)

CXX_BIN=${CXX:-g++}
PYBIND_DIR=$("$PY" -c "import pybind11; print(pybind11.get_cmake_dir())") || fail "pybind11 missing in $PY"
cmake -S "$ROOT" -B "$BUILD/cmake" -DCMAKE_BUILD_TYPE=Release -DSPHERE_NO_SIMD=ON \
  -Dpybind11_DIR="$PYBIND_DIR" -DPython_EXECUTABLE="$PY" -DCMAKE_CXX_COMPILER="$CXX_BIN" >"$LOG/cmake.log" 2>&1 \
  || { tail -30 "$LOG/cmake.log"; fail "cmake configure"; }
cmake --build "$BUILD/cmake" -j "${SPHERE_BUILD_JOBS:-2}" >"$LOG/build.log" 2>&1 \
  || { tail -30 "$LOG/build.log"; fail "build"; }
if grep -q "warning:" "$LOG/build.log"; then
  grep "warning:" "$LOG/build.log" | head -20
  fail "compiler warnings (the scalar path builds warning-free with -Wall -Wextra -Wpedantic -Wshadow -Wconversion)"
fi
echo "scalar_engine_tests: built in $(( $(date +%s) - start )) s"

mkdir -p "$STAGE/sphere"
for entry in "$ROOT"/sphere/*; do
  case "$(basename "$entry")" in _core*.so | __pycache__) continue ;; esac
  ln -s "$entry" "$STAGE/sphere/$(basename "$entry")"
done
cp "$BUILD"/cmake/_core*.so "$STAGE/sphere/" || fail "no _core module built"

export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE=1
export SPHERE_EXPECT_SIMD=scalar
# The editable install's import hook (scikit-build-core's redirecting finder) would win over PYTHONPATH: run
# python through a bootstrap that drops it (and the repository root, which holds the plain sources), so `sphere`
# resolves to the staged copy.
BOOT="import os, sys; sys.meta_path[:] = [f for f in sys.meta_path if 'ScikitBuild' not in type(f).__name__]; sys.path[:] = [p for p in sys.path if p not in ('', os.getcwd())]"
WHERE=$("$PY" -c "$BOOT; import sphere._core as c; assert c.SIMD == 'scalar', c.SIMD; print(c.__file__)") \
  || fail "cannot import the scalar module, or it is not the scalar build"
case "$WHERE" in "$STAGE"/*) ;; *) fail "tests would import $WHERE, not the scalar build" ;; esac
echo "scalar_engine_tests: running the engine parity/golden/API tests against $WHERE"
"$PY" -c "$BOOT; import pytest; sys.exit(pytest.main(sys.argv[1:]))" -q -p no:cacheprovider \
  tests/test_engine_parity.py tests/test_engine_golden.py tests/test_engine_api.py "$@"
rc=$?
echo "scalar_engine_tests: $(( $(date +%s) - start )) s in all"
[ $rc -eq 0 ] && { echo "scalar_engine_tests: PASS"; exit 0; }
fail "pytest exit $rc"
