"""ava.ckpt: commit protocol, fallback, keep-last-K, async, crash mid-save, S3, DDP and DCP.

Real parts throughout: real files, a real moto S3 server, real processes killed with SIGKILL,
real two-rank Gloo jobs.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ava import ckpt
from tests.support.agent_helpers import wait_for
from tests.support.s3server import moto_server

REPO = Path(__file__).resolve().parents[2]


def names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def state_of(value: float) -> dict[str, Any]:
    return {"w": torch.full((4,), value), "meta": {"note": "x", "n": [1, 2]}}


# ---------------------------------------------------------------------------------- local dir


def test_save_then_load_latest_round_trips_on_a_local_directory(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    ckpt.save({"model": model.state_dict(), "step": 7}, 7, dir=tmp_path)
    state, step = ckpt.load_latest(dir=tmp_path)
    assert step == 7 and state["step"] == 7
    fresh = torch.nn.Linear(3, 2)
    fresh.load_state_dict(state["model"])
    assert torch.equal(fresh.weight, model.weight)
    assert names(tmp_path) == ["step-00000007", "step-00000007.COMMITTED"]
    assert names(tmp_path / "step-00000007") == ["state.pt"]


def test_load_latest_of_an_empty_or_missing_directory_is_none(tmp_path: Path) -> None:
    assert ckpt.load_latest(dir=tmp_path) is None
    assert ckpt.load_latest(dir=tmp_path / "absent") is None
    assert ckpt.latest_step(tmp_path / "absent") is None


def test_directory_defaults_to_ava_checkpoint_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVA_CHECKPOINT_DIR", str(tmp_path))
    ckpt.save(state_of(1.0), 1)
    assert ckpt.latest_step() == 1
    assert ckpt.load_latest()[1] == 1


def test_no_directory_at_all_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AVA_CHECKPOINT_DIR", raising=False)
    with pytest.raises(ckpt.CheckpointError, match="AVA_CHECKPOINT_DIR"):
        ckpt.save(state_of(1.0), 1)


def test_only_the_last_k_checkpoints_are_kept(tmp_path: Path) -> None:
    for step in range(1, 6):
        ckpt.save(state_of(step), step * 10, dir=tmp_path, keep=2)
    assert ckpt.committed_steps(tmp_path) == [40, 50]
    assert names(tmp_path) == ["step-00000040", "step-00000040.COMMITTED", "step-00000050", "step-00000050.COMMITTED"]


def test_keep_defaults_to_the_recipes_checkpoint_keep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVA_CHECKPOINT_KEEP", "1")
    for step in (1, 2, 3):
        ckpt.save(state_of(step), step, dir=tmp_path)
    assert ckpt.committed_steps(tmp_path) == [3]


def test_uncommitted_newest_checkpoint_is_never_loaded(tmp_path: Path) -> None:
    ckpt.save(state_of(1.0), 1, dir=tmp_path)
    # A save that died before its commit: complete-looking data, no marker.
    ckpt.save(state_of(2.0), 2, dir=tmp_path)
    (tmp_path / "step-00000002.COMMITTED").unlink()
    (tmp_path / "step-00000003").mkdir()
    (tmp_path / "step-00000003" / "state.pt").write_bytes(b"partial")
    assert ckpt.latest_step(tmp_path) == 1
    state, step = ckpt.load_latest(dir=tmp_path)
    assert step == 1 and torch.equal(state["w"], torch.full((4,), 1.0))


def test_next_save_removes_the_leftovers_of_a_dead_save(tmp_path: Path) -> None:
    ckpt.save(state_of(1.0), 1, dir=tmp_path)
    (tmp_path / "step-00000002").mkdir()
    (tmp_path / "step-00000002" / "state.pt").write_bytes(b"partial")
    ckpt.save(state_of(3.0), 3, dir=tmp_path)
    assert "step-00000002" not in names(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "append", "flip", "delete", "marker"])
def test_unreadable_newest_checkpoint_falls_back_to_the_previous(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt.save(state_of(1.0), 1, dir=tmp_path)
    ckpt.save(state_of(2.0), 2, dir=tmp_path)
    f = tmp_path / "step-00000002" / "state.pt"
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "append":
        f.write_bytes(data + b"\0")
    elif damage == "flip":  # same size, one bit changed inside the tensor data
        i = data.rfind(torch.full((4,), 2.0).numpy().tobytes())
        f.write_bytes(data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :])
    elif damage == "delete":
        f.unlink()
    else:
        (tmp_path / "step-00000002.COMMITTED").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="ava.ckpt"):
        state, step = ckpt.load_latest(dir=tmp_path)
    assert step == 1 and torch.equal(state["w"], torch.full((4,), 1.0))
    assert "step 2 is unreadable" in caplog.text


@pytest.mark.parametrize(
    "marker",
    [
        "[]",
        '"x"',
        "null",
        "7",
        '{"format": "torch", "files": []}',
        '{"format": "torch", "files": {"state.pt": 3}}',
        '{"format": "torch", "files": {"state.pt": {"size": 1}}}',
        '{"format": ["torch"]}',
    ],
)
def test_marker_of_the_wrong_shape_falls_back_to_the_previous(
    tmp_path: Path, marker: str, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt.save(state_of(1.0), 1, dir=tmp_path)
    ckpt.save(state_of(2.0), 2, dir=tmp_path)
    (tmp_path / "step-00000002.COMMITTED").write_text(marker)
    with caplog.at_level(logging.WARNING, logger="ava.ckpt"):
        state, step = ckpt.load_latest(dir=tmp_path)
    assert step == 1 and torch.equal(state["w"], torch.full((4,), 1.0))


def test_sharded_marker_of_the_wrong_shape_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "step-00000003").mkdir()
    (tmp_path / "step-00000003.COMMITTED").write_text("[1, 2]")
    assert ckpt.load_sharded({"w": torch.zeros(2)}, dir=tmp_path) is None


def test_keep_1_never_prunes_the_step_just_written_below_an_unreadable_newest(tmp_path: Path) -> None:
    ckpt.save(state_of(9.0), 90, dir=tmp_path, keep=1)
    (tmp_path / "step-00000090" / "state.pt").write_bytes(b"damaged")
    # The run restarted from scratch (step 90 unreadable) and saves again with keep=1.
    assert ckpt.load_latest(dir=tmp_path) is None
    ckpt.save(state_of(1.0), 10, dir=tmp_path, keep=1)
    assert 10 in ckpt.committed_steps(tmp_path)
    state, step = ckpt.load_latest(dir=tmp_path)
    assert step == 10 and torch.equal(state["w"], torch.full((4,), 1.0))
    # The newer unreadable step does not count towards keep: the next save replaces step 10.
    ckpt.save(state_of(2.0), 20, dir=tmp_path, keep=1)
    assert ckpt.committed_steps(tmp_path) == [20, 90]
    assert ckpt.load_latest(dir=tmp_path)[1] == 20
    # Reaching the stale step again overwrites it, and ordinary pruning resumes above it.
    ckpt.save(state_of(3.0), 90, dir=tmp_path, keep=1)
    ckpt.save(state_of(4.0), 100, dir=tmp_path, keep=1)
    assert ckpt.committed_steps(tmp_path) == [100]


def test_load_error_on_intact_bytes_is_raised_not_skipped(tmp_path: Path) -> None:
    # An intact checkpoint that weights_only refuses must not silently fall back to an older one.
    ckpt.save({"odd": Path("x")}, 1, dir=tmp_path)
    with pytest.raises(pickle.UnpicklingError):
        ckpt.load_latest(dir=tmp_path)
    assert ckpt.load_latest(dir=tmp_path, weights_only=False)[0] == {"odd": Path("x")}


def test_saving_a_step_again_replaces_it(tmp_path: Path) -> None:
    ckpt.save(state_of(1.0), 5, dir=tmp_path)
    ckpt.save(state_of(9.0), 5, dir=tmp_path)
    state, step = ckpt.load_latest(dir=tmp_path)
    assert step == 5 and torch.equal(state["w"], torch.full((4,), 9.0))


def test_marker_records_size_and_checksum(tmp_path: Path) -> None:
    ckpt.save(state_of(1.0), 1, dir=tmp_path)
    marker = json.loads((tmp_path / "step-00000001.COMMITTED").read_text())
    assert marker["step"] == 1 and marker["format"] == "torch"
    assert marker["files"]["state.pt"]["size"] == (tmp_path / "step-00000001" / "state.pt").stat().st_size


def test_async_save_snapshots_the_state_before_returning(tmp_path: Path) -> None:
    model = torch.nn.Linear(256, 256)
    before = model.weight.detach().clone()
    fut = ckpt.save({"model": model.state_dict()}, 1, dir=tmp_path, async_=True)
    with torch.no_grad():
        model.weight.add_(1.0)  # training goes on while the save is in the background
    assert fut.result() == 1
    ckpt.wait()
    state, _ = ckpt.load_latest(dir=tmp_path)
    assert torch.equal(state["model"]["weight"], before)


def test_async_save_failure_is_raised_by_wait(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    ckpt.save(state_of(1.0), 1, dir=blocker / "ckpt", async_=True)
    with pytest.raises(OSError):
        ckpt.wait()
    ckpt.wait()  # reported once


# ------------------------------------------------------------------------- crash during save

STALL_WRITER = textwrap.dedent("""
    import sys, time, torch
    from ava import ckpt

    class Stall:
        # Pickled in the middle of torch.save, after state.pt was opened: hold the save there.
        def __reduce__(self):
            open(sys.argv[2], "w").close()
            time.sleep(120)
            return (int, ())

    ckpt.save({"w": torch.ones(4)}, 1, dir=sys.argv[1])
    ckpt.save({"w": torch.ones(4) * 2, "stall": Stall()}, 2, dir=sys.argv[1])
""")

LOOP_WRITER = textwrap.dedent("""
    import sys, torch
    from ava import ckpt
    step = (ckpt.latest_step(sys.argv[1]) or 0) + 1
    print("ready", flush=True)
    while True:
        ckpt.save({"w": torch.full((1 << 20,), float(step))}, step, dir=sys.argv[1], keep=2)
        step += 1
""")


def run_python(code: str, *args: str, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, text=True, **kw)


def test_kill_9_during_save_leaves_the_previous_checkpoint_loadable(tmp_path: Path) -> None:
    d, ready = tmp_path / "ckpt", tmp_path / "ready"
    proc = run_python(STALL_WRITER, str(d), str(ready))
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "writer never stalled"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
        proc.wait()
    assert (d / "step-00000002" / "state.pt").exists()  # the dead save's partial file
    assert not (d / "step-00000002.COMMITTED").exists()
    state, step = ckpt.load_latest(dir=d)
    assert step == 1 and torch.equal(state["w"], torch.ones(4))


def test_kill_9_at_random_moments_never_leaves_an_unloadable_newest(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    for delay in (0.0, 0.05, 0.3):  # how far into the saves after a commit the kill lands
        before = ckpt.latest_step(d) or 0
        proc = run_python(LOOP_WRITER, str(d), stdout=subprocess.PIPE)
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
            saved = wait_for(lambda: (ckpt.latest_step(d) or 0) > before or proc.poll() is not None, 60, 0.01)
            assert saved and proc.poll() is None, f"the writer committed nothing past step {before}"
            time.sleep(delay)
        finally:
            proc.kill()
            proc.wait()
        latest = ckpt.latest_step(d)
        assert latest is not None and latest > before, f"newest after the kill: {latest}, before: {before}"
        state, step = ckpt.load_latest(dir=d)
        assert step == latest and float(state["w"][0]) == step


# ---------------------------------------------------------------------------------------- S3


@pytest.fixture(scope="module")
def s3() -> Iterator[Any]:
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture()
def bucket(s3: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket; the endpoint reaches s3fs only through the environment, as on a node."""
    import s3fs

    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    # fsspec reads FSSPEC_* variables once, at import; botocore reads this one at each new client.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.url)
    s3fs.S3FileSystem.clear_instance_cache()
    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(name)
    return name


def test_save_then_load_latest_round_trips_on_s3(bucket: str) -> None:
    url = f"s3://{bucket}/run/ckpt"
    for step in (1, 2, 3, 4):
        ckpt.save(state_of(step), step, dir=url, keep=2)
    assert ckpt.committed_steps(url) == [3, 4]
    state, step = ckpt.load_latest(dir=url)
    assert step == 4 and torch.equal(state["w"], torch.full((4,), 4.0))


def test_s3_uncommitted_and_damaged_checkpoints_are_skipped(bucket: str) -> None:
    import s3fs

    url = f"s3://{bucket}/ckpt"
    fs = s3fs.S3FileSystem()
    ckpt.save(state_of(1.0), 1, dir=url)
    ckpt.save(state_of(2.0), 2, dir=url)
    fs.pipe_file(f"{bucket}/ckpt/step-00000003/state.pt", b"partial, never committed")
    fs.pipe_file(f"{bucket}/ckpt/step-00000002/state.pt", b"overwritten after its commit")
    state, step = ckpt.load_latest(dir=url)
    assert step == 1 and torch.equal(state["w"], torch.full((4,), 1.0))


def test_s3_async_save_commits_in_the_background(bucket: str) -> None:
    url = f"s3://{bucket}/ckpt"
    assert ckpt.save(state_of(5.0), 5, dir=url, async_=True).result() == 5
    assert ckpt.load_latest(dir=url)[1] == 5


S3_ROUND_TRIP = textwrap.dedent("""
    import sys, torch
    from ava import ckpt
    ckpt.save({"w": torch.ones(2)}, 3, dir=sys.argv[1])
    print(ckpt.load_latest(dir=sys.argv[1])[1])
""")


def test_s3_endpoint_can_come_from_aws_endpoint_url_s3(s3: Any, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    # (AWS_ENDPOINT_URL itself is what every other S3 test here relies on.)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.delenv("FSSPEC_S3_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.url)
    s3fs.S3FileSystem.clear_instance_cache()
    ckpt.save(state_of(3.0), 3, dir=f"s3://{bucket}/ckpt")
    assert ckpt.load_latest(dir=f"s3://{bucket}/ckpt")[1] == 3


def test_s3_endpoint_can_come_from_fsspec_s3_endpoint_url(s3: Any, bucket: str) -> None:
    # A fresh process, as on a node: fsspec reads FSSPEC_S3_ENDPOINT_URL only when imported.
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")}
    env["FSSPEC_S3_ENDPOINT_URL"] = s3.url
    proc = run_python(S3_ROUND_TRIP, f"s3://{bucket}/ckpt", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip() == "3", err[-2000:]


# ------------------------------------------------------------- async: staged, then uploaded

UPLOAD_KILLED = textwrap.dedent("""
    import sys, time, s3fs, torch
    from ava import ckpt

    url, ready = sys.argv[1], sys.argv[2]
    ckpt.save({"w": torch.ones(4)}, 1, dir=url)
    call = s3fs.S3FileSystem._call_s3

    async def stall_after_upload(self, method, *args, **kwargs):
        # The state's bytes reach the server; the process dies before its commit marker does.
        out = await call(self, method, *args, **kwargs)
        if method in ("put_object", "upload_part") and str(kwargs.get("Key", "")).endswith("state.pt"):
            open(ready, "w").close()
            time.sleep(120)
        return out

    s3fs.S3FileSystem._call_s3 = stall_after_upload
    ckpt.save({"w": torch.ones(4) * 2}, 2, dir=url, async_=True)
    time.sleep(120)
""")

EXIT_AFTER_ASYNC = textwrap.dedent("""
    import sys, torch
    from ava import ckpt
    ckpt.save({"w": torch.full((1 << 18,), 7.0)}, 7, dir=sys.argv[1], async_=True)
    # no ckpt.wait(): the interpreter's exit finishes the save
""")


def test_s3_async_save_stages_on_local_disk_and_leaves_nothing_there(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import s3fs

    monkeypatch.setenv(ckpt.STAGING_ENV, str(tmp_path / "staging"))
    url = f"s3://{bucket}/ckpt"
    uploads: list[tuple[str, str, int]] = []
    real = s3fs.S3FileSystem._put_file

    async def put_file(self: Any, lpath: str, rpath: str, **kw: Any) -> Any:
        uploads.append((lpath, rpath, os.path.getsize(lpath)))
        return await real(self, lpath, rpath, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", put_file)
    s3fs.S3FileSystem.clear_instance_cache()  # a new client binds the patched method
    fut = ckpt.save(state_of(3.0), 3, dir=url, async_=True)
    assert fut is not None and fut.result() == 3
    [(lpath, rpath, size)] = uploads
    assert lpath.startswith(str(tmp_path / "staging")) and rpath.endswith("step-00000003/state.pt") and size > 0
    assert list((tmp_path / "staging").rglob("*.pt")) == []
    state, step = ckpt.load_latest(dir=url)
    assert step == 3 and torch.equal(state["w"], torch.full((4,), 3.0))


def test_kill_9_during_the_background_upload_leaves_the_previous_checkpoint_loadable(
    s3: Any, bucket: str, tmp_path: Path
) -> None:
    import s3fs

    url, ready = f"s3://{bucket}/ckpt", tmp_path / "ready"
    env = {**os.environ, ckpt.STAGING_ENV: str(tmp_path / "staging")}
    proc = run_python(UPLOAD_KILLED, url, str(ready), env=env, stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: ready.exists() or proc.poll() is not None, 60, 0.05) and ready.exists(), (
            proc.stderr.read() if proc.stderr and proc.poll() is not None else "the upload never started"
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
        proc.wait()
    fs = s3fs.S3FileSystem()
    assert fs.exists(f"{bucket}/ckpt/step-00000002/state.pt")  # uploaded, never committed
    assert ckpt.committed_steps(url) == [1]
    state, step = ckpt.load_latest(dir=url)
    assert step == 1 and torch.equal(state["w"], torch.ones(4))
    # The next run's save clears what the dead one left, here and on the node's disk.
    assert list((tmp_path / "staging").rglob("*.pt"))
    os.environ[ckpt.STAGING_ENV] = str(tmp_path / "staging")
    try:
        ckpt.save(state_of(3.0), 3, dir=url, async_=True)
        ckpt.wait()
    finally:
        del os.environ[ckpt.STAGING_ENV]
    assert ckpt.committed_steps(url) == [1, 3]
    assert not fs.exists(f"{bucket}/ckpt/step-00000002/state.pt")
    assert list((tmp_path / "staging").rglob("*.pt")) == []


def test_interpreter_exit_finishes_an_async_save_in_flight(s3: Any, bucket: str, tmp_path: Path) -> None:
    for url in (str(tmp_path / "ckpt"), f"s3://{bucket}/exit"):
        proc = run_python(EXIT_AFTER_ASYNC, url, stderr=subprocess.PIPE)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        state, step = ckpt.load_latest(dir=url)
        assert step == 7 and float(state["w"][0]) == 7.0


def test_a_background_save_that_fails_is_reported_at_exit(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run_python(EXIT_AFTER_ASYNC, str(blocker / "ckpt"), stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=120)
    assert "ava.ckpt: a background checkpoint save failed before exit: NotADirectoryError" in err, err[-2000:]


def test_async_saves_reuse_their_host_copies_without_changing_a_committed_step(tmp_path: Path) -> None:
    w = torch.zeros(1024)
    for step in (1, 2, 3):
        w.fill_(float(step))
        ckpt.save({"w": w}, step, dir=tmp_path, keep=0, async_=True)
    ckpt.wait()
    for step in (1, 2, 3):
        state = ckpt._read_state(ckpt._Store(str(tmp_path)), step, "cpu", True)
        assert float(state["w"][0]) == step and float(state["w"][-1]) == step


def test_an_async_save_copies_and_stores_tied_weights_once_as_a_sync_save_does(tmp_path: Path) -> None:
    embed = torch.nn.Embedding(512, 64)
    head = torch.nn.Linear(64, 512, bias=False)
    head.weight = embed.weight  # tied, as GPT-style models tie the output layer to the embedding
    state = {"model": torch.nn.ModuleDict({"embed": embed, "head": head}).state_dict()}
    ckpt.save(state, 1, dir=tmp_path / "sync")
    ckpt.save(state, 1, dir=tmp_path / "async", async_=True)
    ckpt.wait()
    sync_file = tmp_path / "sync" / "step-00000001" / ckpt.STATE_FILE
    async_file = tmp_path / "async" / "step-00000001" / ckpt.STATE_FILE
    assert async_file.stat().st_size == sync_file.stat().st_size  # one copy of the tied weight
    loaded, _ = ckpt.load_latest(dir=tmp_path / "async")
    weights = loaded["model"]
    assert weights["embed.weight"].data_ptr() == weights["head.weight"].data_ptr()
    assert torch.equal(weights["head.weight"], embed.weight.detach())


# ------------------------------------------------------------------ how often: checkpoint.every


@pytest.fixture()
def timing(monkeypatch: pytest.MonkeyPatch) -> ckpt._Timing:
    fresh = ckpt._Timing()
    monkeypatch.setattr(ckpt, "_timing", fresh)
    for name in (ckpt.EVERY_ENV, "AVA_ATTEMPT", "AVA_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    return fresh


def test_due_by_steps_from_the_recipe_or_the_script(timing: ckpt._Timing, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not any(ckpt.due(s) for s in range(10))  # nothing set: the script decides
    assert [s for s in range(1, 11) if ckpt.due(s, 5)] == [5, 10]
    monkeypatch.setenv(ckpt.EVERY_ENV, "3")  # the recipe wins over the script's default
    assert [s for s in range(1, 11) if ckpt.due(s, 5)] == [3, 6, 9]
    assert ckpt.interval() is None


def test_due_by_duration_counts_from_the_last_save(
    timing: ckpt._Timing, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ckpt.EVERY_ENV, "600s")
    assert ckpt.interval() == 600.0 and ckpt.interval("10m") == 600.0
    assert not ckpt.due(1)
    timing.process_started -= 601
    assert ckpt.due(2)
    ckpt.save(state_of(2.0), 2, dir=tmp_path)
    assert not ckpt.due(3)
    monkeypatch.delenv(ckpt.EVERY_ENV)
    assert ckpt.due(3, "0s") and ckpt.due(3, 0.0)
    with pytest.raises(ckpt.CheckpointError, match="every 'soon'"):
        ckpt.due(3, "soon")


@pytest.mark.parametrize(("written", "steps"), [("4", [4, 8]), ('"auto"', []), ('"10m"', [])])
def test_a_recipes_checkpoint_every_reaches_due(
    timing: ckpt._Timing, monkeypatch: pytest.MonkeyPatch, written: str, steps: list[int]
) -> None:
    from ava import config

    text = f'name = "r"\n[run]\nscript = "t.py"\n[checkpoint]\nevery = {written}\n'
    every = config.parse_recipe(text, "r.toml", ".").checkpoint.every
    assert every is not None
    monkeypatch.setenv(ckpt.EVERY_ENV, every)  # as launch passes it to the ranks
    assert [s for s in range(1, 10) if ckpt.due(s)] == steps
    assert ckpt.interval() == {"4": None, "auto": None, "600s": 600.0}[every]


def test_auto_interval_is_young_daly_from_the_measured_stall_and_the_runs_failures(
    timing: ckpt._Timing, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ckpt.EVERY_ENV, "auto")
    assert ckpt.interval() is None and not ckpt.due(1)  # nothing measured: first save after FIRST_AUTO_S
    timing.process_started -= ckpt.FIRST_AUTO_S
    assert ckpt.due(1)
    timing.stalls.extend([0.4, 0.5, 9.0])  # median 0.5 s
    timing.run_started = time.time() - 3600
    monkeypatch.setenv("AVA_ATTEMPT", "2")  # two failures in an hour: MTBF 30 min
    assert ckpt.interval() == pytest.approx((2 * 0.5 * 1800) ** 0.5, rel=0.01)
    monkeypatch.setenv("AVA_ATTEMPT", "0")  # no failure yet: the 3 h prior
    assert ckpt.interval() == pytest.approx((2 * 0.5 * ckpt.MTBF_PRIOR_S) ** 0.5, rel=0.01)
    timing.background = 500.0  # never so often that a save waits for the previous upload
    assert ckpt.interval() == 500.0


def test_markers_record_the_stall_and_the_auto_interval_and_a_resume_learns_them(
    timing: ckpt._Timing, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ckpt.EVERY_ENV, "auto")
    monkeypatch.setenv("AVA_RUN_ID", "r-20261201-120000-abcd")
    ckpt.save(state_of(1.0), 1, dir=tmp_path, async_=True)
    ckpt.wait()
    marker = json.loads((tmp_path / "step-00000001.COMMITTED").read_text())
    assert marker["stall"] >= 0 and marker["run"] == "r-20261201-120000-abcd" and marker["attempt"] == 0
    assert set(marker["every"]) == {"seconds", "cost", "mtbf", "failures"}
    assert marker["every"]["seconds"] >= marker["seconds"]
    # A new attempt's process: its cost and the run's start come from the marker it resumes from.
    fresh = ckpt._Timing()
    monkeypatch.setattr(ckpt, "_timing", fresh)
    monkeypatch.setenv("AVA_ATTEMPT", "1")
    ckpt.load_latest(dir=tmp_path)
    assert list(fresh.stalls) == [marker["stall"]] and fresh.run_started == marker["run_started"]
    assert ckpt.interval() is not None


# ----------------------------------------------------------------------- two-rank Gloo jobs

DIST_WORKER = textwrap.dedent("""
    import json, os, sys, torch, torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh
    from ava import ckpt

    base = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = {}

    # DDP-style save: every rank calls save(); only rank 0 writes.
    d = f"{base}/ddp"
    out["save_returned"] = repr(ckpt.save({"who": torch.tensor([rank])}, 1, dir=d))
    out["async_returned_none"] = ckpt.save({"who": torch.tensor([rank])}, 2, dir=d, async_=True) is None
    ckpt.wait()
    dist.barrier()
    state, step = ckpt.load_latest(dir=d)
    out["ddp_loaded"] = [step, int(state["who"])]

    # A time rule is rank 0's clock, told to every rank: all save, or none does.
    out["due"] = [ckpt.due(3, "0s"), ckpt.due(3, "1h"), ckpt.due(4, 2)]

    # Sharded: a DTensor split over both ranks, each rank writes its own shard.
    mesh = init_device_mesh("cpu", (2,))
    def sharded(v):
        return {"w": distribute_tensor(torch.arange(8.0) * v, mesh, [Shard(0)]), "n": v}
    for url_key in ("dcp_dir", "dcp_s3"):
        url = sys.argv[2] if url_key == "dcp_s3" else f"{base}/dcp"
        if not url:
            continue
        ckpt.save_sharded(sharded(1.0), 1, dir=url)
        ckpt.save_sharded(sharded(2.0), 2, dir=url, async_=True).result()
        ckpt.wait()
        dist.barrier()
        target = sharded(0.0)
        step = ckpt.load_sharded(target, dir=url)
        out[url_key] = [step, target["w"].to_local().tolist(), target["n"]]

    # A committed sharded step whose shard file lost bytes: every rank falls back together.
    d = f"{base}/dcp-damaged"
    ckpt.save_sharded(sharded(1.0), 1, dir=d)
    ckpt.save_sharded(sharded(2.0), 2, dir=d)
    if rank == 0:
        shard = next(p for p in sorted(os.listdir(f"{d}/step-00000002")) if p.endswith(".distcp"))
        with open(f"{d}/step-00000002/{shard}", "r+b") as f:
            f.truncate(3)
    dist.barrier()
    target = sharded(0.0)
    out["dcp_fallback"] = [ckpt.load_sharded(target, dir=d), target["w"].to_local().tolist()]

    print("RESULT " + json.dumps(out), flush=True)
    dist.destroy_process_group()
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(
    code: str, args: list[str], world: int = 2, extra_env: dict[str, str] | None = None, timeout: float = 120
) -> list[dict[str, Any]]:
    """Start `world` real processes wired for env:// (as torchrun would) and collect RESULT lines."""
    port = free_port()
    procs = []
    try:
        for rank in range(world):
            env = {
                **os.environ,
                **(extra_env or {}),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world),
                "LOCAL_WORLD_SIZE": str(world),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
            }
            procs.append(run_python(code, *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    results = []
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} exited {proc.returncode}:\n{output[-3000:]}"
        line = next(ln for ln in output.splitlines() if ln.startswith("RESULT "))
        results.append(json.loads(line[len("RESULT ") :]))
    return results


@pytest.fixture(scope="module")
def two_rank_job(tmp_path_factory: pytest.TempPathFactory, s3: Any) -> tuple[Path, list[dict[str, Any]]]:
    import s3fs

    base = tmp_path_factory.mktemp("dist")
    s3fs.S3FileSystem(**s3.s3fs_kwargs()).mkdir("ckpt-dcp")
    results = run_ranks(DIST_WORKER, [str(base), "s3://ckpt-dcp/run"], extra_env=s3.env)
    return base, results


def test_only_rank_0_writes_in_a_two_rank_job(two_rank_job: tuple[Path, list[dict[str, Any]]]) -> None:
    base, (r0, r1) = two_rank_job
    assert r1["save_returned"] == "None" and r1["async_returned_none"]
    assert r0["due"] == r1["due"] == [True, False, True]  # rank 0's clock decided for both
    # Both ranks load what rank 0 wrote; there is one state file per step, rank 0's.
    assert r0["ddp_loaded"] == r1["ddp_loaded"] == [2, 0]
    assert names(base / "ddp") == [
        "step-00000001",
        "step-00000001.COMMITTED",
        "step-00000002",
        "step-00000002.COMMITTED",
    ]
    assert names(base / "ddp" / "step-00000002") == ["state.pt"]


def test_sharded_save_and_load_in_a_two_rank_job(two_rank_job: tuple[Path, list[dict[str, Any]]]) -> None:
    base, (r0, r1) = two_rank_job
    assert r0["dcp_dir"] == [2, [0.0, 2.0, 4.0, 6.0], 2.0]
    assert r1["dcp_dir"] == [2, [8.0, 10.0, 12.0, 14.0], 2.0]
    files = names(base / "dcp" / "step-00000002")
    assert ".metadata" in files and sum(f.endswith(".distcp") for f in files) == 2  # one per rank
    assert "step-00000002.COMMITTED" in names(base / "dcp")


def test_sharded_save_and_load_through_s3(two_rank_job: tuple[Path, list[dict[str, Any]]]) -> None:
    _, (r0, r1) = two_rank_job
    assert r0["dcp_s3"] == [2, [0.0, 2.0, 4.0, 6.0], 2.0]
    assert r1["dcp_s3"] == [2, [8.0, 10.0, 12.0, 14.0], 2.0]


def test_damaged_sharded_checkpoint_falls_back_on_every_rank(two_rank_job: tuple[Path, list[dict[str, Any]]]) -> None:
    _, (r0, r1) = two_rank_job
    assert r0["dcp_fallback"] == [1, [0.0, 1.0, 2.0, 3.0]]
    assert r1["dcp_fallback"] == [1, [4.0, 5.0, 6.0, 7.0]]


def test_single_process_sharded_save_and_load(tmp_path: Path) -> None:
    ckpt.save_sharded({"w": torch.arange(4.0)}, 3, dir=tmp_path)
    target = {"w": torch.zeros(4)}
    assert ckpt.load_sharded(target, dir=tmp_path) == 3
    assert torch.equal(target["w"], torch.arange(4.0))
    assert ckpt.load_latest(dir=tmp_path) is None  # a sharded step is not a save() checkpoint
