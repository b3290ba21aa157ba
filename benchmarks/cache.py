"""Benchmark ava's node cache against plain reads, side by side on the same bytes, in one run.

    python benchmarks/cache.py [--size-mib 64] [--runs 5] [--index-blocks 100000] [--quick]
    python benchmarks/cache.py --server s3rver --netem 20ms,1gbit [--block-mib 8] [--readahead 8]

Starts moto's S3 server on loopback (its own process) and a counting proxy, then measures:
1. warm:  cached object read vs the same bytes in a plain local file (1 MiB reads, and one
          read() of the whole object); target >= 0.9x;
2. cold:  an empty cache vs s3fs open().read(), s3fs with concurrent 8 MiB ranges, fsspec
          blockcache and simplecache; target >= 0.9x the best direct s3fs read;
3. dedup: bytes fetched from S3 when 8 processes cold-read the object at once, ava vs blockcache;
4. bookkeeping: time a miss spends in the cache (lock, write, rename, count; no network) with
          `--index-blocks` blocks already cached; target <= 2 ms.
Medians of `--runs` runs; throughput in MiB/s. Loopback S3 is moto in Python, so cold figures
measure moto as much as the client: the ratios, not the absolute numbers, are the result. moto
copies the whole object for every ranged GET (an 8 MiB range costs ~0.5 ms more per MiB of object
size), so on moto one big GET (s3fs open().read()) beats concurrent block-sized ranges, which is
the opposite of real S3; the cold section therefore also prints the ratio against a direct s3fs
read making the same requests as the cache, and `--block-mib 64` shows the one-GET pattern.

`--server s3rver` measures against npm's s3rver instead (it streams a ranged GET from its file,
as S3 does), in a network namespace behind a veth pair shaped by `--netem RTT,RATE` (tc netem, or
where the kernel has no netem, tc tbf plus a delay line: tests/support/s3rver.py): the figures a
real object store's link gives. Needs root and `npm install --prefix /var/cache/ava-test-s3rver
s3rver`. The dedup section needs moto's counting proxy and is left out there. Cases run
interleaved (each once per round), and the cold section prints the client's CPU seconds per GiB:
on a machine whose cores are shared, a ratio follows CPU as much as the link.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import fsspec  # type: ignore[import-untyped]  # noqa: E402  # fsspec ships no type hints

from ava.cache import AvaCacheFileSystem  # noqa: E402
from ava.cache.store import BlockStore, ObjectId  # noqa: E402
from tests.support.s3rver import s3rver_server  # noqa: E402
from tests.support.s3server import Proxy, S3Endpoint, moto_server, s3_proxy  # noqa: E402

MiB = 1 << 20
Row = dict[str, Any]
BUCKET = "ava-bench"


def median_time(fn: Callable[[], object], runs: int, setup: Callable[[], None] | None = None) -> float:
    times = []
    for _ in range(runs):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_chunks(f: Any, n: int = MiB) -> int:
    total = 0
    while chunk := f.read(n):
        total += len(chunk)
    return total


def row(name: str, seconds: float, size: int, ref: float | None = None, note: str = "") -> Row:
    rate = size / MiB / seconds
    out: Row = {"case": name, "median_s": round(seconds, 4), "MiB_s": round(rate, 1)}
    if ref is not None:
        out["ratio"] = round(ref / seconds, 3)
    if note:
        out["vs"] = note
    print(
        f"  {name:<44} {seconds * 1000:9.1f} ms {rate:9.1f} MiB/s"
        + (f"   {ref / seconds:5.2f}x {note}" if ref is not None else "")
    )
    return out


def _read_closed(cfs: AvaCacheFileSystem, url: str, reader: Callable[[Any], object]) -> object:
    """Read through the cache and close the file, inside the timing: close() returns once every
    block the read fetched is written to the cache (blocks are written behind the reader)."""
    with cfs.open(url) as f:
        return reader(f)


def bench_warm(cfs: AvaCacheFileSystem, url: str, local: str, size: int, runs: int) -> list[Row]:
    print("warm read (object fully cached) vs the same bytes in a local file")
    with cfs.open(url) as f:
        f.read()
    out = []
    for label, reader in (("1 MiB reads", read_chunks), ("one read()", lambda f: f.read())):
        local_s, cache_s = [], []
        for _ in range(runs):  # interleaved, as in bench_cold
            local_s.append(median_time(lambda: reader(open(local, "rb", buffering=0)), 1))
            cache_s.append(median_time(lambda: _read_closed(cfs, url, reader), 1))
        t_local, t_cache = statistics.median(local_s), statistics.median(cache_s)
        out.append(row(f"local file, {label}", t_local, size))
        out.append(row(f"avacache warm, {label}", t_cache, size, t_local, "local file"))
    return out


def bench_cold(
    remote: Any, url: str, size: int, runs: int, work: Path, block: int, readahead: int | None = None
) -> list[Row]:
    print("cold read (nothing cached) vs direct s3fs and fsspec's caches")
    path = url[len("s3://") :]
    cases: dict[str, Callable[[], object]] = {}
    cases["s3fs open().read()"] = lambda: remote.open(path, "rb").read()

    def tuned() -> bytes:  # concurrent ranged GETs, one per cache block: the same requests
        starts = list(range(0, size, block))
        ends = [min(s + block, size) for s in starts]
        return b"".join(remote.cat_ranges([path] * len(starts), starts, ends))

    tuned_name = f"s3fs cat_ranges {block // MiB} MiB x concurrent"
    cases[tuned_name] = tuned
    store = work / "cold"

    def fresh() -> None:
        shutil.rmtree(store, ignore_errors=True)
        store.mkdir(parents=True)

    def fsspec_cache(kind: str) -> Callable[[], object]:
        return lambda: (
            fsspec.filesystem(kind, fs=remote, cache_storage=str(store), skip_instance_cache=True)
            .open(path, "rb")
            .read()
        )

    cases["fsspec blockcache read()"] = fsspec_cache("blockcache")
    cases["fsspec simplecache read()"] = fsspec_cache("simplecache")

    def ava(reader: Callable[[Any], object]) -> Callable[[], object]:
        return lambda: _read_closed(
            AvaCacheFileSystem(
                fs=remote, cache_dir=str(store), block_size=block, readahead=readahead, skip_instance_cache=True
            ),
            url,
            reader,
        )

    cases["avacache cold read()"] = ava(lambda f: f.read())
    cases["avacache cold 1 MiB reads (readahead)"] = ava(read_chunks)
    # Interleaved (every case once per round), so a change in the machine's load between rounds
    # moves every case alike and the ratios hold.
    samples: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}  # this process's CPU s, all threads
    for _ in range(runs):
        for name, fn in cases.items():
            before = time.process_time()
            samples[name].append(median_time(fn, 1, setup=fresh))
            cpu[name].append(time.process_time() - before)
    times = {name: statistics.median(values) for name, values in samples.items()}
    best_name = min(("s3fs open().read()", tuned_name), key=lambda n: times[n])
    best = times[best_name]
    out = [row(name, t, size, best, f"best direct s3fs ({best_name})") for name, t in times.items()]
    print("  client CPU per GiB read (this process, every thread; medians):")
    for name in cases:
        per_gib = statistics.median(cpu[name]) * (1 << 30) / size
        print(f"    {name:<42} {per_gib:6.2f} CPU s/GiB")
        out.append({"case": name, "cpu_s_per_gib": round(per_gib, 3)})
    print(f"  same requests as the cache ({tuned_name}):")
    for name in ("avacache cold read()", "avacache cold 1 MiB reads (readahead)"):
        print(f"    {name:<42} {times[tuned_name] / times[name]:5.2f}x")
        out.append({"case": name, "ratio_same_requests": round(times[tuned_name] / times[name], 3)})
    return out


READER = textwrap.dedent("""
    import hashlib, sys, time, fsspec
    import ava.cache
    kind, url, cache_dir, start_at = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    opts = {"avacache": {"cache_dir": cache_dir}} if kind == "avacache" else \\
        {"blockcache": {"cache_storage": cache_dir}}
    f = fsspec.open(f"{kind}::{url}", "rb", **opts).open()
    time.sleep(max(0.0, start_at - time.time()))
    h = hashlib.sha256()
    while chunk := f.read(1 << 20):
        h.update(chunk)
    print(h.hexdigest())
""")


def bench_dedup(s3: S3Endpoint, proxy: Proxy, url: str, data_sha: str, size: int, work: Path) -> list[Row]:
    print("8 processes cold-reading the object at once: bytes fetched from S3 / object size")
    out = []
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_", "AVA_"))}
    env.update(s3.env, FSSPEC_S3_ENDPOINT_URL=proxy.url, PYTHONPATH=str(REPO))
    for kind in ("avacache", "blockcache"):
        cache = work / f"dedup-{kind}"
        shutil.rmtree(cache, ignore_errors=True)
        proxy.reset()
        start_at = time.time() + 5.0
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", READER, kind, url, str(cache), str(start_at)],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(8)
        ]
        digests = [p.communicate(timeout=600)[0].strip() for p in procs]
        elapsed = time.time() - start_at
        fetched = proxy.stats()["get_bytes"]
        ok = sum(d == data_sha for d in digests)
        print(f"  {kind:<12} fetched {fetched / size:5.2f}x the object   exact reads {ok}/8   wall {elapsed:5.1f} s")
        out.append(
            {
                "case": f"8 readers {kind}",
                "fetched_over_size": round(fetched / size, 3),
                "exact_reads": ok,
                "wall_s": round(elapsed, 2),
            }
        )
    return out


def bench_bookkeeping(work: Path, nblocks: int, samples: int = 2000) -> list[Row]:
    print(f"bookkeeping per miss with {nblocks} blocks cached (in-memory fetch, no network)")
    root = work / "index"
    shutil.rmtree(root, ignore_errors=True)
    store = BlockStore(str(root), 1 << 50)
    payload = b"x" * 512
    t0 = time.perf_counter()
    per_object = 100  # spread over objects (and so over shard directories) as real data is
    for k in range(0, nblocks, per_object):
        obj = ObjectId(f"s3://bench/fill-{k}", "e", per_object * 512, 512)
        os.makedirs(os.path.dirname(store.block_path(obj, 0)), exist_ok=True)
        for i in range(min(per_object, nblocks - k)):  # set-up: commit directly, no lock dance
            store._commit(obj, i, store.block_path(obj, i), payload)
    fill = time.perf_counter() - t0
    miss = ObjectId("s3://bench/miss", "e", samples * 512, 512)
    times = []
    for i in range(samples):
        t = time.perf_counter()
        store.get(miss, i, lambda s, e: payload[: e - s]).close()
        times.append(time.perf_counter() - t)
    hits = []
    for i in range(samples):
        t = time.perf_counter()
        store.get(miss, i, lambda s, e: payload[: e - s]).close()
        hits.append(time.perf_counter() - t)
    t = time.perf_counter()
    store.rescan()  # what an eviction pass costs: one scan of every block file
    scan = time.perf_counter() - t
    times.sort()
    hits.sort()
    med, p99 = statistics.median(times), times[int(0.99 * len(times))]
    print(f"  miss: median {med * 1000:.3f} ms, p99 {p99 * 1000:.3f} ms   (target <= 2 ms)")
    print(f"  hit (open + pin + header check): median {statistics.median(hits) * 1000:.3f} ms")
    print(
        f"  eviction scan of {nblocks + samples} blocks: {scan:.2f} s "
        f"(once per (high-low) x size of misses); set-up {fill:.1f} s"
    )
    shutil.rmtree(root, ignore_errors=True)
    return [
        {
            "case": "miss bookkeeping",
            "blocks_cached": nblocks,
            "median_ms": round(med * 1000, 3),
            "p99_ms": round(p99 * 1000, 3),
            "hit_median_ms": round(statistics.median(hits) * 1000, 3),
            "scan_s": round(scan, 3),
        }
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--index-blocks", type=int, default=100_000)
    ap.add_argument("--block-mib", type=int, default=8, help="cache block size for the cold case")
    ap.add_argument("--readahead", type=int, help="cache readahead in blocks (default: the cache's own)")
    ap.add_argument("--server", choices=("moto", "s3rver"), default="moto")
    ap.add_argument("--netem", metavar="RTT,RATE", help='with --server s3rver: shape its link, e.g. "20ms,1gbit"')
    ap.add_argument("--quick", action="store_true", help="16 MiB, 3 runs, 10k blocks")
    ap.add_argument("--json", action="store_true", help="also print all rows as one JSON line")
    args = ap.parse_args()
    if args.quick:
        args.size_mib, args.runs, args.index_blocks = 16, 3, 10_000
    import s3fs  # type: ignore[import-untyped]  # s3fs ships no type hints

    load_start = _load()
    size = args.size_mib * MiB
    data = os.urandom(size)
    sha = hashlib.sha256(data).hexdigest()
    rows: list[Row] = []
    if args.server == "s3rver":
        with tempfile.TemporaryDirectory(prefix="ava-bench-") as tmp, s3rver_server(netem=args.netem) as shaped:
            work = Path(tmp)
            remote = s3fs.S3FileSystem(**shaped.s3fs_kwargs(skip_instance_cache=True))
            remote.pipe(f"{BUCKET}/obj.bin", data)
            url = f"s3://{BUCKET}/obj.bin"
            local = work / "local.bin"
            local.write_bytes(data)
            print(
                f"s3rver, link: {shaped.shaping}; object {args.size_mib} MiB, {args.runs} runs each, medians; "
                f"{os.cpu_count()} CPUs; block {args.block_mib} MiB, readahead {args.readahead or 'default'}"
            )
            warm_fs = AvaCacheFileSystem(fs=remote, cache_dir=str(work / "warm"), skip_instance_cache=True)
            rows += bench_warm(warm_fs, url, str(local), size, args.runs)
            rows += bench_cold(remote, url, size, args.runs, work, args.block_mib * MiB, args.readahead)
    else:
        with (
            tempfile.TemporaryDirectory(prefix="ava-bench-") as tmp,
            moto_server(process=True) as s3,
            s3_proxy(s3.url) as proxy,
        ):
            work = Path(tmp)
            remote = s3fs.S3FileSystem(**s3.s3fs_kwargs(skip_instance_cache=True))
            remote.mkdir(BUCKET)
            remote.pipe(f"{BUCKET}/obj.bin", data)
            url = f"s3://{BUCKET}/obj.bin"
            local = work / "local.bin"
            local.write_bytes(data)
            print(
                f"object {args.size_mib} MiB, {args.runs} runs each, medians; {os.cpu_count()} CPUs; cache under {tmp}"
            )
            warm_fs = AvaCacheFileSystem(fs=remote, cache_dir=str(work / "warm"), skip_instance_cache=True)
            rows += bench_warm(warm_fs, url, str(local), size, args.runs)
            rows += bench_cold(remote, url, size, args.runs, work, args.block_mib * MiB, args.readahead)
            rows += bench_dedup(s3, proxy, url, sha, size, work)
            rows += bench_bookkeeping(work, args.index_blocks)
    print(f"load average at the end: {_load()} (at the start: {load_start})")
    if args.json:
        print(json.dumps(rows))
    return 0


def _load() -> str:
    """The 1/5/15-minute load averages: on shared cores they say how far to trust a ratio."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    sys.exit(main())
