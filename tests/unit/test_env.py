"""ava.env: a script's place in the run from the environment, and the progress heartbeat."""

from __future__ import annotations

import os
import threading
import time
import warnings
from pathlib import Path

import pytest

from ava import env

VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "AVA_RUN_ID",
    "AVA_ATTEMPT",
    "AVA_NODE",
    "AVA_CHECKPOINT_DIR",
    "AVA_CACHE_DIR",
    "AVA_PROGRESS_FILE",
    "AVA_CHECKPOINT_KEEP",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(env, "_last_progress", None)
    monkeypatch.setattr(env, "_progress_warned", False)


def test_outside_any_launcher_the_script_is_rank_0_of_1() -> None:
    assert (env.rank(), env.local_rank(), env.world_size(), env.local_world_size()) == (0, 0, 1, 1)
    assert env.run_id() is None and env.node() is None and env.attempt() == 0
    assert env.checkpoint_dir() is None and env.cache_dir() is None
    assert env.checkpoint_keep() is None


def test_values_come_from_torchrun_and_the_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "RANK": "5",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "8",
        "LOCAL_WORLD_SIZE": "4",
        "AVA_RUN_ID": "charlm-20261123-101200-a3f1",
        "AVA_ATTEMPT": "2",
        "AVA_NODE": "gpu1",
        "AVA_CHECKPOINT_DIR": "s3://b/ckpt",
        "AVA_CACHE_DIR": "/nvme/cache",
        "AVA_CHECKPOINT_KEEP": "5",
    }.items():
        monkeypatch.setenv(name, value)
    assert (env.rank(), env.local_rank(), env.world_size(), env.local_world_size()) == (5, 1, 8, 4)
    assert env.run_id() == "charlm-20261123-101200-a3f1" and env.attempt() == 2
    assert env.node() == "gpu1"
    assert env.checkpoint_dir() == "s3://b/ckpt" and env.cache_dir() == "/nvme/cache"
    assert env.checkpoint_keep() == 5


def test_a_bad_integer_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        env.world_size()


def test_progress_is_a_no_op_without_a_progress_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AVA_PROGRESS_FILE", raising=False)
    monkeypatch.chdir(tmp_path)  # where a relative or empty name would land
    env.progress(1, force=True)
    assert list(tmp_path.iterdir()) == []
    assert env._last_progress is None, "progress() went on to write without a progress file"


def test_progress_writes_step_and_unix_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "progress"
    monkeypatch.setenv("AVA_PROGRESS_FILE", str(target))
    before = time.time()
    env.progress(42)
    step, stamp = target.read_text().split()
    assert step == "42" and before - 0.01 <= float(stamp) <= time.time() + 0.01
    assert [p.name for p in tmp_path.iterdir()] == ["progress"]  # no temporary left behind


def test_progress_is_rate_limited_unless_forced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "progress"
    monkeypatch.setenv("AVA_PROGRESS_FILE", str(target))
    env.progress(1)
    env.progress(2)  # within PROGRESS_MIN_INTERVAL_S of the first: skipped
    assert target.read_text().split()[0] == "1"
    env.progress(3, force=True)
    assert target.read_text().split()[0] == "3"
    monkeypatch.setattr(env, "_last_progress", time.monotonic() - env.PROGRESS_MIN_INTERVAL_S)
    env.progress(4)
    assert target.read_text().split()[0] == "4"


def test_progress_costs_little_per_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVA_PROGRESS_FILE", str(tmp_path / "progress"))
    started = time.perf_counter()
    for step in range(10_000):
        env.progress(step)
    assert (time.perf_counter() - started) / 10_000 < 50e-6


def test_progress_reader_never_sees_a_partial_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "progress"
    monkeypatch.setenv("AVA_PROGRESS_FILE", str(target))
    env.progress(0)
    seen: list[str] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.append(target.read_text())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for step in range(1, 300):
            env.progress(step, force=True)
    finally:
        stop.set()
        reader.join()
    assert seen and all(len(text.split()) == 2 for text in seen)


def test_progress_failure_warns_once_and_never_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVA_PROGRESS_FILE", str(tmp_path / "missing-dir" / "progress"))
    with pytest.warns(UserWarning, match="progress heartbeat"):
        env.progress(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        env.progress(2, force=True)
    assert not os.path.exists(tmp_path / "missing-dir")
