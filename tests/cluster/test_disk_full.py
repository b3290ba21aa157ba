"""A full disk on a node is reported as one: `disk full on NODE (path)`, not a lost node or a
dead agent; and a sync that hits it leaves no partial file behind to keep it full."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ava.decide import NodeView, Observation, judge
from tests.conftest import REPO, run_ava
from tests.support.agent_helpers import Agent, agent, needs_cgroups
from tests.support.cluster import Cluster

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")

FILL = """
import os, sys, time
# Fill the disk the node's workdir is on, then keep running: the job itself does not fail.
# Only a test's small tmpfs: anywhere else (a wrong inventory, a mount that failed) do nothing.
disk = os.statvfs(os.path.dirname(os.path.abspath(sys.argv[1])))
if disk.f_blocks * disk.f_frsize > 64 << 20:
    sys.exit(f"{os.path.abspath(sys.argv[1])}: not on a small test file system: refusing to fill it")
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
for chunk in (1 << 16, 1 << 12, 1):
    try:
        while True:
            os.write(fd, b"x" * chunk)
    except OSError:
        pass
time.sleep(60)
"""


@contextlib.contextmanager
def tmpfs(path: Path, size: str, inside: int | None = None) -> Iterator[Path]:
    """A small file system of its own at PATH (what was there comes back after). `inside`: a
    pid of a test node (its sshd), whose mount namespace gets it; yields the path to look at
    it from here."""
    enter = ["nsenter", "-t", str(inside), "-m", "--"] if inside else []
    subprocess.run([*enter, "mkdir", "-p", str(path)], check=True)
    subprocess.run([*enter, "mount", "-t", "tmpfs", "-o", f"size={size}", "ava-test-full", str(path)], check=True)
    try:
        yield Path(f"/proc/{inside}/root{path}") if inside else path
    finally:
        subprocess.run([*enter, "umount", "-l", str(path)], check=False)


def test_a_disk_full_failure_names_the_node_and_the_path() -> None:
    path = "/w/runs/r/attempt-1/status.json"
    views = (NodeView("n1"), NodeView("n2", state="failed", reason="disk-full", disk_full=path))
    verdict = judge(Observation(views, elapsed=30.0), hang_timeout=600)
    assert (verdict.kind, verdict.cause, verdict.node) == ("disk-full", f"disk full on n2 ({path})", "n2")


@needs_root
@needs_cgroups
def test_a_heartbeat_that_hits_a_full_disk_ends_the_attempt_as_disk_full(agent: Agent) -> None:
    with tmpfs(agent.work, "2m"):
        (agent.jobs / "fill.py").write_text(FILL)
        run = agent.new_run("full")
        code, st = agent.start(
            agent.spec(
                run,
                ["python3", str(agent.jobs / "fill.py"), str(agent.work / "filler")],
                gpus={"want": 1, "allowed": [4]},
            )
        )
        assert code == 0, st
        final = agent.wait_final(run, timeout=30)
        assert final["state"] == "failed" and final["reason"] == "disk-full", final
        assert final["disk_full"] == str(agent.work / "runs" / run / "attempt-1" / "status.json")
        assert agent.leases() == []  # the job is gone, its GPU free
        assert not (agent.work / "runs" / run / "attempt-1" / "disk-reserve").exists()
        agent.cleanup()


@needs_root
def test_a_full_disk_on_a_node_is_reported_as_disk_full(cluster: Cluster, tmp_path: Path) -> None:
    home = {"AVA_HOME": str(tmp_path / "home")}
    recipe = tmp_path / "fill"
    recipe.mkdir()
    (recipe / "fill.py").write_text(FILL.replace("sys.argv[1]", "'filler'"))
    (recipe / "recipe.toml").write_text(
        'name = "fill"\n[run]\nscript = "fill.py"\n[resources]\nnodes = 1\n'
        "procs_per_node = 1\n[failover]\nmax_restarts = 0\n"
    )
    from ava.config import load_inventory

    n3, inventory = cluster.node("n3"), cluster.inventory(["n3"])
    # The workdir as the node sees it (a node may bind its own directory at ~/.ava).
    work = Path(os.path.expanduser(load_inventory(inventory).nodes["n3"].workdir))
    with tmpfs(work, "24m", inside=n3.sshd.pid if n3.sshd else None):
        done = run_ava("train", str(recipe), inventory=inventory, env=home, timeout=300)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "disk full on n3 (" in done.stderr and "status.json)" in done.stderr, done.stderr[-2000:]
    assert "agent died" not in done.stderr and "stopped answering" not in done.stderr


@needs_root
@pytest.mark.parametrize("name", ["n3", "local"])
def test_a_file_sent_to_a_full_disk_leaves_no_partial_file(cluster: Cluster, tmp_path: Path, name: str) -> None:
    from ava.config import load_inventory
    from ava.errors import AvaError
    from ava.transport import close_all, connect

    node = (
        load_inventory(cluster.inventory(["n3"])).nodes["n3"]
        if name == "n3"
        else load_inventory(REPO / "ava.toml").nodes["local"]
    )
    sshd = cluster.node("n3").sshd if name == "n3" else None
    with tmpfs(tmp_path / "small", "1m", inside=sshd.pid if sshd else None) as small:
        try:
            with pytest.raises(AvaError if name == "n3" else OSError):
                connect(node).put(os.urandom(2 << 20), str(tmp_path / "small" / "objects" / "archive.tar"))
        finally:
            close_all()
        assert [p.name for p in small.rglob("*") if p.is_file()] == []
        assert os.statvfs(small).f_bfree == os.statvfs(small).f_blocks  # nothing keeps it full
