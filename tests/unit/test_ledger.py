"""The GPU ledger: it never hands out a GPU that is still in use.

A lease outlives a teardown that left processes behind (draining); a short write never
truncates the ledger, and a ledger that cannot be read is rebuilt from the live monitors.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ava.agent import layout
from ava.agent.cgroupv1 import controller_mounts
from tests.support.agent_helpers import Agent, agent, needs_cgroups, wait_for

BUSY = 4

STUCK = """
import os, sys, time
pid = os.fork()
if pid == 0:
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    time.sleep(600)
    os._exit(0)
time.sleep(600)
"""


def sleeper(agent: Agent, run: str, gpu: int) -> dict:
    return agent.spec(
        run,
        [sys.executable, str(agent.jobs / "ranks.py")],
        env={"JOB_SLEEP": "120"},
        gpus={"want": 1, "allowed": [gpu]},
    )


@pytest.fixture
def frozen() -> Iterator[Path]:
    """A freezer cgroup of the test's own: a process frozen there ignores SIGKILL until thawed,
    as one in D state after a GPU fault does."""
    mount = controller_mounts().get("freezer")
    if mount is None:
        pytest.skip("no cgroup v1 freezer here")
    group = Path(mount) / f"ava-test-stuck-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        yield group
    finally:
        (group / "freezer.state").write_text("THAWED")
        for pid in (group / "cgroup.procs").read_text().split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_for(lambda: not (group / "cgroup.procs").read_text().split(), timeout=10)
        group.rmdir()


@needs_cgroups
def test_a_lease_stays_draining_while_teardown_left_processes_behind(agent: Agent, frozen: Path) -> None:
    (agent.jobs / "stuck.py").write_text(STUCK)
    run_a, run_b = agent.new_run("stuck"), agent.new_run("next")
    pidfile = agent.jobs / f"{run_a}.pid"
    code, st = agent.start(
        agent.spec(
            run_a, [sys.executable, str(agent.jobs / "stuck.py"), str(pidfile)], gpus={"want": 1, "allowed": [5]}
        )
    )
    assert code == 0, st
    assert wait_for(pidfile.exists)
    child = int(pidfile.read_text())
    (frozen / "cgroup.procs").write_text(str(child))
    (frozen / "freezer.state").write_text("FROZEN")
    assert wait_for(lambda: (frozen / "freezer.state").read_text().strip() == "FROZEN")

    code, stopped = agent.stop(run_a, grace=0.5)
    assert code != 0 and child in stopped["remaining_pids"], stopped
    (held,) = agent.leases()
    assert held["run"] == run_a and held["gpus"] == [5]
    assert held["draining"] and str(child) in held["draining"]
    code, busy = agent.start(sleeper(agent, run_b, 5))
    assert code == BUSY and [h["run"] for h in busy["holders"]] == [run_a], busy

    # Once the stuck process is gone, the GPU is free again.
    (frozen / "freezer.state").write_text("THAWED")
    assert wait_for(lambda: agent.leases() == [], timeout=20)
    code, st = agent.start(sleeper(agent, run_b, 5))
    assert code == 0 and st["gpus"] == [5], st


@pytest.mark.parametrize("damage", ["truncated", "empty", "wrong-shape"])
@needs_cgroups
def test_an_unreadable_ledger_is_rebuilt_from_live_monitors_never_read_as_empty(agent: Agent, damage: str) -> None:
    run_a, run_b = agent.new_run("holder"), agent.new_run("late")
    code, st = agent.start(sleeper(agent, run_a, 6))
    assert code == 0 and st["gpus"] == [6], st
    ledger = agent.work / "leases.json"
    data = ledger.read_bytes()
    ledger.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "wrong-shape": b'{"holders": 6}'}[damage])
    code, busy = agent.start(sleeper(agent, run_b, 6))
    assert code == BUSY and [h["run"] for h in busy["holders"]] == [run_a], busy
    assert [h["run"] for h in agent.leases()] == [run_a]
    assert json.loads(ledger.read_bytes())["holders"][0]["gpus"] == [6]  # and written back whole


def test_a_short_write_never_leaves_a_truncated_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "leases.json"
    layout.write_json_atomic(path, {"holders": [{"run": "old"}]})
    real_write = os.write

    def short(fd: int, data: bytes) -> int:  # the kernel may write less than asked
        return real_write(fd, bytes(data[:5]))

    monkeypatch.setattr(os, "write", short)
    layout.write_json_atomic(path, {"holders": [{"run": "new", "gpus": list(range(50))}]})
    assert json.loads(path.read_bytes())["holders"][0]["gpus"] == list(range(50))

    def full(fd: int, data: bytes) -> int:  # then the disk fills up
        if len(data) < 40:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, bytes(data[:20]))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError):
        layout.write_json_atomic(path, {"holders": [{"run": "newer", "gpus": list(range(50))}]})
    monkeypatch.setattr(os, "write", real_write)
    assert json.loads(path.read_bytes())["holders"][0]["run"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["leases.json"]
    assert (path.stat().st_mode & 0o777) == 0o600


def test_ava_nodes_says_why_a_holder_is_draining() -> None:
    from ava.cli.nodes import _holding

    line = _holding({"run": "r1", "user": "ann", "gpus": [5], "draining": "processes [4242] survived the teardown"})
    assert line == "run r1 of ann holds GPUs 5; draining: processes [4242] survived the teardown"


@needs_cgroups
def test_a_node_wide_ledger_is_shared_by_several_workdirs(agent: Agent, tmp_path: Path) -> None:
    shared = tmp_path / "var-lib-ava" / "leases"
    other = Agent(tmp_path / "work2", agent.jobs, agent.parent)
    try:
        run_a, run_b = agent.new_run("one"), other.new_run("two")
        code, st = agent.start({**sleeper(agent, run_a, 3), "ledger": str(shared)})
        assert code == 0 and st["gpus"] == [3], st
        # Another workdir (another user, say) naming the same ledger sees run A's GPU as taken.
        code, busy = other.start({**sleeper(other, run_b, 3), "ledger": str(shared)})
        assert code == BUSY and [h["run"] for h in busy["holders"]] == [run_a], busy
        assert [h["workdir"] for h in other.leases()] == [str(agent.work)]
        assert (shared.stat().st_mode & 0o7777) == 0o2770
        assert ((shared / "leases.json").stat().st_mode & 0o777) == 0o660
        assert ((shared / "leases.lock").stat().st_mode & 0o777) == 0o660
        assert (agent.work / "leases.json").resolve() == shared / "leases.json"
        # Rebuilt from every registered workdir when it is damaged.
        (shared / "leases.json").write_bytes(b"{")
        assert [h["run"] for h in other.leases()] == [run_a]
    finally:
        other.cleanup()


def test_doctor_warns_when_several_workdirs_on_one_node_hold_leases_apart() -> None:
    from ava.config import Node
    from ava.doctor import Observation, check_ledgers

    def seen(name: str, workdir: str, ledger: str | None, held: bool) -> Observation:
        node = Node(name=name, host="10.0.0.11", workdir=workdir, ledger=ledger)
        return Observation(node, facts={"leases": [{"run": "r"}] if held else []})

    (warning,) = check_ledgers([seen("a", "~/.ava", None, True), seen("b", "/scratch/ava", None, True)])
    assert warning.status == "warn" and "a (~/.ava), b (/scratch/ava)" in warning.detail
    assert "ledger" in warning.fix
    shared = "/var/lib/ava/leases"
    assert check_ledgers([seen("a", "~/.ava", shared, True), seen("b", "/scratch/ava", shared, True)]) == []
    assert check_ledgers([seen("a", "~/.ava", None, True), seen("b", "/scratch/ava", None, False)]) == []
