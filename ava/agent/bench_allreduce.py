"""An all-reduce benchmark across nodes, one process per node: standard library and torch.

Run by the agent (`bench-allreduce ARGS_JSON`, see programs.py) on every node at once for
`ava doctor --bandwidth`. Measures like nccl-tests' all_reduce_perf: per message size the slowest
rank's mean time, algorithm bandwidth = bytes / time, bus bandwidth = algbw * 2(n-1)/n. Then rank 0
exchanges a large message with each other rank in turn, so one node with a slow link stands out.
Rank 0 prints one JSON object; the other ranks print `{"rank": R}`. torch is imported inside
main() only, so this module stays importable where torch is not installed.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any


def iterations(size: int) -> int:
    # Enough repeats to average out small messages, few for big ones: bounded total time.
    return max(3, min(20, (64 << 20) // max(size, 1)))


def main(args: dict[str, Any]) -> dict[str, Any]:
    if args.get("interface"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", args["interface"])
        os.environ.setdefault("NCCL_SOCKET_IFNAME", args["interface"])
    import torch
    import torch.distributed as dist

    rank, world, backend = int(args["rank"]), int(args["world"]), str(args["backend"])
    dist.init_process_group(
        backend,
        init_method=f"tcp://{args['master']}:{int(args['port'])}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=float(args.get("timeout", 60))),
    )
    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rows = []
    try:
        for size in args["sizes"]:
            count = max(1, size // 4)
            data = torch.ones(count, dtype=torch.float32, device=device)
            for _ in range(2):  # warm-up: connections, allocator, algorithm choice
                dist.all_reduce(data)
            sync()
            dist.barrier()
            repeats = iterations(size)
            started = time.perf_counter()
            for _ in range(repeats):
                dist.all_reduce(data)
            sync()
            mean = torch.tensor([(time.perf_counter() - started) / repeats], dtype=torch.float64, device=device)
            dist.all_reduce(mean, op=dist.ReduceOp.MAX)
            rows.append({"size": count * 4, "count": count, "seconds": float(mean.item())})
        links = {}
        payload = torch.ones(max(1, int(args.get("pair_bytes", 16 << 20)) // 4), dtype=torch.float32, device=device)
        for peer in range(1, world):
            dist.barrier()
            if rank == 0:
                dist.send(payload, peer)  # warm the pair's connection
                dist.recv(payload, peer)
                sync()
                started = time.perf_counter()
                for _ in range(3):
                    dist.send(payload, peer)
                    dist.recv(payload, peer)
                sync()
                links[peer] = 6 * payload.numel() * 4 / (time.perf_counter() - started)
            elif rank == peer:
                for _ in range(4):
                    dist.recv(payload, 0)
                    dist.send(payload, 0)
                sync()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return {"rank": rank}
    return {"rank": 0, "backend": backend, "world": world, "rows": rows, "links": links}
