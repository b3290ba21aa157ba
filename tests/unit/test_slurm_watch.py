"""The login node's look at a Slurm attempt (ava/agent/slurmwatch.py): what its long poll calls news."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

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


def test_a_stream_answers_every_line_once_and_ends_when_the_next_attempt_is_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(watch, "slurm_facts", lambda job: {"job": {"state": "RUNNING"}, "states": {}})
    n1 = attempt_dir(tmp_path, "n1")
    (n1 / "status.json").write_text(json.dumps({"state": "running"}))
    (n1 / "output.log").write_bytes(b"[0]:one\n")

    def later() -> None:
        time.sleep(0.3)
        with open(n1 / "output.log", "ab") as f:
            f.write(b"[0]:two\n")
        time.sleep(0.3)
        (tmp_path / "slurm" / "r1").mkdir(parents=True)
        (tmp_path / "slurm" / "r1" / "attempt-2.json").write_text("{}")  # ava restarts the run

    writer = threading.Thread(target=later)
    writer.start()
    options = {"life": 10, "nnodes": 1, "gap": 0, "starting": 0}
    assert watch.stream(str(tmp_path), "r1", 1, "7", {}, {}, 5.0, options) == 0
    writer.join()
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    texts = [a["logs"]["n1"]["text"] for a in answers]
    assert texts[0] == "[0]:one\n" and "".join(texts) == "[0]:one\n[0]:two\n", texts
    assert answers[-1]["logs"]["n1"]["offset"] == 16 and answers[0]["job"] == {"state": "RUNNING"}


def test_a_stream_ends_once_its_job_has_left_the_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(watch, "slurm_facts", lambda job: {"job": {"state": "COMPLETED"}, "states": {}})
    n1 = attempt_dir(tmp_path, "n1")
    (n1 / "status.json").write_text(json.dumps({"state": "succeeded"}))
    began = time.monotonic()
    assert watch.stream(str(tmp_path), "r1", 1, "7", {}, {}, 5.0, {"life": 10, "nnodes": 1}) == 0
    assert time.monotonic() - began < 2
    (answer,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert answer["status"]["n1"]["state"] == "succeeded"
