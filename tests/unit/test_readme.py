"""The README's front door is what CI runs."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO
from tests.support.quickstart import quickstart_command


def test_ci_runs_the_readme_quickstart_verbatim_in_a_fresh_venv() -> None:
    command = quickstart_command((REPO / "README.md").read_text(encoding="utf-8"))
    # The command itself makes the fresh venv (no --system-site-packages) and trains.
    assert command.startswith("python3 -m venv ") and "--system-site-packages" not in command
    assert "ava train recipes/charlm" in command
    printed = subprocess.run(
        [sys.executable, "-m", "tests.support.quickstart"], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout.strip()
    assert printed == command
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    # CI takes the command from the README at run time and runs it as it is.
    assert 'quickstart="$(python3 -m tests.support.quickstart)"' in ci
    assert 'bash -euo pipefail -c "$quickstart"' in ci


def test_ci_runs_the_readme_test_command() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "bash .ci/run" in readme
    assert "\npython3 -m pytest -q\n" in (REPO / ".ci" / "run").read_text(encoding="utf-8") + "\n"
