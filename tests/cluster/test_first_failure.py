"""Which failure a run reports, and when it stops retrying: on the real test cluster."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO, run_ava
from tests.support.cluster import Cluster

FIRSTFAIL = REPO / "tests" / "data" / "recipes" / "firstfail"
ECHO = REPO / "tests" / "data" / "recipes" / "echo"
HOG = REPO / "tests" / "data" / "recipes" / "hog"


@pytest.fixture()
def home(tmp_path: Path) -> dict[str, str]:
    return {"AVA_HOME": str(tmp_path / "home")}


def only_run(home: dict[str, str]) -> dict:
    done = run_ava("ps", "--json", env=home)
    assert done.returncode == 0, done.stderr
    (record,) = json.loads(done.stdout)
    return record


@pytest.mark.parametrize("nodes,procs", [(1, 2), (2, 1)], ids=["one-node", "two-nodes"])
def test_the_rank_that_raised_first_is_named_not_the_peer_that_lost_its_connection(
    cluster: Cluster, home: dict[str, str], nodes: int, procs: int
) -> None:
    names = ["n1", "n2"][:nodes]
    done = run_ava(
        "train",
        str(FIRSTFAIL),
        "--set",
        f"resources.nodes={nodes}",
        "--set",
        f"resources.procs_per_node={procs}",
        inventory=cluster.inventory(names),
        env=home,
        timeout=180,
    )
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    # Rank 0 did die too, of the broken connection, on its own and with exit 1: the trap.
    assert "rank 0 lost its peer" in done.stdout
    record = only_run(home)
    cause = record["attempts"][-1]["cause"]
    assert cause.startswith("rank 1 on ") and cause.endswith(" exited 1"), cause
    summary = done.stderr[done.stderr.index("failed on ") :]
    assert "rank 1 (exit 1)" in summary.splitlines()[0]
    assert "RuntimeError: rank 1 broke first" in summary


def test_a_start_up_failure_seen_twice_is_not_retried_a_third_time(
    cluster: Cluster, home: dict[str, str], tmp_path: Path
) -> None:
    done = run_ava(
        "train",
        str(ECHO),
        "--set",
        "env.ECHO_FAIL_RANK=0",
        "--set",
        "failover.max_restarts=5",
        "--set",
        "failover.backoff=0s",
        inventory=cluster.inventory(["n1"]),
        env=home,
        timeout=180,
    )
    assert done.returncode == 1
    record = only_run(home)
    assert len(record["attempts"]) == 2, [a["cause"] for a in record["attempts"]]
    assert "the same start-up failure twice; not retrying: rank 0 failing on purpose" in done.stderr
    # The recipe key turns it off: the budget is spent as before.
    again = run_ava(
        "train",
        str(ECHO),
        "--set",
        "env.ECHO_FAIL_RANK=0",
        "--set",
        "failover.max_restarts=2",
        "--set",
        "failover.backoff=0s",
        "--set",
        "failover.stop_repeated_startup_failure=false",
        inventory=cluster.inventory(["n1"]),
        env={"AVA_HOME": str(tmp_path / "other")},
        timeout=180,
    )
    assert again.returncode == 1 and "restart budget exhausted" in again.stderr


def test_an_out_of_memory_start_is_still_retried(cluster: Cluster, home: dict[str, str], tmp_path: Path) -> None:
    recipe = tmp_path / "hog"
    shutil.copytree(HOG, recipe)
    done = run_ava(
        "train",
        str(recipe),
        "--set",
        "resources.memory=200MiB",
        "--set",
        "env.HOG_MODE=alloc",
        "--set",
        "env.HOG_MIB=1024",
        "--set",
        "failover.max_restarts=2",
        "--set",
        "failover.backoff=0s",
        inventory=cluster.inventory(["n1"]),
        env=home,
        timeout=240,
    )
    assert done.returncode == 1
    record = only_run(home)
    assert [a["kind"] for a in record["attempts"]] == ["oom", "oom", "oom"]
    assert "restart budget exhausted" in done.stderr


def test_an_out_of_memory_kill_is_the_cause_not_the_peer_that_lost_its_rank(
    cluster: Cluster, home: dict[str, str]
) -> None:
    # Rank 1 on n2 is killed by the OOM killer; rank 0 on n1 dies of the closed connection,
    # with exit 1, while n2's torchrun still drains. The cause is n2's memory.
    done = run_ava(
        "train",
        str(FIRSTFAIL),
        "--set",
        "resources.nodes=2",
        "--set",
        "resources.procs_per_node=1",
        "--set",
        "resources.memory=300MiB",
        "--set",
        "env.FIRSTFAIL_MODE=oom",
        inventory=cluster.inventory(["n1", "n2"]),
        env=home,
        timeout=180,
    )
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "rank 0 lost its peer" in done.stdout
    attempt = only_run(home)["attempts"][-1]
    assert attempt["kind"] == "oom", attempt
    assert attempt["cause"].startswith("out of memory on n2"), attempt["cause"]
