"""The skip gate (tests/skip_gate.py): under CI=true or SPHERE_FAIL_ON_SKIP=1 an unexpected skip fails the
session and is named; an allow-listed (gpu) skip and an xfail do not; without either variable a skip is only
a skip. Each case runs a child pytest on a small generated test file with the gate plugin loaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

TESTS = '''
import pytest

def test_ok():
    pass

def test_needs_a_missing_thing():
    pytest.skip("frobnicator is not installed")

@pytest.mark.gpu
def test_gpu_only():
    pytest.skip("no CUDA GPU")

@pytest.mark.xfail(reason="known bug", strict=True)
def test_known_bug():
    assert False
'''


def run_child(tmp_path: Path, env_extra: dict[str, str], body: str = TESTS) -> subprocess.CompletedProcess:
    (tmp_path / "test_child.py").write_text(body)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a CUDA GPU\n")
    # the gate as tests/conftest.py registers it, as a -p plugin of the child session
    (tmp_path / "skip_gate_plugin.py").write_text(
        "from skip_gate import SkipGate\n\n\n"
        "def pytest_configure(config):\n"
        "    config.pluginmanager.register(SkipGate(), 'sphere-skip-gate')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "SPHERE_FAIL_ON_SKIP", "PYTEST_ADDOPTS")}
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(HERE)])
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "skip_gate_plugin",
                           "-q", "-rs", "test_child.py"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)


@pytest.mark.parametrize("env", [{"CI": "true"}, {"CI": "TRUE"}, {"SPHERE_FAIL_ON_SKIP": "1"}],
                         ids=["CI=true", "CI=TRUE", "SPHERE_FAIL_ON_SKIP=1"])
def test_unexpected_skip_fails_the_session_and_is_named(tmp_path, env):
    r = run_child(tmp_path, env)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "unexpected skips" in out
    assert "SKIPPED test_child.py::test_needs_a_missing_thing: frobnicator is not installed" in out
    assert "1 unexpected skip(s)" in out
    # the allow-listed gpu test and the xfail are not reported as unexpected
    gate = out.split("unexpected skips", 1)[1]
    assert "test_gpu_only" not in gate and "test_known_bug" not in gate


def test_without_ci_a_skip_is_only_a_skip(tmp_path):
    r = run_child(tmp_path, {"CI": "false"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "unexpected skips" not in r.stdout


def test_allow_listed_and_xfail_only_pass_in_ci(tmp_path):
    body = TESTS.replace('pytest.skip("frobnicator is not installed")', "pass")
    r = run_child(tmp_path, {"CI": "true"}, body)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "unexpected skips" not in r.stdout


def test_module_level_skip_is_caught(tmp_path):
    body = 'import pytest\npytest.importorskip("no_such_module_for_the_gate")\n\ndef test_x():\n    pass\n'
    r = run_child(tmp_path, {"SPHERE_FAIL_ON_SKIP": "1"}, body)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "SKIPPED test_child.py: could not import 'no_such_module_for_the_gate'" in r.stdout


def test_a_failure_stays_a_failure(tmp_path):
    body = TESTS + "\ndef test_broken():\n    assert 1 == 2\n"
    r = run_child(tmp_path, {"CI": "true"}, body)
    assert r.returncode == 1 and "1 failed" in r.stdout and "unexpected skips" in r.stdout
