"""Fencing one attempt's processes on a node: one small interface, four back-ends.

    fence = isolation.open_fence(kind, parent)     # kind from probe(): systemd | v2 | v1 | none
    fence.create(name, limits, gpus)               # in the monitor, before the job exists
    argv = fence.command(argv)                     # systemd wraps argv in `systemd-run --scope`
    fence.add_self()                               # in the job child, before exec
    fence.adopt(job_pid)                           # in the monitor, once the job runs
    fence.pids(); fence.oom_happened()
    remaining = fence.kill_all_verified()          # [] when every process is gone
    fence.remove()
    fence.info()                                   # JSON for status.json; attach(info) reopens it

A fence is per node AND run AND attempt (`<run>.<node>.a<attempt>`): in a test cluster
several nodes share one kernel, and so one cgroup tree.

This module holds the interface (`Fence`) and picks a back-end: nofence (none), cgroupv1 (v1),
cgroupv2 (v2 and systemd). They share cgroups.py (the tree, the limits, its files) and
devices.py (the GPU device files), and never import this module or each other.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Protocol

from .cgroups import PARENT, ROOT, IsolationError, Limits, mounts
from .nofence import MARKER, NoFence

__all__ = [
    "KINDS",
    "MARKER",
    "Fence",
    "IsolationError",
    "Limits",
    "attach",
    "fence_name",
    "mounts",
    "open_fence",
    "probe",
]

KINDS = ("systemd", "v2", "v1", "none")


class Fence(Protocol):
    """One attempt's processes on a node: made, joined, watched, killed and removed as one."""

    backend: str  # one of KINDS
    parent: str
    name: str
    warning: str | None  # what this fence does not enforce here, for status.json

    def create(self, name: str, limits: Limits, gpus: list[int]) -> None:
        """In the monitor, before the job exists; IsolationError when the node refuses."""

    def command(self, argv: list[str]) -> list[str]:
        """The argv that starts the job inside the fence."""

    def add_self(self) -> None:
        """Called in the job child between fork and exec."""

    def adopt(self, job_pid: int) -> None:
        """Called in the monitor once the job child exists."""

    def admits(self) -> bool:
        """Whether admit() can work here (what a spare interpreter needs, see warm.py)."""

    def admit(self, pid: int) -> None:
        """Move PID, a process already running (a spare), into the fence, so that what it
        forks next starts fenced; OSError when the node refuses."""

    def pids(self) -> list[int]: ...

    def oom_happened(self) -> bool: ...

    def kill_all_verified(self, timeout: float = 10.0) -> list[int]:
        """SIGKILL every process of the fence until none is left; returns those remaining."""

    def remove(self) -> bool: ...

    def exists(self) -> bool: ...

    def info(self) -> dict[str, Any]:
        """What status.json records, for attach() in another process."""

    def restore(self, info: dict[str, Any]) -> None:
        """Take back the state info() saved, in a process that did not create the fence."""


def fence_name(run: str, node: str, attempt: int) -> str:
    return f"{run}.{node}.a{attempt}"


def _systemd_is_init() -> bool:
    try:
        with open("/proc/1/comm") as f:
            return f.read().strip() == "systemd"
    except OSError:
        return False


def probe() -> str:
    """Which back-end this node supports, best first."""
    found = mounts()
    pure_v2 = any(point == ROOT and kind == "cgroup2" for point, kind, _ in found)
    root = os.geteuid() == 0
    may_scope = root or bool(os.environ.get("XDG_RUNTIME_DIR"))  # a user manager to ask
    if pure_v2 and _systemd_is_init() and shutil.which("systemd-run") and may_scope:
        return "systemd"
    if pure_v2 and os.access(ROOT, os.W_OK):
        return "v2"
    if root and any(kind == "cgroup" and "memory" in opts for _, kind, opts in found):
        return "v1"
    return "none"


def open_fence(kind: str | None, parent: str) -> Fence:
    """A fence of back-end KIND ("auto" probes) under the cgroup subtree PARENT."""
    if kind in ("", "auto", None):
        kind = probe()
    # The cgroup back-ends are imported only when a fence is opened: every agent command imports
    # this module, and on a slow node compiling code it never runs is what `status` pays for.
    if kind == "v1":
        from .cgroupv1 import CgroupV1

        return CgroupV1(parent)
    if kind == "v2":
        from .cgroupv2 import CgroupV2

        return CgroupV2(parent)
    if kind == "systemd":
        from .cgroupv2 import SystemdScope

        return SystemdScope(parent)
    if kind == "none":
        return NoFence(parent)
    raise IsolationError(f"unknown isolation back-end {kind!r}; use one of {', '.join(KINDS)}")


def attach(info: dict[str, Any] | None) -> Fence | None:
    """Reopen the fence that status.json describes (in stop, status, the reaper)."""
    if not info or not info.get("name"):
        return None
    fence = open_fence(info["backend"], info.get("parent") or PARENT)
    fence.restore(info)
    return fence
