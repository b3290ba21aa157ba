"""ava.ckpt.load_latest falls back to AVA_INIT_CHECKPOINT (ava train --from) and never writes there."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from ava import ckpt


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        h.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            h.update(path.read_bytes())
            h.update(str(path.stat().st_mtime_ns).encode())
    return h.hexdigest()


@pytest.fixture
def parent(tmp_path: Path) -> Path:
    folder = tmp_path / "parent"
    for step in (10, 20):
        ckpt.save({"w": torch.full((4,), float(step)), "step": step}, step, dir=folder)
    return folder


def test_a_new_run_loads_the_parent_checkpoint_until_it_has_its_own(
    tmp_path: Path, parent: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    own = tmp_path / "child"
    monkeypatch.setenv("AVA_CHECKPOINT_DIR", str(own))
    monkeypatch.setenv("AVA_INIT_CHECKPOINT", str(parent / "step-00000010"))
    before = tree_digest(parent)
    found = ckpt.load_latest()
    assert found is not None
    state, step = found
    assert step == 10 and torch.equal(state["w"], torch.full((4,), 10.0))
    # The explicit dir= a script passes (charlm: its --ckpt-dir default) is the run's own too.
    found = ckpt.load_latest(dir=str(own))
    assert found is not None and found[1] == 10
    ckpt.save({"w": torch.full((4,), 11.0), "step": 11}, 11)
    found = ckpt.load_latest()
    assert found is not None and found[1] == 11, "the run's own checkpoint comes first"
    assert tree_digest(parent) == before, "the parent's checkpoint directory changed"


def test_another_directory_than_the_run_s_own_does_not_fall_back(
    tmp_path: Path, parent: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AVA_CHECKPOINT_DIR", str(tmp_path / "child"))
    monkeypatch.setenv("AVA_INIT_CHECKPOINT", str(parent / "step-00000020"))
    assert ckpt.load_latest(dir=str(tmp_path / "elsewhere")) is None


def test_without_a_checkpoint_dir_the_init_checkpoint_still_loads(
    parent: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AVA_CHECKPOINT_DIR", raising=False)
    monkeypatch.setenv("AVA_INIT_CHECKPOINT", str(parent / "step-00000020"))
    found = ckpt.load_latest()
    assert found is not None and found[1] == 20


def test_an_init_checkpoint_that_is_not_committed_is_an_error(
    tmp_path: Path, parent: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AVA_CHECKPOINT_DIR", str(tmp_path / "child"))
    monkeypatch.setenv("AVA_INIT_CHECKPOINT", str(parent / "step-00000030"))
    with pytest.raises(ckpt.CheckpointError, match=r"AVA_INIT_CHECKPOINT=.*no such committed checkpoint"):
        ckpt.load_latest()


def test_a_sharded_checkpoint_loads_from_the_parent_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parent = tmp_path / "parent"
    ckpt.save_sharded({"w": torch.full((4,), 7.0)}, 30, dir=parent)
    before = tree_digest(parent)
    monkeypatch.setenv("AVA_CHECKPOINT_DIR", str(tmp_path / "child"))
    monkeypatch.setenv("AVA_INIT_CHECKPOINT", str(parent / "step-00000030"))
    state = {"w": torch.zeros(4)}
    assert ckpt.load_sharded(state) == 30 and torch.equal(state["w"], torch.full((4,), 7.0))
    assert tree_digest(parent) == before
    monkeypatch.setenv("AVA_INIT_CHECKPOINT", str(tmp_path / "nowhere" / "step-00000030"))
    with pytest.raises(ckpt.CheckpointError, match="no such committed checkpoint"):
        ckpt.load_sharded(state)
