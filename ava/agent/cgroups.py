"""The node's cgroup tree as ava uses it: where it is mounted, the parent every fence lives
under, the controllers ava fences with, the limits a fence enforces, and its files.

Shared by the fence back-ends (cgroupv1, cgroupv2) and by provisioning, which makes the parent
ahead of the first run. Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = "/sys/fs/cgroup"
# Fences live under <mount>/ava/ (v1, v2) or in ava.slice (systemd), unless a spec names another.
PARENT = "ava"
# The controllers the agent fences with on cgroup v1, and those it enables down the tree on v2.
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "freezer", "devices")
V2_CONTROLLERS = ("memory", "cpu", "pids")
CPU_PERIOD_US = 100_000


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


def cpu_quota_us(cpus: float) -> int:
    """The CFS quota per CPU_PERIOD_US for CPUS cores (at least 1 ms, the kernel's floor)."""
    return max(1000, int(cpus * CPU_PERIOD_US))


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


def read(path: Path) -> str:
    """A cgroup file's text; "" when it cannot be read (gone, or not offered by this kernel)."""
    try:
        return path.read_text()
    except OSError:
        return ""


def write(path: Path, value: str, *, strict: bool = True) -> bool:
    """Write VALUE to a cgroup file; False when it refused and STRICT is off, else IsolationError."""
    try:
        with open(path, "w") as f:
            f.write(value)
        return True
    except OSError as exc:
        if strict:
            raise IsolationError(f"cannot write {value.strip()!r} to {path}: {exc.strerror}") from exc
        return False
