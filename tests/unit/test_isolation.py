"""Isolation back-ends: the argv systemd gets (pure), and the real cgroup v1 tree here."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ava.agent.cgroupv1 import CgroupV1, controller_mounts, device_denies
from ava.agent.cgroupv2 import systemd_run_argv, unit_name
from ava.agent.isolation import Limits, attach, fence_name, open_fence, probe
from tests.support.agent_helpers import (
    Agent,
    agent,
    marker_pids,
    needs_cgroups,
    wait_for,
)

GPU_DEVICES = [
    "/dev/nvidiactl rw",
    "/dev/nvidia-uvm rw",
    "/dev/nvidia-uvm-tools rw",
    "/dev/nvidia-modeset rw",
    "/dev/nvidia2 rw",
    "/dev/nvidia3 rw",
]


def test_systemd_scope_argv_as_root_closes_devices_to_the_leased_gpus() -> None:
    limits = Limits(memory=209715200, cpus=1.5, pids=4096)
    argv = systemd_run_argv("ava-r1.n1.a1.scope", "ava.slice", limits, user_mode=False, device_allow=GPU_DEVICES)
    assert argv == [
        "systemd-run", "--scope", "--quiet", "--collect", "--unit=ava-r1.n1.a1.scope", "--slice=ava.slice",
        "-p", "MemoryMax=209715200", "-p", "CPUQuota=150%", "-p", "TasksMax=4096",
        "-p", "DevicePolicy=closed",
        "-p", "DeviceAllow=/dev/nvidiactl rw", "-p", "DeviceAllow=/dev/nvidia-uvm rw",
        "-p", "DeviceAllow=/dev/nvidia-uvm-tools rw", "-p", "DeviceAllow=/dev/nvidia-modeset rw",
        "-p", "DeviceAllow=/dev/nvidia2 rw", "-p", "DeviceAllow=/dev/nvidia3 rw",
    ]  # fmt: skip


def test_systemd_scope_argv_without_root_or_limits_sets_only_what_it_can() -> None:
    argv = systemd_run_argv("ava-x.scope", "ava.slice", Limits(), user_mode=True, device_allow=GPU_DEVICES)
    assert argv == [
        "systemd-run",
        "--user",
        "--scope",
        "--quiet",
        "--collect",
        "--unit=ava-x.scope",
        "--slice=ava.slice",
    ]
    no_gpus = systemd_run_argv("ava-x.scope", "ava.slice", Limits(cpus=0.25), user_mode=False, device_allow=None)
    assert no_gpus[-2:] == ["-p", "CPUQuota=25%"]


def test_systemd_scope_wraps_the_job_argv_after_a_double_dash() -> None:
    fence = open_fence("systemd", "ava")
    fence.create(fence_name("ddp-1", "n1", 2), Limits(memory=1 << 30), [])
    assert fence.command(["python3", "-m", "torch.distributed.run", "--standalone"])[-5:] == [
        "--", "python3", "-m", "torch.distributed.run", "--standalone",
    ]  # fmt: skip
    assert fence.info()["unit"] == "ava-ddp-1.n1.a2.scope"


def test_unit_names_keep_only_what_systemd_allows() -> None:
    assert unit_name("ddp-20261123-101200-a3f1.gpu1.a1") == "ava-ddp-20261123-101200-a3f1.gpu1.a1.scope"
    assert unit_name("r@x+y/z") == "ava-r_x_y_z.scope"


def test_device_denies_cover_every_gpu_not_leased_and_nothing_else() -> None:
    minors = {0: 0, 1: 1, 2: 3, 3: 2}  # minors need not follow indices
    assert device_denies([2], minors, [0, 1, 2, 3]) == ["c 195:0 rwm", "c 195:1 rwm", "c 195:2 rwm"]
    assert device_denies([], minors, []) == []


def test_fence_names_are_unique_per_run_node_and_attempt() -> None:
    names = {fence_name(r, n, a) for r in ("r1", "r2") for n in ("n1", "n2") for a in (1, 2)}
    assert len(names) == 8


def test_probe_names_the_backend_this_node_offers() -> None:
    # The node's facts read here by other means than the agent's: stat(1), /proc/mounts, pid 1.
    fs_type = subprocess.run(
        ["stat", "-fc", "%T", "/sys/fs/cgroup"], capture_output=True, text=True, check=True
    ).stdout.strip()
    v1_memory = any(
        f[2] == "cgroup" and "memory" in f[3].split(",")
        for f in (line.split() for line in Path("/proc/mounts").read_text().splitlines())
    )
    systemd_init = Path("/proc/1/comm").read_text().strip() == "systemd"
    root = os.geteuid() == 0
    may_scope = root or bool(os.environ.get("XDG_RUNTIME_DIR"))
    if fs_type == "cgroup2fs" and systemd_init and shutil.which("systemd-run") and may_scope:
        want = "systemd"
    elif fs_type == "cgroup2fs" and os.access("/sys/fs/cgroup", os.W_OK):
        want = "v2"
    elif root and v1_memory:
        want = "v1"
    else:
        want = "none"
    assert probe() == want, (
        f"/sys/fs/cgroup is {fs_type}, v1 memory controller: {v1_memory}, pid 1 systemd: {systemd_init}"
    )


@pytest.fixture
def v1_fence() -> Iterator[CgroupV1]:
    if os.geteuid() != 0 or probe() != "v1":
        pytest.skip("needs root on a cgroup v1 node")
    fence = CgroupV1(f"ava-test-{uuid.uuid4().hex[:8]}")
    try:
        yield fence
    finally:
        fence.kill_all_verified(5)
        fence.remove()
        for mount in set(controller_mounts().values()):
            try:
                os.rmdir(os.path.join(mount, fence.parent))
            except OSError:
                pass


def _child_in(fence: CgroupV1, code: str) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            fence.add_self()
            os.execv(sys.executable, [sys.executable, "-c", code])
        finally:
            os._exit(127)
    return pid


def test_v1_fence_writes_the_limits(v1_fence: CgroupV1) -> None:
    v1_fence.create("limits.n1.a1", Limits(memory=300 << 20, cpus=0.5, pids=64), [])
    d = {c: Path(p) for c, p in v1_fence.dirs.items()}
    assert int((d["memory"] / "memory.limit_in_bytes").read_text()) == 300 << 20
    assert int((d["cpu"] / "cpu.cfs_quota_us").read_text()) == 50_000
    assert (d["pids"] / "pids.max").read_text().strip() == "64"
    assert v1_fence.info()["path"] == f"{v1_fence.parent}/limits.n1.a1"


def test_v1_kill_is_verified_against_a_tree_that_left_its_session(v1_fence: CgroupV1) -> None:
    v1_fence.create("tree.n1.a1", Limits(), [])
    code = (
        "import os, time\n"
        "for _ in range(3):\n"
        "    if os.fork() == 0:\n"
        "        os.setsid(); os.fork(); time.sleep(60)\n"
        "time.sleep(60)\n"
    )
    pid = _child_in(v1_fence, code)
    assert wait_for(lambda: len(v1_fence.pids()) >= 7, 10)
    reopened = attach(v1_fence.info())
    assert reopened is not None and sorted(reopened.pids()) == sorted(v1_fence.pids())
    assert reopened.kill_all_verified() == []
    os.waitpid(pid, 0)
    assert reopened.remove() and not v1_fence.exists()


def test_v1_out_of_memory_is_detected(v1_fence: CgroupV1) -> None:
    v1_fence.create("oom.n1.a1", Limits(memory=64 << 20), [])
    assert not v1_fence.oom_happened()
    pid = _child_in(v1_fence, "b = bytearray(512 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1")
    _, wstatus = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(wstatus) and os.WTERMSIG(wstatus) == signal.SIGKILL
    assert v1_fence.oom_happened()


def test_none_backend_ends_the_job_by_its_env_marker(agent: Agent, tmp_path: Path) -> None:
    run = agent.new_run("none")
    hidden = tmp_path / "hidden.pid"
    rc, st = agent.start(agent.spec(run, [sys.executable, "escape.py", str(hidden)], isolation="none"))
    assert rc == 0 and st["cgroup"]["backend"] == "none" and st["warning"]
    assert wait_for(lambda: hidden.exists() and hidden.read_text(), 10)
    assert int(hidden.read_text()) in marker_pids(run)
    out = agent.stop(run, grace=0.5)[1]
    assert out["stopped"] is True and out["remaining_pids"] == []
    assert wait_for(lambda: not marker_pids(run), 5) is True


@needs_cgroups
def test_a_job_that_cannot_start_fails_and_frees_its_lease(agent: Agent) -> None:
    run = agent.new_run("nobin")
    rc, st = agent.start(agent.spec(run, ["/nonexistent/binary"], gpus={"want": 1, "allowed": [0]}))
    assert rc == 1 and (st["state"], st["reason"]) == ("failed", "exit")
    assert "/nonexistent/binary" in st["error"]
    assert agent.leases() == []
    assert agent.stop(run)[1]["cgroup_removed"] is True


@needs_cgroups
def test_a_fence_the_node_cannot_make_fails_the_attempt_cleanly(agent: Agent) -> None:
    # This node's cgroup2 mount carries no memory controller, so a v2 fence cannot limit memory.
    if probe() != "v1":
        pytest.skip("needs a hybrid v1 node")
    run = agent.new_run("badfence")
    limits = {"memory": 1 << 30, "cpus": None, "pids": None}
    rc, st = agent.start(agent.spec(run, [sys.executable, "ranks.py"], limits=limits, isolation="v2"))
    assert rc == 1 and st["state"] == "failed" and st["error"].startswith("isolation:")
    assert agent.leases() == []
    assert agent.stop(run)[1] == {"run": run, "stopped": True, "remaining_pids": [], "cgroup_removed": True}
