"""`ava cache` and `[data] prefetch` on the real test cluster, reading from a real S3 API (moto)
that every node reaches at the cluster's gateway address.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, run_ava
from tests.support.cluster import Cluster

CACHEDATA = REPO / "tests" / "data" / "recipes" / "cachedata"
THREE = ["n1", "n2", "n3"]
MiB = 2**20
BLOCK = 8 * MiB  # ava.provision.BLOCK_SIZE: what launch exports and `ava cache warm` uses
# Object name -> size: 3 blocks (the last one short) and 1 block.
OBJECTS = {"shards/train-0.bin": 2 * BLOCK + 3 * MiB, "shards/train-1.bin": 1 * MiB + 17}
EPOCH = re.compile(r"epoch (\d+) node (\S+) url \S+/([^/\s]+) read (\d+) fetched (\d+) sha256 (\w+)")


@pytest.fixture(scope="module")
def s3(cluster: Cluster) -> Iterator[tuple[dict[str, str], dict[str, bytes]]]:
    """moto on the gateway address with the bucket `cachedata`; yields (AWS_* env, objects)."""
    import logging

    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address=cluster.gateway, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    objects = {name: os.urandom(size) for name, size in OBJECTS.items()}
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=url)
    fs.mkdir("cachedata")
    for name, data in objects.items():
        fs.pipe(f"cachedata/{name}", data)
    # Dummy credentials of the test server; real ones belong in the node's environment.
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": url,
    }
    try:
        yield env, objects
    finally:
        server.stop()


@pytest.fixture()
def ava_home(tmp_path: Path) -> dict[str, str]:
    return {"AVA_HOME": str(tmp_path / "home")}


def status(inventory: Path) -> dict[str, dict]:
    done = run_ava("cache", "status", "--json", inventory=inventory)
    assert done.returncode == 0, done.stderr
    return {row["node"]: row for row in json.loads(done.stdout)}


def clear(inventory: Path) -> None:
    done = run_ava("cache", "clear", inventory=inventory)
    assert done.returncode == 0, done.stderr


def epochs(stdout: str) -> dict[tuple[int, str, str], tuple[int, int, str]]:
    """(epoch, node, object name) -> (bytes read, bytes the node's cache fetched, digest prefix)."""
    found = {}
    for line in stdout.splitlines():
        if m := EPOCH.search(line):
            found[(int(m.group(1)), m.group(2), m.group(3))] = (int(m.group(4)), int(m.group(5)), m.group(6))
    return found


def train_cachedata(cluster: Cluster, aws: dict[str, str], home: dict[str, str], *extra: str):  # type: ignore[no-untyped-def]
    settings = [arg for name, value in aws.items() for arg in ("--set", f"env.{name}={value}")]
    return run_ava(
        "train", str(CACHEDATA), *settings, *extra, inventory=cluster.inventory(THREE, s3fs=True), env=home, timeout=240
    )


def test_warm_fills_every_node_then_status_shows_it_and_clear_empties_it(cluster: Cluster, s3) -> None:  # type: ignore[no-untyped-def]
    aws, objects = s3
    inventory = cluster.inventory(THREE, s3fs=True)
    clear(inventory)
    total = sum(len(d) for d in objects.values())
    # Credentials and endpoint are forwarded by name: they reach the nodes in a file, not argv.
    done = run_ava("cache", "warm", "s3://cachedata/shards/train-*.bin", "--env", "AWS_*", inventory=inventory, env=aws)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in THREE:
        assert re.search(rf"^{name} \| warmed 2 objects .*in 4 blocks$", done.stdout, re.M), done.stdout
    assert "testing" not in done.stdout + done.stderr
    for name in THREE:  # the launcher deleted the environment file
        assert list((cluster.node(name).workdir / "tmp").glob("*")) == []

    seen = status(inventory)
    for name in THREE:
        row = seen[name]
        assert row["ok"] and row["blocks"] == 4 and row["misses"] == 4
        assert row["fetched_bytes"] == total
        assert total <= row["bytes"] < total + 4 * 4096  # block files carry a small header
        assert row["dir"] == cluster.node(name).node_cache_dir

    done = run_ava("cache", "clear", "--json", inventory=inventory)
    assert done.returncode == 0, done.stderr
    assert [(r["node"], r["blocks"]) for r in json.loads(done.stdout)] == [(n, 4) for n in THREE]
    seen = status(inventory)
    assert all(seen[n]["bytes"] == 0 and seen[n]["blocks"] == 0 and seen[n]["hits"] == 0 for n in THREE)


def test_warm_of_a_missing_object_fails_on_every_node_with_exit_1(cluster: Cluster, s3) -> None:  # type: ignore[no-untyped-def]
    aws, _objects = s3
    done = run_ava(
        "cache",
        "warm",
        "s3://cachedata/shards/nothing-*.bin",
        "--env",
        "AWS_*",
        inventory=cluster.inventory(THREE, s3fs=True),
        env=aws,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    errors = [l for l in done.stderr.splitlines() if l.startswith("ava: ")]
    assert sorted(l.split()[1] for l in errors) == ["n1:", "n2:", "n3:"]
    assert all("no object matches s3://cachedata/shards/nothing-*.bin" in l for l in errors)


def test_status_reports_reachable_nodes_and_exits_3_for_an_unreachable_one(cluster: Cluster, tmp_path: Path) -> None:
    inventory = tmp_path / "ava.toml"
    cluster.inventory(["n1"], path=inventory)
    with inventory.open("a") as f:
        f.write('\n[nodes.gone]\nhost = "127.0.0.1"\nport = 1\n')  # nothing listens on port 1
    done = run_ava("cache", "status", "--json", inventory=inventory)
    assert done.returncode == 3, done.stderr
    rows = {r["node"]: r for r in json.loads(done.stdout)}
    assert rows["n1"]["ok"] and not rows["gone"]["ok"]
    assert "gone (127.0.0.1:1)" in rows["gone"]["error"]


def test_a_recipe_reading_through_avacache_fetches_nothing_in_epoch_2_and_prefetched_data_never(
    cluster: Cluster,
    s3,
    ava_home: dict[str, str],  # type: ignore[no-untyped-def]
) -> None:
    """One run on three nodes: train-0 is read cold (fetched once, in epoch 1); train-1 was
    prefetched by `[data] prefetch` before the job started (fetched in neither epoch)."""
    aws, objects = s3
    inventory = cluster.inventory(THREE, s3fs=True)
    clear(inventory)
    done = train_cachedata(cluster, aws, ava_home, "--set", 'data.prefetch=["s3://cachedata/shards/train-1*"]')
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "prefetching s3://cachedata/shards/train-1* into the cache of n1, n2, n3" in done.stdout + done.stderr
    seen = epochs(done.stdout)
    cold, warmed = objects["shards/train-0.bin"], objects["shards/train-1.bin"]
    for name in THREE:
        cold_digest, warm_digest = hashlib.sha256(cold).hexdigest()[:16], hashlib.sha256(warmed).hexdigest()[:16]
        assert seen[(1, name, "train-0.bin")] == (len(cold), len(cold), cold_digest)  # every block once
        assert seen[(2, name, "train-0.bin")] == (len(cold), 0, cold_digest)  # all from the node's cache
        assert seen[(1, name, "train-1.bin")] == (len(warmed), 0, warm_digest)
        assert seen[(2, name, "train-1.bin")] == (len(warmed), 0, warm_digest)
    after = status(inventory)
    assert all(after[n]["blocks"] == 4 and after[n]["fetched_bytes"] == len(cold) + len(warmed) for n in THREE)
    # The recipe's credentials reached the nodes for the prefetch in a file that is gone again.
    for name in THREE:
        assert list((cluster.node(name).workdir / "tmp").glob("*")) == []


def test_a_failing_prefetch_stops_the_launch_with_a_clear_error(
    cluster: Cluster,
    s3,
    ava_home: dict[str, str],  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    aws, _objects = s3
    recipe = tmp_path / "cachedata"
    shutil.copytree(CACHEDATA, recipe)
    with (recipe / "recipe.toml").open("a") as f:
        f.write('[data]\nprefetch = ["s3://cachedata/missing.bin"]\n')
    settings = [arg for name, value in aws.items() for arg in ("--set", f"env.{name}={value}")]
    done = run_ava(
        "train", str(recipe), *settings, inventory=cluster.inventory(THREE, s3fs=True), env=ava_home, timeout=120
    )
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    assert "prefetching recipe data: n" in done.stdout + done.stderr
    assert "s3://cachedata/missing.bin" in done.stdout + done.stderr
    assert EPOCH.search(done.stdout) is None


# -- pure logic -------------------------------------------------------------------------------


def test_the_module_command_names_the_env_file_but_never_a_value() -> None:
    from ava.cachenodes import module_command
    from ava.config import Node

    node = Node(name="n1", host="10.0.0.1", workdir="~/.ava", cache_dir="/nvme/ava cache")
    command = module_command(
        node, "python3", "~/.ava/tmp/cache-env-00.json", "warm", "--dir", node.cache_dir, "--", "s3://b/x; rm -rf /"
    )
    assert "'/nvme/ava cache'" in command and "'s3://b/x; rm -rf /'" in command
    assert command.endswith("; code=$?; rm -f ~/.ava/tmp/cache-env-00.json; exit $code")
    assert "AWS" not in command


def test_exit_code_is_3_for_an_unreachable_node_before_1_for_a_failed_warm() -> None:
    from ava.cachenodes import WarmFailed, exit_code
    from ava.errors import ConnectError

    assert exit_code({"n1": object()}) == 0
    assert exit_code({"n1": object(), "n2": WarmFailed("n2: no object matches s3://b/x")}) == 1
    assert exit_code({"n1": WarmFailed("n1: ..."), "n2": ConnectError("n2", "10.0.0.2:22", "connection refused")}) == 3
