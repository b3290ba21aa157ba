"""Prints its arguments and AVA_T_* environment as JSON, then optionally sleeps or fails.

Knows nothing of ava: a plain torchrun script (it does not even init a process group unless
asked to with ECHO_COLLECTIVE=1).
"""

import json
import os
import sys
import time

rank = int(os.environ["RANK"])
print("ECHO " + json.dumps({
    "rank": rank,
    "world": int(os.environ["WORLD_SIZE"]),
    "argv": sys.argv[1:],
    "env": {k: v for k, v in os.environ.items() if k.startswith("AVA_T_")},
    "ava": {k: os.environ.get(k) for k in ("AVA_RUN_ID", "AVA_ATTEMPT", "AVA_NODE", "AVA_CHECKPOINT_DIR")},
    "pid": os.getpid(),
}), flush=True)
if os.environ.get("ECHO_COLLECTIVE") == "1":
    import torch.distributed as dist

    dist.init_process_group("gloo")
    dist.barrier()
sleep = float(os.environ.get("ECHO_SLEEP", "0"))
deadline = time.time() + sleep
while time.time() < deadline:
    print(f"tick {rank}", flush=True)
    time.sleep(0.5)
if os.environ.get("ECHO_FAIL_RANK") == str(rank):
    print(f"rank {rank} failing on purpose", flush=True)
    sys.exit(int(os.environ.get("ECHO_EXIT", "1")))
print(f"done {rank}", flush=True)
