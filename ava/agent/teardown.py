"""Ending an attempt for good, from whichever process gets there: the monitor, its reaper,
`stop`, or `status` finding both dead. Every step is idempotent."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import isolation, leases, procs, status
from .protocol import AGENT_DIED, FAILED


@dataclass
class Teardown:
    status: dict[str, Any]
    remaining_pids: list[int]
    cgroup_removed: bool


def end_fence(st: dict[str, Any]) -> tuple[list[int], bool]:
    """Kill every process of the attempt's fence, verify none is left, remove the fence."""
    if procs.alive(st.get("job_pid"), st.get("job_start")):
        procs.signal_group(st["job_pid"], signal.SIGKILL)
    fence = isolation.attach(st.get("cgroup"))
    if fence is None:
        return [], True
    remaining = fence.kill_all_verified()
    removed = fence.remove() if not remaining else False
    return remaining, removed


def ended_clean(st: dict[str, Any] | None) -> bool:
    """True when nothing of an ended attempt is left here: neither its job nor a process the
    kill left behind, nor its fence. (Its leases went before its final state was written.)
    The supervisor needs no `stop` call for such an attempt."""
    if not status.is_final(st):
        return False
    assert st is not None
    if procs.alive(st.get("job_pid"), st.get("job_start")):
        return False
    if any(procs.alive(pid) for pid in st.get("left_pids") or []):
        return False
    dirs = _fence_dirs(st.get("cgroup"))
    if dirs is not None:
        return not any(os.path.isdir(d) for d in dirs)
    fence = isolation.attach(st.get("cgroup"))
    return fence is None or not fence.exists()


def _fence_dirs(info: dict[str, Any] | None) -> list[str] | None:
    """The cgroup directories a fence's status.json entry names (its back-end's info()), read
    without importing the back-end: a status answer pays for compiling it on a slow node.
    None for a back-end whose entry names none (then ask the back-end itself)."""
    if not info or not info.get("name"):
        return []
    if info.get("backend") == "v1":
        return [str(d) for d in (info.get("dirs") or {}).values()]
    if info.get("backend") in ("v2", "systemd"):
        return [str(info["path"])] if info.get("path") else []
    return None


def teardown(work: Path, attempt_dir: Path, st: dict[str, Any], state: str, reason: str, **extra: Any) -> Teardown:
    remaining, removed = end_fence(st)
    # Processes that survived the kill still hold their GPUs: their leases stay, draining.
    leases.release_or_drain(work, st["run"], st.get("node"), st.get("attempt"), remaining)
    if remaining:
        extra.setdefault("left_pids", remaining)
    final = status.finish(attempt_dir, st, state, reason, **extra)
    return Teardown(final, remaining, removed)


def settle(work: Path, attempt_dir: Path) -> dict[str, Any] | None:
    """The attempt's status, made true: a non-final attempt whose monitor died is ended
    (by its reaper if that still lives, else here) and reported failed / agent-died."""
    st = status.read(attempt_dir)
    if st is None or not status.monitor_gone(st):
        return st
    end = time.monotonic() + 15.0
    while status.reaper_alive(st) and time.monotonic() < end:
        time.sleep(0.1)
        st = status.read(attempt_dir) or st
        if status.is_final(st):
            return st
    st = status.read(attempt_dir) or st
    if status.is_final(st):
        return st
    return teardown(work, attempt_dir, st, FAILED, AGENT_DIED).status
