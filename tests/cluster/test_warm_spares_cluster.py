"""Spare torchrun interpreters through `ava train` on the real test cluster (ava/agent/warm.py):
after a crashed rank every node's attempt 2 takes torchrun and its ranks from the spare that
attempt 1 left, the run ends as it would have, and its success leaves no spare behind. Spares
are on by default for a run that can restart, and a run with max_restarts = 0 starts none."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from ava.agent import warm
from tests.cluster.test_failover import STEPS, LiveRun, final_sha, run_id_of
from tests.conftest import processes_of, rank_pid, run_ava
from tests.support.agent_helpers import wait_for
from tests.support.cluster import Cluster

MAIN = ["n1", "n2", "n3"]


@pytest.fixture()
def home(tmp_path: Path) -> dict[str, str]:
    return {"AVA_HOME": str(tmp_path / "home")}


def _status(cluster: Cluster, node: str, run_id: str, attempt: int) -> dict[str, object]:
    workdir = next(n.workdir for n in cluster.nodes if n.name == node)
    found = json.loads((workdir / "runs" / run_id / f"attempt-{attempt}" / "status.json").read_text())
    assert isinstance(found, dict)
    return found


def _spare_listens(cluster: Cluster, run_id: str) -> bool:
    return all((n.workdir / "runs" / run_id / warm.SOCKET).exists() for n in cluster.nodes if n.name in MAIN)


def _spared_run(cluster: Cluster, home: dict[str, str], tmp_path: Path, *settings: str) -> tuple[LiveRun, str]:
    """`ava train` of the steps recipe with spares (and SETTINGS), once its spares listen on
    every node (they start at the job's first progress)."""
    args = ["train", str(STEPS), "--set", f"checkpoint.dir={tmp_path}/ckpt/{{run}}", "--set", f"env.{warm.ENABLE}=1"]
    for setting in settings:
        args += ["--set", setting]
    run = LiveRun(args, cluster.inventory(MAIN), home)
    try:
        run_id = run_id_of(run)
        run.wait_line(r"\| step 12$", timeout=180)
        assert wait_for(lambda: _spare_listens(cluster, run_id), 60.0, 0.1), "no spare on some node"
    except BaseException:
        run.kill()
        raise
    return run, run_id


def test_a_resume_takes_torchrun_and_ranks_from_spares_and_a_success_leaves_none(
    cluster: Cluster, home: dict[str, str], tmp_path: Path
) -> None:
    steps = 'run.args=["--steps", "150", "--ckpt-every", "10", "--step-time", "0.1"]'
    run, run_id = _spared_run(cluster, home, tmp_path, steps, "failover.backoff=0s")
    try:
        pid = rank_pid(run_id, "1")
        assert pid, "no rank 1"
        os.kill(pid, signal.SIGKILL)
        run.wait_line(r"attempt 2 starting", timeout=120)
        assert run.finish(timeout=240) == 0, run.text()[-3000:]
        assert "resumed from step" in run.text()
        final_sha(run.text())
        for node in MAIN:
            first, second = _status(cluster, node, run_id, 1), _status(cluster, node, run_id, 2)
            assert second["from_spare"] and second["from_spare"] == first["spare_pid"], (node, first, second)
        # The success ended every spare of the run on its nodes: nothing of the run is left.
        assert wait_for(lambda: not processes_of(run_id), 5.0, 0.1), processes_of(run_id)
        assert not any((n.workdir / "runs" / run_id / warm.SOCKET).exists() for n in cluster.nodes)
    finally:
        run.kill()
        run_ava("stop", run_id, env=home, inventory=cluster.inventory(MAIN))


def test_a_run_that_fails_for_good_ends_its_spares_before_ava_returns(
    cluster: Cluster, home: dict[str, str], tmp_path: Path
) -> None:
    steps = 'run.args=["--steps", "150", "--ckpt-every", "10", "--step-time", "0.1"]'
    # The crash ends the run: no attempt claims the spares.
    run, run_id = _spared_run(cluster, home, tmp_path, steps, "failover.max_restarts=0")
    try:
        pid = rank_pid(run_id, "1")
        assert pid, "no rank 1"
        os.kill(pid, signal.SIGKILL)
        assert run.finish(timeout=120) == 1, run.text()[-3000:]
        # The teardown kept the spares for a next attempt; the run's end took them (no 10 s linger).
        assert processes_of(run_id) == []
        assert not any((n.workdir / "runs" / run_id / warm.SOCKET).exists() for n in cluster.nodes)
    finally:
        run.kill()
        run_ava("stop", run_id, env=home, inventory=cluster.inventory(MAIN))


def test_ava_stop_ends_the_runs_spares(cluster: Cluster, home: dict[str, str], tmp_path: Path) -> None:
    run, run_id = _spared_run(cluster, home, tmp_path, 'run.args=["--steps", "2000", "--step-time", "0.1"]')
    try:
        done = run_ava("stop", run_id, env=home, inventory=cluster.inventory(MAIN))
        assert done.returncode == 0, done.stdout + done.stderr
        assert processes_of(run_id) == []
    finally:
        run.kill()
        run_ava("stop", run_id, env=home, inventory=cluster.inventory(MAIN))


def _spare_processes(run_id: str) -> list[int]:
    """The live spares of the run here, and what they forked (torchrun, ranks): they carry the mark."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            environ = (entry / "environ").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if any(item.startswith(f"{warm.MARK}={run_id}.".encode()) for item in environ):
            found.append(int(entry.name))
    return found


def test_spares_are_on_by_default_and_a_run_that_cannot_restart_starts_none(
    cluster: Cluster, home: dict[str, str], tmp_path: Path
) -> None:
    steps = 'run.args=["--steps", "2000", "--step-time", "0.1"]'
    for restarts, spared in ((2, True), (0, False)):
        # No [env] AVA_WARM_SPARES: the recipe key's default decides, with max_restarts.
        args = ["train", str(STEPS), "--set", f"checkpoint.dir={tmp_path}/ckpt/{{run}}", "--set", steps]
        args += ["--set", f"failover.max_restarts={restarts}"]
        run = LiveRun(args, cluster.inventory(MAIN), home)
        run_id = None
        try:
            run_id = run_id_of(run)
            run.wait_line(r"\| step 12$", timeout=180)
            if spared:
                assert wait_for(lambda: _spare_listens(cluster, run_id), 60.0, 0.1), "no spare on some node"
                assert _spare_processes(run_id)
            else:
                run.wait_line(r"\| step 40$", timeout=60)  # spares start at the first progress
                assert _spare_processes(run_id) == []
                assert not any((n.workdir / "runs" / run_id / warm.SOCKET).exists() for n in cluster.nodes)
            done = run_ava("stop", run_id, env=home, inventory=cluster.inventory(MAIN))
            assert done.returncode == 0, done.stdout + done.stderr
            assert processes_of(run_id) == []
        finally:
            run.kill()
            if run_id:
                run_ava("stop", run_id, env=home, inventory=cluster.inventory(MAIN))
