"""A node's spare between runs (`keep_warm`, ava/agent/warm.py): a run that ends leaves a spare
torchrun, torch imported, that the next run's first attempt on the node starts from; it fits
only an equal interpreter, import environment and site-packages, carries nothing of the run
before, and exits on its own once unclaimed for keep_warm seconds. Real agent, real torchrun,
real cgroups; the pure parts (the fit, the settings) without."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from ava.agent import layout, warm
from ava.agent.protocol import SpecError, StartSpec
from ava.agent.spec import Spec
from ava.config import load_inventory
from tests.support.agent_helpers import Agent, agent, needs_cgroups, torchrun, wait_for

__all__ = ["agent"]

REPORT = """
import json, os, sys
rank = os.environ["RANK"]
out = os.path.join(os.environ["REPORT_DIR"], f"rank{rank}-{os.environ['PHASE']}.json")
with open(out, "w") as f:
    json.dump({"env": dict(os.environ), "cwd": os.getcwd(), "cgroup": open("/proc/self/cgroup").read(),
               "parent": os.getppid()}, f)
print(f"rank {rank} says hello", flush=True)
"""


def _spec(agent: Agent, phase: str, keep_warm: float, **env: str) -> dict[str, Any]:
    run = agent.new_run(phase)
    cwd = agent.jobs / phase
    cwd.mkdir()
    job_env = {"PHASE": phase, "REPORT_DIR": str(agent.jobs), "WANDB_API_KEY": f"token-of-{phase}", **env}
    spec = agent.spec(run, torchrun(str(agent.jobs / "report.py")), env=job_env, cwd=str(cwd))
    if keep_warm:
        spec["keep_warm"] = keep_warm
    return spec


def _run(agent: Agent, spec: dict[str, Any]) -> dict[str, Any]:
    rc, st = agent.start(spec)
    assert rc == 0, st
    final = agent.wait_final(spec["run"])
    assert final["state"] == "succeeded", final
    return final


def _socket(agent: Agent) -> Path:
    return warm.node_dir(agent.work) / warm.SOCKET


def _node_spares(agent: Agent) -> list[int]:
    """Live processes started as this workdir's node spare (by their command line)."""
    where = str(warm.node_dir(agent.work)).encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and where in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _end_node_spares(agent: Agent) -> None:
    for pid in _node_spares(agent):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _listening_spare(agent: Agent) -> int:
    assert wait_for(lambda: _socket(agent).exists(), 60.0, 0.1), "no node spare listening"
    spares = _node_spares(agent)
    assert len(spares) == 1, spares
    return spares[0]


@needs_cgroups
def test_the_next_run_starts_torchrun_from_the_spare_the_last_run_left(agent: Agent) -> None:
    (agent.jobs / "report.py").write_text(REPORT)
    try:
        first = _run(agent, _spec(agent, "one", 30))
        assert not first.get("from_node_spare"), first  # nothing was left before it
        spare = _listening_spare(agent)
        environ = Path(f"/proc/{spare}/environ").read_bytes().split(b"\0")
        # Nothing of the run it follows: no AVA_* but its mark, no run directory on its path, no
        # value of the run's [env] that `import torch` does not read (a token stays with its run).
        assert [v for v in environ if v.startswith(b"AVA_")] == [f"{warm.MARK}={warm.NODE_MARK}n1".encode()]
        assert not [v for v in environ if b"token-of-" in v or v.startswith((b"PHASE=", b"REPORT_DIR="))]
        assert f"/runs/{first['run']}".encode() not in Path(f"/proc/{spare}/cmdline").read_bytes()
        if os.geteuid() == 0:  # started at the lowest priority, which torchrun gets back
            assert os.getpriority(os.PRIO_PROCESS, spare) == 19
            group = Path(f"/proc/{spare}/autogroup")  # its session too, where sessions are groups
            if group.exists():
                assert group.read_text().split()[-1] == "19", group.read_text()

        spec = _spec(agent, "two", 30)
        second = _run(agent, spec)
        assert second.get("from_node_spare") and second["from_spare"] == spare, second
        for rank in ("0", "1"):
            got = json.loads((agent.jobs / f"rank{rank}-two.json").read_text())
            assert got["env"]["PHASE"] == "two" and got["env"]["AVA_RUN_ID"] == spec["run"], got["env"]
            assert got["env"]["WANDB_API_KEY"] == "token-of-two"
            assert warm.MARK not in got["env"]
            assert got["cwd"] == spec["cwd"]
            assert f"{spec['run']}.n1.a1" in got["cgroup"], got["cgroup"]
            assert got["parent"] == second["job_pid"]  # a rank of the torchrun the spare became
        output = (layout.attempt_dir(agent.work, spec["run"], 1) / layout.OUTPUT).read_text()
        assert "rank 0 says hello" in output and "rank 1 says hello" in output, output
        # The claimed spare ended with its attempt's fence; the run left a new one.
        assert wait_for(lambda: _node_spares(agent) and spare not in _node_spares(agent), 60.0, 0.1)
        assert _listening_spare(agent) != spare
    finally:
        _end_node_spares(agent)


@needs_cgroups
def test_a_spare_that_does_not_fit_or_went_stale_exits_and_the_run_starts_as_before(
    agent: Agent, tmp_path: Path
) -> None:
    (agent.jobs / "report.py").write_text(REPORT)
    site = tmp_path / "extra" / "site-packages"  # a recipe's own packages, on its PYTHONPATH
    site.mkdir(parents=True)
    packages = {"PYTHONPATH": str(site)}
    try:
        _run(agent, _spec(agent, "one", 30, OMP_NUM_THREADS="1", **packages))
        spare = _listening_spare(agent)
        # An environment `import torch` reads differently: not this spare.
        second = _run(agent, _spec(agent, "two", 30, OMP_NUM_THREADS="2", **packages))
        assert not second.get("from_node_spare"), second
        assert wait_for(lambda: spare not in _node_spares(agent), 10.0, 0.1), "the unfit spare is still there"
        # Run two left its own; a package installed since makes it stale.
        spare = _listening_spare(agent)
        (site / "newly_installed.py").write_text("")
        third = _run(agent, _spec(agent, "three", 30, OMP_NUM_THREADS="2", **packages))
        assert not third.get("from_node_spare"), third
        assert wait_for(lambda: spare not in _node_spares(agent), 10.0, 0.1), "the stale spare is still there"
        # A run just like the one before it does start from the spare that one left.
        spare = _listening_spare(agent)
        fourth = _run(agent, _spec(agent, "four", 30, OMP_NUM_THREADS="2", **packages))
        assert fourth.get("from_node_spare") and fourth["from_spare"] == spare, fourth
    finally:
        _end_node_spares(agent)


# On the spare's path (a recipe's PYTHONPATH reaches it): a node spare's interpreter takes 3 s
# longer to start, so the next run surely finds it still importing.
SLOW_SPARE = """
import os, time
if os.environ.get("AVA_SPARE", "").startswith("/warm/"):
    time.sleep(3)
"""


@needs_cgroups
def test_a_run_started_while_the_last_runs_spare_still_imports_waits_for_it(agent: Agent, tmp_path: Path) -> None:
    (agent.jobs / "report.py").write_text(REPORT)
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(SLOW_SPARE)
    try:
        _run(agent, _spec(agent, "one", 30, PYTHONPATH=str(slow)))
        assert (warm.node_dir(agent.work) / warm.NEXT).exists() and not _socket(agent).exists()
        spare = _node_spares(agent)
        assert len(spare) == 1, spare
        second = _run(agent, _spec(agent, "two", 30, PYTHONPATH=str(slow)))
        assert second.get("from_node_spare") and second["from_spare"] == spare[0], second
        assert second["node_spare_wait"] > 0.1, second
        # A run that does not fit it neither waits for nor keeps the importing spare.
        assert wait_for(lambda: len(_node_spares(agent)) == 1, 30.0, 0.1), _node_spares(agent)
        spare = _node_spares(agent)
        third = _run(agent, _spec(agent, "three", 30, PYTHONPATH=str(slow), OMP_NUM_THREADS="7"))
        assert not third.get("from_node_spare") and "node_spare_wait" not in third, third
        assert spare[0] not in _node_spares(agent)
    finally:
        _end_node_spares(agent)


@needs_cgroups
def test_an_unclaimed_spare_exits_after_keep_warm_and_keep_warm_0_leaves_none(agent: Agent) -> None:
    (agent.jobs / "report.py").write_text(REPORT)
    try:
        _run(agent, _spec(agent, "one", 0))
        time.sleep(2.0)
        assert not _node_spares(agent) and not _socket(agent).exists()

        _run(agent, _spec(agent, "two", 2))
        _listening_spare(agent)
        listening = time.monotonic()
        assert wait_for(lambda: not _node_spares(agent), 30.0, 0.1), _node_spares(agent)
        assert time.monotonic() - listening >= 1.0  # it waited (keep_warm counts from its start)
        assert not _socket(agent).exists()
    finally:
        _end_node_spares(agent)


# -- the pure parts --------------------------------------------------------------------------


def test_the_fit_ignores_what_changes_from_run_to_run_and_not_what_import_reads() -> None:
    work = Path("/home/u/.ava")
    argv = ["/venv/bin/python", "-m", "torch.distributed.run", "train.py"]
    base = {
        "PYTHONPATH": "/home/u/.ava/runs/r1/work:/home/u/.ava/trees/rt1:/opt/mine",
        "AVA_RUN_ID": "r1",
        "CUDA_VISIBLE_DEVICES": "0",
        "SSH_CLIENT": "10.0.0.1 5000 22",
        "LD_LIBRARY_PATH": "/opt/cuda/lib",
    }
    other_run = {
        **base,
        "PYTHONPATH": "/home/u/.ava/runs/r2/work:/home/u/.ava/trees/rt2:/opt/mine",
        "AVA_RUN_ID": "r2",
        "CUDA_VISIBLE_DEVICES": "1",
        "SSH_CLIENT": "10.0.0.1 5001 22",
    }
    assert warm.node_fit(argv, base, work) == warm.node_fit(argv, other_run, work)
    for changed in (
        {"OMP_NUM_THREADS": "4"},
        {"LD_LIBRARY_PATH": "/opt/other"},
        {"PYTHONPATH": "/home/u/.ava/runs/r1/work:/opt/theirs"},
        {"TORCH_CPP_LOG_LEVEL": "INFO"},
    ):
        assert warm.node_fit(argv, base, work) != warm.node_fit(argv, {**base, **changed}, work), changed
    assert warm.node_fit(argv, base, work) != warm.node_fit(["/other/python", *argv[1:]], base, work)


def test_a_bare_interpreter_name_fits_only_where_path_finds_the_same_one(tmp_path: Path) -> None:
    venvs = []
    for name in ("one", "two"):
        bin_dir = tmp_path / name / "bin"
        bin_dir.mkdir(parents=True)
        (bin_dir / "python3").write_text("#!/bin/sh\n")
        (bin_dir / "python3").chmod(0o755)
        venvs.append(str(bin_dir))
    argv = ["python3", "-m", "torch.distributed.run", "train.py"]
    work = tmp_path / "work"
    one = warm.node_fit(argv, {"PATH": f"{venvs[0]}:/usr/bin"}, work)
    assert one == warm.node_fit(argv, {"PATH": f"{venvs[0]}:/bin"}, work)
    assert one != warm.node_fit(argv, {"PATH": f"{venvs[1]}:/usr/bin"}, work)


def test_a_node_keeps_a_spare_only_for_torchrun_in_a_fence_that_can_admit_it() -> None:
    torchrun_argv = ["/venv/bin/python", "-m", "torch.distributed.run", "x.py"]
    assert warm.keeps_warm(300.0, torchrun_argv, True) and warm.keeps_warm(1.0, torchrun_argv, True)
    assert not warm.keeps_warm(0.0, torchrun_argv, True)
    assert not warm.keeps_warm(300.0, torchrun_argv, False)
    assert not warm.keeps_warm(300.0, ["/venv/bin/python", "x.py"], True)


def test_keep_warm_in_the_inventory_reaches_the_spec(tmp_path: Path) -> None:
    path = tmp_path / "ava.toml"
    path.write_text(
        '[nodes.a]\nhost = "h"\n\n[nodes.b]\nhost = "h2"\nkeep_warm = "0s"\n\n[nodes.c]\nhost = "h3"\nkeep_warm = "90s"\n'
    )
    nodes = load_inventory(str(path)).nodes
    assert (nodes["a"].keep_warm, nodes["b"].keep_warm, nodes["c"].keep_warm) == (300.0, 0.0, 90.0)
    path.write_text('[nodes.a]\nhost = "h"\nkeep_warm = "soon"\n')
    with pytest.raises(Exception, match=r"nodes\.a\.keep_warm"):
        load_inventory(str(path))

    spec = StartSpec(run="r", attempt=1, node="a", workdir="/w", cwd="/w", argv=("p",), env={}, keep_warm=90.0)
    assert Spec.from_json(spec.to_json()).keep_warm == 90.0
    assert "keep_warm" not in StartSpec(**{**spec.__dict__, "keep_warm": 0.0}).to_json()
    with pytest.raises(SpecError, match="keep_warm"):
        Spec.from_json({**spec.to_json(), "keep_warm": -1})


def test_the_scope_made_around_a_spare_has_the_limits_systemd_run_would_give() -> None:
    from ava.agent.cgroupv2 import systemd_run_argv, transient_unit_call
    from ava.agent.isolation import Limits

    limits = Limits(memory=1 << 30, cpus=1.5, pids=64)
    allow = ["/dev/nvidiactl rw", "/dev/nvidia1 rw"]
    call = transient_unit_call("ava-r.n1.a1.scope", "ava.slice", limits, 4242, user_mode=False, device_allow=allow)
    assert call[:5] == [
        *("busctl", "call", "org.freedesktop.systemd1"),
        *("/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager"),
    ]
    assert call[5:10] == ["StartTransientUnit", "ssa(sv)a(sa(sv))", "ava-r.n1.a1.scope", "fail", "8"]
    assert call[10:] == [
        *("PIDs", "au", "1", "4242"),
        *("Slice", "s", "ava.slice"),
        *("CollectMode", "s", "inactive-or-failed"),
        *("MemoryMax", "t", str(1 << 30)),
        *("CPUQuotaPerSecUSec", "t", "1500000"),
        *("TasksMax", "t", "64"),
        *("DevicePolicy", "s", "closed"),
        *("DeviceAllow", "a(ss)", "2", "/dev/nvidiactl", "rw", "/dev/nvidia1", "rw"),
        "0",
    ]
    run = systemd_run_argv("ava-r.n1.a1.scope", "ava.slice", limits, user_mode=False, device_allow=allow)
    assert "CPUQuota=150%" in run and "MemoryMax=1073741824" in run and "TasksMax=64" in run
    user = transient_unit_call("u.scope", "ava.slice", Limits(), 7, user_mode=True, device_allow=allow)
    assert user[:2] == ["busctl", "--user"] and "DevicePolicy" not in user and user[-1] == "0"
