"""The node's GPU and CPU-slot ledger: who holds what, so two runs never share a GPU.

LEDGER/leases.json is `{"holders": [entry, ...]}`, changed only under `flock` on
LEDGER/leases.lock. LEDGER is WORKDIR, or a node-wide directory (the inventory's `ledger`)
that WORKDIR/leases.json links to, so that several users and workdirs on one node share one
ledger. An entry: run, attempt, node, user, workdir, pid (the monitor), pid_start, started,
gpus [indices], cpu_slots n, and when teardown left processes behind, draining (why) and left
[[pid, start], ...]. An entry is reclaimed on every read once its monitor is gone and, for a
draining one, every process it left is gone too: a crashed agent never strands a GPU, and a
GPU still used by a process stuck in D state is never handed out.

The ledger is written whole (temp file, fsync, rename): a full disk fails the write, never
truncates the file. A ledger that cannot be read anyway is rebuilt from the live monitors'
status files under WORKDIR/runs (and every workdir registered in a shared ledger), never
taken as empty.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import procs
from .layout import write_json_atomic

LEDGER = "leases.json"
LOCK = "leases.lock"
WORKDIRS = "workdirs"  # in a shared ledger: one link per workdir that took a lease from it
PRIVATE, SHARED = 0o600, 0o660  # a shared ledger is group-writable (the node's ava group)


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
    workdir: str = ""
    draining: str | None = None  # why the lease outlives its attempt: processes left behind
    left: list[list[int | None]] = field(default_factory=list)  # [[pid, start], ...] left behind

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
            workdir=str(raw.get("workdir", "")),
            draining=raw.get("draining"),
            left=[[int(p), s] for p, s in raw.get("left", [])],
        )

    def alive(self) -> bool:
        """The monitor runs, or a process the teardown could not kill still does."""
        return procs.alive(self.pid, self.pid_start) or any(procs.alive(p, s) for p, s in self.left)

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
            "workdir": self.workdir,
            "draining": self.draining,
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
    return [e for e in entries if e.alive()]


def ledger_dir(work: Path) -> Path:
    """Where WORKDIR's ledger lives: WORKDIR, or the shared directory its leases.json links to."""
    link = work / LEDGER
    if link.is_symlink():
        return (work / os.readlink(link)).parent
    return work


def use_shared(work: Path, shared: str) -> None:
    """Point WORKDIR at the node-wide ledger directory SHARED (group-writable and setgid, so
    every member of its group can lease; made so when this user creates it), moving over what
    WORKDIR's own ledger holds, and register WORKDIR there for rebuilds."""
    where = Path(os.path.abspath(os.path.expanduser(shared)))
    if ledger_dir(work) == where:
        return
    for d in (where, where / WORKDIRS):
        d.mkdir(parents=True, exist_ok=True)
        if d.stat().st_uid == os.geteuid():
            os.chmod(d, 0o2770)
    with locked(work) as own, locked(where) as ledger:
        ledger.entries += [e for e in own.entries if e not in ledger.entries]
        ledger.save()
        temp = work / f".{LEDGER}.{os.getpid()}.link"
        os.symlink(where / LEDGER, temp)
        os.replace(temp, work / LEDGER)
    registered = where / WORKDIRS / hashlib.sha256(str(work.resolve()).encode()).hexdigest()[:16]
    if not registered.is_symlink():
        os.symlink(work.resolve(), registered)


def _read(path: Path) -> list[Lease] | None:
    """The ledger's entries, [] when there is none yet, None when it cannot be read as one."""
    try:
        with open(path, "rb") as f:
            raw = json.loads(f.read())
        return [Lease.from_json(e) for e in raw["holders"]]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def rebuild(workdirs: list[Path]) -> list[Lease]:
    """The entries of a lost ledger, from the status files of attempts whose monitor lives."""
    from . import layout, status

    found = []
    for work in workdirs:
        try:
            attempts = [
                (run, n, status.read(layout.attempt_dir(work, run, n)))
                for run in layout.runs(work)
                for n in layout.attempts(work, run)
            ]
        except OSError:
            continue  # another user's workdir (runs/ is 0700): only its owner can rebuild from it
        for run, n, st in attempts:
            if not st or status.is_final(st) or not procs.alive(st.get("pid"), st.get("pid_start")):
                continue
            found.append(
                Lease(
                    run=run,
                    attempt=n,
                    node=str(st.get("node", "")),
                    user=str(st.get("user", "")),
                    pid=int(st["pid"]),
                    pid_start=st.get("pid_start"),
                    started=float(st.get("started") or 0.0),
                    gpus=list(st.get("gpus") or []),
                    cpu_slots=int(st.get("cpu_slots") or 0),
                    workdir=str(work),
                )
            )
    return found


class Ledger:
    """The ledger file, open under its lock; `entries` are the live ones."""

    def __init__(self, work: Path, fd: int) -> None:
        self.work = work  # the ledger's directory
        self.fd = fd  # the locked fd: a forked child must close its copy (see monitor.spawn)
        entries = _read(work / LEDGER)
        if entries is None:
            # Truncated or garbled (a short write by an older agent, a full disk): taking it as
            # empty would grant held GPUs twice. The live monitors know what is held.
            entries = rebuild(self.workdirs())
        self.entries = live(entries)

    def workdirs(self) -> list[Path]:
        """WORKDIR for a private ledger; every registered workdir for a shared one."""
        try:
            names = sorted(os.listdir(self.work / WORKDIRS))
        except OSError:
            return [self.work]
        return [Path(os.readlink(self.work / WORKDIRS / n)) for n in names]

    def save(self, optional: bool = False) -> None:
        """Write the ledger whole. `optional`: dropping entries, which their dead monitors drop
        again on the next read anyway, so a full disk must not fail the caller (stop, status)."""
        mode = SHARED if (self.work / WORKDIRS).is_dir() else PRIVATE
        try:
            write_json_atomic(self.work / LEDGER, {"holders": [asdict(e) for e in self.entries]}, mode)
        except OSError as exc:
            if not (optional and exc.errno in (errno.ENOSPC, errno.EDQUOT)):
                raise

    def grant(
        self, want: Want, attempt: int, user: str, pid: int, gpus: list[int], slots: int, workdir: Path | None = None
    ) -> Lease:
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
            workdir=str(workdir or self.work),
        )
        self.entries = [e for e in self.entries if not (e.run == want.run and e.node == want.node)]
        self.entries.append(lease)
        self.save()
        return lease

    def release(self, run: str, node: str | None = None, attempt: int | None = None) -> None:
        def matches(e: Lease) -> bool:
            return e.run == run and node in (None, e.node) and attempt in (None, e.attempt)

        self.entries = [e for e in self.entries if not matches(e)]
        self.save(optional=True)

    def drain(self, run: str, node: str | None, attempt: int | None, left: list[int], why: str) -> None:
        """Keep the matching leases while LEFT (processes teardown could not kill) live."""
        for e in self.entries:
            if e.run == run and node in (None, e.node) and attempt in (None, e.attempt):
                e.draining = why
                e.left = [[p, procs.start_time(p)] for p in left]
        self.entries = live(self.entries)
        self.save()


@contextmanager
def locked(work: Path) -> Iterator[Ledger]:
    """WORKDIR's ledger under an exclusive flock; dead entries are dropped on open and saved."""
    work.mkdir(parents=True, exist_ok=True)
    where = ledger_dir(work)
    shared = (where / WORKDIRS).is_dir()
    fd = os.open(where / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, SHARED if shared else PRIVATE)
    try:
        if shared and os.fstat(fd).st_uid == os.geteuid():
            os.fchmod(fd, SHARED)  # the agent's umask (077) must not lock the group out
        fcntl.flock(fd, fcntl.LOCK_EX)
        ledger = Ledger(where, fd)
        ledger.save(optional=True)
        yield ledger
    finally:
        os.close(fd)


def holders(work: Path) -> list[Lease]:
    with locked(work) as ledger:
        return list(ledger.entries)


def release(work: Path, run: str, node: str | None = None, attempt: int | None = None) -> None:
    with locked(work) as ledger:
        ledger.release(run, node, attempt)


def release_or_drain(work: Path, run: str, node: str | None, attempt: int | None, left: list[int]) -> None:
    """Free the leases, unless processes survived the teardown (D state after a GPU fault):
    their GPUs are still in use, so the leases stay, marked draining, until those are gone."""
    with locked(work) as ledger:
        if left:
            ledger.drain(run, node, attempt, left, f"processes {sorted(left)} survived the teardown")
        else:
            ledger.release(run, node, attempt)
