"""The `none` back-end, for a node without a cgroup tree the agent may write: it limits nothing
and finds the job's processes by the env marker every one of them carries. Standard library only.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

from . import procs
from .cgroups import Limits

MARKER = "AVA_JOB_TAG"  # env entry every job process carries: finds them without a cgroup


class NoFence:
    backend = "none"

    def __init__(self, parent: str, name: str = "") -> None:
        self.parent = parent
        self.name = name
        self.warning: str | None = None

    def create(self, name: str, limits: Limits, gpus: list[int]) -> None:
        self.name = name
        self.warning = "no cgroup on this node: limits are not enforced, processes tracked by session and env marker"

    def command(self, argv: list[str]) -> list[str]:
        return list(argv)

    def add_self(self) -> None:
        """Nothing to join: the job child carries the marker in its environment."""

    def adopt(self, job_pid: int) -> None:
        """Nothing to learn from the job's pid: the marker finds its processes."""

    def admits(self) -> bool:
        return False  # a running process cannot be given the marker

    def admit(self, pid: int) -> None:
        raise OSError("no cgroup on this node: a running process cannot join the job")

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
        self.name = info["name"]


def _wait_empty(pids_fn: Callable[[], list[int]], seconds: float) -> bool:
    end = time.monotonic() + seconds
    while True:
        if not pids_fn():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.02)
