"""benchmarks/gpu_check.py's job: an NCCL all-reduce measured the nccl-tests way, or a device probe.

    torchrun ... allreduce.py bench --sizes 1M,256M,1G [--hold SECONDS]
    python allreduce.py open /dev/nvidia0 /dev/nvidia1 [--hold SECONDS]

bench: one rank per GPU (env:// from torchrun or ava), each on cuda:LOCAL_RANK (with --backend
gloo, on CPU: gpu_check.py --simulate on a machine without a GPU). Per message size
(float32): warm-up, then the mean time of a number of in-place all-reduces, the slowest rank's;
algbw = bytes / time, busbw = algbw * 2(n-1)/n (nccl-tests' all_reduce_perf; 0 on one rank); and
`copy`, bytes / time of a device-to-device copy of the same buffer (what one rank can compare).
Rank 0 prints one line `GPUCHECK {json}`; with --hold every rank then keeps its GPU that long
(printing `GPUCHECK-HOLDING` first), for a lease another run must be refused.

open: no torch and no CUDA; opens each device file read-write and prints `GPUCHECK-OPEN {json}`
with "opened" or the errno name per path (EPERM: the devices cgroup refused it).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from typing import Any

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def size_of(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in UNITS:
        return int(float(text[:-1]) * UNITS[text[-1]])
    return int(text)


def iterations(size: int) -> int:
    # Enough repeats to average out small messages, few for big ones: bounded total time.
    return max(5, min(50, (4 << 30) // max(size, 1)))


def bench(sizes: list[int], hold: float, backend: str) -> None:
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:  # gloo: gpu_check.py --simulate, on a machine without a GPU
        device = torch.device("cpu")
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rows: list[dict[str, Any]] = []
    for size in sizes:
        count = max(1, size // 4)
        data = torch.ones(count, dtype=torch.float32, device=device)
        for _ in range(3):  # warm-up: connections, channels, algorithm choice
            dist.all_reduce(data)
        sync()
        dist.barrier()
        repeats = iterations(size)
        started = time.perf_counter()
        for _ in range(repeats):
            dist.all_reduce(data)
        sync()
        reduced = (time.perf_counter() - started) / repeats
        # A device-to-device copy of the same buffer: on one rank the all-reduce moves nothing,
        # so this is what says whether the GPU runs as fast inside ava's cgroup as outside.
        target = torch.empty_like(data)
        for _ in range(2):
            target.copy_(data)
        sync()
        started = time.perf_counter()
        for _ in range(repeats):
            target.copy_(data)
        sync()
        copied = (time.perf_counter() - started) / repeats
        means = torch.tensor([reduced, copied], dtype=torch.float64, device=device)
        dist.all_reduce(means, op=dist.ReduceOp.MAX)
        seconds, copy_seconds = (float(v) for v in means.tolist())
        algbw = count * 4 / seconds
        busbw = algbw * 2 * (world - 1) / world
        rows.append(
            {
                "size": count * 4,
                "iterations": repeats,
                "seconds": seconds,
                "algbw": algbw,
                "busbw": busbw,
                "copy": count * 4 / copy_seconds,
            }
        )
        del data, target
    if rank == 0:
        result = {
            "world": world,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "backend": backend,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            # torch.cuda.nccl.version() has no annotations in torch itself.
            "nccl": ".".join(str(v) for v in torch.cuda.nccl.version()) if backend == "nccl" else None,  # type: ignore[no-untyped-call]
            "torch": torch.__version__,
            "rows": rows,
        }
        print("GPUCHECK " + json.dumps(result), flush=True)
    if hold > 0:
        print(f"GPUCHECK-HOLDING rank {rank}", flush=True)
        time.sleep(hold)
    dist.destroy_process_group()


def probe(paths: list[str], hold: float) -> None:
    seen = {}
    for path in paths:
        try:
            os.close(os.open(path, os.O_RDWR))
            seen[path] = "opened"
        except OSError as error:
            seen[path] = errno.errorcode.get(error.errno or 0, str(error.errno))
    print(
        "GPUCHECK-OPEN " + json.dumps({"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "paths": seen})
    )
    sys.stdout.flush()
    if hold > 0:
        time.sleep(hold)


def main() -> None:
    parser = argparse.ArgumentParser(description="NCCL all-reduce bus bandwidth, or a GPU device probe")
    parser.add_argument("mode", choices=["bench", "open"])
    parser.add_argument("paths", nargs="*", help="open: the device files to try")
    parser.add_argument("--sizes", default="1M,64M,256M,1G", help="bench: message sizes, comma-separated")
    parser.add_argument("--hold", type=float, default=0.0, help="seconds to keep the GPU (or run) afterwards")
    parser.add_argument("--backend", choices=["nccl", "gloo"], default="nccl", help="bench: gloo runs on CPU")
    options = parser.parse_args()
    if options.mode == "bench":
        bench([size_of(s) for s in options.sizes.split(",") if s.strip()], options.hold, options.backend)
    else:
        probe(options.paths, options.hold)


if __name__ == "__main__":
    main()
