"""A start that fails on some nodes leaves no process of the run on any node it tried."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.conftest import REPO, processes_of, run_ava
from tests.support.cluster import Cluster

ECHO = REPO / "tests" / "data" / "recipes" / "echo"

# The real CLI, with one fault: n2's agent starts the attempt, then its reply is lost (a dropped
# connection, a timeout), so the start counts as failed there though its ranks are running.
LOST_REPLY = textwrap.dedent("""
    import sys
    from ava import attempt
    from ava.errors import CommandError

    real = attempt.start_one

    def start_one(launch, **options):
        payload = real(launch, **options)
        if launch.node.name == "n2":
            raise CommandError("n2: the connection dropped before the agent's reply")
        return payload

    attempt.start_one = start_one
    from ava.cli import main
    sys.argv[0] = "ava"
    main()
""")


def test_a_start_that_failed_on_one_node_stops_every_node_tried(cluster: Cluster, tmp_path: Path) -> None:
    recipe = tmp_path / "echo"
    shutil.copytree(ECHO, recipe)
    home = {"AVA_HOME": str(tmp_path / "home")}
    env = {**os.environ, **home, "COLUMNS": "200"}
    env.pop("AVA_INVENTORY", None)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            LOST_REPLY,
            "--inventory",
            str(cluster.inventory(["n1", "n2", "n3"])),
            "train",
            str(recipe),
            "--set",
            "resources.nodes=3",
            "--set",
            "env.ECHO_SLEEP=300",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode != 0, done.stdout[-2000:]
    assert "connection dropped" in done.stdout + done.stderr
    listed = run_ava("ps", "--json", env=home)
    (run,) = json.loads(listed.stdout)
    # n2's ranks were started and must be gone too, not only those of n1 and n3.
    deadline = time.monotonic() + 30
    while processes_of(run["id"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_of(run["id"]) == []
