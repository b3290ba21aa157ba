"""Deterministic training for failover tests: the same weights whatever happens on the way.

Each step's gradient depends only on (step, rank), gradients are all-reduced over Gloo, and
state is saved with ava.ckpt every --ckpt-every steps; a new attempt resumes from the newest
committed checkpoint. Prints `resumed from step S`, `step N` and finally
`final step N sha256 HEX` on rank 0.
"""

import argparse
import hashlib
import os
import sys
import time

import torch
import torch.distributed as dist

from ava import ckpt, env

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=60)
parser.add_argument("--ckpt-every", type=int, default=10)
parser.add_argument("--step-time", type=float, default=0.2)
parser.add_argument("--hang-at", type=int, default=None, help="rank 0 of attempt 1 stops progressing here")
parser.add_argument("--slow-save-at", type=int, default=None, help="attempt 1: the save at this step takes 60 s")
args = parser.parse_args()

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
weights = torch.zeros(1000, dtype=torch.float64)
start = 0
found = ckpt.load_latest()
if found is not None:
    state, start = found
    weights = state["weights"]
    print(f"resumed from step {start}", flush=True)

for step in range(start + 1, args.steps + 1):
    if args.hang_at == step and rank == 0 and env.attempt() == 1:
        print("hanging on purpose", flush=True)
        while True:
            time.sleep(1)
    grad = torch.sin(torch.arange(1000, dtype=torch.float64) * (step % 17 + 1) + rank)
    dist.all_reduce(grad)
    weights -= 0.01 * grad / world
    time.sleep(args.step_time)
    if rank == 0:
        print(f"step {step}", flush=True)
    env.progress(step)
    if step % args.ckpt_every == 0 or step == args.steps:
        if args.slow_save_at == step and env.attempt() == 1 and rank == 0:
            # Stretch the save so a test can kill the writer in the middle of it.
            torch.save = (lambda original: (lambda *a, **k: (print("saving slowly", flush=True),
                                                            time.sleep(60), original(*a, **k))))(torch.save)
        ckpt.save({"weights": weights, "step": step}, step)
        if rank == 0:
            print(f"checkpoint {step}", flush=True)

if rank == 0:
    digest = hashlib.sha256(bytes(weights.clone().untyped_storage())).hexdigest()
    print(f"final step {args.steps} sha256 {digest}", flush=True)
dist.destroy_process_group()
