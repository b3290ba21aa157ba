"""Isolation on a real systemd + cgroup v2 node (the qemu guest of tests/support/vm.py), through the
real CLI and ava's SSH transport, for both back-ends such a node offers: systemd transient
scopes (what the agent picks there) and the plain cgroup v2 subtree `/sys/fs/cgroup/ava`
(forced with the hidden AVA_ISOLATION hook of ava/launch.py).

The same behaviours tests/cluster/test_isolation_cluster.py checks on this machine's cgroup v1 tree:
the OOM report with its limit, teardown with a setsid'd escapee, a SIGKILLed agent reaped, the
pids and CPU limits, and the lease ledger. Every run is one node with its master on the guest.
An `ava train` there costs ~40 s (torch imports slowly on an emulated CPU), so each behaviour
is one run where one run shows it.
"""

from __future__ import annotations

import json
import shlex
import socket
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ava.agent.doctor_facts import reach
from tests.cluster.test_isolation_cluster import detach, hog_recipe, leases, ps, sets, stop, wait_for
from tests.conftest import run_ava
from tests.support.vm import VM
from tests.support.vm_fixtures import VM_ENV, look

BACKENDS = ("systemd", "v2")
SLOW = 600  # seconds an `ava` command may take on the emulated node


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture()
def home(tmp_path: Path, backend: str) -> dict[str, str]:
    return {"AVA_HOME": str(tmp_path / "home"), "AVA_ISOLATION": backend, **VM_ENV}


@pytest.fixture()
def inventory(vm: VM, tmp_path: Path) -> Path:
    return vm.inventory(tmp_path / "ava.toml")


@pytest.fixture()
def cleanup(home: dict[str, str], inventory: Path) -> Iterator[list[str]]:
    """Runs to stop whatever happens."""
    started: list[str] = []
    yield started
    with ThreadPoolExecutor() as pool:
        list(pool.map(lambda run: stop(run, inventory, home), started))


def assert_nothing_left(vm: VM, run_id: str, inventory: Path, *, wait: float = 0.0) -> None:
    """No process, cgroup (scope or plain directory) or lease of the run on the guest."""
    if wait:
        wait_for(
            lambda: not (seen := look(vm, run_id)).procs and not seen.cgroups,
            timeout=wait,
            every=1,
            what=f"{run_id} gone from the VM",
        )
    seen = look(vm, run_id)
    assert seen.procs == [], f"processes of {run_id} left: {seen.procs}"
    assert seen.cgroups == {}, f"cgroups of {run_id} left: {sorted(seen.cgroups)}"
    held = [h for h in leases(inventory)["vm"] if h.get("run") == run_id]
    assert held == [], held


def fenced_by(vm: VM, run_id: str) -> str:
    return str(look(vm, run_id).status["cgroup"]["backend"])


def running(vm: VM, run_id: str, *lines: str) -> bool:
    seen = look(vm, run_id)
    return seen.status.get("state") == "running" and all(line in seen.output for line in lines)


# -- memory -------------------------------------------------------------------------------------


def test_memory_limit_kills_the_hog_as_out_of_memory_and_spares_its_neighbour(
    vm: VM, backend: str, home: dict[str, str], inventory: Path, tmp_path: Path, cleanup: list[str]
) -> None:
    release = f"/tmp/release-{uuid.uuid4().hex}"
    neighbour = detach(hog_recipe(tmp_path), inventory, home, *sets(HOG_SECONDS=300, HOG_UNTIL=release))
    cleanup.append(neighbour)
    wait_for(lambda: running(vm, neighbour, "ready 0"), timeout=SLOW, every=1, what="the neighbour running")
    assert fenced_by(vm, neighbour) == backend

    greedy = tmp_path / "greedy"
    greedy.mkdir()
    recipe = hog_recipe(greedy, memory="200MiB")
    done = run_ava(
        "train", str(recipe), *sets(HOG_MODE="alloc", HOG_MIB=1024), inventory=inventory, env=home, timeout=SLOW
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "out of memory on vm (limit 200MiB)" in output
    assert "allocated 1024 MiB" not in output
    (hog_run,) = [r for r in ps(home).values() if r["id"] != neighbour]
    cleanup.append(hog_run["id"])
    assert hog_run["state"] == "failed"
    assert hog_run["attempts"][-1]["cause"] == "out of memory on vm (limit 200MiB)"
    assert fenced_by(vm, hog_run["id"]) == backend
    assert_nothing_left(vm, hog_run["id"], inventory)

    # The neighbour in its own cgroup beside it was never touched by the OOM killer, and ends well.
    assert ps(home)[neighbour]["state"] == "running"
    seen = look(vm, neighbour)
    assert seen.status["state"] == "running"
    events = dict(line.split() for line in (seen.fence()["memory.events"] or "").splitlines())
    assert events.get("oom_kill") == "0" and events.get("oom_group_kill", "0") == "0", events
    vm.ssh(f"touch {shlex.quote(release)}")
    wait_for(
        lambda: ps(home)[neighbour]["state"] in ("succeeded", "failed"),
        timeout=120,
        every=1,
        what="the neighbour ending",
    )
    assert ps(home)[neighbour]["state"] == "succeeded"
    assert "done 0" in look(vm, neighbour).output


# -- teardown -------------------------------------------------------------------------------------


def escapee(vm: VM, run_id: str) -> int:
    """The job's double-forked, setsid'd grandchild, once it runs: its pid (checked in the guest)."""

    def find() -> int | None:
        lines = [l for l in look(vm, run_id).output.splitlines() if "escaped " in l]
        return int(lines[0].rsplit(" ", 1)[1]) if lines else None

    pid = wait_for(find, timeout=SLOW, every=1, what="the escapee")
    seen = look(vm, run_id)
    assert pid in seen.procs and pid in seen.cgroup_procs
    # It really left: its own session, not torchrun's, whose leader is gone.
    probe = "import os, sys; s = os.getsid(int(sys.argv[1])); print(s, os.path.exists(f'/proc/{s}'))"
    session, leader_alive = vm.ssh(shlex.join(["python3", "-c", probe, str(pid)])).stdout.split()
    assert int(session) != seen.status["job_pid"] and leader_alive == "False"
    return pid


def test_stop_ends_every_process_even_a_setsid_escapee(
    vm: VM, backend: str, home: dict[str, str], inventory: Path, tmp_path: Path, cleanup: list[str]
) -> None:
    run_id = detach(hog_recipe(tmp_path), inventory, home, *sets(HOG_MODE="escape", HOG_SECONDS=300))
    cleanup.append(run_id)
    escapee(vm, run_id)
    assert fenced_by(vm, run_id) == backend

    stopped = stop(run_id, inventory, home)
    assert stopped.returncode == 0, stopped.stderr
    assert_nothing_left(vm, run_id, inventory)
    assert ps(home)[run_id]["state"] == "stopped"
    ended = look(vm, run_id).status
    assert (ended["state"], ended["reason"]) == ("stopped", "stopped"), ended


def test_killing_the_agent_ends_the_run_and_leaves_nothing(
    vm: VM, backend: str, home: dict[str, str], inventory: Path, tmp_path: Path, cleanup: list[str]
) -> None:
    run_id = detach(hog_recipe(tmp_path), inventory, home, *sets(HOG_MODE="escape", HOG_SECONDS=300))
    cleanup.append(run_id)
    escapee(vm, run_id)
    vm.ssh(f"kill -KILL {int(look(vm, run_id).status['pid'])}")

    assert_nothing_left(vm, run_id, inventory, wait=120)
    assert look(vm, run_id).status["reason"] == "agent-died"
    run = wait_for(
        lambda: (r := ps(home)[run_id])["state"] != "running" and r, timeout=120, every=1, what="the run ending"
    )
    assert run["state"] == "failed" and run["attempts"][-1]["cause"] == "the agent on vm died"


# -- pids and CPU limits --------------------------------------------------------------------------

FORKS = """
import errno, os, signal, time
os.write(1, f"ready {os.environ['RANK']}\\n".encode())
children, refused = [], None
try:
    while len(children) < 400:
        pid = os.fork()
        if pid == 0:
            time.sleep(120)
            os._exit(0)
        children.append(pid)
except OSError as exc:
    refused = errno.errorcode.get(exc.errno)
for pid in children:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
os.write(1, f"forked {len(children)} then refused: {refused}\\n".encode())
"""


def test_pids_limit_refuses_forks_past_it(
    vm: VM, backend: str, home: dict[str, str], inventory: Path, tmp_path: Path, cleanup: list[str]
) -> None:
    recipe = hog_recipe(tmp_path, pids=64)
    (recipe / "forks.py").write_text(FORKS)
    toml = recipe / "recipe.toml"
    toml.write_text(toml.read_text().replace('script = "hog.py"', 'script = "forks.py"'))
    done = run_ava("train", str(recipe), inventory=inventory, env=home, timeout=SLOW)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    (line,) = [l for l in output.splitlines() if "forked " in l]
    forked = int(line.split("forked ", 1)[1].split()[0])
    # torchrun's and the rank's own threads count too: the rank gets fewer than 64 children.
    assert 0 < forked < 64 and line.endswith("refused: EAGAIN"), line
    (run,) = ps(home).values()
    cleanup.append(run["id"])
    assert fenced_by(vm, run["id"]) == backend
    assert_nothing_left(vm, run["id"], inventory)


CPU_USE = """
import sys, time
def usage():
    with open(sys.argv[1]) as f:
        return int(dict(line.split() for line in f)["usage_usec"])
before, at = usage(), time.monotonic()
time.sleep(3)
print((usage() - before) / 1e6 / (time.monotonic() - at))
"""


def test_cpu_limit_holds_two_spinning_ranks_near_one_core(
    vm: VM, backend: str, home: dict[str, str], inventory: Path, tmp_path: Path, cleanup: list[str]
) -> None:
    run_id = detach(
        hog_recipe(tmp_path, cpus=1),
        inventory,
        home,
        "--set",
        "resources.procs_per_node=2",
        *sets(HOG_MODE="spin", HOG_SECONDS=120),
    )
    cleanup.append(run_id)
    wait_for(lambda: running(vm, run_id, "ready 0", "ready 1"), timeout=SLOW, every=1, what="both ranks spinning")
    seen = look(vm, run_id)
    assert seen.status["cgroup"]["backend"] == backend
    assert (seen.fence()["cpu.max"] or "").split() == ["100000", "100000"]
    stat = Path(seen.status["cgroup"]["path"]) / "cpu.stat"
    cores = float(vm.ssh(shlex.join(["python3", "-c", CPU_USE, str(stat)])).stdout)
    # The guest has 2 CPUs: unfenced, two spinners take up to 2 cores.
    assert 0.05 < cores < 1.3, f"the run used {cores:.2f} cores"
    stopped = stop(run_id, inventory, home)
    assert stopped.returncode == 0, stopped.stderr
    assert_nothing_left(vm, run_id, inventory)


# -- GPU leases -----------------------------------------------------------------------------------


def test_a_run_asking_for_held_gpus_is_refused_until_they_are_released(
    vm: VM, backend: str, home: dict[str, str], tmp_path: Path, cleanup: list[str]
) -> None:
    inventory = vm.inventory(tmp_path / "ava.toml", gpus=[0, 1])
    recipe = hog_recipe(tmp_path)
    two_gpus = ["--set", "resources.gpus_per_node=2", "--set", "resources.procs_per_node=1"]
    release = f"/tmp/release-{uuid.uuid4().hex}"
    first = detach(recipe, inventory, home, *two_gpus, *sets(HOG_SECONDS=300, HOG_UNTIL=release))
    cleanup.append(first)
    wait_for(lambda: running(vm, first, "ready 0"), timeout=SLOW, every=1, what="the first run")
    assert fenced_by(vm, first) == backend
    (holder,) = [h for h in leases(inventory)["vm"] if h["gpus"]]
    assert holder["run"] == first and holder["gpus"] == [0, 1]

    started = time.monotonic()
    busy = run_ava("train", str(recipe), *two_gpus, inventory=inventory, env=home, timeout=SLOW)
    took = time.monotonic() - started
    assert busy.returncode == 1, busy.stdout + busy.stderr
    assert f"vm is busy: held by run {first}" in busy.stdout + busy.stderr
    # No torchrun was started for it: refused in the time a connection and an agent call take.
    assert took < 60, f"the busy refusal took {took:.0f}s"
    second = next(r for r in ps(home).values() if r["id"] != first)
    cleanup.append(second["id"])
    assert second["state"] == "failed" and first in second["attempts"][-1]["cause"]
    assert look(vm, second["id"]).procs == []

    vm.ssh(f"touch {shlex.quote(release)}")
    wait_for(lambda: ps(home)[first]["state"] != "running", timeout=120, every=1, what="the first run ending")
    assert ps(home)[first]["state"] == "succeeded"
    assert [h for h in leases(inventory)["vm"] if h["gpus"]] == []
    assert_nothing_left(vm, first, inventory)


def test_the_agent_picks_systemd_scopes_on_a_systemd_cgroup_v2_node(vm: VM, tmp_path: Path) -> None:
    """What `auto` chooses there, and what `ava nodes` and `ava doctor` say of it (as root)."""
    inventory = vm.inventory(tmp_path / "ava.toml")
    nodes = run_ava("nodes", "--json", inventory=inventory, timeout=SLOW)
    assert nodes.returncode == 0, nodes.stderr
    (row,) = json.loads(nodes.stdout)
    assert row["reachable"] and row["isolation"] == "systemd", row
    assert vm.ssh("stat -fc %T /sys/fs/cgroup").stdout.strip() == "cgroup2fs"
    assert vm.ssh("systemctl is-system-running", check=False).stdout.strip() == "running"


# -- a non-root user (the README's `user = "ubuntu"`) ------------------------------------------------


def test_a_non_root_user_trains_in_a_systemd_user_scope_and_doctor_says_so(vm: VM, tmp_path: Path) -> None:
    """Without root, a node with systemd fences runs in the user's own manager (user@1000.service,
    which delegates memory, cpu and pids): limits hold, and `ava nodes` and `ava doctor` say so."""
    inventory = vm.inventory(tmp_path / "ava.toml", user="ubuntu")
    home = {"AVA_HOME": str(tmp_path / "home"), **VM_ENV}
    nodes = run_ava("nodes", "--json", inventory=inventory, timeout=SLOW)
    assert nodes.returncode == 0, nodes.stderr
    (row,) = json.loads(nodes.stdout)
    assert row["reachable"] and row["isolation"] == "systemd", row

    doctor = run_ava("doctor", "--json", inventory=inventory, timeout=SLOW)
    checks = {c["check"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert checks["isolation"]["status"] == "pass", checks["isolation"]
    assert checks["isolation"]["detail"] == "systemd (cgroup v2)", checks["isolation"]
    # The inventory's port is a forwarded one: the master (this very node) is reached as the
    # rendezvous reaches it, on its own address.
    assert checks["reaches master"]["status"] == "pass", checks["reaches master"]

    done = run_ava(
        "train",
        "tests/data/recipes/echo",
        "--set",
        "resources.memory=512MiB",
        inventory=inventory,
        env=home,
        timeout=SLOW,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "done 0" in done.stdout + done.stderr
    (run,) = ps(home).values()
    seen = look(vm, run["id"], user="ubuntu")
    fence = seen.status["cgroup"]
    assert fence["backend"] == "systemd" and fence["user_mode"] is True, fence
    assert fence["path"].startswith("/sys/fs/cgroup/user.slice/user-1000.slice/user@1000.service/"), fence
    # status.json was read from /home/ubuntu/.ava: the agent ran as ubuntu, the limit was set.
    assert seen.status["memory_limit"] == 512 << 20 and seen.status["state"] == "succeeded"
    assert seen.procs == [] and seen.cgroups == {}


def test_the_master_reaches_its_own_address_whatever_port_its_ssh_is_forwarded_from() -> None:
    """`ava doctor` on the master probes its own address with a listener of its own: the
    inventory's SSH port (here: one nothing listens on) may be a forwarded one."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        unused = closed.getsockname()[1]
    assert reach("127.0.0.1", unused, 2)["ok"] is True
