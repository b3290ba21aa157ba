"""Spare torchrun interpreters (ava/agent/warm.py): the next attempt's torchrun comes from a
spare that imported torch while the attempt before it ran, with that next attempt's env, cwd
and fence, and no spare outlives its run. Real agent, real torchrun, real cgroups."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from ava.agent import layout, warm
from tests.support.agent_helpers import REPO, Agent, agent, marker_pids, needs_cgroups, torchrun, wait_for

__all__ = ["agent"]

# Each rank writes what it was given: env, cwd, cgroup, whether torch was imported before its
# script ran (a zygote's worker), its parent; the phase decides how it ends.
REPORT = """
import sys
preloaded = "torch" in sys.modules
import json, os, time
rank = os.environ["RANK"]
out = os.path.join(os.environ["REPORT_DIR"], f"rank{rank}-{os.environ['PHASE']}.json")
with open(out, "w") as f:
    json.dump({"env": dict(os.environ), "cwd": os.getcwd(), "cgroup": open("/proc/self/cgroup").read(),
               "parent": os.getppid(), "preloaded": preloaded, "argv": sys.argv, "pid": os.getpid()}, f)
print(f"rank {rank} says hello", flush=True)
with open(os.environ["AVA_PROGRESS_FILE"], "w") as f:
    f.write(f"1 {time.time()}")  # a first step: the monitor starts the next attempt's spare
time.sleep(float(os.environ.get("JOB_SLEEP", "0")))
if os.environ["PHASE"] == "one" and rank == "1":
    sys.exit(3)
if os.environ["PHASE"] == "two" and rank == "1":
    raise ValueError("rank 1 fails in phase two")
"""


def _spec(agent: Agent, run: str, attempt: int, phase: str, cwd: Path, sleep: str) -> dict[str, Any]:
    # The rank hook as the runtime tree ships it: sitecustomize on the ranks' PYTHONPATH.
    hook = agent.jobs / "runtime"
    if not hook.exists():
        hook.mkdir()
        (hook / "sitecustomize.py").write_text((REPO / "ava" / "rankhook.py").read_text())
    env = {
        warm.ENABLE: "1",
        "PHASE": phase,
        "REPORT_DIR": str(agent.jobs),
        "JOB_SLEEP": sleep,
        "PYTHONPATH": str(hook),
    }
    argv = torchrun(str(agent.jobs / "report.py"))
    return agent.spec(run, argv, attempt=attempt, env=env, cwd=str(cwd))


def _spare_ready(agent: Agent, run: str) -> bool:
    return (layout.run_dir(agent.work, run) / warm.SOCKET).exists()


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _spares(run: str) -> list[int]:
    return [p for p in marker_pids(run) if f"{warm.MARK}=".encode() in Path(f"/proc/{p}/environ").read_bytes()]


@needs_cgroups
def test_the_next_attempt_runs_torchrun_and_its_ranks_from_the_spare_with_its_own_env_cwd_and_fence(
    agent: Agent,
) -> None:
    (agent.jobs / "report.py").write_text(REPORT)
    second_cwd = agent.jobs / "second"
    second_cwd.mkdir()
    run = agent.new_run("warm")
    rc, st = agent.start(_spec(agent, run, 1, "one", agent.jobs, "4"))
    assert rc == 0, st
    assert wait_for(lambda: _spare_ready(agent, run), 30.0, 0.1), "no spare listening"
    first = agent.wait_final(run)
    assert first["state"] == "failed" and first["rank_exit_codes"] == {"1": 3}, first
    # Nothing to claim at the run's first attempt: it started a spare for itself (not niced),
    # so that its ranks too are forked with torch imported; then one for the next attempt.
    assert first["from_spare"] and first["from_spare"] != first["spare_pid"], first
    assert json.loads((agent.jobs / "rank0-one.json").read_text())["preloaded"]

    rc, st = agent.start(_spec(agent, run, 2, "two", second_cwd, "4"))
    assert rc == 0, st
    assert wait_for(lambda: _spare_ready(agent, run), 30.0, 0.1), "attempt 2 keeps no spare"
    second = agent.wait_final(run)
    assert second["from_spare"] == first["spare_pid"], second
    # Rank 1 raised: its exit code and the moment it raised come through the proxy as before.
    assert second["state"] == "failed" and second["rank_exit_codes"] == {"1": 1}, second
    assert "1" in second["rank_fail_times"]
    assert (agent.work / "runs" / run / "attempt-2" / "rank-errors" / "1.json").exists()
    output = (agent.work / "runs" / run / "attempt-2" / "output.log").read_text()
    assert "rank 0 says hello" in output and "ValueError: rank 1 fails in phase two" in output, output
    for rank in ("0", "1"):
        got = json.loads((agent.jobs / f"rank{rank}-two.json").read_text())
        assert got["env"]["PHASE"] == "two" and got["env"]["AVA_JOB_TAG"] == f"{run}.n1.a2", got["env"]
        assert warm.MARK not in got["env"]
        assert got["cwd"] == str(second_cwd)
        assert f"{run}.n1.a2" in got["cgroup"], got["cgroup"]
        # Forked by the zygote (the spare torchrun came from), torch already imported.
        assert got["preloaded"] and got["parent"] == second["from_spare"], got
        assert got["argv"][0].endswith("report.py")

    rc, st = agent.start(_spec(agent, run, 3, "three", second_cwd, "0"))
    assert rc == 0, st
    third = agent.wait_final(run)
    assert third["state"] == "succeeded" and third["from_spare"] == second["spare_pid"], third
    # A success ends the run's spares here: the one attempt 3 started is gone too.
    assert wait_for(lambda: not marker_pids(run), 10.0, 0.1), marker_pids(run)
    assert not _spare_ready(agent, run)


@needs_cgroups
def test_a_spare_nobody_claims_exits_on_its_own(agent: Agent) -> None:
    (agent.jobs / "report.py").write_text(REPORT)
    run = agent.new_run("idle")
    rc, st = agent.start(_spec(agent, run, 1, "one", agent.jobs, "3"))
    assert rc == 0, st
    assert wait_for(lambda: _spare_ready(agent, run), 30.0, 0.1), "no spare listening"
    assert agent.wait_final(run)["state"] == "failed"
    assert _spares(run), "the spare waits for the next attempt"
    ended = time.monotonic()
    assert wait_for(lambda: not marker_pids(run), warm.IDLE + 10.0, 0.2), marker_pids(run)
    assert time.monotonic() - ended >= warm.IDLE - 2.0
    assert not _spare_ready(agent, run)


@needs_cgroups
def test_a_spare_in_use_dies_with_a_stopped_attempt(agent: Agent) -> None:
    (agent.jobs / "report.py").write_text(REPORT)
    run = agent.new_run("stop")
    rc, st = agent.start(_spec(agent, run, 1, "one", agent.jobs, "4"))
    assert rc == 0, st
    assert wait_for(lambda: _spare_ready(agent, run), 30.0, 0.1)
    agent.wait_final(run)
    rc, st = agent.start(_spec(agent, run, 2, "two", agent.jobs, "60"))
    assert rc == 0 and st.get("from_spare"), st
    assert wait_for(lambda: (agent.jobs / "rank0-two.json").exists(), 30.0, 0.1)
    spare = st["from_spare"]
    # A stopped rank (SIGSTOP cannot be forwarded) stops its worker; continued, it continues.
    worker = json.loads((agent.jobs / "rank0-two.json").read_text())["pid"]
    rank = next(p for p in marker_pids(run) if b"RANK=0" in Path(f"/proc/{p}/environ").read_bytes().split(b"\0"))
    os.kill(rank, signal.SIGSTOP)
    assert wait_for(lambda: _state(worker) == "T", 5.0, 0.05), _state(worker)
    os.kill(rank, signal.SIGCONT)
    assert wait_for(lambda: _state(worker) in ("S", "R"), 5.0, 0.05), _state(worker)
    rc, out = agent.stop(run)
    assert rc == 0 and out["stopped"], out
    assert not os.path.exists(f"/proc/{spare}") or "Z" in Path(f"/proc/{spare}/stat").read_text().split(")")[-1][:3]
    final = agent.status(run)
    assert final["state"] == "stopped", final
