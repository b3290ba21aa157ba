"""GPU and CPU-slot leases: the picking rule (pure), the ledger file, and busy starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ava.agent import leases
from ava.agent.leases import Busy, Lease, Want, pick
from ava.agent.procs import start_time
from tests.support.agent_helpers import REPO, Agent, agent, needs_cgroups, wait_for


def held(run: str, gpus: list[int] = (), slots: int = 0, node: str = "n1") -> Lease:
    return Lease(run, 1, node, "bob", os.getpid(), None, 0.0, list(gpus), slots)


def test_gpus_are_the_lowest_free_indices_of_allowed() -> None:
    assert pick([], Want("r", "n1", gpus=2, allowed=(3, 1, 2, 0))) == ([0, 1], 0)
    assert pick([held("a", [0, 2])], Want("r", "n1", gpus=2, allowed=(0, 1, 2, 3))) == ([1, 3], 0)


def test_too_few_free_gpus_is_busy_naming_the_holders() -> None:
    others = [held("a", [0]), held("b", [5]), held("c", [], 2)]
    with pytest.raises(Busy) as busy:
        pick(others, Want("r", "n1", gpus=2, allowed=(0, 1)))
    assert [h.run for h in busy.value.holders] == ["a"]


def test_a_new_attempt_takes_over_its_own_runs_leases() -> None:
    mine = held("r", [0, 1], 2)
    assert pick([mine], Want("r", "n1", gpus=2, allowed=(0, 1), cpu_slots=2, cpu_total=2)) == ([0, 1], 2)
    # ... but only on its own node: the same run elsewhere is another holder.
    with pytest.raises(Busy):
        pick([held("r", [0, 1], node="n2")], Want("r", "n1", gpus=2, allowed=(0, 1)))


def test_cpu_slots_add_up_to_the_total() -> None:
    assert pick([held("a", [], 5)], Want("r", "n1", cpu_slots=3, cpu_total=8)) == ([], 3)
    with pytest.raises(Busy):
        pick([held("a", [], 5), held("b", [], 1)], Want("r", "n1", cpu_slots=3, cpu_total=8))


def test_no_lease_wanted_is_never_busy() -> None:
    everything = [held("a", [0, 1], 8)]
    assert pick(everything, Want("r", "n1", gpus=0, allowed=(0, 1), cpu_slots=2, cpu_total=None)) == ([], 0)


def test_entries_of_dead_or_reused_pids_are_reclaimed_on_read(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = os.getpid()
    entries = [
        {"run": "dead", "attempt": 1, "node": "n1", "user": "u", "pid": dead.pid, "started": 1.0, "gpus": [0]},
        {"run": "reused", "attempt": 1, "node": "n1", "user": "u", "pid": me, "pid_start": 1, "gpus": [1]},
        {"run": "live", "attempt": 1, "node": "n1", "user": "u", "pid": me, "pid_start": start_time(me), "gpus": [2]},
    ]
    (tmp_path / "leases.json").write_text(json.dumps({"holders": entries}))
    assert [h.run for h in leases.holders(tmp_path)] == ["live"]
    assert [h["run"] for h in json.loads((tmp_path / "leases.json").read_text())["holders"]] == ["live"]


def test_release_touches_only_the_named_attempt(tmp_path: Path) -> None:
    with leases.locked(tmp_path) as ledger:
        for attempt in (1, 2):
            ledger.grant(Want(f"r{attempt}", "n1", gpus=1, allowed=(attempt,)), attempt, "u", os.getpid(), [attempt], 0)
    leases.release(tmp_path, "r1", "n1", attempt=2)
    assert len(leases.holders(tmp_path)) == 2
    leases.release(tmp_path, "r1", "n1", attempt=1)
    assert [h.run for h in leases.holders(tmp_path)] == ["r2"]


def dump_cuda_devices(out: Path) -> list[str]:
    """A job that writes the CUDA_VISIBLE_DEVICES it got, then waits to be stopped."""
    code = (
        f"import os, json, time; json.dump(os.environ['CUDA_VISIBLE_DEVICES'], open({str(out)!r}, 'w')); time.sleep(60)"
    )
    return [sys.executable, "-c", code]


@needs_cgroups
def test_second_run_on_the_same_gpus_is_busy_until_the_first_stops(agent: Agent, tmp_path: Path) -> None:
    first, second = agent.new_run("gpuA"), agent.new_run("gpuB")
    gpus = {"want": 2, "allowed": [0, 1]}
    out = tmp_path / "env.json"
    argv = dump_cuda_devices(out)
    rc, st = agent.start(agent.spec(first, argv, gpus=gpus))
    assert rc == 0 and st["gpus"] == [0, 1]
    rc, busy = agent.start(agent.spec(second, argv, gpus=gpus))
    assert rc == 4 and busy["error"] == "busy"
    holders = [(h["run"], h["gpus"], h["user"], h["pid"]) for h in busy["holders"]]
    assert holders == [(first, [0, 1], "tester", st["pid"])]
    assert wait_for(out.exists, 10) and json.loads(out.read_text()) == "0,1"
    assert agent.stop(first, grace=0.5)[1]["stopped"] is True
    rc, st = agent.start(agent.spec(second, argv, gpus=gpus))
    assert rc == 0 and st["state"] == "running" and st["gpus"] == [0, 1]
    assert [h["run"] for h in agent.leases()] == [second]
    agent.stop_clean(second, grace=0.5)
    assert agent.leases() == []


@needs_cgroups
def test_cpu_run_on_a_gpu_node_sees_no_gpu_and_holds_its_slots(agent: Agent, tmp_path: Path) -> None:
    run, other = agent.new_run("cpuA"), agent.new_run("cpuB")
    out = tmp_path / "env.json"
    argv = dump_cuda_devices(out)
    spec = agent.spec(run, argv, gpus={"want": 0, "allowed": [0, 1]}, cpu_slots={"want": 6, "total": 8})
    rc, st = agent.start(spec)
    assert rc == 0 and st["cpu_slots"] == 6
    assert wait_for(out.exists, 10) and json.loads(out.read_text()) == ""
    rc, busy = agent.start(agent.spec(other, argv, cpu_slots={"want": 3, "total": 8}))
    assert rc == 4 and busy["holders"][0]["cpu_slots"] == 6
    agent.stop_clean(run, grace=0)
    assert agent.leases() == [], "the stopped run still holds its CPU slots"


def test_concurrent_starts_grant_one_gpu_once(agent: Agent) -> None:
    runs = [agent.new_run(f"race{i}") for i in range(4)]
    paths = []
    for run in runs:
        argv = [sys.executable, "-c", "import time; time.sleep(60)"]
        spec = agent.spec(run, argv, gpus={"want": 1, "allowed": [7]}, isolation="none")
        path = agent.jobs / f"{run}.json"
        path.write_text(json.dumps(spec))
        paths.append(path)
    procs = [
        subprocess.Popen([sys.executable, "-m", "ava.agent", "start", str(p)], cwd=REPO, stdout=subprocess.PIPE)
        for p in paths
    ]
    codes = sorted(p.wait(timeout=60) for p in procs)
    for p in procs:
        p.stdout.close()  # type: ignore[union-attr]
    assert codes == [0, 4, 4, 4]
    assert len(agent.leases()) == 1
