"""Isolation between runs, end to end through the real CLI on the test cluster: memory and CPU
limits, GPU leases, and teardown that leaves nothing behind however the run is ended.

The test nodes share this machine's kernel, so "every process of the run on any node" is every
process here whose environment holds AVA_RUN_ID=<run>, and its cgroups are the real v1 tree.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.conftest import REPO, processes_of, run_ava
from tests.support.cluster import Cluster

HOG = REPO / "tests" / "data" / "recipes" / "hog"
CGROUP_ROOT = Path("/sys/fs/cgroup")
AT_ONCE_S = 10.0  # "fails at once": one `ava train` that stops at the lease (4.7 s measured, loaded)
# The limit is what the README promises; the floor only shows the ranks spin in this cgroup: two
# spinning ranks under cpus = 1 got 0.36 cores here while other tests loaded the 2 cores.
CPU_FLOOR = 0.15
T = TypeVar("T")

pytestmark = pytest.mark.skipif(
    not (CGROUP_ROOT / "memory").is_dir() or os.geteuid() != 0,
    reason="needs root and the cgroup v1 tree (memory, cpuacct, freezer) these tests read",
)


# -- helpers ----------------------------------------------------------------------------------


@pytest.fixture()
def home(tmp_path: Path) -> dict[str, str]:
    return {"AVA_HOME": str(tmp_path / "home")}


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, every: float = 0.2, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout:g}s")
        time.sleep(every)


def hog_recipe(tmp_path: Path, **resources: object) -> Path:
    """A copy of the hog recipe with these [resources] keys set in its file."""
    target = tmp_path / "hog"
    if not target.exists():
        shutil.copytree(HOG, target)
    text = (HOG / "recipe.toml").read_text()
    extra = "".join(f"{key} = {json.dumps(value)}\n" for key, value in resources.items())
    (target / "recipe.toml").write_text(text.replace("[resources]\n", "[resources]\n" + extra))
    return target


def sets(**env: object) -> list[str]:
    return [arg for key, value in env.items() for arg in ("--set", f"env.{key}={value}")]


def detach(recipe: Path, inventory: Path, home: dict[str, str], *args: str) -> str:
    done = run_ava("train", str(recipe), "--detach", *args, inventory=inventory, env=home)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip().splitlines()[-1]


def ps(home: dict[str, str]) -> dict[str, dict[str, Any]]:
    done = run_ava("ps", "--json", env=home)
    assert done.returncode == 0, done.stderr
    return {r["id"]: r for r in json.loads(done.stdout)}


def stop(run_id: str, inventory: Path, home: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_ava("stop", run_id, inventory=inventory, env=home)


def attempt_dir(cluster: Cluster, node: str, run_id: str, attempt: int = 1) -> Path:
    return cluster.node(node).workdir / "runs" / run_id / f"attempt-{attempt}"


def node_status(cluster: Cluster, node: str, run_id: str) -> dict[str, Any]:
    try:
        return dict(json.loads((attempt_dir(cluster, node, run_id) / "status.json").read_text()))
    except (OSError, ValueError):
        return {}


def node_output(cluster: Cluster, node: str, run_id: str) -> str:
    try:
        return (attempt_dir(cluster, node, run_id) / "output.log").read_text(errors="replace")
    except OSError:
        return ""


def cgroups_of(run_id: str) -> list[Path]:
    """The run's cgroup directories under every controller's `ava` parent."""
    return sorted(d for d in CGROUP_ROOT.glob(f"*/ava/*{run_id}*") if d.is_dir())


def cgroup_tasks(run_id: str) -> list[int]:
    tasks: set[int] = set()
    for folder in cgroups_of(run_id):
        try:
            tasks.update(int(t) for t in (folder / "tasks").read_text().split())
        except OSError:
            continue
    return sorted(tasks)


def leases(inventory: Path) -> dict[str, list[dict[str, Any]]]:
    done = run_ava("nodes", "--json", inventory=inventory)
    assert done.returncode == 0, done.stderr
    return {r["name"]: r["leases"] for r in json.loads(done.stdout)}


def session_sshds(cluster: Cluster, node: str) -> list[int]:
    """The node's sshd processes serving a session (its listener aside)."""
    listener = cluster.node(node).sshd
    found = []
    for pid in cluster.namespace_pids(node):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"sshd") and (listener is None or pid != listener.pid):
            found.append(pid)
    return found


def assert_nothing_left(run_id: str, inventory: Path, *, wait: float = 0.0) -> None:
    """No process, cgroup or lease of the run on any node (waiting up to WAIT seconds)."""
    if wait:
        wait_for(lambda: not processes_of(run_id) and not cgroups_of(run_id), timeout=wait, what=f"{run_id} gone")
    assert processes_of(run_id) == []
    assert cgroup_tasks(run_id) == []
    assert cgroups_of(run_id) == []
    held = {name: [h for h in holders if h.get("run") == run_id] for name, holders in leases(inventory).items()}
    assert all(not h for h in held.values()), held


def escapee(cluster: Cluster, node: str, run_id: str) -> int:
    """Wait until the job's double-forked, setsid'd child runs; its pid."""

    def find() -> int | None:
        for line in node_output(cluster, node, run_id).splitlines():
            if "escaped " in line:
                return int(line.rsplit(" ", 1)[1])
        return None

    pid = wait_for(find, timeout=60, what=f"the escapee on {node}")
    assert pid in processes_of(run_id)
    # It really left: a session of its own, not torchrun's, whose leader (its parent) is gone.
    session = os.getsid(pid)
    assert session != node_status(cluster, node, run_id)["job_pid"]
    assert not Path(f"/proc/{session}").exists()
    return pid


class Attached:
    """An attached `ava train` whose output lines are read as they come."""

    def __init__(self, inventory: Path, home: dict[str, str], *args: str) -> None:
        env = {**os.environ, **home, "COLUMNS": "200"}
        env.pop("AVA_INVENTORY", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ava", "--inventory", str(inventory), "train", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def expect(self, text: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None and self.lines.empty():
                    break
                continue
            self.seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"{text!r} never came; output:\n" + "\n".join(self.seen[-30:]))

    def finish(self, timeout: float = 60.0) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(10)  # it ends at the output's end: every line is queued by then
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture()
def cleanup(home: dict[str, str]) -> Iterator[list[tuple[str, Path]]]:
    """Runs to stop whatever happens: (run id, inventory) pairs."""
    started: list[tuple[str, Path]] = []
    yield started
    with ThreadPoolExecutor() as pool:
        list(pool.map(lambda pair: stop(pair[0], pair[1], home), started))


def run_id_of(home: dict[str, str], recipe: str = "hog", exclude: tuple[str, ...] = ()) -> str:
    def find() -> str | None:
        ids = [i for i in ps(home) if i.startswith(recipe + "-") and i not in exclude]
        return ids[0] if ids else None

    return wait_for(find, timeout=30, what="the run record")


# -- memory -------------------------------------------------------------------------------------


def test_memory_limit_kills_the_hog_as_out_of_memory_and_spares_its_neighbour(
    cluster: Cluster, home: dict[str, str], tmp_path: Path, cleanup: list[tuple[str, Path]]
) -> None:
    inventory = cluster.inventory(["n1"])
    release = tmp_path / "release-neighbour"
    neighbour = detach(hog_recipe(tmp_path), inventory, home, *sets(HOG_SECONDS=60, HOG_UNTIL=release))
    cleanup.append((neighbour, inventory))
    # Its job runs (torchrun started in its fence) before the hog is launched beside it.
    wait_for(
        lambda: node_status(cluster, "n1", neighbour).get("state") == "running",
        timeout=60,
        what="the neighbour running",
    )

    greedy = tmp_path / "greedy"
    greedy.mkdir()
    recipe = hog_recipe(greedy, memory="200MiB")
    done = run_ava("train", str(recipe), *sets(HOG_MODE="alloc", HOG_MIB=1024), inventory=inventory, env=home)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "out of memory on n1 (limit 200MiB)" in output
    assert "allocated 1024 MiB" not in output
    (hog_run,) = [r for r in ps(home).values() if r["id"] != neighbour]
    cleanup.append((hog_run["id"], inventory))
    assert hog_run["state"] == "failed"
    assert hog_run["attempts"][-1]["cause"] == "out of memory on n1 (limit 200MiB)"
    assert_nothing_left(hog_run["id"], inventory)

    # The neighbour on the same node ran through it all, never touched by the OOM killer, and
    # now ends well.
    assert ps(home)[neighbour]["state"] == "running"
    assert node_status(cluster, "n1", neighbour)["state"] == "running"
    wait_for(lambda: "ready 0" in node_output(cluster, "n1", neighbour), what="the neighbour's rank")
    oom = (CGROUP_ROOT / "memory" / "ava" / f"{neighbour}.n1.a1" / "memory.oom_control").read_text()
    assert dict(line.split() for line in oom.splitlines()).get("oom_kill", "0") == "0"
    release.touch()
    wait_for(lambda: ps(home)[neighbour]["state"] in ("succeeded", "failed"), timeout=30, what="the neighbour ending")
    assert ps(home)[neighbour]["state"] == "succeeded"
    assert "done 0" in node_output(cluster, "n1", neighbour)


# -- teardown: nothing of the run is left, however it ends --------------------------------------


def test_stop_ends_every_process_on_every_node_even_a_setsid_escapee(
    cluster: Cluster, home: dict[str, str], tmp_path: Path, cleanup: list[tuple[str, Path]]
) -> None:
    inventory = cluster.inventory(["n1", "n2"])
    run_id = detach(
        hog_recipe(tmp_path), inventory, home, "--set", "resources.nodes=2", *sets(HOG_MODE="escape", HOG_SECONDS=60)
    )
    cleanup.append((run_id, inventory))
    escaped = [escapee(cluster, node, run_id) for node in ("n1", "n2")]
    assert cgroup_tasks(run_id) and set(escaped) <= set(cgroup_tasks(run_id))

    stopped = stop(run_id, inventory, home)
    assert stopped.returncode == 0, stopped.stderr
    assert_nothing_left(run_id, inventory)
    assert ps(home)[run_id]["state"] == "stopped"


def test_killing_the_agent_ends_the_run_and_leaves_nothing(
    cluster: Cluster, home: dict[str, str], tmp_path: Path, cleanup: list[tuple[str, Path]]
) -> None:
    inventory = cluster.inventory(["n2"])
    run_id = detach(hog_recipe(tmp_path), inventory, home, *sets(HOG_MODE="escape", HOG_SECONDS=60))
    cleanup.append((run_id, inventory))
    escapee(cluster, "n2", run_id)
    os.kill(node_status(cluster, "n2", run_id)["pid"], signal.SIGKILL)

    assert_nothing_left(run_id, inventory, wait=30)
    assert node_status(cluster, "n2", run_id)["reason"] == "agent-died"
    run = wait_for(lambda: (r := ps(home)[run_id])["state"] != "running" and r, what="the run ending")
    assert run["state"] == "failed" and run["attempts"][-1]["cause"] == "the agent on n2 died"


def test_killing_torchrun_ends_its_orphaned_workers_and_leaves_nothing(
    cluster: Cluster, home: dict[str, str], tmp_path: Path, cleanup: list[tuple[str, Path]]
) -> None:
    inventory = cluster.inventory(["n3"])
    run_id = detach(hog_recipe(tmp_path), inventory, home, *sets(HOG_MODE="escape", HOG_SECONDS=60))
    cleanup.append((run_id, inventory))
    escapee(cluster, "n3", run_id)
    os.kill(node_status(cluster, "n3", run_id)["job_pid"], signal.SIGKILL)

    assert_nothing_left(run_id, inventory, wait=30)
    run = wait_for(lambda: (r := ps(home)[run_id])["state"] != "running" and r, what="the run ending")
    assert run["state"] == "failed" and run["attempts"][-1]["cause"] == "torchrun on n3 exited -9"


@pytest.mark.skipif(os.geteuid() != 0, reason="cutting a link needs network namespaces")
def test_stop_after_a_dropped_connection_leaves_nothing(
    cluster: Cluster, home: dict[str, str], tmp_path: Path, cleanup: list[tuple[str, Path]]
) -> None:
    inventory = cluster.inventory(["n4"])
    attached = Attached(inventory, home, str(hog_recipe(tmp_path)), *sets(HOG_MODE="escape", HOG_SECONDS=60))
    try:
        attached.expect("escaped")
        run_id = run_id_of(home)
        cleanup.append((run_id, inventory))
        # The link goes down under the attached CLI, which then dies without a goodbye: the
        # node's sshd children serving it are left waiting on a peer that is gone.
        cluster.cut_link("n4")
        try:
            attached.kill()
            # What this test is about: sshd children on the node still serve the dead session.
            assert wait_for(lambda: session_sshds(cluster, "n4"), timeout=10, what="the node's sshd session")
        finally:
            cluster.restore_link("n4")
    finally:
        attached.kill()
    # The job outlived its connection ...
    assert node_status(cluster, "n4", run_id)["state"] == "running"
    assert processes_of(run_id)
    # ... and `ava stop` still ends all of it.
    stopped = stop(run_id, inventory, home)
    assert stopped.returncode == 0, stopped.stderr
    assert_nothing_left(run_id, inventory)
    assert ps(home)[run_id]["state"] == "stopped"


# -- GPU leases -----------------------------------------------------------------------------------


def test_runs_asking_for_the_same_gpus_never_overlap(
    cluster: Cluster, home: dict[str, str], tmp_path: Path, cleanup: list[tuple[str, Path]]
) -> None:
    inventory = cluster.inventory(["n3"], path=tmp_path / "ava.toml", gpus=[0, 1])
    recipe = hog_recipe(tmp_path)
    two_gpus = ["--set", "resources.gpus_per_node=2", "--set", "resources.procs_per_node=1"]
    release = tmp_path / "release-first"
    first = detach(recipe, inventory, home, *two_gpus, *sets(HOG_SECONDS=60, HOG_UNTIL=release))
    cleanup.append((first, inventory))
    wait_for(lambda: "ready 0" in node_output(cluster, "n3", first), timeout=60, what="the first run")

    # `ava nodes` shows who holds each GPU, as JSON and in its table.
    (holder,) = [h for h in leases(inventory)["n3"] if h["gpus"]]
    assert holder["run"] == first and holder["gpus"] == [0, 1]
    table = run_ava("nodes", inventory=inventory).stdout
    (line,) = [l for l in table.splitlines() if l.startswith("n3: run ")]
    assert line.startswith(f"n3: run {first} of ") and " holds GPUs 0,1 (since " in line

    # Without --wait the second run fails at once, naming the run in the way.
    started = time.monotonic()
    busy = run_ava("train", str(recipe), *two_gpus, inventory=inventory, env=home)
    took = time.monotonic() - started
    assert busy.returncode == 1, busy.stdout + busy.stderr
    # At once: the time of a start that reaches the node's agent and no more (no waiting, no retry).
    assert took < AT_ONCE_S, f"the busy run took {took:.1f}s to fail"
    assert f"n3 is busy: held by run {first}" in busy.stdout + busy.stderr
    second = next(r for r in ps(home).values() if r["id"] != first)
    cleanup.append((second["id"], inventory))
    assert second["state"] == "failed" and first in second["attempts"][-1]["cause"]
    assert not (cluster.node("n3").workdir / "runs" / second["id"] / "attempt-1").exists()

    # With --wait the third one says what it waits for, and starts only once the first ended.
    waiting = Attached(inventory, home, str(recipe), "--wait", *two_gpus, *sets(HOG_SECONDS=0))
    try:
        assert first in waiting.expect("waiting:")
        third = run_id_of(home, exclude=(first, second["id"]))
        cleanup.append((third, inventory))
        assert node_status(cluster, "n3", first)["state"] == "running"
        assert processes_of(third) == [] and processes_of(second["id"]) == []
        release.touch()
        waiting.expect("done 0")
        assert waiting.finish() == 0, "\n".join(waiting.seen)
    finally:
        waiting.kill()
    ended, began = node_status(cluster, "n3", first)["ended"], node_status(cluster, "n3", third)["started"]
    assert ps(home)[first]["state"] == "succeeded" and began >= ended
    assert node_status(cluster, "n3", third)["gpus"] == [0, 1]
    assert [h for h in leases(inventory)["n3"] if h["gpus"]] == []


# -- CPU limit ------------------------------------------------------------------------------------


def test_cpu_limit_holds_two_spinning_ranks_near_one_core(
    cluster: Cluster, home: dict[str, str], tmp_path: Path, cleanup: list[tuple[str, Path]]
) -> None:
    inventory = cluster.inventory(["n1"])
    run_id = detach(
        hog_recipe(tmp_path, cpus=1),
        inventory,
        home,
        "--set",
        "resources.procs_per_node=2",
        *sets(HOG_MODE="spin", HOG_SECONDS=30),
    )
    cleanup.append((run_id, inventory))
    wait_for(
        lambda: all(f"ready {r}" in node_output(cluster, "n1", run_id) for r in (0, 1)),
        timeout=60,
        what="both ranks spinning",
    )
    (usage,) = CGROUP_ROOT.glob(f"cpuacct/ava/{run_id}.n1.a1/cpuacct.usage")
    before, at = int(usage.read_text()), time.monotonic()
    time.sleep(3)
    cores = (int(usage.read_text()) - before) / 1e9 / (time.monotonic() - at)
    # At most the limit (plus a CFS period at each end of the window); above the floor, as the two
    # ranks really spin here (how far above depends on what else loads this 2-core machine).
    assert CPU_FLOOR < cores <= 1.1, f"cpus = 1: the run used {cores:.2f} cores"
    assert (CGROUP_ROOT / "cpu" / "ava" / f"{run_id}.n1.a1" / "cpu.cfs_quota_us").read_text().strip() == "100000"
    stop(run_id, inventory, home)
    assert_nothing_left(run_id, inventory)
