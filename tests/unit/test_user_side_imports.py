"""The modules training scripts import on the nodes load no part of ava's CLI side."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Every one of them: a module that went missing must fail here, not drop out of the check.
USER_SIDE = ["ava.ckpt", "ava.env", "ava.data"]
# Installed on the machine that runs ava, absent on the nodes: loading any of them would break there.
FORBIDDEN = ("fabric", "paramiko", "invoke", "typer", "rich", "click")


def test_user_side_modules_load_no_cli_dependencies() -> None:
    code = f"import json, sys\nfor m in {USER_SIDE!r}: __import__(m)\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    ).stdout
    loaded = json.loads(out)
    assert set(USER_SIDE) <= set(loaded), sorted(set(USER_SIDE) - set(loaded))
    bad = sorted(
        m for m in loaded if m.split(".")[0] in FORBIDDEN or m.startswith(("ava.cli", "ava.transport", "ava.console"))
    )
    assert bad == []


def test_ava_package_itself_is_import_free() -> None:
    code = "import sys, ava; print(sorted(m for m in sys.modules if m.startswith('ava')))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.strip() == "['ava']"


def test_ckpt_and_env_need_no_other_ava_module() -> None:
    # The nodes get these files as plain source; nothing else of ava has to travel with them.
    code = "import sys, ava.ckpt, ava.env; print(sorted(m for m in sys.modules if m.startswith('ava')))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert out.strip() == "['ava', 'ava.ckpt', 'ava.env']"
