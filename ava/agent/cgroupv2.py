"""cgroup v2 back-ends: a plain directory under `<cgroup2 mount>/<parent>/`, or, where
systemd is PID 1, a transient scope made by `systemd-run` (systemd is the single writer of
the tree there, so the agent asks it rather than writing behind its back).

Stop is `cgroup.kill` (whole subtree, race-free against forks) with freeze+kill as the
fallback on kernels before 5.14, then wait for `populated 0`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from . import procs
from .cgroups import (
    CPU_PERIOD_US,
    ROOT,
    V2_CONTROLLERS,
    IsolationError,
    Limits,
    cpu_quota_us,
    mounts,
    read,
    write,
)
from .devices import (
    EXTRA_DEVICE_GROUPS,
    NVIDIA_CONTROL_DEVICES,
    char_device_groups,
    gpu_device_minors,
    nvidia_minors,
)


def unified_mount() -> str | None:
    """The cgroup2 mount that carries controllers (on hybrid nodes the unified one may not)."""
    best = None
    for point, kind, _ in mounts():
        if kind == "cgroup2":
            if read(Path(point) / "cgroup.controllers").split():
                return point
            best = best or point
    return best


def _keyed(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


class CgroupV2:
    backend = "v2"

    def __init__(self, parent: str, name: str = "") -> None:
        self.parent = parent
        self.name = name
        self.warning: str | None = None
        self.path: str | None = None

    def create(self, name: str, limits: Limits, gpus: list[int]) -> None:
        self.name = name
        mount = unified_mount()
        if not mount:
            raise IsolationError("no cgroup2 mount on this node")
        parent = Path(mount) / self.parent
        parent.mkdir(parents=True, exist_ok=True)
        # Top-down rule: a controller reaches the child only if every ancestor enables it.
        for d in (Path(mount), parent):
            have = read(d / "cgroup.controllers").split()
            for ctrl in V2_CONTROLLERS:
                if ctrl in have:
                    write(d / "cgroup.subtree_control", f"+{ctrl}", strict=False)
        d = parent / name
        d.mkdir(exist_ok=True)
        self.path = str(d)
        self._apply(limits)
        if gpu_device_minors():
            self.warning = "cgroup v2 without systemd: GPUs fenced by CUDA_VISIBLE_DEVICES only"

    def _apply(self, limits: Limits) -> None:
        d = Path(self.path or "")
        if limits.memory:
            write(d / "memory.max", str(limits.memory))
            if (d / "memory.swap.max").exists():
                write(d / "memory.swap.max", "0", strict=False)
        if limits.cpus:
            write(d / "cpu.max", f"{cpu_quota_us(limits.cpus)} {CPU_PERIOD_US}")
        if limits.pids:
            write(d / "pids.max", str(limits.pids))
        # One rank killed alone would leave the others hanging in a collective.
        write(d / "memory.oom.group", "1", strict=False)

    def command(self, argv: list[str]) -> list[str]:
        return list(argv)

    def add_self(self) -> None:
        """Called in the job child between fork and exec."""
        write(Path(self.path or "") / "cgroup.procs", str(os.getpid()))

    def adopt(self, job_pid: int) -> None:
        """The job joined the group itself (add_self)."""

    def admits(self) -> bool:
        return True

    def admit(self, pid: int) -> None:
        with open(Path(self.path or "") / "cgroup.procs", "w", encoding="ascii") as f:
            f.write(str(pid))

    def pids(self) -> list[int]:
        if not self.path:
            return []
        found: set[int] = set()
        for root, _, files in os.walk(self.path):
            if "cgroup.procs" in files:
                found.update(int(x) for x in read(Path(root) / "cgroup.procs").split())
        return sorted(found)

    def oom_happened(self) -> bool:
        if not self.path:
            return False
        events = _keyed(read(Path(self.path) / "memory.events"))
        return events.get("oom_kill", 0) > 0 or events.get("oom_group_kill", 0) > 0

    def kill_all_verified(self, timeout: float = 10.0) -> list[int]:
        if not self.path or not os.path.isdir(self.path):
            return []
        d = Path(self.path)
        deadline = time.monotonic() + timeout
        while self.pids() and time.monotonic() < deadline:
            if not write(d / "cgroup.kill", "1", strict=False):
                write(d / "cgroup.freeze", "1", strict=False)
                procs.signal_pids(self.pids(), signal.SIGKILL)
                write(d / "cgroup.freeze", "0", strict=False)
            end = min(deadline, time.monotonic() + 1.0)
            while self.pids() and time.monotonic() < end:
                time.sleep(0.02)
        return self.pids()

    def remove(self) -> bool:
        if not self.path:
            return True
        for root, dirs, _ in os.walk(self.path, topdown=False):
            for sub in dirs:
                _rmdir(os.path.join(root, sub))
        _rmdir(self.path)
        return not os.path.isdir(self.path)

    def exists(self) -> bool:
        return bool(self.path) and os.path.isdir(self.path or "")

    def info(self) -> dict[str, Any]:
        return {"backend": self.backend, "path": self.path, "name": self.name, "parent": self.parent}

    def restore(self, info: dict[str, Any]) -> None:
        """Take back the state info() saved, in a process that did not create the fence."""
        self.name = info["name"]
        self.path = info.get("path")


def _rmdir(path: str) -> None:
    end = time.monotonic() + 2.0
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() >= end:
                return
            time.sleep(0.05)


def unit_name(name: str) -> str:
    """A systemd unit name for fence NAME (units allow only [A-Za-z0-9:_.\\-])."""
    return "ava-" + re.sub(r"[^A-Za-z0-9:_.\-]", "_", name) + ".scope"


def systemd_run_argv(
    unit: str,
    slice_: str,
    limits: Limits,
    *,
    user_mode: bool,
    device_allow: list[str] | None,
) -> list[str]:
    """The `systemd-run` prefix that starts the job in its own transient scope.

    A scope (not a service) because the job must be our own child: the monitor waits on it
    and reads its exit code. device_allow=None leaves devices alone; a list closes the device
    policy to /dev/null & co. plus those entries (root only: device policy is eBPF)."""
    argv = ["systemd-run"]
    if user_mode:
        argv.append("--user")
    argv += ["--scope", "--quiet", "--collect", f"--unit={unit}", f"--slice={slice_}"]
    props: list[str] = []
    if limits.memory:
        props.append(f"MemoryMax={limits.memory}")
    if limits.cpus:
        props.append(f"CPUQuota={max(1, round(limits.cpus * 100))}%")
    if limits.pids:
        props.append(f"TasksMax={limits.pids}")
    if device_allow is not None and not user_mode:
        props.append("DevicePolicy=closed")
        props += [f"DeviceAllow={entry}" for entry in device_allow]
    for prop in props:
        argv += ["-p", prop]
    return argv


def transient_unit_call(
    unit: str,
    slice_: str,
    limits: Limits,
    pid: int,
    *,
    user_mode: bool,
    device_allow: list[str] | None,
) -> list[str]:
    """The `busctl` call that makes the scope systemd_run_argv() would, around PID, a process
    that already runs (systemd-run makes one only around itself): StartTransientUnit with the
    same properties, as D-Bus values (name, signature, value words)."""
    props: list[tuple[str, str, list[str]]] = [
        ("PIDs", "au", ["1", str(pid)]),
        ("Slice", "s", [slice_]),
        ("CollectMode", "s", ["inactive-or-failed"]),  # systemd-run --collect
    ]
    if limits.memory:
        props.append(("MemoryMax", "t", [str(limits.memory)]))
    if limits.cpus:  # CPUQuota=N% is N/100 s of CPU per second
        props.append(("CPUQuotaPerSecUSec", "t", [str(max(1, round(limits.cpus * 100)) * 10_000)]))
    if limits.pids:
        props.append(("TasksMax", "t", [str(limits.pids)]))
    if device_allow is not None and not user_mode:
        props.append(("DevicePolicy", "s", ["closed"]))
        pairs = [word for entry in device_allow for word in entry.split(" ", 1)]
        props.append(("DeviceAllow", "a(ss)", [str(len(device_allow)), *pairs]))
    argv = ["busctl"] + (["--user"] if user_mode else [])
    argv += ["call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager"]
    argv += ["StartTransientUnit", "ssa(sv)a(sa(sv))", unit, "fail", str(len(props))]
    for name, signature, words in props:
        argv += [name, signature, *words]
    return [*argv, "0"]  # no auxiliary units


def gpu_device_allow(leased: list[int]) -> list[str] | None:
    """DeviceAllow entries for the leased GPUs; None on a node without NVIDIA devices."""
    present = gpu_device_minors()
    if not present:
        return None
    index_to_minor = nvidia_minors()
    allow = [f"{path} rw" for path in NVIDIA_CONTROL_DEVICES if os.path.exists(path)]
    allow += [f"/dev/nvidia{index_to_minor.get(i, i)} rw" for i in leased]
    groups = char_device_groups()
    allow += [f"char-{g} rw" for g in EXTRA_DEVICE_GROUPS if g in groups]
    return allow


class SystemdScope(CgroupV2):
    backend = "systemd"

    def __init__(self, parent: str, name: str = "") -> None:
        super().__init__(parent, name)
        self.unit = ""
        self.user_mode = os.geteuid() != 0
        self.prefix: list[str] = []
        self._limits = Limits()
        self._allow: list[str] | None = None

    def _systemctl(self, *args: str) -> None:
        argv = ["systemctl"] + (["--user"] if self.user_mode else []) + list(args)
        subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False)

    def create(self, name: str, limits: Limits, gpus: list[int]) -> None:
        self.name = name
        self.unit = unit_name(name)
        allow = gpu_device_allow(gpus)
        if allow is not None and self.user_mode:
            self.warning = "not root: GPUs fenced by CUDA_VISIBLE_DEVICES only"
        self.prefix = systemd_run_argv(
            self.unit, f"{self.parent}.slice", limits, user_mode=self.user_mode, device_allow=allow
        )
        self._limits, self._allow = limits, allow

    def admits(self) -> bool:
        # The user manager cannot take a process from an SSH session's scope (the system's).
        return not self.user_mode

    def admit(self, pid: int) -> None:
        call = transient_unit_call(
            self.unit, f"{self.parent}.slice", self._limits, pid, user_mode=self.user_mode, device_allow=self._allow
        )
        try:
            done = subprocess.run(call, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise OSError(f"busctl StartTransientUnit: {exc}") from exc
        if done.returncode != 0:
            raise OSError(f"busctl StartTransientUnit: {done.stderr.strip()[-300:]}")
        self.adopt(pid)  # systemd moves it once the unit starts: wait for that
        if not self.path:
            raise OSError(f"{pid} did not land in {self.unit}")

    def command(self, argv: list[str]) -> list[str]:
        return self.prefix + ["--", *argv]

    def add_self(self) -> None:
        """systemd-run moves itself into the scope before it execs the job."""

    def adopt(self, job_pid: int) -> None:
        # The scope exists once systemd-run has exec'd the job: read where the job landed.
        mount = unified_mount() or ROOT
        end = time.monotonic() + 15.0
        while time.monotonic() < end and procs.alive(job_pid):
            rel = next(
                (ln[3:] for ln in read(Path(f"/proc/{job_pid}/cgroup")).splitlines() if ln.startswith("0::")),
                "",
            )
            if rel.rstrip("/").endswith("/" + self.unit):
                self.path = os.path.join(mount, rel.strip("/"))
                write(Path(self.path) / "memory.oom.group", "1", strict=False)
                return
            time.sleep(0.05)

    def kill_all_verified(self, timeout: float = 10.0) -> list[int]:
        self._systemctl("kill", "--signal=SIGKILL", self.unit)
        return super().kill_all_verified(timeout)

    def remove(self) -> bool:
        self._systemctl("stop", self.unit)
        self._systemctl("reset-failed", self.unit)
        return super().remove()

    def info(self) -> dict[str, Any]:
        return {**super().info(), "unit": self.unit, "user_mode": self.user_mode}

    def restore(self, info: dict[str, Any]) -> None:
        super().restore(info)
        self.unit = info.get("unit") or unit_name(self.name)
        self.user_mode = bool(info.get("user_mode"))
