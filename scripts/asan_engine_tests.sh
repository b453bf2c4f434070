#!/usr/bin/env bash
# Build the C++ engine with AddressSanitizer + UBSan (CMake option SPHERE_SANITIZE=ON) into its own build
# directory and run the engine tests against it, without touching the normal editable install.
#   bash scripts/asan_engine_tests.sh            # prints PASS or FAIL last; exit code 0 on PASS
# The sanitized module is put first on the import path through a private copy of the `sphere` package
# (a tree of symlinks to the sources plus the sanitized _core), so the tests import it instead of the
# installed one. libasan is preloaded because python itself is not built with ASan.
# CI: `bash scripts/asan_engine_tests.sh` (about 3 minutes on 2 cores, mostly the sanitized build).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-${SPHERE_VENV:-$ROOT/.venv}/bin/python}
BUILD=${SPHERE_ASAN_BUILD:-$ROOT/build/asan}
STAGE=$BUILD/stage
fail() { echo "asan_engine_tests: FAIL ($1)"; exit 1; }

CXX_BIN=${CXX:-g++}
LIBASAN=$("$CXX_BIN" -print-file-name=libasan.so)
[ -f "$LIBASAN" ] || fail "libasan.so not found via $CXX_BIN -print-file-name (install gcc's libasan)"
PYBIND_DIR=$("$PY" -c "import pybind11; print(pybind11.get_cmake_dir())") || fail "pybind11 missing in $PY"

cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSPHERE_SANITIZE=ON \
  -Dpybind11_DIR="$PYBIND_DIR" -DPython_EXECUTABLE="$PY" -DCMAKE_CXX_COMPILER="$CXX_BIN" >"$BUILD.cmake.log" 2>&1 \
  || { tail -30 "$BUILD.cmake.log"; fail "cmake configure"; }
cmake --build "$BUILD" -j 2 >"$BUILD.build.log" 2>&1 || { tail -30 "$BUILD.build.log"; fail "build"; }
if grep -q "warning:" "$BUILD.build.log"; then
  grep "warning:" "$BUILD.build.log" | head -20
  fail "compiler warnings (the engine builds warning-free with -Wall -Wextra -Wpedantic -Wshadow -Wconversion)"
fi

rm -rf "$STAGE" && mkdir -p "$STAGE/sphere"
for entry in "$ROOT"/sphere/*; do
  case "$(basename "$entry")" in _core*.so | __pycache__) continue ;; esac
  ln -s "$entry" "$STAGE/sphere/$(basename "$entry")"
done
cp "$BUILD"/_core*.so "$STAGE/sphere/" || fail "no _core module built"

export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}"
# libstdc++ is preloaded too: python does not link it, and without it ASan's __cxa_throw interceptor finds
# no real function and aborts on the first C++ exception ("real___cxa_throw != 0").
LIBSTDCXX=$("$CXX_BIN" -print-file-name=libstdc++.so)
export LD_PRELOAD="$LIBASAN $LIBSTDCXX"
# Reports go to files (pytest captures stderr, and an abort would swallow them); printed on failure.
rm -f "$BUILD"/sanitizer.report.*
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:log_path=$BUILD/sanitizer.report"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$BUILD/sanitizer.report"
export OMP_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE=1
# The editable install's import hook (scikit-build-core's redirecting finder) would win over PYTHONPATH:
# run python through a bootstrap that drops it (and the repository root, which holds the plain sources),
# so `sphere` resolves to the staged copy.
BOOT="import os, sys; sys.meta_path[:] = [f for f in sys.meta_path if 'ScikitBuild' not in type(f).__name__]; sys.path[:] = [p for p in sys.path if p not in ('', os.getcwd())]"
WHERE=$("$PY" -c "$BOOT; import sphere._core as c; print(c.__file__)") || fail "cannot import the sanitized module"
case "$WHERE" in "$STAGE"/*) ;; *) fail "tests would import $WHERE, not the sanitized build" ;; esac
echo "asan_engine_tests: running tests/test_engine*.py against $WHERE"
"$PY" -c "$BOOT; import pytest; sys.exit(pytest.main(sys.argv[1:]))" -q -p no:cacheprovider \
  tests/test_engine_parity.py tests/test_engine_api.py tests/test_adversarial_engine.py "$@"
rc=$?
if ls "$BUILD"/sanitizer.report.* >/dev/null 2>&1; then
  head -60 "$BUILD"/sanitizer.report.*
  fail "sanitizer report (pytest exit $rc)"
fi
[ $rc -eq 0 ] && { echo "asan_engine_tests: PASS"; exit 0; }
fail "pytest exit $rc"
