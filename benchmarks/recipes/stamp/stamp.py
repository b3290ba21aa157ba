"""One line per rank, first thing: `STAMP {"rank": R, "time": T, "torchrun": S}`: T the wall clock
now, S when this rank's parent (torchrun) started, on the wall clock too (every test node shares
this machine's clock). Knows nothing of ava: the hand-written sbatch script of
benchmarks/slurm_launch.py starts it with torchrun too."""

import json
import os
import time


def started(pid: int) -> float:
    """A process's start on the wall clock, from /proc (clock ticks since boot)."""
    with open(f"/proc/{pid}/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        up = float(f.read().split()[0])
    return time.time() - up + ticks / os.sysconf("SC_CLK_TCK")


now = time.time()
line = {"rank": int(os.environ["RANK"]), "time": now, "torchrun": started(os.getppid())}
os.write(1, ("STAMP " + json.dumps(line) + "\n").encode())
