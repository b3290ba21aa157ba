"""`ava nodes` says whether each node has this ava's agent build."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_ava
from tests.support.cluster import Cluster


def agent_of(cluster: Cluster, inventory: Path, name: str) -> str:
    done = run_ava("nodes", "--json", inventory=inventory)
    assert done.returncode == 0, done.stderr
    (report,) = [r for r in json.loads(done.stdout) if r["name"] == name]
    return report["agent"]


def test_nodes_tells_a_current_agent_from_an_older_build(cluster: Cluster) -> None:
    inventory = cluster.inventory(["n1"])
    assert run_ava("provision", "n1", inventory=inventory).returncode == 0
    assert agent_of(cluster, inventory, "n1") == "current"
    (node,) = [n for n in cluster.nodes if n.name == "n1"]
    (current,) = [p for p in (Path(node.workdir) / "agent").glob("agent-*.pyz")]
    older = current.with_name("agent-0000000000000000.pyz")
    current.rename(older)
    try:
        assert agent_of(cluster, inventory, "n1") == "older"
        table = run_ava("nodes", inventory=inventory)
        assert "older" in table.stdout.splitlines()[1].split(), table.stdout
    finally:
        older.rename(current)
    assert agent_of(cluster, inventory, "n1") == "current"
