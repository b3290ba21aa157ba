"""How long ava.ckpt's async save blocks training, against a synchronous save of the same state.

    python benchmarks/ckpt_async.py [--size-mib 200] [--saves 5] [--gap 0] [--only local|s3]

A state of `--size-mib` MiB (a model-like dict of float32 tensors) is saved `--saves` times to
1. a local directory (torch.save, fsync, commit), and
2. the test S3 server (moto in its own process on loopback; async: staged on local disk, then
   uploaded as a multipart upload, then committed),
once synchronously and once with `async_=True`, interleaved (a sync save, then an async one, per
round), so a change in the machine's load moves both alike. The stall is the time save() blocks
the caller; for async saves each is measured after the previous one is committed (`ckpt.wait()`
outside the timing, or `--gap` seconds of pretend training), so it is the copy to host memory
alone. A first round, not counted, is printed on its own: the first async save also allocates
the host buffers every later save reuses. Prints medians, the stall's own CPU time (a stall far
above it was the process waiting for a core), the background time (save() to commit), a plain
`torch.save` of the same state to a file as a reference, and stall / sync save; target <= 0.10.
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


def plain_save(state: dict[str, Any], path: str) -> float:
    """What a user's own `torch.save(state, path)` costs (no checksum, no fsync, no commit)."""
    t0 = time.perf_counter()
    torch.save(state, path)
    seconds = time.perf_counter() - t0
    fd = os.open(path, os.O_RDONLY)  # outside the timing: its writeback must not load the next round
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return seconds


def measure(url: str, state: dict[str, Any], saves: int, gap: float, plain: str | None) -> dict[str, float]:
    sync, stalls, stall_cpu, background, plains = [], [], [], [], []
    first: dict[str, float] = {}
    for step in range(1, 2 * saves + 3, 2):  # a sync save and an async one per round
        t0 = time.perf_counter()
        ckpt.save(state, step, dir=url, keep=2)
        sync_s = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.thread_time()
        fut = ckpt.save(state, step + 1, dir=url, keep=2, async_=True)
        stall_s, cpu_s = time.perf_counter() - t0, time.thread_time() - c0
        if gap:
            time.sleep(gap)
        assert fut is not None and fut.result() == step + 1
        commit_s = time.perf_counter() - t0
        plain_s = plain_save(state, plain) if plain is not None else 0.0
        if step == 1:  # the first async save allocates the host buffers: shown, not counted
            first = {"first_sync_s": sync_s, "first_async_stall_s": stall_s}
            continue
        sync.append(sync_s)
        stalls.append(stall_s)
        stall_cpu.append(cpu_s)
        background.append(commit_s)
        plains.append(plain_s)
    ckpt.wait()
    loaded = ckpt.load_latest(dir=url)
    assert loaded is not None and loaded[1] == 2 * saves + 2, f"newest committed step: {loaded and loaded[1]}"
    out = {
        "sync_s": statistics.median(sync),
        "async_stall_s": statistics.median(stalls),
        "async_stall_cpu_s": statistics.median(stall_cpu),
        "async_commit_s": statistics.median(background),
        **first,
    }
    if plain is not None:
        out["plain_torch_save_s"] = statistics.median(plains)
    return out


def report(name: str, r: dict[str, float], size_mib: int) -> dict[str, Any]:
    ratio = r["async_stall_s"] / r["sync_s"]
    print(
        f"  {name:<16} sync save {r['sync_s'] * 1000:8.1f} ms ({size_mib / r['sync_s']:6.1f} MiB/s)"
        f"   async stall {r['async_stall_s'] * 1000:7.1f} ms (CPU {r['async_stall_cpu_s'] * 1000:5.1f} ms)"
        f"   async save-to-commit {r['async_commit_s'] * 1000:8.1f} ms"
        f"   stall/sync {ratio:5.3f}  {'ok' if ratio <= 0.10 else 'OVER 0.10'}"
    )
    print(
        f"  {'':<16} first round (not counted): sync {r['first_sync_s'] * 1000:.1f} ms, async stall "
        f"{r['first_async_stall_s'] * 1000:.1f} ms (allocates the host buffers later saves reuse)"
    )
    if "plain_torch_save_s" in r:
        plain = r["plain_torch_save_s"]
        print(
            f"  {'':<16} reference: plain torch.save to a file {plain * 1000:.1f} ms (no checksum, fsync or commit);"
            f" async stall / plain {r['async_stall_s'] / plain:5.3f}"
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
            f"state {size:.0f} MiB, {args.saves} saves each, medians; {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; local disk under {tmp}; load average {_load()}"
        )
        if args.only in (None, "local"):
            local = measure(f"{tmp}/ckpt", state, args.saves, args.gap, f"{tmp}/plain.pt")
            rows.append(report("local directory", local, args.size_mib))
        if args.only in (None, "s3"):
            import s3fs  # type: ignore[import-untyped]  # s3fs ships no type hints

            with moto_server(process=True) as s3:
                os.environ.update(s3.env)
                os.environ["AWS_ENDPOINT_URL"] = s3.url
                s3fs.S3FileSystem.clear_instance_cache()
                s3fs.S3FileSystem().mkdir("ckpt-bench")
                rows.append(
                    report(
                        "S3 (moto)", measure("s3://ckpt-bench/run", state, args.saves, args.gap, None), args.size_mib
                    )
                )
    print(f"load average at the end: {_load()}")
    if args.json:
        print(json.dumps(rows))
    return 0


def _load() -> str:
    """The 1/5/15-minute load averages: on shared cores they say how far to trust a ratio."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    sys.exit(main())
