"""The node's GPU and CPU-slot ledger: who holds what, so two runs never share a GPU.

WORKDIR/leases.json is `{"holders": [entry, ...]}`, changed only under `flock` on
WORKDIR/leases.lock. An entry: run, attempt, node, user, pid (the monitor), pid_start,
started, gpus [indices], cpu_slots n. An entry whose monitor is gone is reclaimed on every
read, so a crashed agent never strands a GPU.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import procs
from .layout import read_json, write_json_atomic

LEDGER = "leases.json"
LOCK = "leases.lock"


@dataclass
class Lease:
    run: str
    attempt: int
    node: str
    user: str
    pid: int
    pid_start: int | None
    started: float
    gpus: list[int] = field(default_factory=list)
    cpu_slots: int = 0

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Lease:
        return cls(
            run=str(raw.get("run", "")),
            attempt=int(raw.get("attempt", 0)),
            node=str(raw.get("node", "")),
            user=str(raw.get("user", "")),
            pid=int(raw.get("pid", 0)),
            pid_start=raw.get("pid_start"),
            started=float(raw.get("started", 0.0)),
            gpus=[int(g) for g in raw.get("gpus", [])],
            cpu_slots=int(raw.get("cpu_slots", 0)),
        )

    def public(self) -> dict[str, Any]:
        """The holder as `busy` answers show it."""
        return {
            "run": self.run,
            "attempt": self.attempt,
            "node": self.node,
            "user": self.user,
            "gpus": self.gpus,
            "cpu_slots": self.cpu_slots,
            "pid": self.pid,
            "started": self.started,
        }


class Busy(Exception):
    """The wanted GPUs or CPU slots are held by other runs."""

    def __init__(self, holders: list[Lease]) -> None:
        super().__init__("busy")
        self.holders = holders


@dataclass(frozen=True)
class Want:
    run: str
    node: str
    gpus: int = 0
    allowed: tuple[int, ...] = ()
    cpu_slots: int = 0
    cpu_total: int | None = None  # None: no CPU lease


def pick(held: list[Lease], want: Want) -> tuple[list[int], int]:
    """(GPU indices, CPU slots) for WANT given the live entries HELD; raises Busy.

    GPUs: the lowest free indices of `allowed`. CPU: held slots + want <= total. Entries of
    the same run on the same node do not count: a new attempt takes over its run's leases."""
    others = [h for h in held if not (h.run == want.run and h.node == want.node)]
    gpus: list[int] = []
    if want.gpus > 0:
        taken = {g for h in others for g in h.gpus}
        free = [g for g in sorted(set(want.allowed)) if g not in taken]
        if len(free) < want.gpus:
            raise Busy([h for h in others if set(h.gpus) & set(want.allowed)])
        gpus = free[: want.gpus]
    slots = 0
    if want.cpu_total is not None and want.cpu_slots > 0:
        used = sum(h.cpu_slots for h in others)
        if used + want.cpu_slots > want.cpu_total:
            raise Busy([h for h in others if h.cpu_slots])
        slots = want.cpu_slots
    return gpus, slots


def live(entries: list[Lease]) -> list[Lease]:
    return [e for e in entries if procs.alive(e.pid, e.pid_start)]


class Ledger:
    """The ledger file, open under its lock; `entries` are the live ones."""

    def __init__(self, work: Path, fd: int) -> None:
        self.work = work
        self.fd = fd  # the locked fd: a forked child must close its copy (see monitor.spawn)
        raw = read_json(work / LEDGER) or {}
        self.entries = live([Lease.from_json(e) for e in raw.get("holders", [])])

    def save(self) -> None:
        write_json_atomic(self.work / LEDGER, {"holders": [asdict(e) for e in self.entries]})

    def grant(self, want: Want, attempt: int, user: str, pid: int, gpus: list[int], slots: int) -> Lease:
        lease = Lease(
            run=want.run,
            attempt=attempt,
            node=want.node,
            user=user,
            pid=pid,
            pid_start=procs.start_time(pid),
            started=time.time(),
            gpus=gpus,
            cpu_slots=slots,
        )
        self.entries = [e for e in self.entries if not (e.run == want.run and e.node == want.node)]
        self.entries.append(lease)
        self.save()
        return lease

    def release(self, run: str, node: str | None = None, attempt: int | None = None) -> None:
        def matches(e: Lease) -> bool:
            return e.run == run and node in (None, e.node) and attempt in (None, e.attempt)

        self.entries = [e for e in self.entries if not matches(e)]
        self.save()


@contextmanager
def locked(work: Path) -> Iterator[Ledger]:
    """The ledger under an exclusive flock; dead entries are dropped on open and saved."""
    work.mkdir(parents=True, exist_ok=True)
    fd = os.open(work / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        ledger = Ledger(work, fd)
        ledger.save()
        yield ledger
    finally:
        os.close(fd)


def holders(work: Path) -> list[Lease]:
    with locked(work) as ledger:
        return list(ledger.entries)


def release(work: Path, run: str, node: str | None = None, attempt: int | None = None) -> None:
    with locked(work) as ledger:
        ledger.release(run, node, attempt)
