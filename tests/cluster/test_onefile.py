"""The one-file `ava` (python -m ava.build): copied into a fresh directory and run by a system
python3 that has none of ava's dependencies, with PATH=/usr/bin:/bin, against the test cluster.

The file is built here, or taken from $AVA_ONEFILE (.ci/run builds dist/ava once and names it).
Every process of the file writes where each of its modules came from (the hidden
AVA_ONEFILE_MODULES, see ava/onefile.py): anything not from the interpreter's standard library or
the file's own unpacked tree fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, processes_of
from tests.support.cluster import Cluster

DEPENDENCIES = ("paramiko", "fabric", "typer", "rich", "fsspec", "s3fs", "ava")
SYSTEM_PATH = "/usr/bin:/bin"


def bare_python3() -> Path:
    """The system python3 the file will find on PATH=/usr/bin:/bin, which must lack ava's
    dependencies (Debian's /usr/bin/python3 does; its own python3-cryptography is a trap the
    module check catches)."""
    python = shutil.which("python3", path=SYSTEM_PATH)
    if python is None:
        pytest.fail(f"no python3 on {SYSTEM_PATH}: the one file needs the system's python3")
    for module in DEPENDENCIES:
        found = subprocess.run(
            [python, "-c", f"import {module}"], capture_output=True, env={"PATH": SYSTEM_PATH}, cwd="/"
        )
        if found.returncode == 0:
            pytest.fail(f"{python} can import {module}: not a bare system python3, so the test would prove nothing")
    return Path(python)


@pytest.fixture(scope="module")
def onefile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    given = os.environ.get("AVA_ONEFILE")
    if given:
        yield Path(given).resolve()
        return
    out = tmp_path_factory.mktemp("build") / "ava"
    done = subprocess.run(
        [sys.executable, "-m", "ava.build", "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=900
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    yield out


class FileUser:
    """Someone with only the file, in a fresh directory, and the system's basic tools."""

    def __init__(self, onefile: Path, root: Path, inventory: Path) -> None:
        self.dir = root / "work"
        self.dir.mkdir()
        self.ava = self.dir / "ava"
        shutil.copy2(onefile, self.ava)
        self.modules = root / "modules"
        self.modules.mkdir()
        self.shiv_root = root / "unpacked"  # a fresh one: the file really unpacks itself here
        self.env = {
            "PATH": SYSTEM_PATH,
            "HOME": os.environ.get("HOME", str(root)),
            "USER": os.environ.get("USER", ""),
            "LANG": "C.UTF-8",
            "COLUMNS": "200",
            "SHIV_ROOT": str(self.shiv_root),
            "AVA_HOME": str(root / "home"),
            "AVA_INVENTORY": str(inventory),
            "AVA_ONEFILE_MODULES": str(self.modules),
        }

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.ava), *args], capture_output=True, text=True, env=self.env, cwd=self.dir, timeout=timeout
        )

    def ps(self) -> list[dict]:
        done = self.run("ps", "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)


def wait_for(predicate, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError("condition not met in time")


def foreign_modules(user: FileUser, python: Path) -> dict[str, str]:
    """Every module any process of the file loaded from neither the stdlib nor the file's tree."""
    stdlib = subprocess.run(
        [str(python), "-S", "-c", "import os; print(os.path.dirname(os.__file__))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    own = str(user.shiv_root.resolve()) + os.sep
    foreign = {}
    for report in user.modules.iterdir():
        for line in report.read_text().splitlines():
            name, _, origin = line.partition("\t")
            if (
                not origin
                or origin in ("built-in", "frozen")
                or origin.startswith(own)
                or origin == str(user.ava)
                or origin.startswith(str(user.ava) + os.sep)
            ):
                continue
            parts = origin.split(os.sep)
            if origin.startswith(stdlib + os.sep) and "site-packages" not in parts and "dist-packages" not in parts:
                continue
            foreign[name] = origin
    return foreign


def test_the_one_file_trains_and_stops_on_the_cluster_with_only_a_system_python(
    cluster: Cluster, onefile: Path, tmp_path: Path
) -> None:
    python = bare_python3()
    user = FileUser(onefile, tmp_path, cluster.inventory(["n1", "n2"]))

    version = user.run("--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("ava ") and "one file, commit " in version.stdout, version.stdout

    nodes = user.run("nodes", "--json")
    assert nodes.returncode == 0, nodes.stderr[-2000:]
    assert [(n["name"], n["reachable"]) for n in json.loads(nodes.stdout)] == [("n1", True), ("n2", True)], nodes.stdout

    # The agent zipapp and the runtime modules the file ships are built from its unpacked tree.
    shutil.copytree(REPO / "recipes" / "ddp-minimal", user.dir / "recipes" / "ddp-minimal")
    trained = user.run("train", "recipes/ddp-minimal", "--set", "resources.nodes=2", timeout=300)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    assert sum("world_size 4" in line for line in trained.stdout.splitlines()) == 4, trained.stdout[-2000:]

    # A detached run: its supervisor is the file started again by the system python3.
    shutil.copytree(REPO / "tests" / "data" / "recipes" / "echo", user.dir / "echo")
    detached = user.run("train", "echo", "--detach", "--set", "resources.nodes=2", "--set", "env.ECHO_SLEEP=120")
    assert detached.returncode == 0, detached.stderr[-2000:]
    run_id = detached.stdout.strip().splitlines()[-1]
    wait_for(lambda: len(processes_of(run_id)) >= 2 * 2)  # torchrun and a worker on each node
    stopped = user.run("stop", run_id)
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert processes_of(run_id) == []
    wait_for(lambda: {r["id"]: r["state"] for r in user.ps()}[run_id] == "stopped", timeout=30)
    supervisor = tmp_path / "home" / "runs" / run_id / "supervisor.log"
    assert supervisor.exists() and "Traceback" not in supervisor.read_text(), supervisor.read_text()[-2000:]

    reports = list(user.modules.iterdir())
    # Each process of the file wrote one: the commands above, and the detached run's supervisor.
    assert len([r for r in reports if r.name.startswith("ava-")]) >= 6, [r.name for r in reports]
    assert [r for r in reports if r.name.startswith("ava.supervisor-")], [r.name for r in reports]
    loaded = "".join(r.read_text() for r in reports)
    assert "\nparamiko\t" in loaded and "\ncryptography\t" in loaded
    assert foreign_modules(user, python) == {}


def wheel(path: Path, files: dict[str, bytes]) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def test_unpacking_wheels_of_two_pythons_keeps_the_older_abi3_module_and_refuses_a_differing_source(
    tmp_path: Path,
) -> None:
    from ava.build import BuildError, unpack

    site = tmp_path / "site"
    old = {
        "pkg/__init__.py": b"x = 1\n",
        "pkg/_rust.abi3.so": b"cp37",
        "pkg-1.dist-info/WHEEL": b"cp37-abi3",
        "pkg-1.data/purelib/pkg/extra.py": b"",
        "pkg-1.data/scripts/tool": b"#!/bin/sh\n",
    }
    unpack(wheel(tmp_path / "pkg-1-cp37-abi3-any.whl", old), site)
    unpack(
        wheel(
            tmp_path / "pkg-1-cp311-abi3-any.whl",
            {**old, "pkg/_rust.abi3.so": b"cp311", "pkg-1.dist-info/WHEEL": b"cp311-abi3"},
        ),
        site,
    )
    assert (site / "pkg" / "_rust.abi3.so").read_bytes() == b"cp37"
    assert (site / "pkg" / "extra.py").exists() and not (site / "pkg-1.data").exists()
    with pytest.raises(BuildError, match="pkg/__init__.py: differs"):
        unpack(wheel(tmp_path / "pkg-1-cp312-cp312-any.whl", {"pkg/__init__.py": b"x = 2\n"}), site)


def test_outside_the_one_file_ava_starts_its_modules_with_this_interpreter() -> None:
    from ava.onefile import child_env, python_module

    assert python_module("ava.supervisor") == [sys.executable, "-m", "ava.supervisor"]
    assert child_env("ava.supervisor") == {}
