"""The systemd + cgroup v2 node (tests/support/vm.py) as pytest fixtures, and looks inside it.

`vm` boots one guest per test session (the image is built first if its inputs changed).
Tests that use it are marked `cluster` by tests/conftest.py, so under CI=true they may not skip.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.vm import VM, build, clean_stale, missing_tools

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# For every `ava` command aimed at the guest: its emulated CPUs answer a status poll in 1-9 s
# (the agent's start, ~30x slower than on the hardware it stands for), so the times that judge
# a node alive (4 s to answer, lost after 6 s, heartbeat stale after 10 s) are stretched 5x.
VM_ENV = {"AVA_LIVENESS_SCALE": "5"}

# Run in the guest by its own python3: every live process of the run (the env marker every
# job process carries), every cgroup whose name holds the run id with the files the tests
# read, and the run's status.json and output.log on the node.
_LOOK = r"""
import json, os, sys
run, workdir, attempt = sys.argv[1], os.path.expanduser(sys.argv[2]), sys.argv[3]
def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return None
procs = []
for entry in os.listdir("/proc"):
    if not entry.isdigit():
        continue
    environ, stat = read(f"/proc/{entry}/environ"), read(f"/proc/{entry}/stat")
    if environ and stat and stat.rsplit(")", 1)[1].split()[0] != "Z" and f"AVA_RUN_ID={run}" in environ.split("\0"):
        procs.append(int(entry))
cgroups = {}
for top, dirs, files in os.walk("/sys/fs/cgroup"):
    if run in os.path.basename(top):
        cgroups[top] = {name: read(os.path.join(top, name)) for name in
                        ("cgroup.procs", "memory.max", "memory.events", "pids.max", "cpu.max", "cpu.stat")}
        dirs[:] = []
folder = os.path.join(workdir, "runs", run, f"attempt-{attempt}")
status = read(os.path.join(folder, "status.json"))
print(json.dumps({"procs": sorted(procs), "cgroups": cgroups,
                  "status": json.loads(status) if status else {}, "output": read(os.path.join(folder, "output.log")) or ""}))
"""


class Look:
    """What the guest holds of one run, read in one SSH round trip."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.procs: list[int] = raw["procs"]
        self.cgroups: dict[str, dict[str, str | None]] = raw["cgroups"]
        self.status: dict[str, Any] = raw["status"]
        self.output: str = raw["output"]

    @property
    def cgroup_procs(self) -> list[int]:
        return sorted({int(p) for files in self.cgroups.values() for p in (files["cgroup.procs"] or "").split()})

    def fence(self) -> dict[str, str | None]:
        """The files of the attempt's own cgroup (the one status.json names)."""
        path = (self.status.get("cgroup") or {}).get("path")
        assert path in self.cgroups, f"status.json names cgroup {path!r}; the guest has {sorted(self.cgroups)}"
        return self.cgroups[path]


def look(vm: VM, run_id: str, *, user: str = "root", workdir: str = "~/.ava", attempt: int = 1) -> Look:
    command = shlex.join(["python3", "-c", _LOOK, run_id, workdir, str(attempt)])
    return Look(json.loads(vm.ssh(command, user=user).stdout))


@pytest.fixture(scope="session")
def vm() -> Iterator[VM]:
    """A booted systemd + cgroup v2 guest, reached at 127.0.0.1:vm.port."""
    gone = missing_tools()
    if gone:
        message = f"the test VM needs {', '.join(gone)} (.ci/run installs qemu-system-x86 and debootstrap)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    clean_stale()
    started = time.monotonic()
    image = build()
    built = time.monotonic() - started
    guest = VM(image).up()
    print(f"\ntest VM: image ready in {built:.0f}s, booted in {guest.boot_seconds:.0f}s", flush=True)
    try:
        yield guest
    finally:
        guest.down()


@pytest.fixture()
def vm_inventory(vm: VM, tmp_path: Path) -> Path:
    return vm.inventory(tmp_path / "ava-vm.toml")


def release_file(vm: VM, path: str) -> None:
    vm.ssh(f"touch {shlex.quote(path)}")
