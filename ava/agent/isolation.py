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
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from dataclasses import dataclass
from typing import Any

from . import procs

MARKER = "AVA_JOB_TAG"  # env entry every job process carries: finds them without a cgroup
KINDS = ("systemd", "v2", "v1", "none")


class IsolationError(RuntimeError):
    """The fence could not be created (a cgroup file refused a write, systemd-run missing)."""


@dataclass(frozen=True)
class Limits:
    memory: int | None = None  # bytes
    cpus: float | None = None  # cores
    pids: int | None = None

    @classmethod
    def from_spec(cls, raw: dict[str, Any] | None) -> Limits:
        raw = raw or {}
        mem, cpus, pids = raw.get("memory"), raw.get("cpus"), raw.get("pids")
        return cls(
            memory=int(mem) if mem else None,
            cpus=float(cpus) if cpus else None,
            pids=int(pids) if pids else None,
        )


class Isolation:
    """Base: the `none` back-end. Tracks the job by its session and its env marker, limits
    nothing; subclasses fence with cgroups."""

    backend = "none"

    def __init__(self, parent: str, name: str = "") -> None:
        self.parent = parent
        self.name = name
        self.warning: str | None = None

    # -- life cycle ----------------------------------------------------------------------
    def create(self, name: str, limits: Limits, gpus: list[int]) -> None:
        self.name = name
        self.warning = "no cgroup on this node: limits are not enforced, processes tracked by session and env marker"

    def command(self, argv: list[str]) -> list[str]:
        return list(argv)

    def add_self(self) -> None:
        """Called in the job child between fork and exec."""

    def adopt(self, job_pid: int) -> None:
        """Called in the monitor once the job child exists."""

    def pids(self) -> list[int]:
        return procs.pids_with_env(f"{MARKER}={self.name}")

    def oom_happened(self) -> bool:
        return False

    def kill_all_verified(self, timeout: float = 10.0) -> list[int]:
        """SIGKILL every process of the fence until none is left; returns those remaining."""
        deadline = time.monotonic() + timeout
        while (pids := self.pids()) and time.monotonic() < deadline:
            procs.signal_pids(pids, signal.SIGKILL)
            _wait_empty(self.pids, min(0.5, max(0.0, deadline - time.monotonic())))
        return self.pids()

    def remove(self) -> bool:
        return True

    def exists(self) -> bool:
        return False

    def info(self) -> dict[str, Any]:
        return {"backend": self.backend, "path": None, "name": self.name, "parent": self.parent}

    def restore(self, info: dict[str, Any]) -> None:
        """Take back the state info() saved, in a process that did not create the fence."""
        self.name = info["name"]


def _wait_empty(pids_fn: Any, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while True:
        if not pids_fn():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.02)


def fence_name(run: str, node: str, attempt: int) -> str:
    return f"{run}.{node}.a{attempt}"


# -- probing -------------------------------------------------------------------------------
def mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, fstype, options) of every cgroup and cgroup2 mount."""
    out: list[tuple[str, str, set[str]]] = []
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        left, _, right = line.partition(" - ")
        parts, rparts = left.split(), right.split()
        if len(parts) >= 5 and len(rparts) >= 3 and rparts[0] in ("cgroup", "cgroup2"):
            point = parts[4].replace("\\040", " ")
            out.append((point, rparts[0], set(rparts[2].split(","))))
    return out


def _systemd_is_init() -> bool:
    try:
        with open("/proc/1/comm") as f:
            return f.read().strip() == "systemd"
    except OSError:
        return False


def probe() -> str:
    """Which back-end this node supports, best first."""
    found = mounts()
    pure_v2 = any(point == "/sys/fs/cgroup" and kind == "cgroup2" for point, kind, _ in found)
    root = os.geteuid() == 0
    if pure_v2 and _systemd_is_init() and shutil.which("systemd-run"):
        if root or os.environ.get("XDG_RUNTIME_DIR"):
            return "systemd"
    if pure_v2 and os.access("/sys/fs/cgroup", os.W_OK):
        return "v2"
    if root and any(kind == "cgroup" and "memory" in opts for _, kind, opts in found):
        return "v1"
    return "none"


def open_fence(kind: str, parent: str) -> Isolation:
    """A fence of back-end KIND ("auto" probes) under the cgroup subtree PARENT."""
    if kind in ("", "auto", None):
        kind = probe()
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
        return Isolation(parent)
    raise IsolationError(f"unknown isolation back-end {kind!r}; use one of {', '.join(KINDS)}")


def attach(info: dict[str, Any] | None) -> Isolation | None:
    """Reopen the fence that status.json describes (in stop, status, the reaper)."""
    if not info or not info.get("name"):
        return None
    fence = open_fence(info["backend"], info.get("parent") or "ava")
    fence.restore(info)
    return fence
