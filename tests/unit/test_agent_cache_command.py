"""The agent's `cache` command runs the cache's command line from a runtime tree: the env file is
read and deleted before the cache module is imported, and the module runs with the login's umask."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ava.agent import build_zipapp

# Stands in for ava/cache/__main__.py in a runtime tree: reports what it was run with.
FAKE_MAIN = """
import json, os, sys
SEEN_AT_IMPORT = os.environ.get("AVA_TEST_SECRET")

def main(argv):
    umask = os.umask(0)
    print(json.dumps({"argv": argv, "secret": SEEN_AT_IMPORT, "umask": umask, "file": __file__}))
    return 3
"""


def fake_runtime(root: Path) -> Path:
    (root / "ava" / "cache").mkdir(parents=True)
    (root / "ava" / "__init__.py").write_text("")
    (root / "ava" / "cache" / "__init__.py").write_text("")
    (root / "ava" / "cache" / "__main__.py").write_text(FAKE_MAIN)
    return root


def agent(tmp_path: Path) -> Path:
    path = tmp_path / "agent.pyz"
    path.write_bytes(build_zipapp()[0])
    return path


def test_the_cache_command_reads_and_deletes_the_env_file_before_the_cache_is_imported(tmp_path: Path) -> None:
    runtime = fake_runtime(tmp_path / "runtime")
    env_file = tmp_path / "env.json"
    env_file.write_text(json.dumps({"AVA_TEST_SECRET": "s3cr3t"}))
    env_file.chmod(0o600)
    args = ["warm", "--dir", str(tmp_path / "c"), "--", "s3://b/x", "--odd"]
    run = subprocess.run(
        [sys.executable, str(agent(tmp_path)), "cache", str(runtime), str(env_file), *args],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: os.umask(0o022),
    )
    assert run.returncode == 3, run.stderr  # the module's own exit status
    seen = json.loads(run.stdout)
    assert seen["argv"] == args and seen["secret"] == "s3cr3t"
    assert seen["file"] == str(runtime / "ava" / "cache" / "__main__.py")
    assert seen["umask"] == 0o022  # the login's, not the agent's own 0o077
    assert not env_file.exists()


def test_the_cache_command_without_an_env_file(tmp_path: Path) -> None:
    runtime = fake_runtime(tmp_path / "runtime")
    run = subprocess.run(
        [sys.executable, str(agent(tmp_path)), "cache", str(runtime), "-", "status", "--dir", "d"],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "AVA_TEST_SECRET"},
    )
    assert run.returncode == 3, run.stderr
    assert json.loads(run.stdout)["argv"] == ["status", "--dir", "d"]
