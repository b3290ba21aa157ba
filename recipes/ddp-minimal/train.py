"""The smallest DDP job: every rank says who it is, one all_reduce, a few DDP steps, exit 0.

A plain torchrun script (env:// rendezvous from RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT):

    python3 -m torch.distributed.run --standalone --nproc-per-node 2 train.py --steps 3

Gloo on CPU; NCCL on the GPU numbered LOCAL_RANK when CUDA is available. Test hooks:
`--fail-rank N` makes rank N exit 1, `--sleep S` sleeps S seconds in every step.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def say(line: str) -> None:
    """One write per line: ranks share stdout, and print() writes the newline separately."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="DDP steps to run")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep in each step")
    parser.add_argument("--fail-rank", type=int, default=None, help="this rank exits 1 on purpose")
    args = parser.parse_args()

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    say(f"rank {rank} world_size {world_size}")

    if args.fail_rank == rank:
        say(f"rank {rank} failing on purpose")
        sys.exit(1)

    # Every rank contributes its rank: the sum proves all of them took part.
    total = torch.tensor([float(rank)], device=device)
    dist.all_reduce(total)
    expected = world_size * (world_size - 1) / 2
    if total.item() != expected:
        say(f"rank {rank}: all_reduce gave {total.item()}, expected {expected}")
        return 1

    train(args.steps, args.sleep, rank, local_rank, device)
    leave_process_group()
    if rank == 0:
        say("done")
    return 0


def train(steps: int, sleep: float, rank: int, local_rank: int, device: torch.device) -> None:
    """A few DDP steps; the model (which holds the process group) is freed on return."""
    torch.manual_seed(0)
    model = DistributedDataParallel(
        torch.nn.Linear(8, 1).to(device), device_ids=[local_rank] if device.type == "cuda" else None
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(steps):
        x = torch.randn(16, 8, device=device)
        loss = (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0:
            say(f"step {step + 1} loss {loss.item():.4f}")
        if sleep:
            time.sleep(sleep)


def leave_process_group() -> None:
    """Exit cleanly. Gloo's worker threads drop their last work (and its tensors) after the
    collective returns; one still doing so while Python shuts down is killed taking the GIL, and
    the process aborts ("terminate called without an active exception", SIGABRT). So: every rank
    past its last collective, then the process group freed now, which joins those threads."""
    dist.barrier()
    gc.collect()  # whatever still refers to the group (a DDP model in a cycle) lets go of it
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
