"""Prints its arguments and AVA_T_* environment as JSON, then optionally sleeps or fails.

Knows nothing of ava: a plain torchrun script (it does not even init a process group unless
asked to with ECHO_COLLECTIVE=1).
"""

import json
import os
import sys
import time


def say(line: str) -> None:
    # One write per line: processes sharing the output file never splice each other's lines.
    os.write(1, (line + "\n").encode())


rank = int(os.environ["RANK"])
say("ECHO " + json.dumps({
    "rank": rank,
    "world": int(os.environ["WORLD_SIZE"]),
    "argv": sys.argv[1:],
    "env": {k: v for k, v in os.environ.items() if k.startswith("AVA_T_")},
    "ava": {k: os.environ.get(k) for k in ("AVA_RUN_ID", "AVA_ATTEMPT", "AVA_NODE", "AVA_CHECKPOINT_DIR")},
    "pid": os.getpid(),
}))
if os.environ.get("ECHO_COLLECTIVE") == "1":
    import torch.distributed as dist

    dist.init_process_group("gloo")
    dist.barrier()
sleep = float(os.environ.get("ECHO_SLEEP", "0"))
deadline = time.time() + sleep
while time.time() < deadline:
    say(f"tick {rank}")
    time.sleep(0.5)
if os.environ.get("ECHO_FAIL_RANK") == str(rank):
    say(f"rank {rank} failing on purpose")
    sys.exit(int(os.environ.get("ECHO_EXIT", "1")))
say(f"done {rank}")
