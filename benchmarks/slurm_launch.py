"""Launch overhead on Slurm: `ava train` to every rank running, against `sbatch` of a hand-written
batch script that starts the same torchrun on the same nodes, side by side.

    python benchmarks/slurm_launch.py [--trials 5] [--nodes 2]

A real Slurm on the test cluster (tests/support/slurm.py: 3 nodes, n1 the login node). "Every
rank running" is one event for both sides: every rank of benchmarks/recipes/stamp (one process
per node) prints the wall-clock time it started (`STAMP {"rank": R, "time": T}`; the test nodes
share this machine's clock), and the latest of those times counts. Both clocks start when the
command starts on this machine: `python -m ava train` for ava, `ssh LOGIN sbatch SCRIPT` for the
other. How late ava's terminal shows the last STAMP line is reported apart ("seen"), as is ava's
first launch (agent and code not yet on the shared filesystem). Trials alternate the two; the
machine's load average is printed before and after. Prints medians, every sample, the median of
the per-trial ratios and the ratio of the medians (target <= 1.2), and where the time goes on
each side: when the job was submitted and allocated (slurmctld's log), when its step was launched
on the last node (slurmd's logs), when the last torchrun started and every rank ran (the stamps).
Slurm starts a submitted batch job at slurmctld's next pass, up to a second later on either side:
use enough trials. On a loaded machine every CPU-second either side spends slows it: compare
figures taken at the same load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from common import REPO, Stamped, clean_env, median, ratio, seconds, spread, table

from tests.support.cluster import clean_stale
from tests.support.slurm import SlurmCluster, running_slurm

STAMP = REPO / "benchmarks" / "recipes" / "stamp"
_STAMP = re.compile(r'STAMP (\{"rank": \d+, .*\})$')


def stamps(lines: list[str], key: str = "time") -> dict[int, float]:
    """Each rank's start time (wall clock) from its STAMP line; with KEY "torchrun", when its
    torchrun started."""
    return {rank: data[key] for rank, data in stamped(lines).items()}


def stamped(lines: list[str]) -> dict[int, dict[str, float]]:
    """Each rank's STAMP line: when it started and when its torchrun did (wall clock)."""
    found: dict[int, dict[str, float]] = {}
    for line in lines:
        if m := _STAMP.search(line):
            data = json.loads(m.group(1))
            found.setdefault(int(data["rank"]), {k: float(data[k]) for k in ("time", "torchrun")})
    return found


PHASES = (
    "submitted",
    "allocated",
    "step launched",
    "torchrun started",
    "every rank running",
)
_LOGGED = re.compile(r"^\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)\] (.*)$")


def logged(path: Path, text: str) -> list[float]:
    """When Slurm's log at PATH wrote a line holding TEXT (wall clock, ms)."""
    found = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        if (m := _LOGGED.match(line)) and text in m.group(2):
            found.append(datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%f").timestamp())
    return found


def phases(slurm: SlurmCluster, job: str, began: float, found: dict[int, dict[str, float]]) -> dict[str, float]:
    """Seconds from the start to each step of the launch: the job submitted and allocated
    (slurmctld's log), its step launched on the last node (slurmd's logs), the last torchrun
    started, every rank running (the ranks' stamps)."""
    launched = [t for path in slurm.dir.glob("slurmd-*.log") for t in logged(path, f"launch task StepId={job}.0 ")]
    at = {
        "submitted": min(
            logged(slurm.dir / "slurmctld.log", f"submit_batch_job: JobId={job} "),
            default=math.nan,
        ),
        "allocated": min(
            logged(slurm.dir / "slurmctld.log", f"Allocate JobId={job} "),
            default=math.nan,
        ),
        "step launched": max(launched, default=math.nan),
        "torchrun started": max(s["torchrun"] for s in found.values()),
        "every rank running": max(s["time"] for s in found.values()),
    }
    return {name: value - began for name, value in at.items()}


def ava_trial(inventory: Path, nodes: int, home: Path, slurm: SlurmCluster) -> tuple[float, float, dict[str, float]]:
    """Seconds from `ava train` to every rank running, to ava's terminal showing it, and to
    each step of the launch."""
    run = Stamped()
    argv = [
        sys.executable,
        "-m",
        "ava",
        "--inventory",
        str(inventory),
        "train",
        str(STAMP),
    ]
    began = time.time()
    run.spawn(
        "ava",
        [*argv, "--set", f"resources.nodes={nodes}"],
        env=clean_env(AVA_HOME=str(home)),
    )
    ok = run.wait_for(lambda lines: len(stamps([l.text for l in lines])) >= nodes, timeout=180)
    seen = max((l.at for l in run.lines if "STAMP" in l.text), default=float("nan"))
    run.finish(timeout=120)
    found = stamps([l.text for l in run.lines])
    if not ok or len(found) < nodes:
        raise SystemExit("ava never had every rank running:\n" + run.text()[-3000:])
    job = re.search(r"Slurm job (\d+)", run.text())
    steps = phases(slurm, job.group(1), began, stamped([l.text for l in run.lines])) if job else {}
    return max(found.values()) - began, seen, steps


def hand_script(slurm: SlurmCluster, nodes: int, out: str) -> str:
    python = slurm.cluster.python
    lines = [
        "#!/bin/bash",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=1",
        f"#SBATCH --output={out}",
        'master=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        'address=$(scontrol show node -o "$master" | grep -o "NodeAddr=[^ ]*" | cut -d= -f2)',
        f"cd {shlex.quote(str(STAMP))}",
        f"srun {shlex.quote(python)} -m torch.distributed.run --nnodes {nodes} --nproc-per-node 1 "
        '--rdzv-backend c10d --rdzv-endpoint "$address:29511" --rdzv-id "$SLURM_JOB_ID" stamp.py',
    ]
    return "\n".join(lines) + "\n"


def sbatch_trial(slurm: SlurmCluster, nodes: int, number: int) -> tuple[float, dict[str, float]]:
    folder = slurm.shared / "hand"
    folder.mkdir(exist_ok=True)
    out = folder / f"out-{number}.txt"
    script = folder / f"job-{number}.sbatch"
    script.write_text(hand_script(slurm, nodes, str(out)))
    cluster, login = slurm.cluster, slurm.node(slurm.login)
    ssh = [
        "ssh",
        "-i",
        str(cluster.key),
        "-o",
        f"UserKnownHostsFile={cluster.known_hosts}",
        "-o",
        "BatchMode=yes",
    ]
    began = time.time()
    job = subprocess.run(
        [
            *ssh,
            f"root@{login.address}",
            f"sbatch --parsable {shlex.quote(str(script))}",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    while time.time() - began < 180:
        found = stamped(out.read_text(errors="replace").splitlines() if out.exists() else [])
        if len(found) >= nodes:
            wait_idle(slurm)
            return max(s["time"] for s in found.values()) - began, phases(slurm, job, began, found)
        time.sleep(0.05)
    raise SystemExit(f"the hand-written job never had every rank running: {out}")


def step_table(steps: dict[str, list[dict[str, float]]]) -> None:
    """Medians of when each launch step ended, and of how long it took, side by side."""
    rows = []
    for number, name in enumerate(PHASES):
        row = [name]
        for side in ("ava", "sbatch"):
            at = [s.get(name, math.nan) for s in steps[side]]
            before = [s.get(PHASES[number - 1], math.nan) if number else 0.0 for s in steps[side]]
            row += [
                seconds(median(at)),
                seconds(median([a - b for a, b in zip(at, before)])),
            ]
        rows.append(row)
    table(
        ["step (from the start)", "ava: at", "ava: took", "sbatch: at", "sbatch: took"],
        rows,
        title="Where the time goes: medians (submitted and allocated from slurmctld's log, the step from "
        "slurmd's, torchrun and the ranks from their stamps)",
    )


def load() -> str:
    return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def wait_idle(slurm: SlurmCluster) -> None:
    deadline = time.monotonic() + 60
    while slurm.sh("squeue", "-h").stdout.strip() and time.monotonic() < deadline:
        time.sleep(0.2)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--nodes", type=int, default=2)
    args = parser.parse_args(argv)
    clean_stale()
    with running_slurm(3) as slurm:
        inventory = slurm.inventory()
        home = slurm.cluster.root / "home"
        cold, _, _ = ava_trial(inventory, args.nodes, home, slurm)
        wait_idle(slurm)
        before = load()
        ava_times: list[float] = []
        seen_times: list[float] = []
        hand_times: list[float] = []
        steps: dict[str, list[dict[str, float]]] = {"ava": [], "sbatch": []}
        for number in range(args.trials):
            for name in ("ava", "sbatch") if number % 2 == 0 else ("sbatch", "ava"):
                if name == "ava":
                    took, seen, launch = ava_trial(inventory, args.nodes, home, slurm)
                    ava_times.append(took)
                    seen_times.append(seen)
                    steps["ava"].append(launch)
                    wait_idle(slurm)
                else:
                    took, launch = sbatch_trial(slurm, args.nodes, number)
                    hand_times.append(took)
                    steps["sbatch"].append(launch)
        after = load()
        table(
            ["launcher", "median", "samples (s)"],
            [
                ["ava train (first launch)", seconds(cold), "-"],
                ["ava train", seconds(median(ava_times)), spread(ava_times)],
                [
                    "  its terminal shows it",
                    seconds(median(seen_times)),
                    spread(seen_times),
                ],
                [
                    "sbatch hand-written",
                    seconds(median(hand_times)),
                    spread(hand_times),
                ],
            ],
            title=f"Slurm: start to every rank running, {args.nodes} nodes, {args.trials} trials "
            f"(os.cpu_count()={os.cpu_count()})",
        )
        step_table(steps)
        pairs = [a / h for a, h in zip(ava_times, hand_times, strict=True)]
        print(f"\nmachine: {before} before, {after} after")
        print(f"ava / sbatch hand-written, per trial: {', '.join(f'{r:.2f}' for r in pairs)}")
        print(
            f"ava / sbatch hand-written: {ratio(median(ava_times), median(hand_times))} (medians), "
            f"{median(pairs):.2f} (median of the trials' ratios) (target <= 1.2)"
        )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main(sys.argv[1:]))
