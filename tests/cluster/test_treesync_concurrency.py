"""Concurrent builds of one code tree on one node, through the real node-side treesync code.

Each builder is its own process running treesync's source exactly as `ava train` sends it
(`python3 -c SOURCE build ...`), so the races are the node's real ones.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

from ava import sync
from tests.conftest import REPO, processes_of, run_ava
from tests.support.cluster import Cluster

ECHO = REPO / "tests" / "data" / "recipes" / "echo"

SOURCE = os.environ.get("AVA_TEST_TREESYNC_SOURCE") or str(sync.TREESYNC_SOURCE)
FILES = 4000
BUILDERS = 4
ROUNDS = 3


def big_tree(count: int) -> tuple[sync.Manifest, bytes]:
    """A manifest of COUNT small files in nested folders, and the tar of their objects."""
    entries, buffer = [], io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i in range(count):
            data = f"file {i}\n".encode()
            digest = hashlib.sha256(data).hexdigest()
            entries.append(sync.FileEntry(f"d{i % 40}/sub{i % 7}/f{i}.txt", digest, len(data), i % 500 == 0))
            info = tarfile.TarInfo(digest)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return sync.Manifest(tuple(sorted(entries, key=lambda e: e.path))), buffer.getvalue()


def start_builder(workdir: Path, manifest: sync.Manifest, archive: bytes | None, index: int) -> subprocess.Popen[str]:
    # As ship_tree does: a listing (and an archive of the missing objects) of one's own, then `build`.
    listing = workdir / "trees" / f".manifest-{index}.json"
    listing.write_text(manifest.to_json())
    argv = [sys.executable, "-c", Path(SOURCE).read_text(), "build", str(workdir), str(listing), manifest.tree]
    if archive is not None:
        tar = workdir / "objects" / f".incoming-{index}.tar"
        tar.write_bytes(archive)
        argv.append(str(tar))
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def store_objects(workdir: Path, count: int) -> None:
    """The objects already on the node (an earlier sync brought them): builds only link."""
    for i in range(count):
        data = f"file {i}\n".encode()
        digest = hashlib.sha256(data).hexdigest()
        path = workdir / "objects" / digest[:2] / digest
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def test_concurrent_builds_of_a_big_tree_all_succeed_and_a_marked_tree_is_always_whole(tmp_path: Path) -> None:
    manifest, _ = big_tree(FILES)
    failures: list[str] = []
    incomplete_sightings: list[int] = []
    for round_ in range(ROUNDS):
        workdir = tmp_path / f"round{round_}"
        (workdir / "trees").mkdir(parents=True)
        (workdir / "objects").mkdir()
        # Every object there already, as when a second launch of changed code finds the
        # unchanged files' objects: the builders then race on the tree alone.
        store_objects(workdir, FILES)
        tree = workdir / "trees" / manifest.tree
        marker = Path(str(tree) + ".complete")
        stop = threading.Event()

        def poll() -> None:
            # A launch trusts a tree as soon as its marker is there: it must be whole by then.
            while not stop.is_set():
                if marker.exists():
                    count = sum(len(files) for _, _, files in os.walk(tree))
                    if count != FILES:
                        incomplete_sightings.append(count)

        poller = threading.Thread(target=poll)
        poller.start()
        builders = [start_builder(workdir, manifest, None, i) for i in range(BUILDERS)]
        for builder in builders:
            _, err = builder.communicate(timeout=300)
            if builder.returncode != 0:
                failures.append(err.strip().splitlines()[-1] if err.strip() else f"exit {builder.returncode}")
        stop.set()
        poller.join()
        if failures or incomplete_sightings:
            break
        assert marker.exists()
        leftovers = [n for n in os.listdir(workdir / "trees") if ".building-" in n or n.startswith(".manifest-")]
        assert leftovers == [], leftovers
        built = {p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file()}
        assert built == {e.path for e in manifest.files}
    assert failures == [], f"{len(failures)} of {ROUNDS * BUILDERS} builds failed: {failures[:3]}"
    assert incomplete_sightings == []


def test_a_tree_left_half_built_by_a_dead_builder_is_rebuilt(tmp_path: Path) -> None:
    manifest, archive = big_tree(50)
    workdir = tmp_path / "work"
    (workdir / "trees").mkdir(parents=True)
    (workdir / "objects").mkdir()
    tree = workdir / "trees" / manifest.tree
    (tree / "stale").mkdir(parents=True)  # renamed into place, marker never written
    Path(f"{tree}.building-999999").mkdir()
    builder = start_builder(workdir, manifest, archive, 0)
    _, err = builder.communicate(timeout=60)
    assert builder.returncode == 0, err
    assert not (tree / "stale").exists() and not Path(f"{tree}.building-999999").exists()
    assert len([p for p in tree.rglob("*") if p.is_file()]) == 50


def test_objects_and_tree_files_are_read_only(tmp_path: Path) -> None:
    manifest, archive = big_tree(600)
    workdir = tmp_path / "work"
    (workdir / "trees").mkdir(parents=True)
    (workdir / "objects").mkdir()
    builder = start_builder(workdir, manifest, archive, 0)
    assert builder.wait(timeout=60) == 0
    tree = workdir / "trees" / manifest.tree
    for entry in manifest.files:
        mode = (tree / entry.path).stat().st_mode & 0o777
        assert mode == (0o555 if entry.exec else 0o444), (entry.path, oct(mode))
    # The manifest kept beside the tree names it by its own hash: run directories check against it.
    listed = json.loads(Path(f"{tree}.json").read_text())
    assert sync.Manifest(tuple(sync.FileEntry(**f) for f in listed["files"])).tree == manifest.tree


# -- on the test cluster: concurrent launches of one recipe -------------------------------------


def test_eight_concurrent_detached_launches_of_one_recipe_all_start_and_run_identical_trees(
    cluster: Cluster, tmp_path: Path
) -> None:
    recipe = tmp_path / "echo"
    shutil.copytree(ECHO, recipe)
    for i in range(1500):  # a tree big enough that concurrent builds overlap on each node
        (recipe / "bulk" / f"d{i % 30}").mkdir(parents=True, exist_ok=True)
        (recipe / "bulk" / f"d{i % 30}" / f"f{i}.txt").write_text(f"{i} {tmp_path}\n")
    manifest = sync.manifest_of(recipe)
    names = ["n1", "n2", "n3", "n4"]
    inventory = cluster.inventory(names)
    home = {**os.environ, "AVA_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    # Two runs per node: each node's two CPU slots, and two builders racing on its tree.
    launches = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ava",
                "--inventory",
                str(inventory),
                "train",
                str(recipe),
                "--detach",
                "--nodes",
                names[i % 4],
                "--set",
                "env.ECHO_SLEEP=3",
            ],
            cwd=REPO,
            env=home,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(8)
    ]
    outcomes = [(p.communicate(timeout=300), p.returncode) for p in launches]
    failed = [err[-500:] for (_, err), code in outcomes if code != 0]
    run_ids = [out.strip().splitlines()[-1] for (out, _), code in outcomes if code == 0]
    try:
        assert failed == [], failed
        deadline = time.monotonic() + 180
        while True:
            done = run_ava("ps", "--json", env={"AVA_HOME": home["AVA_HOME"]})
            states = {r["id"]: r["state"] for r in json.loads(done.stdout)}
            if all(states.get(run) == "succeeded" for run in run_ids) or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert sorted(states.values()) == ["succeeded"] * 8, states
    finally:
        for run in run_ids:
            run_ava("stop", run, inventory=inventory, env={"AVA_HOME": home["AVA_HOME"]})
    # recipe.toml itself may stay home (its [env] can hold secrets): the code is everything else.
    expected = {f.path for f in manifest.files} - {"recipe.toml"}
    for name in names:
        trees = cluster.node(name).workdir / "trees"
        assert not [n for n in os.listdir(trees) if ".building-" in n or n.startswith(".manifest-")]
        for marker in trees.glob("*.complete"):  # every finished tree holds all its manifest's files
            listed = {f["path"] for f in json.loads(Path(f"{trees}/{marker.stem}.json").read_text())["files"]}
            assert {
                p.relative_to(trees / marker.stem).as_posix()
                for p in (trees / marker.stem).rglob("*")
                if p.is_file() and "__pycache__" not in p.parts
            } == listed  # Python adds its caches
    seen = []
    for run in run_ids:
        (rundir,) = [
            cluster.node(n).workdir / "runs" / run / "work"
            for n in names
            if (cluster.node(n).workdir / "runs" / run / "work").exists()
        ]
        seen.append({p.relative_to(rundir).as_posix(): p.read_bytes() for p in rundir.rglob("*") if p.is_file()})
        assert processes_of(run) == []
    assert all(files == seen[0] for files in seen)
    assert expected <= set(seen[0]) <= expected | {"recipe.toml"}
