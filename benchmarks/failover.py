"""Failover timings on a real 4-node test cluster (3 in the run, 1 spare).

    python benchmarks/failover.py [--trials 3] [--goodput-every 15] [--faults "rank crash"] [--no-goodput]
                                  [--spares off|on|both]

For a rank crash (SIGKILL of one worker), a node kill (its sshd and every process) and a link cut:
  detect   = fault injected -> ava says the attempt failed (its verdict)
  teardown = that -> the attempt ended on every node ("attempt 1 ended")
  resume   = detection -> first training step printed by the new attempt
Then the effective training time ratio of a run with a rank crash injected every N seconds:
  productive time (the steps' own compute time, counted once) / wall time, beside an unfaulted run.
Medians over the trials; the machine is shared and noisy, so compare ratios, not absolutes.
--spares on runs the fault trials with spare torchrun interpreters (`[failover] warm_spares`, on by
default, see ava/agent/warm.py), off without; "warm" counts the nodes whose attempt 2 took its
torchrun from a spare. The goodput runs keep the default (spares on).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.cluster.test_failover import STEPS, LiveRun, run_id_of
from tests.conftest import (
    rank_pid,
    run_ava,
)
from tests.support.cluster import Cluster, clean_stale

MAIN = ["n1", "n2", "n3"]
STEP_TIME = 0.2


def worker_pid(run_id: str, rank: str) -> int | None:
    return rank_pid(run_id, rank)


def warm_nodes(cluster: Cluster, run_id: str) -> int:
    """How many nodes started attempt 2 from a spare (its status names the spare it used)."""
    found = 0
    for node in cluster.nodes:
        try:
            st = json.loads((node.workdir / "runs" / run_id / "attempt-2" / "status.json").read_text())
        except (OSError, ValueError):
            continue
        found += bool(st.get("from_spare"))
    return found


def one_trial(cluster: Cluster, fault: str, home: dict[str, str], spares: bool) -> tuple[float, float, float, int]:
    args = [
        "train",
        str(STEPS),
        "--set",
        f'run.args=["--steps", "400", "--ckpt-every", "10", "--step-time", "{STEP_TIME}"]',
        "--set",
        "checkpoint.dir=/tmp/ava-bench-ckpt/{run}",
        "--set",
        "failover.backoff=0s",
    ]
    args += ["--set", f"failover.warm_spares={'true' if spares else 'false'}"]
    # A local checkpoint dir per node works here because every test node shares this disk.
    run = LiveRun(args, cluster.inventory(MAIN + ["n4"]), home)
    run_id = None
    try:
        run_id = run_id_of(run)
        run.wait_line(r"\| step 12$", timeout=180)
        injected = time.monotonic()
        if fault == "rank crash":
            pid = worker_pid(run_id, "1")
            assert pid, "no worker of rank 1"
            os.kill(pid, signal.SIGKILL)
        elif fault == "node kill":
            cluster.kill_node("n2")
        else:
            cluster.cut_link("n2")
        # Known: the supervisor's verdict; ended: after its teardown of the attempt everywhere.
        detected, _ = run.wait_line(r"attempt 1 failed: ", timeout=120)
        ended, _ = run.wait_line(r"attempt 1 ended", timeout=120)
        marker = len(run.lines)
        run.wait_line(r"attempt 2 starting", timeout=120)
        deadline = time.monotonic() + 180
        resumed = None
        while resumed is None and time.monotonic() < deadline:
            for stamp, line in run.lines[marker:]:
                if re.search(r"\| step \d+$", line):
                    resumed = stamp
                    break
            time.sleep(0.05)
        assert resumed is not None, run.text()[-2000:]
        return detected - injected, ended - detected, resumed - detected, warm_nodes(cluster, run_id)
    finally:
        run.kill()
        cluster.restore_link("n2")
        cluster.restart_node("n2")
        if run_id:
            run_ava("stop", run_id, env=home, inventory=cluster.inventory(MAIN + ["n4"]))


def goodput(cluster: Cluster, home: dict[str, str], every: float, steps: int) -> tuple[float, float]:
    args = [
        "train",
        str(STEPS),
        "--set",
        f'run.args=["--steps", "{steps}", "--ckpt-every", "10", "--step-time", "{STEP_TIME}"]',
        "--set",
        "checkpoint.dir=/tmp/ava-bench-ckpt/{run}",
        "--set",
        "failover.backoff=0s",
        "--set",
        "failover.max_restarts=50",
    ]
    started = time.monotonic()
    run = LiveRun(args, cluster.inventory(MAIN), home)
    try:
        run_id = run_id_of(run)
        next_fault = started + every
        while run.process.poll() is None:
            if every and time.monotonic() >= next_fault:
                pid = worker_pid(run_id, "1")
                if pid:
                    os.kill(pid, signal.SIGKILL)
                next_fault = time.monotonic() + every
            time.sleep(0.2)
        assert run.finish() == 0, run.text()[-2000:]
    finally:
        run.kill()
    wall = time.monotonic() - started
    return wall, steps * STEP_TIME / wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--goodput-every", type=float, default=20.0, help="seconds between injected crashes")
    parser.add_argument("--goodput-steps", type=int, default=300)
    parser.add_argument("--faults", default="rank crash,node kill,link cut", help="which faults, comma-separated")
    parser.add_argument("--no-goodput", action="store_true", help="only the fault timings")
    parser.add_argument("--spares", choices=("off", "on", "both"), default="both", help="spare torchrun interpreters")
    options = parser.parse_args()
    clean_stale()
    cluster = Cluster(4)
    cluster.up()
    home = {"AVA_HOME": tempfile.mkdtemp(prefix="ava-bench-home-")}
    try:
        faults = [f.strip() for f in options.faults.split(",") if f.strip()]
        if not cluster.use_namespaces and "link cut" in faults:
            faults.remove("link cut")  # a cut needs a namespace per node (root)
        print(f"load before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
        print(
            f"{'fault':<12} {'spares':<7} {'detect s':>9} {'teardown s':>11} {'resume s':>9}"
            "   (medians; trials detect/teardown/resume/warm nodes)"
        )
        modes = {"off": [False], "on": [True], "both": [False, True]}[options.spares]
        for fault in faults:
            for spares in modes:
                results = [one_trial(cluster, fault, home, spares) for _ in range(options.trials)]
                detect, teardown, resume = (statistics.median(r[k] for r in results) for k in range(3))
                each = ", ".join(f"{d:.1f}/{t:.1f}/{r:.1f}/{w}" for d, t, r, w in results)
                mode = "on" if spares else "off"
                print(f"{fault:<12} {mode:<7} {detect:>9.2f} {teardown:>11.2f} {resume:>9.2f}   {each}", flush=True)
        print(f"load after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
        if options.no_goodput:
            return 0
        clean_wall, clean_ratio = goodput(cluster, home, 0, options.goodput_steps)
        faulty_wall, faulty_ratio = goodput(cluster, home, options.goodput_every, options.goodput_steps)
        print(f"\neffective training time ratio ({options.goodput_steps} steps of {STEP_TIME}s, productive/wall):")
        print(f"  no faults:                          {clean_ratio:.2f}  (wall {clean_wall:.0f}s)")
        print(
            f"  a rank crash every {options.goodput_every:.0f}s:             {faulty_ratio:.2f}  (wall {faulty_wall:.0f}s)"
        )
        print(f"  faulted / unfaulted:                {faulty_ratio / clean_ratio:.2f}")
    finally:
        cluster.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
