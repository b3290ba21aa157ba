"""Launch overhead on Slurm: `ava train` to every rank running, against `sbatch` of a hand-written
batch script that starts the same torchrun on the same nodes, side by side.

    python benchmarks/slurm_launch.py [--trials 3] [--nodes 2]

A real Slurm on the test cluster (tests/support/slurm.py: 3 nodes, n1 the login node). "Every
rank running" is the moment the first `ECHO` line of every rank (tests/data/recipes/echo, one
process per node) is there to see: in ava's output for ava; in the job's output file on the
shared filesystem (read every 50 ms) for the hand-written script. Both clocks start when the
command starts on this machine: `python -m ava train` for ava, `ssh LOGIN sbatch SCRIPT` for
the other. ava's first launch (code and agent not yet on the shared filesystem) is reported
apart. Trials alternate the two. Prints medians, every sample and ava/sbatch (target <= 1.2).
"""

from __future__ import annotations

import argparse
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

ECHO = REPO / "tests" / "data" / "recipes" / "echo"


def every_rank(lines: list[str], world: int) -> bool:
    ranks = {m.group(1) for line in lines if (m := re.search(r'ECHO \{"rank": (\d+)', line))}
    return len(ranks) >= world


def ava_trial(inventory: Path, nodes: int, home: Path) -> float:
    run = Stamped()
    argv = [sys.executable, "-m", "ava", "--inventory", str(inventory), "train", str(ECHO)]
    run.spawn("ava", [*argv, "--set", f"resources.nodes={nodes}"], env=clean_env(AVA_HOME=str(home)))
    ok = run.wait_for(lambda lines: every_rank([l.text for l in lines], nodes), timeout=180)
    at = run.first(lambda line: every_rank([line.text], 1)) if ok else None
    took = max((l.at for l in run.lines if "ECHO" in l.text), default=float("nan")) if ok else float("nan")
    run.finish(timeout=120)
    if not ok or at is None:
        raise SystemExit("ava never had every rank running:\n" + run.text()[-3000:])
    return took


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
        f"cd {shlex.quote(str(ECHO))}",
        f"srun {shlex.quote(python)} -m torch.distributed.run --nnodes {nodes} --nproc-per-node 1 "
        '--rdzv-backend c10d --rdzv-endpoint "$address:29511" --rdzv-id "$SLURM_JOB_ID" echo.py',
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
    started = time.perf_counter()
    subprocess.run(
        [*ssh, f"root@{login.address}", f"sbatch --parsable {shlex.quote(str(script))}"],
        check=True,
        capture_output=True,
    )
    while time.perf_counter() - started < 180:
        text = out.read_text(errors="replace") if out.exists() else ""
        if every_rank(text.splitlines(), nodes):
            took = time.perf_counter() - started
            wait_idle(slurm)
            return took
        time.sleep(0.05)
    raise SystemExit(f"the hand-written job never had every rank running: {out}")


def wait_idle(slurm: SlurmCluster) -> None:
    deadline = time.monotonic() + 60
    while slurm.sh("squeue", "-h").stdout.strip() and time.monotonic() < deadline:
        time.sleep(0.2)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=2)
    args = parser.parse_args(argv)
    clean_stale()
    with running_slurm(3) as slurm:
        inventory = slurm.inventory()
        home = slurm.cluster.root / "home"
        cold = ava_trial(inventory, args.nodes, home)
        wait_idle(slurm)
        ava_times, hand_times = [], []
        for number in range(args.trials):
            order = [("ava", None), ("sbatch", None)] if number % 2 == 0 else [("sbatch", None), ("ava", None)]
            for name, _ in order:
                if name == "ava":
                    ava_times.append(ava_trial(inventory, args.nodes, home))
                    wait_idle(slurm)
                else:
                    hand_times.append(sbatch_trial(slurm, args.nodes, number))
        table(
            ["launcher", "median", "samples (s)"],
            [
                ["ava train (first launch)", seconds(cold), "-"],
                ["ava train", seconds(median(ava_times)), spread(ava_times)],
                ["sbatch hand-written", seconds(median(hand_times)), spread(hand_times)],
            ],
            title=f"Slurm: start to every rank running, {args.nodes} nodes, {args.trials} trials (os.cpu_count()={os.cpu_count()})",
        )
        print(f"\nava / sbatch hand-written: {ratio(median(ava_times), median(hand_times))} (target <= 1.2)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main(sys.argv[1:]))
