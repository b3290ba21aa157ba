"""A warm launch's provision check riding in its start: the guard's shell on a real /bin/sh, and
what the launch cache remembers of a node found ready."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from ava import launchcache, provision
from ava.config import Node


def sh(command: str) -> str:
    done = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_guarded_command_runs_only_where_the_facts_read_as_remembered(tmp_path: Path) -> None:
    marker = tmp_path / "present"
    facts = f"if [ -e '{marker}' ]; then echo present=1; else echo present=0; fi; echo 'cache='; echo '{{\"a\": 1}}'"
    seen = sh(facts)
    check = provision.ReadyCheck(facts, hashlib.sha256(seen.encode()).hexdigest())
    command = provision.guarded("echo started", check)
    assert sh(command).split() == ["started"]
    marker.touch()  # the node changed since it was last found ready
    assert sh(command).split() == [provision.FACTS_CHANGED]


def test_a_check_found_ready_is_remembered_per_node_and_facts_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AVA_HOME", str(tmp_path))
    n1, n2 = Node(name="n1", host="10.0.0.1"), Node(name="n2", host="10.0.0.2")
    assert launchcache.ready_facts(n1, "facts A") is None
    launchcache.remember_ready_facts(n1, "facts A", "present=1\n")
    launchcache.remember_ready_facts(n1, "facts B", "present=11\n")  # another recipe's environment
    assert launchcache.ready_facts(n1, "facts A") == hashlib.sha256(b"present=1\n").hexdigest()
    assert launchcache.ready_facts(n1, "facts B") == hashlib.sha256(b"present=11\n").hexdigest()
    assert launchcache.ready_facts(n2, "facts A") is None
    moved = Node(name="n1", host="10.0.0.9")  # the same name elsewhere: nothing known of it
    assert launchcache.ready_facts(moved, "facts A") is None
    # The routes of the same file are untouched by it.
    assert launchcache.load([n1], "10.0.0.1") == {}
