"""A run on several nodes whose checkpoints stay on one node's disk is told so before it starts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ava.config import parse_inventory, parse_recipe
from ava.placement import checkpoint_reach_warning, place
from tests.conftest import REPO, run_ava
from tests.support.cluster import Cluster

INVENTORY = """
[nodes.a]
host = "10.0.0.1"
[nodes.b]
host = "10.0.0.2"
[nodes.c]
host = "10.0.0.3"
"""


def warning_for(nodes: int, checkpoint: str | None, only: list[str] | None = None) -> str | None:
    text = f'name = "r"\n[run]\nmodule = "m"\n[resources]\nnodes = {nodes}\n'
    if checkpoint is not None:
        text += f'[checkpoint]\ndir = "{checkpoint}"\n'
    recipe = parse_recipe(text, "r.toml", "/r")
    placement = place(recipe, parse_inventory(INVENTORY, "ava.toml"), only=only or [])
    return checkpoint_reach_warning(recipe, placement)


@pytest.mark.parametrize("checkpoint", [None, "~/.ava/ckpt/{name}", "/data/ckpt", "file:///data/ckpt"])
def test_node_local_or_missing_checkpoints_on_several_nodes_are_warned_about(checkpoint: str | None) -> None:
    warning = warning_for(2, checkpoint)
    assert warning is not None and "a node brought in after a failure will not see checkpoints" in warning
    assert "s3://" in warning and "shared mount" in warning


def test_a_url_every_node_reaches_is_not_warned_about() -> None:
    assert warning_for(2, "s3://bucket/ckpt/{name}") is None


def test_one_node_without_a_spare_is_not_warned_about() -> None:
    assert warning_for(1, None, only=["a"]) is None
    # ... but one node with spares to fail over to is.
    assert warning_for(1, None) is not None


def test_train_says_it_once_before_the_start(cluster: Cluster, tmp_path: Path) -> None:
    recipe = tmp_path / "echo"
    shutil.copytree(REPO / "tests" / "data" / "recipes" / "echo", recipe)
    done = run_ava(
        "train",
        str(recipe),
        "--set",
        "resources.nodes=2",
        inventory=cluster.inventory(["n1", "n2"]),
        env={"AVA_HOME": str(tmp_path / "home")},
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("will not see checkpoints written on another node's disk") == 1
    assert done.stderr.index("checkpoint.dir is not set") < done.stderr.index("attempt 1 starting")
