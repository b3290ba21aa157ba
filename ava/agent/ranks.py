"""When each rank failed, so the first failure in time can be named as the cause.

torchrun's failure summary gives each rank's exit code but no usable order: a rank that dies
because a peer went away ("Connection closed by peer") fails too, moments later, often with the
same code. A rank fails at the earlier of two moments: its uncaught exception reaching the top
(written by the rank hook, ava/rankhook.py, into the attempt's rank-errors/ directory) and its
exit. Exits alone mislead: a rank that raised winds its interpreter down for a while, and a peer
that lost it can exit first. The monitor watches torchrun's children (the ranks: its direct
children carrying RANK in their environment); with pidfds (Linux 5.3+) the wait itself is the
clock, elsewhere exits are seen at the next tick.

A rank's exit code is known the moment it exits, before torchrun notices: the pidfd wakes the
monitor while the rank is a zombie, and /proc/PID/stat holds the status torchrun is about to
reap (it looks every 0.1 s). A crash is reported from there, not ~2 s later when torchrun has
stopped the other ranks and ended itself.
"""

from __future__ import annotations

import json
import os
import select
import time
from pathlib import Path

from . import procs


def _children(parent: int) -> list[int]:
    """Direct children of PARENT: /proc/PID/task/*/children, or a /proc walk on kernels built
    without that file."""
    found: list[int] = []
    readable = False
    try:
        tasks = os.listdir(f"/proc/{parent}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{parent}/task/{task}/children", "rb") as f:
                found += [int(p) for p in f.read().split()]
            readable = True
        except (OSError, ValueError):
            continue
    if readable:
        return found
    for name in os.listdir("/proc"):
        fields = procs._stat_fields(int(name)) if name.isdigit() else None
        if fields and len(fields) > 1 and fields[1] == str(parent):
            found.append(int(name))
    return found


def _rank_of(pid: int) -> int | None:
    """The RANK in PID's environment; None before its exec (it still holds torchrun's)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            entries = f.read().split(b"\0")
    except OSError:
        return None
    for entry in entries:
        if entry.startswith(b"RANK="):
            try:
                return int(entry[5:])
            except ValueError:
                return None
    return None


class RankWatch:
    """Follows the ranks of one torchrun: `wait(timeout)` sleeps until a rank exits or the
    timeout passes; `failures()` maps global rank (as text, like rank_exit_codes) to the unix
    time it failed."""

    def __init__(self, torchrun_pid: int, errors: Path | None = None) -> None:
        self.parent = torchrun_pid
        self.errors = errors
        self.exits: dict[str, float] = {}
        self.codes: dict[str, int] = {}  # rank -> exit code, where read before torchrun reaped it
        self.unread: set[str] = set()  # ranks that exited while the job ran, reaped before their code was read
        self._live: dict[int, tuple[str, int | None]] = {}  # pid -> (rank, pidfd)
        self._seen: set[int] = set()

    def scan(self) -> None:
        """Pick up ranks started since the last scan (torchrun starts them after rendezvous)."""
        for pid in _children(self.parent):
            if pid in self._seen:
                continue
            rank = _rank_of(pid)
            if rank is None:
                continue  # not exec'd yet, or not a rank: looked at again next scan
            self._seen.add(pid)
            try:
                fd: int | None = os.pidfd_open(pid)
            except (AttributeError, OSError):
                fd = None
            if not procs.alive(pid):
                self._exited(pid, str(rank), fd)
                continue
            self._live[pid] = (str(rank), fd)

    def wait(self, timeout: float, also: int | None = None) -> None:
        """Sleep until a rank exits, or the process behind the pidfd ALSO does, or TIMEOUT."""
        fds = {fd: pid for pid, (_, fd) in self._live.items() if fd is not None}
        watched = list(fds) + ([also] if also is not None else [])
        if watched:
            ready, _, _ = select.select(watched, [], [], timeout)
            for fd in ready:
                if fd in fds:
                    pid = fds[fd]
                    self._exited(pid, self._live.pop(pid)[0], fd)
        else:
            time.sleep(timeout)
        # Without a pidfd (old kernel or Python): a liveness check each tick.
        for pid, (rank, pidfd) in list(self._live.items()):
            if pidfd is None and not procs.alive(pid):
                del self._live[pid]
                self._exited(pid, rank, None)

    def _exited(self, pid: int, rank: str, fd: int | None, *, read_code: bool = True) -> None:
        self.exits.setdefault(rank, time.time())
        code = procs.exit_code(pid) if read_code else None
        if code is not None:
            self.codes.setdefault(rank, code)
        elif read_code and rank not in self.codes:
            self.unread.add(rank)  # torchrun was quicker (a loaded machine): its summary will say
        if fd is not None:
            os.close(fd)

    def all_exited(self) -> bool:
        """Ranks were started and every one seen has exited."""
        return bool(self._seen) and not self._live

    def close(self) -> None:
        """After the job: the ranks still here were ended by the fence's kill (torchrun died
        first): their exits are dated, their codes are not the failure's."""
        for pid, (rank, fd) in list(self._live.items()):
            if not procs.alive(pid):
                self._exited(pid, rank, None, read_code=False)
            if fd is not None:
                os.close(fd)
        self._live.clear()

    def raised(self) -> dict[str, float]:
        """Ranks whose uncaught exception reached the top so far: failures for certain, known
        while the job still runs (exits are not: their codes come at the end)."""
        return _raised(self.errors)

    def failed_codes(self) -> dict[str, int]:
        """Ranks seen to exit non-zero so far. One that raised and was then ended by a signal
        while its interpreter wound down (torchrun stopping the others) failed with the code
        its exception gives, 1."""
        raised = self.raised()
        failed = {rank: (1 if code < 0 and rank in raised else code) for rank, code in self.codes.items() if code != 0}
        # A rank whose exception reached the top failed, with the code it gives, even where
        # torchrun reaped it before its code could be read.
        failed.update({rank: 1 for rank in self.unread & raised.keys()})
        return failed

    def failures(self) -> dict[str, float]:
        found = dict(self.exits)
        for rank, raised in _raised(self.errors).items():
            found[rank] = min(raised, found.get(rank, raised))
        return found


def _raised(errors: Path | None) -> dict[str, float]:
    """rank -> when its uncaught exception reached the top, from the rank hook's files."""
    found: dict[str, float] = {}
    if errors is None:
        return found
    try:
        names = os.listdir(errors)
    except OSError:
        return found
    for name in names:
        rank, _, ext = name.partition(".")
        if ext != "json" or not rank.isdigit():
            continue
        try:
            with open(errors / name, "rb") as f:
                found[rank] = float(json.loads(f.read())["time"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found
