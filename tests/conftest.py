"""Shared fixtures: the real test cluster and a way to run the real `ava` command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.cluster import Cluster, clean_stale, have_sshd
from tests.support.leak_check import nothing_left_on_the_cluster
from tests.support.vm_fixtures import vm

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        # The systemd + cgroup v2 guest (tests/support/vm_fixtures.py) is a cluster node too.
        if {"cluster", "vm"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)


# The only skips CI accepts: hardware no CI machine of ours has and nothing here can stand in for.
# Each is printed at the end of the run, so what was not tested is said, not hidden.
HARDWARE_ONLY = {
    "gpu": "an NVIDIA GPU with CUDA (NCCL between ranks); CI machines are CPU-only",
}
_hardware_skips: list[tuple[str, str]] = []


def has_gpu() -> bool:
    return Path("/dev/nvidiactl").exists() and shutil.which("nvidia-smi") is not None


def needs_gpu(test: Callable[..., None]) -> Callable[..., None]:
    """Declares a test hardware-only (GPU): skipped where there is none, even under CI."""
    test = pytest.mark.hardware("gpu")(test)
    return pytest.mark.skipif(not has_gpu(), reason=f"needs {HARDWARE_ONLY['gpu']}")(test)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "hardware(kind): may skip under CI where the machine lacks KIND (see HARDWARE_ONLY)"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    # Under CI no test may skip, whatever its kind: a skip would hide that nothing was tested.
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and not hasattr(report, "wasxfail")):
        return
    hardware = item.get_closest_marker("hardware")
    kind = hardware.args[0] if hardware and hardware.args else None
    if kind in HARDWARE_ONLY:
        _hardware_skips.append((item.nodeid, kind))
    elif IN_CI:
        why = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where only hardware-only skips {sorted(HARDWARE_ONLY)} may: {why}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _hardware_skips:
        terminalreporter.section("hardware-only skips (not tested on this machine)")
        for nodeid, kind in _hardware_skips:
            terminalreporter.line(f"{nodeid}: needs {HARDWARE_ONLY[kind]}")


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """Four real sshd nodes (n1..n4); tests pick the ones they need through inventories."""
    if not have_sshd():
        if IN_CI:
            pytest.fail("openssh-server is missing under CI=true: .ci/run must install it")
        pytest.skip("openssh-server is not installed")
    clean_stale()
    test_cluster = Cluster(4)
    test_cluster.up()
    try:
        yield test_cluster
    finally:
        test_cluster.down()


def run_ava(
    *args: str,
    inventory: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """The real command line, in a fresh interpreter, as a user would run it."""
    full_env = dict(os.environ)
    full_env.pop("AVA_INVENTORY", None)
    full_env["COLUMNS"] = "200"
    if env:
        full_env.update(env)
    argv = [sys.executable, "-m", "ava"]
    if inventory is not None:
        argv += ["--inventory", str(inventory)]
    return subprocess.run(
        argv + list(args), capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd or REPO
    )


def processes_of(run_id: str) -> list[int]:
    """Every live process here (all test nodes share this kernel) that belongs to the run."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and f"AVA_RUN_ID={run_id}".encode() in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def rank_pid(run_id: str, rank: str, script: bytes = b"steps.py") -> int | None:
    """The process torchrun started for RANK of the run (with spare interpreters: the rank's
    stand-in, see ava/agent/zygote.py), running SCRIPT."""
    for pid in processes_of(run_id):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and script in cmd:
            return pid
    return None
