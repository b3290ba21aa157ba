"""How long ava.ckpt's async save blocks training, against a synchronous save of the same state.

    python benchmarks/ckpt_async.py [--size-mib 200] [--saves 5] [--gap 0] [--only local|s3]

A state of `--size-mib` MiB (a model-like dict of float32 tensors) is saved `--saves` times to
1. a local directory (torch.save, fsync, commit), and
2. the test S3 server (moto in its own process on loopback; async: staged on local disk, then
   uploaded as a multipart upload, then committed),
once synchronously and once with `async_=True`. The stall is the time save() blocks the caller;
for async saves each is measured after the previous one is committed (`ckpt.wait()` outside the
timing, or `--gap` seconds of pretend training), so it is the copy to host memory alone. Prints
medians, the background time (save() to commit) and stall / sync save; target <= 0.10.
`--threads` (default 1, as recipes set OMP_NUM_THREADS=1): on a machine whose cores are busy
with other work, torch's parallel copy waits for descheduled threads and the stall grows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from ava import ckpt  # noqa: E402
from tests.support.s3server import moto_server  # noqa: E402

MiB = 1 << 20


def model_state(size_mib: int) -> dict[str, Any]:
    """Layers of 4 MiB float32 weights (plus an optimizer-like step counter) totalling size_mib."""
    layers = max(1, size_mib // 4)
    return {
        "model": {f"layer{i}.weight": torch.randn(1024, 1024) for i in range(layers)},
        "step": 0,
    }


def measure(url: str, state: dict[str, Any], saves: int, gap: float) -> dict[str, float]:
    sync, stalls, background = [], [], []
    step = 1
    for _ in range(saves):
        t0 = time.perf_counter()
        ckpt.save(state, step, dir=url, keep=2)
        sync.append(time.perf_counter() - t0)
        step += 1
    for _ in range(saves):
        t0 = time.perf_counter()
        fut = ckpt.save(state, step, dir=url, keep=2, async_=True)
        stalls.append(time.perf_counter() - t0)
        if gap:
            time.sleep(gap)
        assert fut is not None and fut.result() == step
        background.append(time.perf_counter() - t0)
        step += 1
    ckpt.wait()
    loaded = ckpt.load_latest(dir=url)
    assert loaded is not None and loaded[1] == step - 1, f"newest committed step: {loaded and loaded[1]}"
    return {
        "sync_s": statistics.median(sync),
        "async_stall_s": statistics.median(stalls),
        "async_commit_s": statistics.median(background),
    }


def report(name: str, r: dict[str, float], size_mib: int) -> dict[str, Any]:
    ratio = r["async_stall_s"] / r["sync_s"]
    print(
        f"  {name:<16} sync save {r['sync_s'] * 1000:8.1f} ms ({size_mib / r['sync_s']:6.1f} MiB/s)"
        f"   async stall {r['async_stall_s'] * 1000:7.1f} ms   async save-to-commit {r['async_commit_s'] * 1000:8.1f} ms"
        f"   stall/sync {ratio:5.3f}  {'ok' if ratio <= 0.10 else 'OVER 0.10'}"
    )
    return {"target": name, **{k: round(v, 4) for k, v in r.items()}, "stall_over_sync": round(ratio, 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=200)
    ap.add_argument("--saves", type=int, default=5)
    ap.add_argument("--gap", type=float, default=0.0, help="seconds of pretend training after each async save")
    ap.add_argument("--only", choices=("local", "s3"))
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (recipes set OMP_NUM_THREADS=1; 0 = torch's default)",
    )
    ap.add_argument("--json", action="store_true", help="also print the rows as one JSON line")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    state = model_state(args.size_mib)
    size = sum(t.numel() * t.element_size() for t in state["model"].values()) / MiB
    rows = []
    with tempfile.TemporaryDirectory(prefix="ava-ckpt-bench-") as tmp:
        os.environ[ckpt.STAGING_ENV] = f"{tmp}/staging"
        print(
            f"state {size:.0f} MiB, {args.saves} saves each, medians; {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; local disk under {tmp}"
        )
        if args.only in (None, "local"):
            rows.append(report("local directory", measure(f"{tmp}/ckpt", state, args.saves, args.gap), args.size_mib))
        if args.only in (None, "s3"):
            import s3fs  # type: ignore[import-untyped]  # s3fs ships no type hints

            with moto_server(process=True) as s3:
                os.environ.update(s3.env)
                os.environ["AWS_ENDPOINT_URL"] = s3.url
                s3fs.S3FileSystem.clear_instance_cache()
                s3fs.S3FileSystem().mkdir("ckpt-bench")
                rows.append(
                    report("S3 (moto)", measure("s3://ckpt-bench/run", state, args.saves, args.gap), args.size_mib)
                )
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
