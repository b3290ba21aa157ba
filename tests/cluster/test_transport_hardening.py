"""SSH transport on awkward nodes: no SFTP subsystem, an unreadable known_hosts, ProxyJump hops."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ava.config import load_inventory
from ava.errors import CommandError
from ava.transport import close_all, connect
from tests.conftest import REPO, run_ava
from tests.support.cluster import Cluster

ECHO = REPO / "tests" / "data" / "recipes" / "echo"
WARNING = "the SSH server offers no SFTP subsystem; ava streams files over the exec channel"


@pytest.fixture()
def no_sftp(cluster: Cluster) -> Iterator[str]:
    """n3, its sshd restarted without the `Subsystem sftp` line; restored afterwards."""
    cluster.set_sftp("n3", False)
    try:
        yield "n3"
    finally:
        cluster.set_sftp("n3", True)


def fresh_inventory(cluster: Cluster, tmp_path: Path, names: list[str], **defaults: object) -> Path:
    """The cluster's inventory with a workdir of this test's own, so the agent and code travel anew."""
    path = cluster.inventory(names, path=tmp_path / "ava.toml", **defaults)
    text = path.read_text()
    for name in names:
        text = text.replace(f'workdir = "{cluster.node(name).workdir}"', f'workdir = "{tmp_path / ("work-" + name)}"')
    path.write_text(text)
    return path


@pytest.mark.parametrize("sftp", [True, False], ids=["sftp", "exec-channel"])
def test_put_and_get_behave_alike_with_and_without_sftp(cluster: Cluster, tmp_path: Path, sftp: bool) -> None:
    if not sftp:
        cluster.set_sftp("n3", False)
    try:
        node = load_inventory(str(cluster.inventory(["n3"], path=tmp_path / "ava.toml"))).nodes["n3"]
        transport = connect(node)
        assert transport.sftp_offered() is sftp  # type: ignore[attr-defined]
        payload = bytes(range(256)) * 4000 + b"\n no newline at the end"
        target = tmp_path / "a dir" / "it's $HOME" / "spec.json"
        transport.put(payload, str(target), mode=0o600)
        assert target.read_bytes() == payload
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
        transport.put(b"replaced", str(target))
        assert target.read_bytes() == b"replaced"
        back = tmp_path / "back"
        transport.get(str(target), back)
        assert back.read_bytes() == b"replaced"
        with pytest.raises(CommandError, match="no such file"):
            transport.get(str(tmp_path / "missing"), tmp_path / "never")
        # `~/` means the node user's home, as over SFTP.
        relative = f".ava-test-{uuid.uuid4().hex[:8]}"
        try:
            transport.put(b"home", f"~/{relative}/f")
            assert (Path.home() / relative / "f").read_bytes() == b"home"
            transport.get(f"~/{relative}/f", back)
            assert back.read_bytes() == b"home"
        finally:
            subprocess.run(["rm", "-rf", str(Path.home() / relative)], check=False)
        assert not list(target.parent.glob("*.part"))
    finally:
        close_all()
        if not sftp:
            cluster.set_sftp("n3", True)


def test_train_works_on_a_node_without_sftp_and_doctor_says_so(cluster: Cluster, tmp_path: Path, no_sftp: str) -> None:
    inventory = fresh_inventory(cluster, tmp_path, [no_sftp])
    home = {"AVA_HOME": str(tmp_path / "home")}
    done = run_ava("train", str(ECHO), "--set", "env.AVA_T_SFTP=none", inventory=inventory, env=home, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    payload = json.loads(done.stdout.split("ECHO ", 1)[1].splitlines()[0])
    assert payload["env"] == {"AVA_T_SFTP": "none"}
    assert "connection lost" not in done.stderr

    report = json.loads(run_ava("doctor", "--json", inventory=inventory, timeout=180).stdout)
    (check,) = [c for c in report["checks"] if c["check"] == "sftp" and c["node"] == no_sftp]
    assert check["status"] == "warn" and WARNING in check["fix"]
    table = run_ava("doctor", inventory=inventory, timeout=180)
    assert f"{no_sftp}: {WARNING}" in table.stdout


def test_doctor_passes_sftp_on_a_node_that_offers_it(cluster: Cluster, tmp_path: Path) -> None:
    report = json.loads(run_ava("doctor", "--json", inventory=cluster.inventory(["n2"]), timeout=180).stdout)
    (check,) = [c for c in report["checks"] if c["check"] == "sftp" and c["node"] == "n2"]
    assert check["status"] == "pass"


def test_an_unreadable_known_hosts_fails_each_node_naming_the_file(cluster: Cluster, tmp_path: Path) -> None:
    unreadable = tmp_path / "known_hosts"
    unreadable.mkdir()  # a directory: unreadable as a file even for root
    done = run_ava("nodes", "--json", inventory=cluster.inventory(["n1", "n2"], known_hosts=str(unreadable)))
    assert done.returncode == 3, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    reports = {r["name"]: r for r in json.loads(done.stdout)}
    for name in ("n1", "n2"):
        assert reports[name]["reachable"] is False
        error = reports[name]["error"]
        assert error.startswith(f"{name} (") and str(unreadable) in error and "known_hosts" in error


# -- ProxyJump: n1 is the bastion in front of n2 ------------------------------------------------------


def bastion_home(cluster: Cluster, tmp_path: Path) -> dict[str, str]:
    """A HOME whose ~/.ssh/config reaches n2 through n1 (ProxyJump), as a user's would."""
    home = tmp_path / "userhome"
    (home / ".ssh").mkdir(parents=True)
    bastion, target = cluster.node("n1"), cluster.node("n2")
    user = os.environ.get("USER") or "root"
    (home / ".ssh" / "config").write_text(
        f"Host {target.address}\n    ProxyJump {user}@{bastion.address}:{bastion.port}\n\n"
        f"Host {bastion.address}\n    IdentityFile {cluster.key}\n    User {user}\n"
    )
    return {"HOME": str(home), "AVA_HOME": str(tmp_path / "ava-home")}


def known_hosts_where(cluster: Cluster, tmp_path: Path, name: str, *, key: str | None) -> Path:
    """The cluster's known_hosts with node `name`'s key replaced by `key` (dropped when None)."""
    node = cluster.node(name)
    entry = node.address if node.port == 22 else f"[{node.address}]:{node.port}"
    lines = [l for l in cluster.known_hosts.read_text().splitlines() if l.split()[0] != entry]
    if key is not None:
        lines.append(f"{entry} {key}")
    path = tmp_path / f"known_hosts-{uuid.uuid4().hex[:6]}"
    path.write_text("\n".join(lines) + "\n")
    return path


def other_key(tmp_path: Path) -> str:
    key = tmp_path / f"other-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return " ".join(Path(f"{key}.pub").read_text().split()[:2])


def test_a_proxyjump_bastion_whose_host_key_changed_is_refused_naming_the_node(
    cluster: Cluster, tmp_path: Path
) -> None:
    env = bastion_home(cluster, tmp_path)
    bastion = cluster.node("n1")
    # Through a bastion whose key is known, n2 is reached.
    good = run_ava("nodes", "--json", env=env, inventory=cluster.inventory(["n2"]))
    assert good.returncode == 0, good.stdout + good.stderr
    for policy in ("strict", "accept-new"):
        changed = known_hosts_where(cluster, tmp_path, "n1", key=other_key(tmp_path))
        before = changed.read_text()
        done = run_ava(
            "nodes", "--json", env=env, inventory=cluster.inventory(["n2"], known_hosts=str(changed), host_keys=policy)
        )
        assert done.returncode == 3, done.stdout + done.stderr
        (report,) = json.loads(done.stdout)
        assert report["error"].startswith("n2 (") and "host key changed" in report["error"]
        assert re.search(rf"ProxyJump hop \[?{re.escape(bastion.address)}", report["error"]), report["error"]
        assert changed.read_text() == before  # never rewritten with the bastion's new key


def test_an_unknown_proxyjump_bastion_is_refused_under_strict_and_recorded_under_accept_new(
    cluster: Cluster, tmp_path: Path
) -> None:
    env = bastion_home(cluster, tmp_path)
    unknown = known_hosts_where(cluster, tmp_path, "n1", key=None)
    done = run_ava("nodes", "--json", env=env, inventory=cluster.inventory(["n2"], known_hosts=str(unknown)))
    assert done.returncode == 3, done.stdout + done.stderr
    (report,) = json.loads(done.stdout)
    assert "unknown host key" in report["error"] and "ProxyJump hop" in report["error"]
    accepted = run_ava(
        "nodes",
        "--json",
        env=env,
        inventory=cluster.inventory(["n2"], known_hosts=str(unknown), host_keys="accept-new"),
    )
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    bastion_key = Path(f"{cluster.node('n1').host_key}.pub").read_text().split()[1]
    assert bastion_key in unknown.read_text()


@pytest.mark.parametrize("kind", ["ssh", "local"])
def test_a_line_longer_than_a_read_reaches_on_line_whole(cluster: Cluster, tmp_path: Path, kind: str) -> None:
    """invoke flushes its output stream after every chunk it reads: a line that spans two chunks
    used to reach `on_line` as two lines (a rank's long log line printed broken; the master's
    first answer to `start` never recognised)."""
    node = load_inventory(str(cluster.inventory(["n1"], path=tmp_path / "ava.toml"))).nodes["n1"]
    if kind == "local":
        node = dataclasses.replace(node, transport="local")
    long = "x" * 100_000
    seen: list[tuple[str, str]] = []
    try:
        result = connect(node).run(
            """python3 -c 'print("x" * 100000); print("short"); print("tail", end="")'""",
            on_line=lambda stream, text: seen.append((stream, text)),
        )
    finally:
        close_all()
    assert result.ok, result.stderr
    assert [(s, t if len(t) < 100 else f"{len(t)} chars") for s, t in seen if s == "out"] == [
        ("out", f"{len(long)} chars"),
        ("out", "short"),
        ("out", "tail"),
    ]
    assert result.stdout == long + "\nshort\ntail"


@pytest.mark.parametrize("kind", ["ssh", "local"])
def test_stdin_reaches_the_command_whole_and_a_command_that_ignores_it_still_answers(
    cluster: Cluster, tmp_path: Path, kind: str
) -> None:
    """How a start's spec travels (its values must not be on a command line). invoke writes a
    stream that is not a terminal one byte per SSH packet with a 10 ms sleep each: a 3 KB spec
    took 30 s; and a write after the command ended raised from its stdin thread."""
    node = load_inventory(str(cluster.inventory(["n1"], path=tmp_path / "ava.toml"))).nodes["n1"]
    if kind == "local":
        node = dataclasses.replace(node, transport="local")
    data = os.urandom(200_000)
    try:
        transport = connect(node)
        got = transport.run("sha256sum", stdin=data, timeout=30)
        ignored = transport.run("echo ended early; exit 3", stdin=data, timeout=30)
        nothing = transport.run("wc -c", stdin=b"", timeout=30)
    finally:
        close_all()
    assert got.ok and got.stdout.split()[0] == hashlib.sha256(data).hexdigest(), got.stdout
    assert ignored.exited == 3 and ignored.stdout.strip() == "ended early"
    assert nothing.ok and nothing.stdout.strip() == "0"
