"""Run ids are matched as plain text: the exact id, or a prefix that names exactly one run."""

from __future__ import annotations

from pathlib import Path

import pytest

from ava import runs
from ava.errors import EXIT_USAGE, UsageError
from tests.conftest import run_ava

IDS = ["echo-20261201-120000-a3f1", "echo-20261201-120500-b7c2", "charlm-20261201-130000-0e9d"]


def make_home(folder: Path, monkeypatch: pytest.MonkeyPatch, ids: list[str]) -> dict[str, str]:
    monkeypatch.setenv("AVA_HOME", str(folder))
    for number, run_id in enumerate(ids):
        runs.RunRecord(
            id=run_id,
            recipe=run_id.split("-")[0],
            source="x",
            recipe_hash="",
            raw={},
            inventory="ava.toml",
            nodes=["n1"],
            started=1000.0 + number,
            state="succeeded",
        ).save()
    return {"AVA_HOME": str(folder)}


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    return make_home(tmp_path / "home", monkeypatch, IDS)


def test_an_exact_id_and_a_unique_prefix_name_the_run(home: dict[str, str]) -> None:
    assert runs.resolve(IDS[0]).id == IDS[0]
    assert runs.resolve("charlm").id == IDS[2]
    assert runs.resolve("echo-20261201-1205").id == IDS[1]


@pytest.mark.parametrize("given", ["", " ", "*", "echo*", "?cho", "[ec]cho", "../home", ".", "echo-2026120?-*"])
def test_an_empty_id_or_a_wildcard_is_a_usage_error_never_a_run(home: dict[str, str], given: str) -> None:
    with pytest.raises(UsageError) as raised:
        runs.resolve(given)
    assert raised.value.exit_code == EXIT_USAGE
    assert IDS[2] in raised.value.message  # lists candidates


def test_an_ambiguous_prefix_is_a_usage_error_listing_the_candidates(home: dict[str, str]) -> None:
    with pytest.raises(UsageError) as raised:
        runs.resolve("echo")
    assert IDS[0] in raised.value.message and IDS[1] in raised.value.message
    assert IDS[2] not in raised.value.message


@pytest.mark.parametrize("given", ["", "*"])
def test_logs_and_stop_of_an_empty_or_wildcard_id_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: str
) -> None:
    # One run only: a glob would have matched it alone and stopped it.
    home = make_home(tmp_path / "home", monkeypatch, IDS[:1])
    for command in ("logs", "stop"):
        done = run_ava(command, given, env=home)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "Traceback" not in done.stderr
    # Nothing was touched: no run was asked to stop.
    assert not any((runs.runs_dir() / run_id / "stop").exists() for run_id in IDS[:1])
