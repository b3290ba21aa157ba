"""Nothing a launch does on a node is silent: code sent is named, unchanged code is not resent."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from tests.conftest import REPO, run_ava
from tests.support.cluster import Cluster


def test_a_launch_says_what_code_it_sent_and_an_unchanged_relaunch_sends_nothing(
    cluster: Cluster, tmp_path: Path
) -> None:
    recipe = tmp_path / "echo"
    shutil.copytree(REPO / "tests" / "data" / "recipes" / "echo", recipe)
    (recipe / "fresh.txt").write_text(f"unique to {tmp_path}\n")  # new content: never on the node yet
    home = {"AVA_HOME": str(tmp_path / "home")}
    first = run_ava("train", str(recipe), inventory=cluster.inventory(["n1"]), env=home, timeout=180)
    assert first.returncode == 0, first.stderr[-2000:]
    assert re.search(r"ava: code: sent \d+ files?, [\d,]+ bytes to n1\n", first.stderr), first.stderr[-2000:]
    again = run_ava("train", str(recipe), inventory=cluster.inventory(["n1"]), env=home, timeout=180)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "code: sent" not in again.stderr
