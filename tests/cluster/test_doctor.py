"""`ava doctor` on the real test cluster: every check is made to fail for real at least once.

Faults come from the node's side: a `python` wrapper that gives one node another torch, another
clock, a tiny disk, no cgroups or a fake GPU; a route that drops the master; a resolver that
never answers. Each is undone in a finally.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ava.bandwidth import bus_bandwidth, slow_links
from ava.config import Node
from ava.doctor import FAIL, PASS, WARN, Observation, check_clock, check_versions_alike
from tests.conftest import run_ava
from tests.support import nodepy
from tests.support.cluster import Cluster

THREE = ["n1", "n2", "n3"]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs network namespaces (root)")


# -- helpers ------------------------------------------------------------------------------------


def inventory(
    cluster: Cluster,
    tmp_path: Path,
    names: list[str],
    per_node: dict[str, dict[str, str]] | None = None,
    **defaults: object,
) -> Path:
    """The cluster's inventory for `names`, with some keys set on single nodes."""
    defaults.setdefault("cache_size", "1GiB")
    path = cluster.inventory(names, path=tmp_path / "ava.toml", **defaults)
    lines = path.read_text().splitlines()
    for name, keys in (per_node or {}).items():
        at = lines.index(f"[nodes.{name}]") + 1
        end = next((i for i in range(at, len(lines)) if not lines[i].strip()), len(lines))
        # Replaced where the cluster's inventory already names them (each node's python).
        lines[at:end] = [l for l in lines[at:end] if l.split(" = ", 1)[0] not in keys]
        lines[at:at] = [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def python_wrapper(folder: Path, *, env: dict[str, str] | None = None, prefix: str = "") -> str:
    """A `python` for one node: the nodes' real interpreter under another environment or namespace."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "python"
    exports = "".join(f"export {k}='{v}'\n" for k, v in (env or {}).items())
    script.write_text(f'#!/bin/sh\n{exports}{prefix}exec {nodepy.node_python()} "$@"\n')
    script.chmod(0o755)
    return str(script)


def doctor(path: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    done = run_ava("doctor", "--json", *args, inventory=path, timeout=180)
    assert done.stdout.strip(), done.stderr
    return done.returncode, json.loads(done.stdout), done.stderr


def find(report: dict[str, Any], check: str, node: str | None) -> dict[str, Any]:
    found = [c for c in report["checks"] if c["check"] == check and c["node"] == node]
    assert found, f"no {check} check for {node}: {[(c['check'], c['node']) for c in report['checks']]}"
    return found[0]


def assert_fails_with_fix(check: dict[str, Any], status: str = FAIL) -> None:
    assert check["status"] == status, check
    assert check["fix"], f"a {status} must say what to do: {check}"


# -- the healthy cluster ------------------------------------------------------------------------


def test_doctor_passes_three_healthy_nodes_and_prints_a_table(cluster: Cluster, tmp_path: Path) -> None:
    path = inventory(cluster, tmp_path, THREE)
    code, report, _ = doctor(path)
    assert code == 0, report
    assert report["status"] in (PASS, WARN)
    failing = [c for c in report["checks"] if c["status"] == FAIL]
    assert failing == []
    for name in THREE:
        for check in (
            "ssh",
            "torch",
            "gpus",
            "gpu health",
            "disk",
            "cache disk",
            "interface",
            "reaches master",
            "name lookups",
            "isolation",
        ):
            assert find(report, check, name)["status"] in (PASS, WARN)
        if cluster.use_namespaces:
            assert find(report, "interface", name)["detail"].startswith(f"eth0 ({cluster.node(name).address})")
    for key in ("python", "torch", "cuda", "nccl"):
        assert find(report, f"{key} alike", None)["status"] == PASS
    assert find(report, "clock skew", None)["status"] == PASS
    table = run_ava("doctor", inventory=path)
    assert table.returncode == 0
    assert "reaches master" in table.stdout and "clock skew" in table.stdout


# -- SSH and host keys --------------------------------------------------------------------------


def test_unknown_host_key_fails_ssh_and_says_how_to_trust_it(cluster: Cluster, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    code, report, _ = doctor(inventory(cluster, tmp_path, ["n1", "n2"], known_hosts=str(empty)))
    assert code == 3
    check = find(report, "ssh", "n1")
    assert_fails_with_fix(check)
    assert "unknown host key" in check["detail"] and "--accept-new" in check["fix"]


@needs_root
def test_a_cut_link_fails_ssh_for_that_node_only(cluster: Cluster, tmp_path: Path) -> None:
    path = inventory(cluster, tmp_path, THREE)
    cluster.cut_link("n3")
    try:
        started = time.monotonic()
        code, report, _ = doctor(path)
        elapsed = time.monotonic() - started
    finally:
        cluster.restore_link("n3")
    assert code == 3
    assert_fails_with_fix(find(report, "ssh", "n3"))
    assert "timed out" in find(report, "ssh", "n3")["detail"]
    assert find(report, "ssh", "n1")["status"] == find(report, "ssh", "n2")["status"] == PASS
    assert elapsed < 40


# -- versions, GPUs, disk, clock, isolation: one node's python made different -------------------


def test_another_torch_on_one_node_fails_versions_alike(cluster: Cluster, tmp_path: Path) -> None:
    fake = tmp_path / "site" / "torch-9.9.9.dist-info"
    fake.mkdir(parents=True)
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 9.9.9\n")
    python = python_wrapper(tmp_path / "bin", env={"PYTHONPATH": str(tmp_path / "site")})
    code, report, _ = doctor(inventory(cluster, tmp_path, THREE, per_node={"n2": {"python": python}}))
    assert code == 3
    check = find(report, "torch alike", None)
    assert_fails_with_fix(check)
    assert "9.9.9 on n2" in check["detail"] and "n1, n3" in check["detail"]


def test_a_missing_torch_fails_the_torch_check(cluster: Cluster, tmp_path: Path) -> None:
    # -S drops site-packages, where torch lives: an interpreter without torch, for real.
    python = python_wrapper(tmp_path / "bin", prefix='set -- -S "$@"\n')
    code, report, _ = doctor(inventory(cluster, tmp_path, ["n1"], per_node={"n1": {"python": python}}))
    assert code == 3
    check = find(report, "torch", "n1")
    assert_fails_with_fix(check)
    assert "not installed" in check["detail"]


def test_gpus_named_in_the_inventory_but_absent_fail(cluster: Cluster, tmp_path: Path) -> None:
    code, report, _ = doctor(inventory(cluster, tmp_path, ["n1", "n2"], per_node={"n2": {"gpus": 2}}))  # type: ignore[dict-item]
    assert code == 3
    check = find(report, "gpus", "n2")
    assert_fails_with_fix(check)
    assert "[0, 1]" in check["detail"] and "no GPUs" in check["detail"]
    assert find(report, "gpus", "n1")["status"] == PASS


FAKE_SMI = r"""#!{python}
# A GPU node's nvidia-smi: answers --query-gpu for the fields asked, from a fixed table.
import sys
gpus = [
    {{"index": "0", "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-0", "memory.total": "81559", "memory.used": "0",
     "utilization.gpu": "0", "ecc.errors.uncorrected.volatile.total": "0", "retired_pages.pending": "[N/A]",
     "remapped_rows.pending": "No", "remapped_rows.failure": "No"}},
    {{"index": "1", "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-1", "memory.total": "81559", "memory.used": "0",
     "utilization.gpu": "0", "ecc.errors.uncorrected.volatile.total": "{ecc}", "retired_pages.pending": "[N/A]",
     "remapped_rows.pending": "Yes", "remapped_rows.failure": "No"}},
]
fields = next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--query-gpu=")).split(",")
for gpu in gpus:
    print(", ".join(gpu[f] for f in fields))
"""
FAKE_DMESG = """#!/bin/sh
echo '[  12.000000] NVRM: Xid (PCI:0000:18:00): 79, pid=0, GPU has fallen off the bus.'
"""


def test_gpu_health_fails_on_ecc_errors_and_a_fatal_xid(cluster: Cluster, tmp_path: Path) -> None:
    fakes = tmp_path / "fakebin"
    fakes.mkdir()
    (fakes / "nvidia-smi").write_text(FAKE_SMI.format(python=sys.executable, ecc="3"))
    (fakes / "dmesg").write_text(FAKE_DMESG)
    for tool in fakes.iterdir():
        tool.chmod(0o755)
    python = python_wrapper(tmp_path / "bin", env={"PATH": f"{fakes}:{os.environ['PATH']}"})
    code, report, _ = doctor(inventory(cluster, tmp_path, ["n1"], per_node={"n1": {"python": python, "gpus": 2}}))  # type: ignore[dict-item]
    assert code == 3
    assert find(report, "gpus", "n1")["status"] == PASS  # two GPUs, as the inventory says
    check = find(report, "gpu health", "n1")
    assert_fails_with_fix(check)
    assert "GPU 1: 3 uncorrected ECC errors" in check["detail"]
    assert "Xid 79" in check["detail"] and "pages wait for retirement" in check["detail"]


@needs_root
def test_a_tiny_workdir_disk_fails_and_an_oversized_cache_warns(cluster: Cluster, tmp_path: Path) -> None:
    work = cluster.node("n2").workdir
    # The node's python sees a 16 MiB tmpfs at its workdir, in its own mount namespace only.
    prefix = f'exec unshare -m sh -c \'mount -t tmpfs -o size=16m ava-test {work} && exec "$0" "$@"\' {nodepy.node_python()} "$@"\n'
    python = python_wrapper(tmp_path / "bin", prefix=prefix)
    path = inventory(
        cluster, tmp_path, ["n1", "n2"], per_node={"n2": {"python": python}, "n1": {"cache_size": "1000TiB"}}
    )
    code, report, _ = doctor(path)
    assert code == 3
    check = find(report, "disk", "n2")
    assert_fails_with_fix(check)
    assert check["detail"].startswith("16.0MiB free")
    assert find(report, "disk", "n1")["status"] != FAIL
    assert_fails_with_fix(find(report, "cache disk", "n1"), WARN)


def test_a_clock_five_seconds_ahead_warns(cluster: Cluster, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import time\n_real = time.time\ntime.time = lambda: _real() + 5.0\n")
    python = python_wrapper(tmp_path / "bin", env={"PYTHONPATH": str(site)})
    code, report, _ = doctor(inventory(cluster, tmp_path, THREE, per_node={"n3": {"python": python}}))
    assert code == 0  # a warning, not a failure
    check = find(report, "clock", "n3")
    assert_fails_with_fix(check, WARN)
    assert check["detail"].startswith(("5.0 s ahead", "4.9 s ahead", "5.1 s ahead"))
    assert_fails_with_fix(find(report, "clock skew", None), WARN)


@needs_root
def test_a_node_without_cgroups_warns_on_isolation(tmp_path: Path) -> None:
    # The embedded local node: the test cluster's nodes see no cgroup mounts at all.
    path = tmp_path / "ava.toml"
    local = f'[nodes.local]\ntransport = "local"\ncache_size = "1GiB"\nworkdir = "{tmp_path}/work"\n'
    path.write_text(local)
    code, report, _ = doctor(path)
    assert find(report, "isolation", "local")["status"] == PASS
    prefix = (
        f'exec unshare -m sh -c \'mount -t tmpfs ava-test /sys/fs/cgroup && exec "$0" "$@"\' {sys.executable} "$@"\n'
    )
    path.write_text(local + f'python = "{python_wrapper(tmp_path / "bin", prefix=prefix)}"\n')
    code, report, _ = doctor(path)
    check = find(report, "isolation", "local")
    assert_fails_with_fix(check, WARN)
    assert "no cgroups" in check["detail"]
    assert code == 0


# -- network: the master's route, the interface, name lookups ------------------------------------


@needs_root
def test_a_node_that_cannot_reach_the_master_fails_interface_and_reach(cluster: Cluster, tmp_path: Path) -> None:
    path = inventory(cluster, tmp_path, THREE)
    namespace, master = cluster.node("n2").namespace, cluster.node("n1").address
    assert namespace
    subprocess.run(["ip", "-n", namespace, "route", "add", "blackhole", f"{master}/32"], check=True)
    try:
        code, report, _ = doctor(path)
    finally:
        subprocess.run(["ip", "-n", namespace, "route", "del", "blackhole", f"{master}/32"], check=True)
    assert code == 3
    reach = find(report, "reaches master", "n2")
    assert_fails_with_fix(reach)
    assert f"{master}:22" in reach["detail"]
    assert_fails_with_fix(find(report, "interface", "n2"))
    assert find(report, "reaches master", "n3")["status"] == PASS
    assert find(report, "ssh", "n2")["status"] == PASS


def test_an_interface_named_in_the_inventory_that_is_absent_fails(cluster: Cluster, tmp_path: Path) -> None:
    code, report, _ = doctor(inventory(cluster, tmp_path, ["n1", "n2"], per_node={"n2": {"interface": "ib7"}}))
    assert code == 3
    check = find(report, "interface", "n2")
    assert_fails_with_fix(check)
    assert "no interface ib7" in check["detail"]


@needs_root
def test_a_resolver_that_drops_queries_fails_name_lookups(cluster: Cluster, tmp_path: Path) -> None:
    node = cluster.node("n2")
    assert node.namespace and node.sshd is not None
    resolv = Path(f"/etc/netns/{node.namespace}/resolv.conf")
    saved = resolv.read_text()
    # A nameserver nobody holds on the node's subnet: queries vanish, each waits out its timeout.
    silent = node.address.rsplit(".", 1)[0] + ".250"
    uts = ["nsenter", "-t", str(node.sshd.pid), "-u"]
    try:
        resolv.write_text(f"nameserver {silent}\noptions timeout:5 attempts:1\n")  # in place: the bind mount follows
        # A hostname /etc/hosts does not hold, so the lookup goes to that nameserver.
        subprocess.run([*uts, "hostname", "avat-unlisted-n2"], check=True)
        code, report, _ = doctor(inventory(cluster, tmp_path, ["n1", "n2"]))
    finally:
        subprocess.run([*uts, "hostname", node.hostname], check=True)
        resolv.write_text(saved)
    assert code == 3
    check = find(report, "name lookups", "n2")
    assert_fails_with_fix(check)
    assert "stalled" in check["detail"] and "avat-unlisted-n2" in check["detail"]
    assert find(report, "name lookups", "n1")["status"] == PASS


# -- bandwidth ----------------------------------------------------------------------------------


def test_doctor_bandwidth_prints_sizes_and_bus_bandwidth(cluster: Cluster, tmp_path: Path) -> None:
    done = run_ava("doctor", "--bandwidth", inventory=inventory(cluster, tmp_path, THREE), timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all-reduce, gloo, 3 nodes" in done.stdout
    assert "algbw (GB/s)" in done.stdout and "busbw (GB/s)" in done.stdout
    for size in ("4.0KiB", "64.0KiB", "1.0MiB", "4.0MiB"):
        assert size in done.stdout
    rows = [l for l in done.stdout.splitlines() if "KiB" in l or "MiB" in l]
    assert len(rows) >= 6


@needs_root
def test_doctor_bandwidth_flags_a_node_with_a_slow_link(cluster: Cluster, tmp_path: Path) -> None:
    namespace = cluster.node("n3").namespace
    assert namespace
    # n3 sends at 400 Mbit/s at most; the bridge gives the others well over a GB/s.
    shape = ["ip", "netns", "exec", namespace, "tc", "qdisc"]
    subprocess.run(
        [*shape, "add", "dev", "eth0", "root", "tbf", "rate", "400mbit", "burst", "256kb", "latency", "50ms"],
        check=True,
    )
    try:
        code, report, _ = doctor(inventory(cluster, tmp_path, THREE), "--bandwidth")
    finally:
        subprocess.run([*shape, "del", "dev", "eth0", "root"], check=True)
    assert code == 0, report
    links = {l["node"]: l for l in report["bandwidth"]["links"]}
    assert links["n3"]["slow"] and not links["n2"]["slow"], links
    assert_fails_with_fix(find(report, "bandwidth", "n3"), WARN)


# -- pure logic ---------------------------------------------------------------------------------


def test_bus_bandwidth_is_nccl_tests_formula() -> None:
    assert bus_bandwidth(1e9, 4) == pytest.approx(1.5e9)
    assert bus_bandwidth(1e9, 2) == pytest.approx(1e9)


def test_a_link_under_half_the_others_median_is_slow() -> None:
    assert slow_links({"n2": 10e9, "n3": 9e9, "n4": 2e9}) == {"n4"}
    assert slow_links({"n2": 10e9, "n3": 8e9}) == set()


def _seen(name: str, **versions: str) -> Observation:
    return Observation(Node(name=name, host="h"), probe={"versions": versions})


def test_versions_alike_names_each_group() -> None:
    checks = check_versions_alike([_seen("a", torch="2.3"), _seen("b", torch="2.4"), _seen("c", torch="2.3")])
    torch_check = next(c for c in checks if c.check == "torch alike")
    assert torch_check.status == FAIL and torch_check.detail == "torch differs: 2.3 on a, c; 2.4 on b"
    assert "torch 2.3 on the others" in torch_check.fix


def test_clock_skew_under_a_second_passes() -> None:
    seen = [Observation(Node(name=n, host="h"), clock_offset=o) for n, o in (("a", 0.1), ("b", -0.2), ("c", 0.3))]
    assert [c.status for c in check_clock(seen)] == [PASS]
