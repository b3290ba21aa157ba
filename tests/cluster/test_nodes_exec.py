"""`ava nodes` and `ava exec` on the real test cluster, host keys included."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import run_ava
from tests.support.cluster import Cluster

THREE = ["n1", "n2", "n3"]


def meminfo_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal")


def test_nodes_json_reports_every_node_with_facts_of_this_machine(cluster: Cluster) -> None:
    done = run_ava("nodes", "--json", inventory=cluster.inventory(THREE))
    assert done.returncode == 0, done.stderr
    reports = json.loads(done.stdout)
    assert [r["name"] for r in reports] == THREE
    for report in reports:
        assert report["reachable"] is True and report["error"] is None
        assert report["cpus"] == len(os.sched_getaffinity(0))
        assert report["mem_total"] == meminfo_total()
        assert 0 < report["mem_free"] <= report["mem_total"]
        assert report["disk_free"] > 0
        assert report["python"] and report["torch"]
        assert report["gpus"] == []
        assert report["cgroup"] in ("v1", "v2", "hybrid", None)
    if cluster.use_namespaces:
        assert [r["hostname"] for r in reports] == [cluster.node(n).hostname for n in THREE]


def test_nodes_with_a_killed_node_reports_it_unreachable_and_exits_3(cluster: Cluster) -> None:
    inventory = cluster.inventory(THREE)
    cluster.kill_node("n2")
    try:
        started = time.monotonic()
        done = run_ava("nodes", "--json", inventory=inventory)
        elapsed = time.monotonic() - started
    finally:
        cluster.restart_node("n2")
    assert done.returncode == 3, done.stderr
    reports = {r["name"]: r for r in json.loads(done.stdout)}
    assert reports["n1"]["reachable"] and reports["n3"]["reachable"]
    assert reports["n2"]["reachable"] is False
    assert "n2" in reports["n2"]["error"] and "connection refused" in reports["n2"]["error"]
    assert elapsed < 3 + 10  # the connect timeout (3 s) plus start-up, never a hang


@pytest.mark.skipif(os.geteuid() != 0, reason="cutting a link needs network namespaces")
def test_nodes_with_a_cut_link_times_out_within_the_connect_timeout(cluster: Cluster) -> None:
    inventory = cluster.inventory(THREE)
    cluster.cut_link("n3")
    try:
        started = time.monotonic()
        done = run_ava("nodes", "--json", inventory=inventory)
        elapsed = time.monotonic() - started
    finally:
        cluster.restore_link("n3")
    assert done.returncode == 3
    reports = {r["name"]: r for r in json.loads(done.stdout)}
    assert reports["n3"]["reachable"] is False and "timed out" in reports["n3"]["error"]
    assert reports["n1"]["reachable"] and reports["n2"]["reachable"]
    assert elapsed < 3 + 10


def test_unknown_host_key_is_refused_under_strict(cluster: Cluster, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    done = run_ava("nodes", "--json", inventory=cluster.inventory(["n1"], known_hosts=str(empty)))
    assert done.returncode == 3
    (report,) = json.loads(done.stdout)
    assert "unknown host key" in report["error"] and "--accept-new" in report["error"]
    assert empty.read_text() == ""


def test_unknown_host_key_is_recorded_under_accept_new(cluster: Cluster, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    inventory = cluster.inventory(["n1", "n2"], known_hosts=str(known), host_keys="accept-new")
    done = run_ava("nodes", "--json", inventory=inventory)
    assert done.returncode == 0, done.stdout + done.stderr
    recorded = known.read_text().splitlines()
    assert len(recorded) == 2
    for name in ("n1", "n2"):
        key = Path(f"{cluster.node(name).host_key}.pub").read_text().split()[1]
        assert any(key in line for line in recorded)
    # Recorded keys are now trusted under strict too.
    assert run_ava("nodes", "--json", inventory=cluster.inventory(["n1", "n2"], known_hosts=str(known))).returncode == 0


def test_flag_accept_new_records_an_unknown_key(cluster: Cluster, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    done = run_ava("nodes", "--json", "--accept-new", inventory=cluster.inventory(["n3"], known_hosts=str(known)))
    assert done.returncode == 0, done.stdout
    assert len(known.read_text().splitlines()) == 1


def test_changed_host_key_is_refused_under_both_policies_naming_the_node(cluster: Cluster, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text(cluster.known_hosts.read_text())
    cluster.regenerate_host_key("n4")
    try:
        for policy in ("strict", "accept-new"):
            done = run_ava(
                "nodes", "--json", inventory=cluster.inventory(["n4"], known_hosts=str(known), host_keys=policy)
            )
            assert done.returncode == 3
            (report,) = json.loads(done.stdout)
            assert report["error"].startswith("n4 (") and "host key changed" in report["error"]
        # The known-hosts file is never rewritten with the new key.
        new_key = Path(f"{cluster.node('n4').host_key}.pub").read_text().split()[1]
        assert new_key not in known.read_text()
    finally:
        # Put the new key in the cluster's known-hosts file so later tests trust n4 again.
        lines = [l for l in cluster.known_hosts.read_text().splitlines() if not _is_entry_for(l, cluster, "n4")]
        node = cluster.node("n4")
        name = node.address if node.port == 22 else f"[{node.address}]:{node.port}"
        lines.append(f"{name} ssh-ed25519 {Path(f'{node.host_key}.pub').read_text().split()[1]}")
        cluster.known_hosts.write_text("\n".join(lines) + "\n")


def _is_entry_for(line: str, cluster: Cluster, name: str) -> bool:
    node = cluster.node(name)
    first = line.split()[0] if line.split() else ""
    return first in (node.address, f"[{node.address}]:{node.port}")


HOSTILE = [
    "echo 'single quoted' \"double $HOME\" back\\slash",
    "echo $(echo sub) `echo tick`; echo after-semicolon && echo and",
    "cd / && echo /e* | tr ' ' '\\n' | sort | head -3",
    "printf '%s\\n' 'héllo wörld ☃ 日本' \"$((6*7))\"",
    'for x in a b; do echo "$x"; done; false; echo status=$?',
    "echo \"tab\there\" 'new\nline'",
]


@pytest.mark.parametrize("command", HOSTILE)
def test_exec_reaches_the_shell_exactly_as_ssh_does(cluster: Cluster, command: str) -> None:
    inventory = cluster.inventory(THREE)
    done = run_ava("exec", *THREE, "--", command, inventory=inventory)
    assert done.returncode == 0, done.stderr
    for name in THREE:
        node = cluster.node(name)
        ssh = subprocess.run(
            [
                "ssh",
                "-i",
                str(cluster.key),
                "-p",
                str(node.port),
                "-o",
                f"UserKnownHostsFile={cluster.known_hosts}",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "BatchMode=yes",
                f"{_user()}@{node.address}",
                command,
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert ssh.returncode == 0, ssh.stderr
        ours = [l.split(" | ", 1)[1] for l in done.stdout.splitlines() if l.startswith(f"{name} | ")]
        # Both streams are shown, each line in its stream's order (the noisy node's ~/.bashrc
        # writes to stderr too).
        errors = ssh.stderr.splitlines()
        assert [l for l in ours if l not in errors] == ssh.stdout.splitlines()
        assert sorted(l for l in ours if l in errors) == sorted(errors)


def test_exec_words_are_joined_like_ssh_joins_them(cluster: Cluster) -> None:
    done = run_ava("exec", "n1", "--", "echo", "a  b", "$((1+2))", inventory=cluster.inventory(["n1"]))
    assert done.stdout.splitlines() == ["n1 | a b 3"]


def test_exec_summarises_exit_codes_and_fails_when_any_node_fails(cluster: Cluster) -> None:
    inventory = cluster.inventory(THREE)
    done = run_ava(
        "exec", "--", 'test "$(hostname)" != ' + cluster.node("n2").hostname + " || exit 7", inventory=inventory
    )
    if not cluster.use_namespaces:
        pytest.skip("nodes share one hostname without namespaces")
    assert done.returncode == 1
    assert "n2: exit 7" in done.stderr and "n1: exit 0" in done.stderr and "n3: exit 0" in done.stderr


def test_exec_on_an_unknown_node_is_a_usage_error(cluster: Cluster) -> None:
    done = run_ava("exec", "nope", "--", "true", inventory=cluster.inventory(THREE))
    assert done.returncode == 2
    assert "nope" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name
