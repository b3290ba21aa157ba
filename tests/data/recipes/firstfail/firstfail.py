"""Rank FIRSTFAIL_RANK (default 1) raises once every rank is in the job (or, with
FIRSTFAIL_MODE=oom, allocates until the OOM killer ends it); the others are in an all-reduce with
it at that moment and die of the closed connection right after. A plain torchrun script."""

import os
import time

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank = dist.get_rank()
dist.barrier()
if rank == int(os.environ.get("FIRSTFAIL_RANK", "1")):
    time.sleep(0.5)  # the others are blocked in the all-reduce below by now
    if os.environ.get("FIRSTFAIL_MODE") == "oom":
        # Touch memory until the kernel's OOM killer ends this rank (resources.memory).
        hoard = []
        while True:
            hoard.append(b"\x01" * (32 << 20))
    raise RuntimeError(f"rank {rank} broke first")
try:
    dist.all_reduce(torch.ones(4))
except RuntimeError as error:
    # Dies of the lost peer at once, on its own and with the same exit code: the trap a
    # summary falls into when it blames the lowest failing rank.
    print(f"rank {rank} lost its peer: {str(error).splitlines()[0]}", flush=True)
    os._exit(1)
print(f"rank {rank} never gets here", flush=True)
