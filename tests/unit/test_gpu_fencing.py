"""GPU device fencing for real, without a GPU: fake /dev/nvidiaN character devices (NVIDIA's
major number, 195) leased through the agent; the devices cgroup must let a run open only its own.

Opening a device whose major has no driver fails with ENXIO (or ENODEV): that is a run getting
past the cgroup. EPERM is the devices controller refusing it.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ava.agent.cgroupv1 import NVIDIA_MAJOR
from tests.support.agent_helpers import Agent, agent, needs_cgroups

OPEN = """
import errno, json, os, sys, time
seen = {}
for path in sys.argv[1:]:
    try:
        os.close(os.open(path, os.O_RDWR))
        seen[path] = "opened"
    except OSError as e:
        seen[path] = errno.errorcode.get(e.errno, str(e.errno))
print("OPEN " + json.dumps(seen), flush=True)
time.sleep(float(os.environ.get("HOLD", "0")))
"""
PAST_THE_CGROUP = ("ENXIO", "ENODEV")


@pytest.fixture
def fake_gpus() -> Iterator[list[int]]:
    """Two /dev/nvidiaN devices for minors no real device uses here; removed after, even on failure."""
    taken = {int(n[6:]) for n in os.listdir("/dev") if n.startswith("nvidia") and n[6:].isdigit()}
    minors = [m for m in range(200, 250) if m not in taken and not os.path.exists(f"/dev/nvidia{m}")][:2]
    made = []
    try:
        for minor in minors:
            os.mknod(f"/dev/nvidia{minor}", 0o666 | stat.S_IFCHR, os.makedev(NVIDIA_MAJOR, minor))
            made.append(f"/dev/nvidia{minor}")
        yield minors
    finally:
        for path in made:
            os.unlink(path)


def opened(agent: Agent, run: str) -> dict[str, str]:
    text = (agent.work / "runs" / run / "attempt-1" / "output.log").read_text()
    return json.loads(next(l for l in text.splitlines() if l.startswith("OPEN "))[5:])


@needs_cgroups
@pytest.mark.skipif(os.geteuid() != 0, reason="creating device files needs root")
def test_each_run_opens_only_the_gpu_it_leased(agent: Agent, fake_gpus: list[int]) -> None:
    first, second = fake_gpus
    paths = [f"/dev/nvidia{first}", f"/dev/nvidia{second}"]
    (agent.jobs / "open.py").write_text(OPEN)
    argv = [sys.executable, str(agent.jobs / "open.py"), *paths]
    run_a, run_b, run_c = agent.new_run("gpua"), agent.new_run("gpub"), agent.new_run("cpu")
    gpus = {"want": 1, "allowed": fake_gpus}
    # A holds its GPU (the lower index) while B starts, so B is leased the other one.
    code, st = agent.start(agent.spec(run_a, argv, gpus=gpus, env={"HOLD": "5"}))
    assert code == 0 and st["gpus"] == [first], st
    code, st = agent.start(agent.spec(run_b, argv, gpus=gpus))
    assert code == 0 and st["gpus"] == [second], st
    # A CPU run on this GPU node: no GPU leased, none opens.
    code, st = agent.start(agent.spec(run_c, argv, gpus={"want": 0, "allowed": fake_gpus}))
    assert code == 0 and st["gpus"] == [], st
    for run in (run_a, run_b, run_c):
        assert agent.wait_final(run)["state"] == "succeeded"
    a, b, c = opened(agent, run_a), opened(agent, run_b), opened(agent, run_c)
    assert a[paths[0]] in PAST_THE_CGROUP and a[paths[1]] == "EPERM", a
    assert b[paths[0]] == "EPERM" and b[paths[1]] in PAST_THE_CGROUP, b
    assert c == {paths[0]: "EPERM", paths[1]: "EPERM"}, c
    # The check itself holds outside a fence: the driverless device is not EPERM by itself.
    with pytest.raises(OSError) as outside:
        os.open(paths[0], os.O_RDWR)
    assert outside.value.errno != 1
