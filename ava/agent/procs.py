"""Processes on this node: identity as (pid, start time), so a reused pid never passes for
the process the agent started, and discovery by an environment marker."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    return raw[raw.rfind(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """Clock ticks since boot at which PID started (field 22 of /proc/PID/stat)."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def exit_code(pid: int) -> int | None:
    """The exit code of PID while it is a zombie (its parent has not reaped it yet), as
    subprocess gives it: negative for a signal. None when it runs, or is gone."""
    fields = _stat_fields(pid)
    # Field 52 (Linux 3.5+): the wait status its parent is about to collect.
    if not fields or fields[0] != "Z" or len(fields) < 50:
        return None
    try:
        return os.waitstatus_to_exitcode(int(fields[49]))
    except ValueError:
        return None


def alive(pid: int | None, started: int | None = None) -> bool:
    """True if PID runs (not a zombie) and, when STARTED is given, is that same process."""
    if not pid or pid <= 0:
        return False
    fields = _stat_fields(pid)
    if not fields or fields[0] in ("Z", "X", "x"):
        return False
    return started is None or int(fields[19]) == started


def pids_with_env(entry: str) -> list[int]:
    """Pids whose initial environment holds exactly ENTRY ("KEY=value"): finds a job's
    processes even after they double-forked and left its session."""
    want = entry.encode()
    found: list[int] = []
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if want in env.split(b"\0") and alive(int(name)):
            found.append(int(name))
    return sorted(found)


def signal_pids(pids: Iterable[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def signal_group(pgid: int | None, sig: int) -> None:
    if pgid and pgid > 1:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
