"""Supervision changing hands: SIGHUP detaches, one supervisor at a time, and a launch cut short
is restarted by the next supervisor rather than taken for lost nodes. On the real test cluster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster.test_failover import LiveRun, run_id_of
from tests.conftest import REPO, processes_of, run_ava
from tests.support.cluster import Cluster

ECHO = REPO / "tests" / "data" / "recipes" / "echo"
HOG = REPO / "tests" / "data" / "recipes" / "hog"


@pytest.fixture()
def home(tmp_path: Path) -> dict[str, str]:
    return {"AVA_HOME": str(tmp_path / "home")}


def record(home: dict[str, str], run_id: str) -> dict:
    return json.loads((Path(home["AVA_HOME"]) / "runs" / run_id / "record.json").read_text())


def wait_for(predicate, timeout: float = 60.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_sighup_hands_the_run_to_a_background_supervisor(cluster: Cluster, home: dict[str, str]) -> None:
    run = LiveRun(["train", str(ECHO), "--set", "env.ECHO_SLEEP=8"], cluster.inventory(["n1"]), home)
    try:
        run_id = run_id_of(run)
        run.wait_line(r"tick 0")
        run.process.send_signal(signal.SIGHUP)
        assert run.finish(timeout=60) == 130, run.text()[-2000:]
        assert "detached from" in run.text()
        # The run goes on without its terminal and ends well under the background supervisor.
        wait_for(lambda: record(home, run_id)["state"] == "succeeded", timeout=90, what="the run to succeed")
        assert processes_of(run_id) == []
    finally:
        run.kill()


def test_a_second_supervisor_is_refused_while_the_first_still_holds_the_run(
    cluster: Cluster, home: dict[str, str], tmp_path: Path
) -> None:
    inventory = cluster.inventory(["n1"])
    done = run_ava("train", str(ECHO), "--detach", "--set", "env.ECHO_SLEEP=25", inventory=inventory, env=home)
    assert done.returncode == 0, done.stderr
    run_id = done.stdout.strip().splitlines()[-1]
    pid = wait_for(lambda: record(home, run_id).get("supervisor_pid"), what="the background supervisor")
    # A supervisor that cannot let go yet (as one inside a launch): stopped, it holds its lock.
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        taken = run_ava("attach", run_id, inventory=inventory, env=home, timeout=120)
        assert taken.returncode == 3, taken.stdout[-1000:] + taken.stderr[-1000:]
        assert f"run {run_id} is supervised by a background supervisor (pid {pid})" in taken.stderr
        assert time.monotonic() - started < 40
        assert record(home, run_id)["supervisor_pid"] == pid  # untouched by the refused attach
    finally:
        os.kill(pid, signal.SIGCONT)
    # Once it can, it leaves on the attach's SIGTERM, and a new attach takes over to the end.
    again = run_ava("attach", run_id, inventory=inventory, env=home, timeout=120)
    log = Path(home["AVA_HOME"]) / "runs" / run_id / "supervisor.log"
    assert again.returncode == 0, (
        again.stdout[-2000:] + again.stderr[-2000:] + (log.read_text() if log.exists() else "")
    )
    assert record(home, run_id)["state"] == "succeeded"


def test_attach_restarts_an_attempt_whose_launch_was_cut_short(
    cluster: Cluster, home: dict[str, str], tmp_path: Path
) -> None:
    # Run A takes every CPU slot of n2, so run B's launch waits there with n1 already tried.
    until = tmp_path / "release"
    hog = tmp_path / "hog"
    shutil.copytree(HOG, hog)
    holder = run_ava(
        "train",
        str(hog),
        "--detach",
        "--set",
        "resources.procs_per_node=2",
        "--set",
        "env.HOG_SECONDS=120",
        "--set",
        f"env.HOG_UNTIL={until}",
        inventory=cluster.inventory(["n2"]),
        env=home,
    )
    assert holder.returncode == 0, holder.stderr
    holder_id = holder.stdout.strip().splitlines()[-1]
    inventory = cluster.inventory(["n1", "n2"])
    try:
        wait_for(lambda: record(home, holder_id)["state"] == "running", what="run A running")
        run = LiveRun(["train", str(ECHO), "--wait", "--set", "resources.nodes=2"], inventory, home)
        try:
            run_id = run_id_of(run)
            run.wait_line(r"waiting: n2 is held by", timeout=120)
            run.process.kill()  # the CLI dies mid-launch: nothing supervises run B now
            run.process.wait()
        finally:
            run.kill()
        until.touch()
        wait_for(lambda: record(home, holder_id)["state"] == "succeeded", what="run A to end")
        attached = run_ava("attach", run_id, inventory=inventory, env=home, timeout=180)
        assert attached.returncode == 0, attached.stdout[-2000:] + attached.stderr[-2000:]
        b = record(home, run_id)
        assert b["state"] == "succeeded" and b["lost_nodes"] == []
        assert "never started on n2" in b["attempts"][0]["cause"]
        assert processes_of(run_id) == []
    finally:
        until.touch()
        run_ava("stop", holder_id, inventory=cluster.inventory(["n2"]), env=home)
