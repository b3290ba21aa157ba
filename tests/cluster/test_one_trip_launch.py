"""A warm launch takes each node's remembered route and code for granted, and each agent checks
them as it starts (one call per node): on the real test cluster, what was remembered wrongly is
made good on a second trip to that node, and remembered rightly for the next launch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
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


# The real CLI, its SSH commands written down (node, command) to the file in AVA_TEST_COMMANDS.
COUNTED = textwrap.dedent("""
    import json, os, sys
    from ava.transport.ssh import SSHTransport

    real = SSHTransport.run

    def run(self, command, **options):
        with open(os.environ["AVA_TEST_COMMANDS"], "a") as f:
            f.write(json.dumps([self.node.name, command]) + "\\n")
        return real(self, command, **options)

    SSHTransport.run = run
    from ava.cli import main
    sys.argv[0] = "ava"
    main()
""")


def test_a_warm_launch_checks_the_setup_in_its_start_and_provisions_a_node_whose_setup_changed(
    cluster: Cluster, tmp_path: Path
) -> None:
    recipe = tmp_path / "echo"
    shutil.copytree(ECHO, recipe)
    inventory = cluster.inventory(["n1", "n2"])
    log = tmp_path / "commands.jsonl"
    env = {**os.environ, "AVA_HOME": str(tmp_path / "home"), "AVA_TEST_COMMANDS": str(log), "COLUMNS": "200"}
    env.pop("AVA_INVENTORY", None)

    def train() -> tuple[str, list[tuple[str, str]]]:
        log.write_text("")
        argv = ["--inventory", str(inventory), "train", str(recipe), "--set", "resources.nodes=2"]
        done = subprocess.run(
            [sys.executable, "-c", COUNTED, *argv], capture_output=True, text=True, env=env, timeout=180, cwd=REPO
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert done.stdout.count("ECHO {") == 2
        return done.stdout + done.stderr, [tuple(json.loads(line)) for line in log.read_text().splitlines()]

    train()  # provisions (where the nodes are new) and probes; remembers the routes
    train()  # by now its provision check finds nothing to do: remembered too
    _, third = train()
    facts = [(node, command) for node, command in third if "present=" in command]
    # The check rode in each node's start: no trip of its own.
    assert sorted(node for node, _ in facts) == ["n1", "n2"]
    assert all(" start " in command for _, command in facts), facts

    cache_json = cluster.node("n2").workdir / "cache.json"
    cache_json.unlink()  # n2's setup changed since: its start must provision it, then start
    output, fourth = train()
    assert cache_json.is_file()
    assert "n2: cache:" in output
    starts = [node for node, command in fourth if " start " in command]
    assert sorted(starts) == ["n1", "n2", "n2"]  # n2 twice: refused (its facts changed), then started
