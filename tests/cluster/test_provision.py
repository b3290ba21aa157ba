"""`ava provision` on the real test cluster: fresh nodes set up once, a second run plans nothing,
and a requirements list gets its own venv per hash (installed offline from a wheel built here)."""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from ava import provision, sync
from ava.config import Node, Requirements, load_inventory
from ava.provision import Facts, Wanted, environment, plan, plan_all
from ava.transport import close_all
from tests.conftest import run_ava
from tests.support import nodepy
from tests.support.cluster import Cluster

THREE = ["n1", "n2", "n3"]


def fresh_inventory(cluster: Cluster, tmp_path: Path, names: list[str], **defaults: object) -> Path:
    """The cluster's nodes with a workdir and cache dir never used before."""
    path = cluster.inventory(names, path=tmp_path / "ava.toml", cache_size="1GiB", **defaults)
    text = path.read_text()
    for name in names:
        node = cluster.node(name)
        fresh = f"workdir = {json.dumps(str(tmp_path / name / 'work'))}\ncache_dir = {json.dumps(str(tmp_path / name / 'cache'))}\n"
        if node.defaults:  # its python stays `python3` from PATH; its ~/.ava is not fresh
            text = text.replace(f"[nodes.{name}]\n", f"[nodes.{name}]\n{fresh}")
        text = text.replace(json.dumps(str(node.workdir)), json.dumps(str(tmp_path / name / "work")))
        text = text.replace(json.dumps(str(node.cache_dir)), json.dumps(str(tmp_path / name / "cache")))
    path.write_text(text)
    return path


def nodes_of(path: Path) -> list[Node]:
    return list(load_inventory(str(path)).nodes.values())


def tiny_wheel(folder: Path, version: str) -> Path:
    """A real, installable wheel of a one-module package `avatiny`, made without a build tool."""
    folder.mkdir(parents=True, exist_ok=True)
    info = f"avatiny-{version}.dist-info"
    files = {
        "avatiny/__init__.py": f'VERSION = "{version}"\n',
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: avatiny\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: ava-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join(record + [f"{info}/RECORD,,"]) + "\n"
    wheel = folder / f"avatiny-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return wheel


def version_in(python: str) -> str:
    done = subprocess.run(
        [python, "-c", "import avatiny; print(avatiny.VERSION)"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


# -- set-up and idempotence ---------------------------------------------------------------------


def test_second_provision_of_three_fresh_nodes_changes_nothing(cluster: Cluster, tmp_path: Path) -> None:
    path = fresh_inventory(cluster, tmp_path, THREE)
    first = run_ava("provision", inventory=path)
    assert first.returncode == 0, first.stdout + first.stderr
    for name in THREE:
        for kind in ("layout", "agent", "runtime", "cache"):
            assert any(l.startswith(f"{name}  {kind}") for l in first.stdout.splitlines()), first.stdout
    nodes = nodes_of(path)
    for node in nodes:
        work = Path(node.workdir)
        assert (work / "runs").is_dir() and Path(node.cache_dir).is_dir()
        assert Path(sync.agent_path(node)).is_file()
        # The agent's interpreter: the one `python` resolves to (the node venv's, by the path that
        # keeps it a venv), not a wrapper.
        noted = Path(Path(sync.interpreter_path(node)).read_text().rstrip("\n"))
        assert noted.parent == Path(nodepy.node_python()).parent and noted.name.startswith("python"), noted
        assert Path(sync.runtime_path(node) + ".complete").exists()
        assert json.loads((work / "cache.json").read_text()) == {
            "dir": node.cache_dir,
            "size": 2**30,
            "block_size": 8 * 2**20,
        }
    stamps = sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file() and p.name != "ava.toml")

    second = run_ava("provision", inventory=path)
    assert second.returncode == 0, second.stderr
    assert [l for l in second.stdout.splitlines() if "note" not in l] == [f"{n}  nothing to do" for n in THREE]
    try:
        plans = plan_all(nodes)
        assert all(p.empty for p in plans.values()), plans  # type: ignore[union-attr]
    finally:
        close_all()
    assert (
        sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file() and p.name != "ava.toml") == stamps
    )


def test_dry_run_prints_the_plan_and_changes_nothing(cluster: Cluster, tmp_path: Path) -> None:
    path = fresh_inventory(cluster, tmp_path, ["n1", "n2"])
    done = run_ava("provision", "--dry-run", inventory=path)
    assert done.returncode == 0, done.stderr
    assert any(l.startswith("n1  agent    put the agent at ") for l in done.stdout.splitlines())
    assert any(l.startswith("n2  cache    write ") for l in done.stdout.splitlines())
    assert not (tmp_path / "n1").exists() and not (tmp_path / "n2").exists()


def test_provision_of_named_nodes_leaves_the_others_alone(cluster: Cluster, tmp_path: Path) -> None:
    path = fresh_inventory(cluster, tmp_path, ["n1", "n2"])
    done = run_ava("provision", "n2", inventory=path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "n2" / "work" / "cache.json").exists() and not (tmp_path / "n1").exists()


def test_ensure_applies_what_is_missing_then_nothing(cluster: Cluster, tmp_path: Path) -> None:
    nodes = nodes_of(fresh_inventory(cluster, tmp_path, ["n3"]))
    try:
        first = provision.ensure(nodes)["n3"]
        assert isinstance(first, provision.PlanResult) and first.applied == ("layout", "agent", "runtime", "cache")
        (tmp_path / "n3" / "work" / "cache.json").write_text("{broken")
        again = provision.ensure(nodes)["n3"]
        assert isinstance(again, provision.PlanResult) and again.applied == ("cache",)
        last = provision.ensure(nodes)["n3"]
        assert isinstance(last, provision.PlanResult) and not last.changed
    finally:
        close_all()


# -- the run's Python environment ---------------------------------------------------------------


def test_requirements_install_once_and_a_changed_list_makes_a_new_venv(cluster: Cluster, tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    tiny_wheel(wheels, "1.0")
    tiny_wheel(wheels, "2.0")
    requirements = tmp_path / "requirements.txt"
    # No package index here: pip finds avatiny only among the wheels pushed from this computer.
    requirements.write_text("--no-index\n--find-links ./wheels\navatiny==1.0\n")
    path = fresh_inventory(cluster, tmp_path, ["n1", "n2"], requirements=str(requirements))
    first = run_ava("provision", inventory=path, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.count("venv ") == 2
    nodes = nodes_of(path)
    old = {n.name: provision.venv_python(n) for n in nodes}
    for node in nodes:
        assert old[node.name].startswith(f"{node.workdir}/venvs/") and version_in(old[node.name]) == "1.0"
        # System site-packages: the node's torch is there without a second copy.
        assert (
            subprocess.run([old[node.name], "-c", "import importlib.util as u; assert u.find_spec('torch')"]).returncode
            == 0
        )
    ready = {n.name: Path(old[n.name]).parent.parent / ".ava-ready" for n in nodes}
    stamps = {name: p.stat().st_mtime_ns for name, p in ready.items()}

    again = run_ava("provision", inventory=path)
    assert again.returncode == 0 and "venv" not in again.stdout, again.stdout
    assert {name: p.stat().st_mtime_ns for name, p in ready.items()} == stamps  # installed once

    requirements.write_text("--no-index\n--find-links ./wheels\navatiny==2.0\n")
    changed = run_ava("provision", inventory=path, timeout=300)
    assert changed.returncode == 0, changed.stdout + changed.stderr
    assert changed.stdout.count("venv ") == 2
    for node in nodes:
        new = provision.venv_python(node)
        assert new != old[node.name] and version_in(new) == "2.0"
        assert version_in(old[node.name]) == "1.0"  # the old run still finds its own


def test_a_wheel_path_in_a_requirements_list_is_pushed_and_installed(cluster: Cluster, tmp_path: Path) -> None:
    wheel = tiny_wheel(tmp_path / "built", "3.0")
    path = fresh_inventory(cluster, tmp_path, ["n4"], requirements=[str(wheel)])
    done = run_ava("provision", inventory=path, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (node,) = nodes_of(path)
    python = provision.venv_python(node)
    assert version_in(python) == "3.0"
    pushed = list((tmp_path / "n4" / "work" / "wheels").rglob("*.whl"))
    assert [p.name for p in pushed] == [wheel.name]


def test_a_venv_another_provisioner_is_making_is_waited_for_not_removed(cluster: Cluster, tmp_path: Path) -> None:
    wheel = tiny_wheel(tmp_path / "built", "4.0")
    path = fresh_inventory(cluster, tmp_path, ["n4"], requirements=[str(wheel)])
    (node,) = nodes_of(path)
    env = environment(node, provision.requirement_sources(node, base=path.parent))
    assert env is not None
    folder = Path(provision.venv_dir(node, env))
    folder.mkdir(parents=True)
    (folder / "installing").write_text("another provisioner is installing here\n")
    # The other provisioner holds the venv's lock, as the node-side helper takes it.
    with open(f"{folder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        provisioner = subprocess.Popen(
            [sys.executable, "-m", "ava", "--inventory", str(path), "provision"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 120
            # Up to the venv step: its requirements are staged beside the venv just before it.
            while not list(folder.parent.glob(f"{folder.name}.requirements-*")):
                assert provisioner.poll() is None and (folder / "installing").exists(), "did not wait"
                assert time.monotonic() < deadline
                time.sleep(0.1)
            time.sleep(2)
            assert provisioner.poll() is None and (folder / "installing").exists()
            (folder / provision.READY).write_text(env.hash + "\n")  # the other one finished
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
        out, err = provisioner.communicate(timeout=120)
    assert provisioner.returncode == 0, out + err
    assert (folder / "installing").exists()  # its venv was taken as made, not remade
    assert not list(folder.parent.glob(f"{folder.name}.requirements-*"))


# -- pure: environments and plans ---------------------------------------------------------------


def test_environment_hash_ignores_order_and_spacing_but_not_content(tmp_path: Path) -> None:
    node = Node(name="a", host="h", workdir="~/.ava")
    here = [(Requirements(packages=("numpy>=1.26", "rich")), tmp_path)]
    same = [(Requirements(packages=("rich", "numpy >= 1.26")), tmp_path)]
    other = [(Requirements(packages=("rich",)), tmp_path)]
    assert environment(node, here).hash == environment(node, same).hash  # type: ignore[union-attr]
    assert environment(node, here).hash != environment(node, other).hash  # type: ignore[union-attr]
    assert environment(node, [(Requirements(), tmp_path)]) is None
    wheel = tiny_wheel(tmp_path / "w", "1.0")
    before = environment(node, [(Requirements(packages=(str(wheel),)), tmp_path)])
    wheel.write_bytes(wheel.read_bytes() + b"\0")  # rebuilt under the same name
    after = environment(node, [(Requirements(packages=(str(wheel),)), tmp_path)])
    assert before and after and before.hash != after.hash
    assert after.text.startswith("${HOME}/.ava/wheels/") and after.uploads[0].local == wheel


def _want(env: provision.Environment | None = None) -> Wanted:
    node = Node(name="a", host="h", workdir="/w", cache_dir="/c")
    return Wanted(
        node,
        ("/w", "/w/runs", "/c"),
        "/w/agent/agent-x.pyz",
        "/w/agent/python-x",
        "/w/trees/t.complete",
        {"dir": "/c", "size": node.cache_size, "block_size": 8 * 2**20},
        env,
    )


def _facts(
    want: Wanted, *, present: set[str], cgroup: str = "v1", writable: bool = True, systemd: bool = False
) -> Facts:
    return Facts({p: p in present for p in want.paths()}, "/usr/bin/python3", "", cgroup, writable, systemd, want.cache)


@pytest.mark.parametrize(
    ("cgroup", "writable", "systemd", "parents", "noted"),
    [
        ("v1", True, False, ["/sys/fs/cgroup/memory/ava", "/sys/fs/cgroup/pids/ava"], False),
        ("v1", False, False, [], True),
        ("v2", True, False, ["/sys/fs/cgroup/ava"], False),
        ("v2", True, True, [], False),
        ("none", False, False, [], True),
    ],
)
def test_cgroup_parent_is_planned_only_where_the_node_allows_it(
    cgroup: str, writable: bool, systemd: bool, parents: list[str], noted: bool
) -> None:
    want = _want()
    mounted = {"/sys/fs/cgroup/memory", "/sys/fs/cgroup/pids"}
    everything = {*want.layout, want.agent, want.interpreter, want.runtime, *mounted}
    made = plan(want, _facts(want, present=everything, cgroup=cgroup, writable=writable, systemd=systemd))
    steps = [s for s in made.steps if s.kind == "cgroup"]
    assert (list(steps[0].paths) if steps else []) == parents
    assert bool(made.notes) == noted
    done = plan(
        want, _facts(want, present=everything | set(parents), cgroup=cgroup, writable=writable, systemd=systemd)
    )
    assert done.empty
