"""Each run works in its own directory on each node, made from an immutable code tree.

Cluster tests run the real CLI on the real test cluster; the retention tests call the agent's
pruning directly on a workdir laid out as the agent lays it out.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from ava.agent import rundir, status
from tests.conftest import REPO, run_ava
from tests.support.cluster import Cluster

RECIPE = REPO / "tests" / "data" / "recipes" / "rundir"


@pytest.fixture()
def ava_home(tmp_path: Path) -> dict[str, str]:
    return {"AVA_HOME": str(tmp_path / "home")}


def recipe_copy(tmp_path: Path, *, module: bool = False) -> Path:
    target = tmp_path / "rundir"
    shutil.copytree(RECIPE, target)
    if module:
        toml = target / "recipe.toml"
        toml.write_text(toml.read_text().replace('script = "rundir.py"', 'module = "pkg.train"'))
    return target


def found_lines(stdout: str) -> list[dict]:
    return [json.loads(line.split("RUNDIR ", 1)[1]) for line in stdout.splitlines() if "| RUNDIR " in line]


def train(recipe: Path, cluster: Cluster, home: dict[str, str], *sets: str) -> tuple[str, list[dict]]:
    args = [a for s in sets for a in ("--set", s)]
    done = run_ava("train", str(recipe), *args, inventory=cluster.inventory(["n1"]), env=home, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout, found_lines(done.stdout)


def run_ids(home: dict[str, str]) -> list[str]:
    done = run_ava("ps", "--json", env=home)
    assert done.returncode == 0, done.stderr
    return [r["id"] for r in sorted(json.loads(done.stdout), key=lambda r: r["started"])]


def test_a_second_run_sees_nothing_the_first_wrote_and_the_store_keeps_its_hashes(
    cluster: Cluster, ava_home: dict[str, str], tmp_path: Path
) -> None:
    recipe = recipe_copy(tmp_path)
    _, (first,) = train(recipe, cluster, ava_home)
    _, (second,) = train(recipe, cluster, ava_home)
    for seen in (first, second):
        assert seen["made"] is False and seen["resumed"] is None
        assert seen["shipped"] == "shipped line\n"
    work = cluster.node("n1").workdir
    ids = run_ids(ava_home)
    assert [first["cwd"], second["cwd"]] == [str(work / "runs" / run / "work") for run in ids]
    assert first["here"] == first["cwd"]  # the script runs from its run directory's copy
    # The first run's writes stayed in its own copy.
    assert (work / "runs" / ids[0] / "work" / "shipped.txt").read_text() == "shipped line\nappended by a run\n"
    objects = [p for p in (work / "objects").rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert objects
    for path in objects:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name, path
    for tree in (work / "trees").glob("*.complete"):
        assert not (work / "trees" / tree.stem / "made.txt").exists()


def test_a_restarted_attempt_resumes_from_the_snapshot_in_its_run_directory(
    cluster: Cluster, ava_home: dict[str, str], tmp_path: Path
) -> None:
    recipe = recipe_copy(tmp_path)
    stdout, seen = train(recipe, cluster, ava_home, "env.RUNDIR_CRASH_FIRST=1")
    assert "killing myself on purpose" in stdout
    assert [(s["attempt"], s["resumed"]) for s in seen] == [(1, None), (2, 7)]
    assert seen[0]["cwd"] == seen[1]["cwd"]


def test_a_module_recipe_imports_from_its_run_directory(
    cluster: Cluster, ava_home: dict[str, str], tmp_path: Path
) -> None:
    recipe = recipe_copy(tmp_path, module=True)
    stdout, (seen,) = train(recipe, cluster, ava_home)
    (module,) = [l.split("MODULE ", 1)[1] for l in stdout.splitlines() if "| MODULE " in l]
    assert module == seen["cwd"] == str(cluster.node("n1").workdir / "runs" / run_ids(ava_home)[0] / "work")


def test_dry_run_shows_the_run_directory_as_cwd_and_first_on_the_python_path(
    cluster: Cluster, ava_home: dict[str, str], tmp_path: Path
) -> None:
    done = run_ava("train", str(recipe_copy(tmp_path)), "--dry-run", inventory=cluster.inventory(["n1"]), env=ava_home)
    assert done.returncode == 0, done.stderr
    spec = json.loads(done.stdout.split("spec: ", 1)[1].split("\n# node", 1)[0])
    work = str(cluster.node("n1").workdir)
    assert spec["cwd"] == f"{work}/runs/{spec['run']}/work"
    assert spec["tree"].startswith(f"{work}/trees/")
    assert spec["env"]["PYTHONPATH"].split(":")[0] == spec["cwd"]


def test_nodes_json_reports_the_disk_the_run_directories_use(
    cluster: Cluster, ava_home: dict[str, str], tmp_path: Path
) -> None:
    train(recipe_copy(tmp_path), cluster, ava_home)
    done = run_ava("nodes", "--json", inventory=cluster.inventory(["n1"]), env=ava_home)
    assert done.returncode == 0, done.stderr
    (report,) = json.loads(done.stdout)
    assert report["run_dirs"]["count"] >= 1 and report["run_dirs"]["bytes"] > 0
    table = run_ava("nodes", inventory=cluster.inventory(["n1"]), env=ava_home)
    assert "run dirs" in table.stdout


# -- retention (the agent's pruning, on a workdir laid out as the agent does) -------------------


def _run(work: Path, run: str, state: str | None, *, age_days: float) -> Path:
    target = rundir.path(work, run)
    target.mkdir(parents=True)
    (target / "snapshot.pt").write_bytes(b"x" * 100)
    when = time.time() - age_days * 86400
    if state is not None:
        adir = work / "runs" / run / "attempt-1"
        adir.mkdir()
        status.write(adir, {"run": run, "attempt": 1, "node": "n", "state": state})
        os.utime(adir / "status.json", (when, when))
    os.utime(target, (when, when))
    return target


def test_run_directories_of_runs_ended_long_ago_are_removed_and_the_others_kept(tmp_path: Path) -> None:
    work = tmp_path / "work"
    old_done = _run(work, "old-done", "succeeded", age_days=8)
    old_failed = _run(work, "old-failed", "failed", age_days=30)
    never_started = _run(work, "never-started", None, age_days=9)
    recent = _run(work, "recent", "stopped", age_days=1)
    running = _run(work, "running", "running", age_days=20)
    starting = _run(work, "this-one", "succeeded", age_days=20)
    crashed = work / "runs" / "never-started" / "work.copying-12345"  # a start that died mid-copy
    crashed.mkdir()
    old = time.time() - 9 * 86400
    os.utime(work / "runs" / "never-started", (old, old))
    removed = rundir.prune(work, spare="this-one")
    assert not crashed.exists()
    assert sorted(removed) == ["never-started", "old-done", "old-failed"]
    assert not old_done.exists() and not old_failed.exists() and not never_started.exists()
    assert recent.exists() and running.exists() and starting.exists()
    # The attempt records stay: only the run directory goes.
    assert (work / "runs" / "old-done" / "attempt-1" / "status.json").exists()


def test_a_store_object_changed_in_place_is_found_when_a_run_directory_is_copied(tmp_path: Path) -> None:
    from ava.agent import treesync

    work = tmp_path / "work"
    tree_dir = _built_tree(work, {"train.py": b"print('hi')\n", "data.txt": b"shipped\n"})
    first = treesync.populate(str(tree_dir), str(rundir.path(work, "run-a")))
    assert first and (rundir.path(work, "run-a") / "data.txt").read_bytes() == b"shipped\n"
    damaged = tree_dir / "data.txt"  # a hard link to its object: as an old in-place append did
    damaged.chmod(0o644)
    with open(damaged, "ab") as handle:
        handle.write(b"appended\n")
    with pytest.raises(treesync.TreeError, match="does not match its hash"):
        treesync.populate(str(tree_dir), str(rundir.path(work, "run-b")))
    assert not rundir.path(work, "run-b").exists()
    # A run that has its directory keeps it: later attempts copy nothing.
    assert treesync.populate(str(tree_dir), str(rundir.path(work, "run-a"))) is False


def _built_tree(work: Path, files: dict[str, bytes]) -> Path:
    """A tree built by the real node-side code from objects already in the store."""
    from ava import sync
    from ava.agent import treesync

    entries = []
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        target = Path(treesync.object_path(str(work), digest))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        entries.append(sync.FileEntry(name, digest, len(data), False))
    manifest = sync.Manifest(tuple(sorted(entries, key=lambda e: e.path)))
    (work / "trees").mkdir(parents=True, exist_ok=True)
    listing = work / "trees" / ".listing.json"
    listing.write_text(manifest.to_json())
    treesync.build(str(work), str(listing), manifest.tree)
    return work / "trees" / manifest.tree
