"""`launch.plan()` for a fixed inventory and recipe, compared with the literal request it must
make (torchx-style): what `ava train --dry-run` shows is built by this same function, so a
change to what runs on the nodes shows up here as a diff to review."""

from __future__ import annotations

import json
import shlex

import pytest

from ava.config import parse_inventory, parse_recipe
from ava.launch import FORCE_ISOLATION_ENV, Launch, Route, plan

INVENTORY = """
[defaults]
user = "ml"
[nodes.gpu1]
host = "10.0.0.11"
gpus = [0, 1]
[nodes.gpu2]
host = "10.0.0.12"
gpus = [0, 1]
ledger = "/var/lib/ava-ledger"
"""

RECIPE = """
name = "ddp"
[run]
script = "train.py"
args = ["--epochs", "2"]
[resources]
nodes = 2
gpus_per_node = 2
memory = "8GiB"
[env]
WANDB_MODE = "offline"
[checkpoint]
dir = "s3://bucket/{name}/{run}"
every = "auto"
"""

EXPECTED = """\
gpu1: python3 -m torch.distributed.run --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d \
--rdzv-endpoint 10.0.0.11:29500 --rdzv-id ddp-20261201-1200-abcd --rdzv-conf is_host=true \
--local-addr 10.0.0.11 --max-restarts 0 --monitor-interval 0.1 --tee 3 train.py --epochs 2
gpu1: {"attempt": 1, "cgroup_parent": "ava", "cpu_slots": null, \
"cwd": "/home/ml/.ava/runs/ddp-20261201-1200-abcd/work", \
"gpus": {"allowed": [0, 1], "want": 2}, "keep_warm": 300.0, \
"limits": {"cpus": null, "memory": 8589934592, "pids": null}, "node": "gpu1", "protocol": 1, "run": "ddp-20261201-1200-abcd", "tree": "/home/ml/.ava/trees/c0de", \
"user": "ml", "workdir": "~/.ava"}
gpu1: AVA_ATTEMPT=1 AVA_CACHE_BLOCK_SIZE=8388608 AVA_CACHE_DIR=/home/ml/.ava/cache \
AVA_CACHE_SIZE=107374182400 AVA_CHECKPOINT_DIR=s3://bucket/ddp/ddp-20261201-1200-abcd \
AVA_CHECKPOINT_EVERY=auto AVA_CHECKPOINT_KEEP=3 AVA_CHECKPOINT_STAGING=/home/ml/.ava/ckpt-staging AVA_NODE=gpu1 AVA_RUN_ID=ddp-20261201-1200-abcd FSSPEC_AVACACHE_BLOCK_SIZE=8388608 \
FSSPEC_AVACACHE_CACHE_DIR=/home/ml/.ava/cache FSSPEC_AVACACHE_CACHE_SIZE=107374182400 \
GLOO_SOCKET_IFNAME=eth0 NCCL_SOCKET_IFNAME=eth0 \
PYTHONPATH=/home/ml/.ava/runs/ddp-20261201-1200-abcd/work:/home/ml/.ava/trees/a11e PYTHONUNBUFFERED=1 \
'TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE=[${rank}]:' WANDB_MODE=offline
gpu2: python3 -m torch.distributed.run --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d \
--rdzv-endpoint 10.0.0.11:29500 --rdzv-id ddp-20261201-1200-abcd --local-addr 10.0.0.12 --max-restarts 0 \
--monitor-interval 0.1 --tee 3 train.py --epochs 2
gpu2: {"attempt": 1, "cgroup_parent": "ava", "cpu_slots": null, \
"cwd": "/home/ml/.ava/runs/ddp-20261201-1200-abcd/work", \
"gpus": {"allowed": [0, 1], "want": 2}, "keep_warm": 300.0, "ledger": "/var/lib/ava-ledger", \
"limits": {"cpus": null, "memory": 8589934592, "pids": null}, "node": "gpu2", "protocol": 1, \
"run": "ddp-20261201-1200-abcd", "tree": "/home/ml/.ava/trees/c0de", "user": "ml", "workdir": "~/.ava"}
gpu2: AVA_ATTEMPT=1 AVA_CACHE_BLOCK_SIZE=8388608 AVA_CACHE_DIR=/home/ml/.ava/cache \
AVA_CACHE_SIZE=107374182400 AVA_CHECKPOINT_DIR=s3://bucket/ddp/ddp-20261201-1200-abcd \
AVA_CHECKPOINT_EVERY=auto AVA_CHECKPOINT_KEEP=3 AVA_CHECKPOINT_STAGING=/home/ml/.ava/ckpt-staging AVA_NODE=gpu2 AVA_RUN_ID=ddp-20261201-1200-abcd FSSPEC_AVACACHE_BLOCK_SIZE=8388608 \
FSSPEC_AVACACHE_CACHE_DIR=/home/ml/.ava/cache FSSPEC_AVACACHE_CACHE_SIZE=107374182400 \
GLOO_SOCKET_IFNAME=eth0 NCCL_SOCKET_IFNAME=eth0 \
PYTHONPATH=/home/ml/.ava/runs/ddp-20261201-1200-abcd/work:/home/ml/.ava/trees/a11e PYTHONUNBUFFERED=1 \
'TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE=[${rank}]:' WANDB_MODE=offline
"""


def rendered(text: str) -> str:
    """A line with runs of spaces made one (EXPECTED's lines are continued with a backslash)."""
    return " ".join(text.split())


def test_plan_makes_exactly_the_reviewed_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FORCE_ISOLATION_ENV, raising=False)
    inventory = parse_inventory(INVENTORY, "ava.toml")
    recipe = parse_recipe(RECIPE, "recipe.toml", "/src")
    launch = Launch("ddp-20261201-1200-abcd", 1, "10.0.0.11", 29500, "c0de", "a11e", "ml")
    routes = {
        "gpu1": Route("10.0.0.11", "eth0", "/home/ml", 16),
        "gpu2": Route("10.0.0.12", "eth0", "/home/ml", 16),
    }
    lines = []
    for launch_on in plan(recipe, list(inventory.nodes.values()), launch, routes):
        spec = launch_on.spec.to_json()
        assert spec.pop("argv") == launch_on.argv  # the agent runs exactly the argv shown
        env = spec.pop("env")
        name = launch_on.node.name
        lines.append(f"{name}: {shlex.join(launch_on.argv)}")
        lines.append(f"{name}: {json.dumps(spec, sort_keys=True)}")
        lines.append(f"{name}: " + " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(env.items())))
    assert [rendered(line) for line in lines] == [rendered(line) for line in EXPECTED.splitlines() if line]
