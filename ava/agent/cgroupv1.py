"""cgroup v1 back-end: one directory per controller, `<mount>/<parent>/<name>`.

Stop is freeze, SIGKILL every task, thaw, wait for the tasks to go, rmdir: the freezer makes
the kill race-free against a job that keeps forking.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path
from typing import Any

from . import procs
from .cgroups import CPU_PERIOD_US, V1_CONTROLLERS, IsolationError, Limits, cpu_quota_us, mounts, read, write
from .devices import NVIDIA_MAJOR, gpu_device_minors, nvidia_minors


def controller_mounts() -> dict[str, str]:
    """Controller -> mount point, for the controllers the agent uses (joint mounts such as
    cpu,cpuacct map both names to one point)."""
    found: dict[str, str] = {}
    for point, kind, opts in mounts():
        if kind == "cgroup":
            for ctrl in V1_CONTROLLERS:
                if ctrl in opts:
                    found.setdefault(ctrl, point)
    return found


def device_denies(leased: list[int], index_to_minor: dict[int, int], present: list[int]) -> list[str]:
    """devices.deny lines: every GPU device minor not leased. Never deny-all: that would take
    /dev/null and friends away from the job."""
    allowed = {index_to_minor.get(i, i) for i in leased}
    return [f"c {NVIDIA_MAJOR}:{minor} rwm" for minor in present if minor not in allowed]


class CgroupV1:
    backend = "v1"

    def __init__(self, parent: str, name: str = "") -> None:
        self.parent = parent
        self.name = name
        self.warning: str | None = None
        self.dirs: dict[str, str] = {}  # controller -> directory

    def _dir(self, ctrl: str) -> Path | None:
        d = self.dirs.get(ctrl)
        return Path(d) if d else None

    def create(self, name: str, limits: Limits, gpus: list[int]) -> None:
        self.name = name
        found = controller_mounts()
        if "memory" not in found or "freezer" not in found:
            raise IsolationError("cgroup v1: memory and freezer controllers must be mounted")
        for ctrl, point in sorted(found.items()):
            d = Path(point) / self.parent / name
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise IsolationError(f"cannot create cgroup {d}: {exc.strerror}") from exc
            self.dirs[ctrl] = str(d)
        self._weigh_parent()
        self._apply(limits, gpus)

    def _weigh_parent(self) -> None:
        """In v1 the whole `ava` subtree is one scheduling entity beside every process outside
        it; at the default 1024 shares, runs would get one process's worth of CPU under load.
        Weigh it like as many busy processes as the node has CPUs (once; a set value stays)."""
        cpu = self._dir("cpu")
        shares = cpu.parent / "cpu.shares" if cpu else None
        if shares is not None and read(shares).strip() == "1024":
            try:
                write(shares, str(1024 * (os.cpu_count() or 1)))
            except IsolationError:
                pass  # an unwritable parent keeps its weight: runs still work

    def _apply(self, limits: Limits, gpus: list[int]) -> None:
        mem, cpu, pids, dev = (self._dir(c) for c in ("memory", "cpu", "pids", "devices"))
        if limits.memory and mem:
            write(mem / "memory.limit_in_bytes", str(limits.memory))
            if (mem / "memory.memsw.limit_in_bytes").exists():
                # Same bound on memory+swap: the limit means RAM, not RAM plus swap.
                write(mem / "memory.memsw.limit_in_bytes", str(limits.memory))
        if limits.cpus and cpu:
            write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            write(cpu / "cpu.cfs_quota_us", str(cpu_quota_us(limits.cpus)))
        if limits.pids and pids:
            write(pids / "pids.max", str(limits.pids))
        if dev:
            for line in device_denies(gpus, nvidia_minors(), gpu_device_minors()):
                write(dev / "devices.deny", line)

    def command(self, argv: list[str]) -> list[str]:
        return list(argv)

    def add_self(self) -> None:
        """Called in the job child between fork and exec."""
        me = str(os.getpid())
        for d in self.dirs.values():
            write(Path(d) / "cgroup.procs", me)

    def adopt(self, job_pid: int) -> None:
        """The job joined every controller's group itself (add_self)."""

    def admits(self) -> bool:
        return True

    def admit(self, pid: int) -> None:
        for d in self.dirs.values():
            with open(Path(d) / "cgroup.procs", "w", encoding="ascii") as f:
                f.write(str(pid))

    def pids(self) -> list[int]:
        found: set[int] = set()
        for d in self.dirs.values():
            found.update(int(x) for x in read(Path(d) / "cgroup.procs").split())
        return sorted(found)

    def oom_happened(self) -> bool:
        mem = self._dir("memory")
        if not mem:
            return False
        fields = dict(line.split(None, 1) for line in read(mem / "memory.oom_control").splitlines() if " " in line)
        if "oom_kill" in fields:
            return int(fields["oom_kill"]) > 0 or fields.get("under_oom", "0").strip() == "1"
        # Kernels before 4.13 have no counter: hitting the limit is the best sign left.
        return read(mem / "memory.failcnt").strip() not in ("", "0")

    def _freeze(self, state: str) -> None:
        fr = self._dir("freezer")
        if not fr or not fr.exists():
            return
        try:
            (fr / "freezer.state").write_text(state)
        except OSError:
            return
        if state == "FROZEN":
            # FREEZING may last while a task sits in D state; go on after a bound.
            end = time.monotonic() + 1.0
            while read(fr / "freezer.state").strip() != "FROZEN" and time.monotonic() < end:
                time.sleep(0.01)

    def kill_all_verified(self, timeout: float = 10.0) -> list[int]:
        deadline = time.monotonic() + timeout
        while self.pids() and time.monotonic() < deadline:
            self._freeze("FROZEN")
            procs.signal_pids(self.pids(), signal.SIGKILL)
            self._freeze("THAWED")
            end = min(deadline, time.monotonic() + 1.0)
            while self.pids() and time.monotonic() < end:
                time.sleep(0.02)
        self._freeze("THAWED")
        return self.pids()

    def remove(self) -> bool:
        gone = True
        for d in self.dirs.values():
            end = time.monotonic() + 2.0
            while True:
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    # EBUSY while the last exiting task is still being released.
                    if exc.errno != errno.EBUSY or time.monotonic() >= end:
                        gone = False
                        break
                    time.sleep(0.05)
        return gone

    def exists(self) -> bool:
        return any(os.path.isdir(d) for d in self.dirs.values())

    def info(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "path": f"{self.parent}/{self.name}",
            "name": self.name,
            "parent": self.parent,
            "dirs": dict(self.dirs),
        }

    def restore(self, info: dict[str, Any]) -> None:
        """Take back the state info() saved, in a process that did not create the fence."""
        self.name = info["name"]
        self.dirs = dict(info.get("dirs") or {})
