"""What the monitor reports while torchrun still runs: a rank's exit code the moment it exits,
and a stop that does not wait on a stopped (SIGSTOPped, hung) rank. Real agent, real torchrun."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.support.agent_helpers import Agent, agent, marker_pids, needs_cgroups, torchrun, wait_for

# Rank 1 exits 3 after a moment; rank 0 takes 4 s to act on the SIGTERM torchrun then sends it,
# so torchrun is still running, winding down, well after rank 1's exit.
SLOW_PEER = """
import os, signal, sys, time
rank = int(os.environ["RANK"])
if rank == 0:
    signal.signal(signal.SIGTERM, lambda *_: (time.sleep(4), sys.exit(0)))
    time.sleep(60)
time.sleep(1.0)
sys.exit(3)
"""


@needs_cgroups
def test_a_ranks_exit_code_is_reported_while_torchrun_still_winds_down(agent: Agent) -> None:
    (agent.jobs / "slow_peer.py").write_text(SLOW_PEER)
    run = agent.new_run("early")
    rc, st = agent.start(agent.spec(run, torchrun("slow_peer.py")))
    assert rc == 0, st
    seen = wait_for(lambda: (s := agent.status(run)).get("rank_exit_codes") and s, 20.0, 0.1)
    assert seen, agent.status(run)
    # Known before torchrun has ended: the state is still running, rank 1's code and time are in.
    assert seen["state"] == "running", seen
    assert seen["rank_exit_codes"] == {"1": 3}, seen
    assert "1" in seen["rank_fail_times"]
    final = agent.wait_final(run)
    assert final["state"] == "failed" and final["rank_exit_codes"].get("1") == 3, final


def _worker_of_rank(run: str, rank: int) -> int | None:
    """The rank's worker: a process of the run whose environment has RANK=rank and whose
    parent is not itself a rank (torchrun has RANK unset)."""
    for pid in marker_pids(run):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and any(e.startswith(b"LOCAL_RANK=") for e in env):
            return pid
    return None


@needs_cgroups
def test_a_stop_does_not_wait_out_its_grace_on_a_stopped_rank(agent: Agent) -> None:
    run = agent.new_run("sigstop")
    rc, st = agent.start(agent.spec(run, torchrun("ranks.py"), env={"JOB_SLEEP": "120"}))
    assert rc == 0, st
    pid = wait_for(lambda: _worker_of_rank(run, 1), 30.0)
    assert pid, marker_pids(run)
    os.kill(pid, signal.SIGSTOP)  # a hung rank, as the supervisor finds one
    started = time.monotonic()
    rc, out = agent.stop(run, grace=30.0)
    took = time.monotonic() - started
    assert rc == 0 and out["stopped"] and out["remaining_pids"] == [], out
    # Without the SIGCONT the stop ran the whole 30 s grace, then killed.
    assert took < 20.0, f"stop took {took:.1f}s"
    assert marker_pids(run) == []
