"""Under CI=true a skip fails the run, except a declared hardware-only one, which is listed at the end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

TESTS = """
import pytest
from tests.conftest import needs_gpu

def test_plain_skip():
    pytest.skip("no reason that CI accepts")

@pytest.mark.skipif(True, reason="a condition this machine meets")
def test_marked_skip():
    pass

@needs_gpu
def test_on_a_gpu():
    pass

@pytest.mark.xfail(reason="known", strict=True)
def test_expected_failure():
    assert False
"""


def run_pytest(tmp_path: Path, ci: str, gpu_absent: bool = True) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_skips.py").write_text(TESTS)
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "tests.conftest",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            "-c",
            os.devnull,
            str(tmp_path / "test_skips.py"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )


def test_every_skip_but_a_declared_hardware_one_fails_under_ci(tmp_path: Path) -> None:
    from tests.conftest import has_gpu

    proc = run_pytest(tmp_path, "true")
    out = proc.stdout
    assert proc.returncode == 1, out
    assert "FAILED" in out and "test_plain_skip" in out and "test_marked_skip" in out, out
    # A skip in the test body fails it; a skipif (decided at setup) makes it an error.
    assert "1 failed" in out and "1 error" in out and "1 xfailed" in out, out
    assert "Skipped: no reason that CI accepts" in out and "a condition this machine meets" in out, out
    if not has_gpu():
        assert "1 skipped" in out, out
        assert "hardware-only skips" in out and "test_on_a_gpu: needs an NVIDIA GPU" in out, out


def test_skips_stay_skips_outside_ci(tmp_path: Path) -> None:
    from tests.conftest import has_gpu

    proc = run_pytest(tmp_path, "")
    assert proc.returncode == 0, proc.stdout
    assert f"{2 if has_gpu() else 3} skipped" in proc.stdout, proc.stdout
