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
the per-trial ratios and the ratio of the medians (target <= 1.2). Slurm starts a submitted batch
job at slurmctld's next pass, up to a second later on either side: use enough trials.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, Stamped, clean_env, median, ratio, seconds, spread, table

from tests.support.cluster import clean_stale
from tests.support.slurm import SlurmCluster, running_slurm

STAMP = REPO / "benchmarks" / "recipes" / "stamp"
_STAMP = re.compile(r'STAMP (\{"rank": \d+, .*\})$')


def stamps(lines: list[str], key: str = "time") -> dict[int, float]:
    """Each rank's start time (wall clock) from its STAMP line; with KEY "torchrun", when its
    torchrun started."""
    found = {}
    for line in lines:
        if m := _STAMP.search(line):
            data = json.loads(m.group(1))
            found.setdefault(int(data["rank"]), float(data[key]))
    return found


def ava_trial(inventory: Path, nodes: int, home: Path) -> tuple[float, float]:
    """Seconds from `ava train` to every rank running, and to ava's terminal showing it."""
    run = Stamped()
    argv = [sys.executable, "-m", "ava", "--inventory", str(inventory), "train", str(STAMP)]
    began = time.time()
    run.spawn("ava", [*argv, "--set", f"resources.nodes={nodes}"], env=clean_env(AVA_HOME=str(home)))
    ok = run.wait_for(lambda lines: len(stamps([l.text for l in lines])) >= nodes, timeout=180)
    seen = max((l.at for l in run.lines if "STAMP" in l.text), default=float("nan"))
    run.finish(timeout=120)
    found = stamps([l.text for l in run.lines])
    if not ok or len(found) < nodes:
        raise SystemExit("ava never had every rank running:\n" + run.text()[-3000:])
    return max(found.values()) - began, seen


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


def sbatch_trial(slurm: SlurmCluster, nodes: int, number: int) -> float:
    folder = slurm.shared / "hand"
    folder.mkdir(exist_ok=True)
    out = folder / f"out-{number}.txt"
    script = folder / f"job-{number}.sbatch"
    script.write_text(hand_script(slurm, nodes, str(out)))
    cluster, login = slurm.cluster, slurm.node(slurm.login)
    ssh = ["ssh", "-i", str(cluster.key), "-o", f"UserKnownHostsFile={cluster.known_hosts}", "-o", "BatchMode=yes"]
    began = time.time()
    subprocess.run(
        [*ssh, f"root@{login.address}", f"sbatch --parsable {shlex.quote(str(script))}"],
        check=True,
        capture_output=True,
    )
    while time.time() - began < 180:
        found = stamps(out.read_text(errors="replace").splitlines() if out.exists() else [])
        if len(found) >= nodes:
            wait_idle(slurm)
            return max(found.values()) - began
        time.sleep(0.05)
    raise SystemExit(f"the hand-written job never had every rank running: {out}")


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
        cold, _ = ava_trial(inventory, args.nodes, home)
        wait_idle(slurm)
        before = load()
        ava_times: list[float] = []
        seen_times: list[float] = []
        hand_times: list[float] = []
        for number in range(args.trials):
            for name in ("ava", "sbatch") if number % 2 == 0 else ("sbatch", "ava"):
                if name == "ava":
                    took, seen = ava_trial(inventory, args.nodes, home)
                    ava_times.append(took)
                    seen_times.append(seen)
                    wait_idle(slurm)
                else:
                    hand_times.append(sbatch_trial(slurm, args.nodes, number))
        after = load()
        table(
            ["launcher", "median", "samples (s)"],
            [
                ["ava train (first launch)", seconds(cold), "-"],
                ["ava train", seconds(median(ava_times)), spread(ava_times)],
                ["  its terminal shows it", seconds(median(seen_times)), spread(seen_times)],
                ["sbatch hand-written", seconds(median(hand_times)), spread(hand_times)],
            ],
            title=f"Slurm: start to every rank running, {args.nodes} nodes, {args.trials} trials "
            f"(os.cpu_count()={os.cpu_count()})",
        )
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
