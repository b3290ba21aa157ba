"""The isolation back-ends stand on their own: each imports the shared cgroup and device modules,
never isolation.py (which picks one) nor another back-end, and each offers the whole Fence."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ava.agent.cgroupv1 import CgroupV1
from ava.agent.cgroupv2 import CgroupV2, SystemdScope
from ava.agent.isolation import Fence, Limits, attach, open_fence
from ava.agent.nofence import MARKER, NoFence

BACKENDS = {"v1": "cgroupv1", "v2": "cgroupv2", "systemd": "cgroupv2", "none": "nofence"}


def agent_modules_after(module: str) -> set[str]:
    """The ava.agent modules a fresh interpreter holds after importing MODULE."""
    code = f"import json, sys, {module}; print(json.dumps(sorted(m for m in sys.modules if m.startswith('ava.agent'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    return set(json.loads(out.stdout))


@pytest.mark.parametrize("backend", sorted(set(BACKENDS.values())))
def test_a_backend_imports_neither_isolation_nor_another_backend(backend: str) -> None:
    loaded = agent_modules_after(f"ava.agent.{backend}")
    others = {f"ava.agent.{b}" for b in BACKENDS.values() if b != backend}
    assert "ava.agent.isolation" not in loaded and not loaded & others, sorted(loaded)


def test_every_backend_offers_the_whole_fence_interface() -> None:
    members = {name for name in Fence.__dict__ if not name.startswith("_")} | set(Fence.__annotations__)
    for cls in (NoFence, CgroupV1, CgroupV2, SystemdScope):
        fence = cls("ava")
        assert not [m for m in members if not hasattr(fence, m)], cls


@pytest.mark.parametrize("kind", sorted(BACKENDS))
def test_open_fence_gives_the_backend_asked_for_and_attach_reopens_it(kind: str) -> None:
    fence = open_fence(kind, "ava-test")
    assert fence.backend == kind and type(fence).__module__ == f"ava.agent.{BACKENDS[kind]}"
    fence.name = "r1.n1.a1"
    again = attach(fence.info())
    assert again is not None and type(again) is type(fence)
    assert (again.name, again.parent) == ("r1.n1.a1", "ava-test")


def test_the_none_backend_limits_nothing_and_says_so() -> None:
    fence = open_fence("none", "ava")
    fence.create("r1.n1.a1", Limits(memory=1 << 30, cpus=1.0, pids=10), [0])
    assert fence.warning and "not enforced" in fence.warning
    assert fence.command(["python3", "x.py"]) == ["python3", "x.py"]
    assert not fence.exists() and fence.remove() and not fence.oom_happened()
    assert MARKER == "AVA_JOB_TAG" and fence.pids() == []  # no process carries this run's marker
