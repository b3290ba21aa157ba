"""After every test on the shared test cluster: nothing of its runs is left, and every node answers.

A test that leaves a process, a cgroup or a live lease behind fails (an error at its teardown),
not the test after it that trips over the leftover. Only what is new since the test began and
belongs to this session's cluster counts: other sessions on this machine run their own clusters.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.cluster import Cluster

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PARENT = "ava"  # ava.launch.CGROUP_PARENT: where the agent fences a run's attempts
SETTLE_S = 3.0  # a teardown just verified may still be reaping: leftovers get this long to go


@dataclass(frozen=True)
class Leftovers:
    processes: dict[int, str]  # pid -> what it is
    cgroups: frozenset[str]
    leases: frozenset[str]

    def minus(self, before: Leftovers) -> Leftovers:
        return Leftovers(
            {p: w for p, w in self.processes.items() if p not in before.processes},
            self.cgroups - before.cgroups,
            self.leases - before.leases,
        )

    def __bool__(self) -> bool:
        return bool(self.processes or self.cgroups or self.leases)


def _processes(root: bytes, listeners: set[int]) -> dict[int, str]:
    """Live processes of this cluster's runs: a rank (AVA_RUN_ID, its files in a node's workdir)
    or an agent (started from a node's workdir); the nodes' sshd listeners aside."""
    found = {}
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in listeners or int(entry.name) == me:
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read()
            if cmdline.startswith(b"sshd") or b"/sshd\0" in cmdline:
                continue
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                environ = f.read()
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
        except OSError:
            continue
        run = next((v[len(b"AVA_RUN_ID=") :] for v in environ.split(b"\0") if v.startswith(b"AVA_RUN_ID=")), None)
        if (run is not None and root in environ) or root in cmdline:
            what = f"run {run.decode(errors='replace')}" if run else "agent"
            argv = cmdline.replace(b"\0", b" ")[:160].decode(errors="replace")
            found[int(entry.name)] = f"{what}: {argv}"
    return found


def _run_ids(cluster: Cluster) -> set[str]:
    ids = set()
    for node in cluster.nodes:
        with contextlib.suppress(OSError):
            ids.update(os.listdir(node.workdir / "runs"))
    return ids


def _cgroups(runs: set[str]) -> frozenset[str]:
    found = set()
    for parent in CGROUP_ROOT.glob(f"*/{CGROUP_PARENT}"):
        with contextlib.suppress(OSError):
            for entry in os.scandir(parent):
                if entry.is_dir() and entry.name.split(".")[0] in runs:
                    found.add(f"{parent.parent.name}/{CGROUP_PARENT}/{entry.name}")
    return frozenset(found)


def _alive(pid: object) -> bool:
    return isinstance(pid, int) and pid > 0 and os.path.exists(f"/proc/{pid}")


def _leases(cluster: Cluster) -> frozenset[str]:
    """Lease entries whose holder still lives (an entry whose monitor is gone is free to reclaim)."""
    found = set()
    for node in cluster.nodes:
        try:
            holders = json.loads((node.workdir / "leases.json").read_text())["holders"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        for h in holders:
            if _alive(h.get("pid")) or any(_alive(p) for p, *_ in h.get("left") or []):
                found.add(f"{node.name}: {h.get('run')} attempt {h.get('attempt')} (monitor {h.get('pid')})")
    return frozenset(found)


def snapshot(cluster: Cluster) -> Leftovers:
    listeners = {n.sshd.pid for n in cluster.nodes if n.sshd is not None}
    return Leftovers(_processes(str(cluster.root).encode(), listeners), _cgroups(_run_ids(cluster)), _leases(cluster))


def silent_nodes(cluster: Cluster) -> list[str]:
    silent = []
    for node in cluster.nodes:
        try:
            with socket.create_connection((node.address, node.port), timeout=2) as sock:
                sock.settimeout(2)
                if sock.recv(4) != b"SSH-":
                    silent.append(f"{node.name} (no SSH banner)")
        except OSError as e:
            silent.append(f"{node.name} ({e})")
    return silent


def _sweep(left: Leftovers) -> None:
    """Remove what was reported, so the tests after this one start clean."""
    for pid in left.processes:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    for path in sorted(left.cgroups, key=len, reverse=True):
        with contextlib.suppress(OSError):
            (CGROUP_ROOT / path).rmdir()


@pytest.fixture(autouse=True)
def nothing_left_on_the_cluster(request: pytest.FixtureRequest) -> Iterator[None]:
    if "cluster" not in request.fixturenames:
        yield
        return
    cluster: Cluster = request.getfixturevalue("cluster")
    before = snapshot(cluster)
    yield
    left = snapshot(cluster).minus(before)
    deadline = time.monotonic() + SETTLE_S
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = snapshot(cluster).minus(before)
    silent = silent_nodes(cluster)
    if left:
        _sweep(left)
    problems = [f"process {pid} ({what})" for pid, what in sorted(left.processes.items())]
    problems += [f"cgroup {c}" for c in sorted(left.cgroups)]
    problems += [f"lease {entry}" for entry in sorted(left.leases)]
    problems += [f"node {n} does not answer" for n in silent]
    if problems:
        pytest.fail("this test left on the cluster:\n  " + "\n  ".join(problems), pytrace=False)
