"""A node's spare between runs through `ava train` on the real test cluster (`keep_warm`,
ava/agent/warm.py): a run that ends leaves a spare torchrun on each of its nodes, and the next
run, its ranks joined in one gloo process group across the nodes, starts from them."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from ava.agent import warm
from tests.conftest import REPO, run_ava
from tests.support.agent_helpers import wait_for
from tests.support.cluster import Cluster

ECHO = REPO / "tests" / "data" / "recipes" / "echo"
NODES = ["n1", "n2"]


def _spares(cluster: Cluster) -> list[int]:
    """Live node spares of the test nodes (by the directory on their command line)."""
    wheres = [str(warm.node_dir(n.workdir)).encode() for n in cluster.nodes if n.name in NODES]
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and any(w in (entry / "cmdline").read_bytes() for w in wheres):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _listening(cluster: Cluster) -> bool:
    return all((warm.node_dir(n.workdir) / warm.SOCKET).exists() for n in cluster.nodes if n.name in NODES)


def _run(cluster: Cluster, inventory: Path, home: dict[str, str]) -> tuple[str, str]:
    done = run_ava(
        "train",
        str(ECHO),
        "--set",
        f"resources.nodes={len(NODES)}",
        "--set",
        "env.ECHO_COLLECTIVE=1",
        inventory=inventory,
        env=home,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    run_id = next(line.split()[2] for line in done.stderr.splitlines() if line.startswith("ava: run "))
    return run_id, done.stdout


def test_the_next_run_on_the_nodes_starts_from_the_spares_the_last_run_left(cluster: Cluster, tmp_path: Path) -> None:
    inventory = cluster.inventory(NODES, keep_warm="60s")
    home = {"AVA_HOME": str(tmp_path / "home")}
    try:
        first, _ = _run(cluster, inventory, home)
        assert wait_for(lambda: _listening(cluster), 60.0, 0.1), "no spare on some node"
        left = sorted(_spares(cluster))
        assert len(left) == len(NODES), left
        # `ava nodes` shows them, ready.
        shown = run_ava("nodes", "--json", inventory=inventory, env=home)
        assert shown.returncode == 0, shown.stderr
        warm_rows = {row["name"]: row["warm"] for row in json.loads(shown.stdout)}
        assert sorted(w["pid"] for w in warm_rows.values()) == left and all(w["ready"] for w in warm_rows.values())

        second, output = _run(cluster, inventory, home)
        for node in cluster.nodes:
            if node.name not in NODES:
                continue
            st = json.loads((node.workdir / "runs" / second / "attempt-1" / "status.json").read_text())
            assert st.get("from_node_spare") and st["from_spare"] in left, (node.name, st)
        ranks = {json.loads(line.split("ECHO ", 1)[1])["rank"] for line in output.splitlines() if "ECHO {" in line}
        assert ranks == {0, 1}, output
        assert first != second
        # The second run left spares of its own; the claimed ones ended with its fences.
        assert wait_for(lambda: _listening(cluster) and not set(left) & set(_spares(cluster)), 60.0, 0.1)
    finally:
        for pid in _spares(cluster):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
