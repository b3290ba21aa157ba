"""Damaged run records: `ava ps` names and skips them, `ava stop` still stops the run on its nodes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from ava import runs
from tests.conftest import REPO, processes_of, run_ava
from tests.support.cluster import Cluster

ECHO = REPO / "tests" / "data" / "recipes" / "echo"
GOOD = "echo-20261201-120000-a3f1"


def save_good(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVA_HOME", str(home))
    runs.RunRecord(
        id=GOOD,
        recipe="echo",
        source="x",
        recipe_hash="",
        raw={},
        inventory="ava.toml",
        nodes=["n1"],
        state="succeeded",
        started=1000.0,
    ).save()


def damage(home: Path, run_id: str, content: str | None) -> Path:
    """A record.json holding `content`, or a directory in its place when None."""
    path = home / "runs" / run_id / "record.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if content is None:
        path.mkdir()
    else:
        path.write_text(content)
    return path


def test_ps_skips_and_names_every_damaged_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    save_good(home, monkeypatch)
    good = json.loads((home / "runs" / GOOD / "record.json").read_text())
    bad = {
        "echo-20261201-120001-0001": "null",
        "echo-20261201-120002-0002": None,
        "echo-20261201-120003-0003": json.dumps("a string"),
        "echo-20261201-120004-0004": json.dumps({**good, "id": "echo-20261201-120004-0004", "started": "noon"}),
        "echo-20261201-120005-0005": json.dumps(good)[:40],
    }
    paths = [damage(home, run_id, content) for run_id, content in bad.items()]
    for args in (["ps", "--json"], ["ps"]):
        done = run_ava(*args, env={"AVA_HOME": str(home)})
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        for path in paths:
            assert str(path) in done.stderr
    listed = json.loads(run_ava("ps", "--json", env={"AVA_HOME": str(home)}).stdout)
    assert [r["id"] for r in listed] == [GOOD]


def test_logs_of_a_truncated_record_is_a_one_line_error_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    save_good(home, monkeypatch)
    record = home / "runs" / GOOD / "record.json"
    record.write_text(record.read_text()[:100])
    done = run_ava("logs", GOOD, env={"AVA_HOME": str(home)})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and str(record) in done.stderr


def test_records_are_fsynced_before_they_replace_the_old_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVA_HOME", str(tmp_path / "home"))
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    record = runs.RunRecord(id=GOOD, recipe="echo", source="x", recipe_hash="", raw={}, inventory="ava.toml", nodes=[])
    record.save()
    assert events[:2] == ["fsync", "replace"] and events.count("fsync") == 2  # the file, then its directory
    assert runs.load(GOOD).id == GOOD


def test_stop_works_on_a_run_whose_record_is_damaged(cluster: Cluster, tmp_path: Path) -> None:
    home = {"AVA_HOME": str(tmp_path / "home")}
    recipe = tmp_path / "echo"
    shutil.copytree(ECHO, recipe)
    inventory = cluster.inventory(["n1", "n2"])
    done = run_ava(
        "train",
        str(recipe),
        "--detach",
        "--set",
        "resources.nodes=2",
        "--set",
        "env.ECHO_SLEEP=120",
        inventory=inventory,
        env=home,
    )
    assert done.returncode == 0, done.stderr
    run_id = done.stdout.strip().splitlines()[-1]
    record = tmp_path / "home" / "runs" / run_id / "record.json"
    deadline = time.monotonic() + 60
    while len(processes_of(run_id)) < 2 * 2 and time.monotonic() < deadline:  # torchrun and a worker on each node
        time.sleep(0.5)
    assert len(processes_of(run_id)) >= 4
    # The supervisor dies with the machine that ran it, and its last write was cut short.
    supervisor = json.loads(record.read_text())["supervisor_pid"]
    os.kill(supervisor, signal.SIGKILL)
    record.write_text(record.read_text()[:120])
    try:
        stopped = run_ava("stop", run_id, env=home, inventory=inventory, timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        assert "Traceback" not in stopped.stderr and str(record) in stopped.stderr
        assert processes_of(run_id) == []
    finally:
        for pid in processes_of(run_id):
            os.kill(pid, signal.SIGKILL)
