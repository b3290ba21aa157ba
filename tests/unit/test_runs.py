"""Run records on this machine: made once per launch with secrets kept apart, rewritten on stop."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import pytest

from ava import runs
from ava.agent.protocol import State
from ava.config import parse_recipe

RECIPE = """
name = "demo"
[run]
script = "train.py"
[resources]
nodes = 2
procs_per_node = 3
[env]
TOKEN = "s3cret"
"""


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AVA_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _record(state: State = "running", attempt_state: State = "running", ended: float | None = None) -> runs.RunRecord:
    recipe = parse_recipe(RECIPE, "recipe.toml", "/r", ["env.TOKEN=other"])
    record = runs.create("demo-20261201-120000-abcd", recipe, Path("ava.toml"), ["n1", "n2"], ["env.TOKEN=other"])
    record.attempts.append(runs.Attempt(1, ["n1", "n2"], time.time() - 5, state=attempt_state))
    record.state, record.ended = state, ended
    record.save()
    return record


def test_a_new_record_keeps_env_values_out_of_record_json_and_in_a_0600_file() -> None:
    record = _record()
    saved = (record.dir / "record.json").read_text()
    assert "s3cret" not in saved and "other" not in saved
    assert json.loads(saved)["overrides"] == ["env.TOKEN"]
    assert runs.read_env(record) == {"TOKEN": "other"}
    assert stat.S_IMODE((record.dir / runs.ENV_FILE).stat().st_mode) == 0o600
    raw = parse_recipe(RECIPE, "recipe.toml", "/r", ["env.TOKEN=other"]).raw
    assert record.recipe_hash == runs.recipe_hash(raw)


def test_the_widest_world_is_nodes_times_processes_per_node() -> None:
    assert _record().widest_world() == 6


def test_stopping_a_running_run_records_it_and_its_attempt_stopped() -> None:
    record = _record()
    stopped = runs.record_stopped(record.id, by="`ava stop`", asked=time.time())
    assert (stopped.state, stopped.exit_code) == ("stopped", 1)
    attempt = runs.load(record.id).attempts[-1]
    assert (attempt.state, attempt.kind, attempt.cause) == ("stopped", "stopped", "stopped by `ava stop`")


def test_a_launch_failure_after_the_stop_was_asked_reads_as_stopped() -> None:
    asked = time.time()
    record = _record(state="failed", attempt_state="failed", ended=asked + 1)
    record.attempts[-1].cause = "launch failed on n2"
    record.save()
    stopped = runs.record_stopped(record.id, by="`ava stop`", asked=asked)
    assert stopped.state == "stopped"
    assert stopped.attempts[-1].cause == "stopped by `ava stop` (launch failed on n2)"


def test_a_run_that_ended_before_the_stop_is_left_as_it_ended() -> None:
    record = _record(state="succeeded", attempt_state="succeeded", ended=time.time() - 1)
    assert runs.record_stopped(record.id, by="`ava stop`", asked=time.time()).state == "succeeded"
    assert runs.load(record.id).state == "succeeded"
