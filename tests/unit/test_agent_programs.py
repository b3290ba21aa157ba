"""The agent's commands for ava's core (ava/agent/programs.py), run from the zipapp as on a node."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import venv
from pathlib import Path

from ava.agent import build_zipapp


def agent(tmp_path: Path) -> Path:
    path = tmp_path / "agent.pyz"
    if not path.exists():
        path.write_bytes(build_zipapp()[0])
    return path


def run(python: str | Path, pyz: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # A login's umask, which the agent narrows for its own records and gives back to these commands.
    return subprocess.run(
        [str(python), str(pyz), *args], capture_output=True, text=True, timeout=60, preexec_fn=lambda: os.umask(0o022)
    )


def test_tree_verbs_list_missing_objects_then_build_the_tree_with_the_login_umask(tmp_path: Path) -> None:
    pyz, work = agent(tmp_path), tmp_path / "work"
    (work / "trees").mkdir(parents=True)
    (work / "objects").mkdir()
    data = b"print('hello')\n"
    digest = hashlib.sha256(data).hexdigest()
    listing = work / "trees" / ".manifest.json"
    listing.write_text(
        json.dumps({"files": [{"path": "pkg/main.py", "sha256": digest, "size": len(data), "exec": False}]})
    )

    missing = run(sys.executable, pyz, "tree", "missing", str(work), str(listing))
    assert missing.returncode == 0, missing.stderr
    assert missing.stdout.split() == [digest]

    archive = work / "objects" / ".incoming.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo(digest)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    built = run(sys.executable, pyz, "tree", "build", str(work), str(listing), "t1", str(archive))
    assert built.returncode == 0, built.stderr
    tree = work / "trees" / "t1"
    assert (tree / "pkg" / "main.py").read_bytes() == data
    assert (work / "trees" / "t1.complete").exists()
    assert (tree / "pkg").stat().st_mode & 0o777 == 0o755  # not the agent's own 0o700
    assert not listing.exists() and not archive.exists()


def test_tree_locked_runs_the_command_once_and_passes_its_status_on(tmp_path: Path) -> None:
    pyz = agent(tmp_path)
    lock, done = tmp_path / "v.lock", tmp_path / "v" / "ready"
    failed = run(sys.executable, pyz, "tree", "locked", str(lock), str(done), "echo ran; exit 3")
    assert (failed.returncode, failed.stdout.strip()) == (3, "ran")
    done.parent.mkdir()
    done.write_text("x")
    skipped = run(sys.executable, pyz, "tree", "locked", str(lock), str(done), "echo ran; exit 3")
    assert (skipped.returncode, skipped.stdout) == (0, "")


def test_free_port_prints_a_port_one_can_bind(tmp_path: Path) -> None:
    import socket

    found = run(sys.executable, agent(tmp_path), "free-port")
    assert found.returncode == 0, found.stderr
    port = json.loads(found.stdout)["port"]
    with socket.socket() as sock:
        sock.bind(("", port))


def test_node_site_lets_a_venv_made_by_a_venv_see_the_node_venvs_packages(tmp_path: Path) -> None:
    node_venv, run_venv = tmp_path / "node-venv", tmp_path / "run-venv"
    venv.create(node_venv, with_pip=False)
    node_python = node_venv / "bin" / "python"
    subprocess.run(
        [str(node_python), "-m", "venv", "--without-pip", "--system-site-packages", str(run_venv)], check=True
    )
    done = run(node_python, agent(tmp_path), "node-site", str(run_venv))
    assert done.returncode == 0, done.stderr
    pth = Path(json.loads(done.stdout)["pth"])
    assert pth.stat().st_mode & 0o777 == 0o644
    node_site = subprocess.run(
        [str(node_python), "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True, text=True
    ).stdout.strip()
    seen = subprocess.run(
        [str(run_venv / "bin" / "python"), "-c", "import sys; print('\\n'.join(sys.path))"],
        capture_output=True,
        text=True,
    ).stdout.split("\n")
    assert node_site in seen


def test_node_site_does_nothing_for_a_python_that_is_no_venv(tmp_path: Path) -> None:
    base = getattr(sys, "_base_executable", sys.executable)
    done = run(base, agent(tmp_path), "node-site", str(tmp_path / "venv"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"pth": None}
