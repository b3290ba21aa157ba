"""`ava logs --timestamps`: each line dated by when the node's log got it."""

from __future__ import annotations

import calendar
import json
import re
import shutil
import time
from pathlib import Path

from tests.conftest import REPO, run_ava
from tests.support.cluster import Cluster

STAMPED = re.compile(r"^n1/(\S+)\s*\| (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z (.*)$")


def when(stamp: str) -> float:
    return calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) + int(stamp[20:23]) / 1000


def test_logs_timestamps_date_each_line_as_it_was_written(cluster: Cluster, tmp_path: Path) -> None:
    recipe = tmp_path / "echo"
    shutil.copytree(REPO / "tests" / "data" / "recipes" / "echo", recipe)
    home = {"AVA_HOME": str(tmp_path / "home")}
    inventory = cluster.inventory(["n1"])
    done = run_ava("train", str(recipe), "--set", "env.ECHO_SLEEP=3", inventory=inventory, env=home, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    (record,) = json.loads(run_ava("ps", "--json", env=home).stdout)
    logs = run_ava("logs", record["id"], "--timestamps", inventory=inventory, env=home)
    assert logs.returncode == 0, logs.stderr
    lines = [l for l in logs.stdout.splitlines() if l.startswith("n1/")]
    stamped = [STAMPED.match(l) for l in lines]
    assert lines and all(stamped), logs.stdout[-2000:]
    times = [when(m.group(2)) for m in stamped if m]
    assert times == sorted(times)
    assert record["started"] - 1 <= times[0] and times[-1] <= record["ended"] + 1
    ticks = [when(m.group(2)) for m in stamped if m and m.group(3).startswith("tick 0")]
    # The script ticks every 0.5 s for 3 s: the dates show it, they are not one read's time.
    assert len(ticks) >= 4 and ticks[-1] - ticks[0] >= 1.5, ticks
    # The plain form is unchanged, and --tail keeps the dates.
    plain = run_ava("logs", record["id"], inventory=inventory, env=home).stdout
    assert "tick 0" in plain and not re.search(r"\| \d{4}-\d\d-\d\dT", plain)
    tail = run_ava("logs", record["id"], "--tail", "1", "-t", inventory=inventory, env=home).stdout.splitlines()
    assert len([l for l in tail if STAMPED.match(l)]) == 1, tail
