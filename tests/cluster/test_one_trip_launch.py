"""A warm launch takes each node's remembered route and code for granted, and each agent checks
them as it starts (one call per node): on the real test cluster, what was remembered wrongly is
made good on a second trip to that node, and remembered rightly for the next launch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.conftest import REPO, run_ava
from tests.support.cluster import Cluster

ECHO = REPO / "tests" / "data" / "recipes" / "echo"


def test_a_wrongly_remembered_route_and_a_wiped_code_tree_cost_a_second_trip_not_the_launch(
    cluster: Cluster, tmp_path: Path
) -> None:
    home = {"AVA_HOME": str(tmp_path / "home")}
    recipe = tmp_path / "echo"
    shutil.copytree(ECHO, recipe)
    inventory = cluster.inventory(["n1", "n2"])

    def train() -> list[dict]:
        done = run_ava("train", str(recipe), "--set", "resources.nodes=2", inventory=inventory, env=home, timeout=180)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return [json.loads(line.split("ECHO ", 1)[1]) for line in done.stdout.splitlines() if "ECHO {" in line]

    assert len(train()) == 2  # the first launch asks the nodes (the probe), then remembers
    cache_path = tmp_path / "home" / "launch-cache.json"
    cache = json.loads(cache_path.read_text())
    (key,) = [k for k in cache if json.loads(k)[0] == "n2"]
    real, tree = cache[key]["address"], cache[key]["trees"][0]
    cache[key]["address"] = "10.9.9.9"  # n2 moved since (its ranks would bind an address it lacks)
    cache_path.write_text(json.dumps(cache))
    n2 = next(node for node in cluster.nodes if node.name == "n2")
    trees = n2.workdir / "trees"
    shutil.rmtree(trees / tree)  # and its copy of the code was wiped
    (trees / f"{tree}.complete").unlink()

    echoed = train()
    assert sorted(e["rank"] for e in echoed) == [0, 1] and {e["world"] for e in echoed} == {2}
    assert (trees / f"{tree}.complete").is_file()
    assert json.loads(cache_path.read_text())[key]["address"] == real
