"""The login node's look at a Slurm attempt (ava/agent/slurmwatch.py): what its long poll calls news."""

from __future__ import annotations

import json
from pathlib import Path

from ava.agent import slurmwatch as watch


def attempt_dir(shared: Path, node: str) -> Path:
    folder = shared / "nodes" / node / "runs" / "r1" / "attempt-1"
    folder.mkdir(parents=True)
    return folder


def test_a_new_whole_line_or_a_changed_state_is_news_a_partial_line_is_not(tmp_path: Path) -> None:
    n1 = attempt_dir(tmp_path, "n1")
    (n1 / "status.json").write_text(json.dumps({"state": "running"}))
    (n1 / "output.log").write_bytes(b"[0]:step 1\n[0]:st")
    statuses, logs = watch.scan(str(tmp_path), "r1", 1, {})
    assert logs["n1"] == {"offset": 11, "text": "[0]:step 1\n"}
    assert watch.news(statuses, logs, {"n1": "running"})
    # From where the supervisor has got to: half a line is not news, nor is a state it knows.
    statuses, logs = watch.scan(str(tmp_path), "r1", 1, {"n1": 11})
    assert logs["n1"]["text"] == "" and not watch.news(statuses, logs, {"n1": "running"})
    assert watch.news(statuses, logs, {})  # a node's first status
    (n1 / "status.json").write_text(json.dumps({"state": "succeeded"}))
    statuses, logs = watch.scan(str(tmp_path), "r1", 1, {"n1": 11})
    assert logs["n1"]["text"] == "[0]:st"  # the attempt ended: its last bytes, whole or not
    assert watch.news(statuses, logs, {"n1": "running"})
