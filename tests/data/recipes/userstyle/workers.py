"""A torchrun script of the common shape: a DataLoader with worker processes and a
DistributedSampler, checkpoints written by rank 0 to a relative `checkpoints/` directory and
picked up from there when the script starts again. Nothing in it knows of ava."""

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler


class Squares(Dataset):
    def __len__(self):
        return 512

    def __getitem__(self, i):
        x = torch.tensor([i / 512.0])
        return x, x * x


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    start = 0
    if os.path.exists("checkpoints/last.pt"):
        state = torch.load("checkpoints/last.pt")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["epoch"] + 1
        print(f"rank {rank}: resumed at epoch {start}", flush=True)
    ddp = nn.parallel.DistributedDataParallel(model)
    sampler = DistributedSampler(Squares())
    loader = DataLoader(Squares(), batch_size=16, sampler=sampler, num_workers=args.workers,
                        persistent_workers=True)
    for epoch in range(start, args.epochs):
        sampler.set_epoch(epoch)
        total = 0.0
        for x, y in loader:
            loss = nn.functional.mse_loss(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
            time.sleep(0.03)
        if rank == 0:
            os.makedirs("checkpoints", exist_ok=True)
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "epoch": epoch},
                       "checkpoints/last.pt.tmp")
            os.replace("checkpoints/last.pt.tmp", "checkpoints/last.pt")
            print(f"epoch {epoch} loss {total:.4f} saved checkpoint", flush=True)
        dist.barrier()
    print(f"rank {rank}: done", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
