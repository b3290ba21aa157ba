"""Block store behaviour on a real filesystem: LRU order, size bound, pinning, rebuild, faults.

The remote side here is a plain function returning known bytes (pure logic); reading through
a real S3 API is covered in test_cache_s3.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ava.cache.store import BlockStore, ObjectId, verify_block_file

REPO = Path(__file__).resolve().parents[2]
BS = 64 * 1024


def payload(url: str, start: int, end: int) -> bytes:
    """Deterministic bytes of a fake object: a function of URL and offset only."""
    seed = hashlib.sha256(url.encode()).digest()
    reps = (end - start) // 32 + 2
    base = seed * reps
    shift = start % 32
    return base[shift : shift + end - start]


def obj(name: str, size: int = 4 * BS) -> ObjectId:
    return ObjectId(f"s3://bucket/{name}", '"etag-1"', size, BS)


def fetcher(o: ObjectId, log: list | None = None):
    def fetch(start: int, end: int) -> bytes:
        if log is not None:
            log.append((o.url, start, end))
        return payload(o.url, start, end)

    return fetch


def block_bytes(store: BlockStore, o: ObjectId, i: int) -> bytes:
    b = store.get(o, i, fetcher(o))
    try:
        return b.read(0, b.length)
    finally:
        b.close()


def cached(store: BlockStore) -> set[str]:
    return {e.name for e in store.iter_block_files()}


def name(store: BlockStore, o: ObjectId, i: int) -> str:
    return os.path.basename(store.block_path(o, i))


def test_block_is_fetched_once_and_then_served_from_disk(tmp_path: Path) -> None:
    store = BlockStore(str(tmp_path), 100 * BS)
    o = obj("a")
    calls: list = []
    for n in range(3):
        b = store.get(o, 1, fetcher(o, calls))
        assert b.read(0, BS) == payload(o.url, BS, 2 * BS)
        assert b.cached == (n > 0)  # the downloader keeps the bytes it fetched in memory
        b.close()
    assert len(calls) == 1
    assert verify_block_file(store.block_path(o, 1))


def test_last_block_is_short_and_exact(tmp_path: Path) -> None:
    store = BlockStore(str(tmp_path), 100 * BS)
    o = ObjectId("s3://bucket/odd", "e", 2 * BS + 7, BS)
    assert block_bytes(store, o, 2) == payload(o.url, 2 * BS, 2 * BS + 7)


def test_eviction_order_is_lru_on_a_scripted_trace(tmp_path: Path) -> None:
    # high = low = 1.0: evict exactly down to the limit, so the victims are easy to name
    probe = BlockStore(str(tmp_path / "probe"), 1 << 40)
    o = obj("trace", size=10 * BS)
    block_bytes(probe, o, 0)
    file_size = os.path.getsize(probe.block_path(o, 0))
    # headers differ by a few bytes (offset digits): the slack is far below one block
    store = BlockStore(str(tmp_path / "c"), 6 * file_size + 64, high=1.0, low=1.0)
    for i in range(6):  # 0..5 cached, in this order
        block_bytes(store, o, i)
    for i in (0, 2, 4):  # touched again: 1, 3, 5 are now the least recently used
        block_bytes(store, o, i)
    block_bytes(store, o, 6)  # over the limit by one block: evict 1
    assert cached(store) == {name(store, o, i) for i in (0, 2, 3, 4, 5, 6)}
    block_bytes(store, o, 7)  # then 3
    block_bytes(store, o, 0)  # a hit refreshes 0
    block_bytes(store, o, 8)  # then 5
    block_bytes(store, o, 9)  # then 2 (0 was refreshed after it)
    assert cached(store) == {name(store, o, i) for i in (0, 4, 6, 7, 8, 9)}


def test_watermarks_evict_down_to_low(tmp_path: Path) -> None:
    o = obj("wm", size=40 * BS)
    store = BlockStore(str(tmp_path), 20 * (BS + 300), high=0.9, low=0.5)
    for i in range(40):
        block_bytes(store, o, i)
        assert store.status()["bytes"] <= store.size_limit
    assert store.status()["bytes"] >= 0.4 * store.size_limit  # evicts to low, not to empty


def test_block_being_read_is_not_evicted(tmp_path: Path) -> None:
    o = obj("pin", size=8 * BS)
    store = BlockStore(str(tmp_path), 3 * (BS + 300), high=1.0, low=1.0)
    store.get(o, 0, fetcher(o)).close()
    pinned = store.get(o, 0, fetcher(o))  # read from its file, held open: shared flock
    assert pinned.cached
    for i in range(1, 8):
        block_bytes(store, o, i)
    assert name(store, o, 0) in cached(store)
    assert pinned.read(0, BS) == payload(o.url, 0, BS)
    pinned.close()
    block_bytes(store, o, 1)
    block_bytes(store, o, 2)
    assert name(store, o, 0) not in cached(store)


def test_size_bound_holds_under_a_workload_five_times_the_cache(tmp_path: Path) -> None:
    objs = [obj(f"w{k}", size=16 * BS) for k in range(5)]  # 80 blocks
    limit = 16 * (BS + 400)
    store = BlockStore(str(tmp_path), limit)
    worst = [0]
    stop = threading.Event()

    def sample() -> None:  # every byte on disk, tmp files of downloads in flight included
        while not stop.is_set():
            total = 0
            for root, _d, files in os.walk(store.blocks_dir):
                for f in files:
                    try:
                        total += os.path.getsize(os.path.join(root, f))
                    except FileNotFoundError:
                        pass
            worst[0] = max(worst[0], total)
            stop.wait(0.002)

    def reader(seed: int) -> list[str]:
        import random

        rnd = random.Random(seed)
        wrong = []
        for _ in range(150):
            o = rnd.choice(objs)
            i = rnd.randrange(o.nblocks)
            if block_bytes(store, o, i) != payload(o.url, *o.span(i)):
                wrong.append(f"{o.url} block {i}")
        return wrong

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        # The futures carry each reader's result, or its exception, back to this thread.
        with ThreadPoolExecutor(4) as pool:
            wrong = [w for ws in pool.map(reader, range(4)) for w in ws]
    finally:
        stop.set()
        sampler.join()
    assert wrong == [], f"{len(wrong)} of 600 reads returned wrong bytes, first: {wrong[:3]}"
    in_flight = 4 * (BS + 400)
    assert worst[0] <= limit + in_flight
    assert store.status()["bytes"] <= limit


def test_failed_fetch_records_nothing_and_a_later_fetch_succeeds(tmp_path: Path) -> None:
    store = BlockStore(str(tmp_path), 100 * BS)
    o = obj("fail")

    def broken(start: int, end: int) -> bytes:
        raise OSError(errno.EIO, "injected")

    def short(start: int, end: int) -> bytes:
        return payload(o.url, start, end)[:-1]

    for bad in (broken, short):
        with pytest.raises(OSError):
            store.get(o, 0, bad)
        assert cached(store) == set()
        assert not [f for _r, _d, fs in os.walk(tmp_path) for f in fs if ".tmp." in f]
    assert block_bytes(store, o, 0) == payload(o.url, 0, BS)


def test_usage_count_is_rebuilt_from_the_block_files(tmp_path: Path) -> None:
    store = BlockStore(str(tmp_path), 100 * BS)
    o = obj("rebuild")
    for i in range(4):
        block_bytes(store, o, i)
    on_disk = sum(e.stat().st_size for e in store.iter_block_files())
    os.unlink(tmp_path / "usage")
    fresh = BlockStore(str(tmp_path), 100 * BS)
    with fresh._locked_usage() as usage:
        assert usage.value == on_disk


def test_corrupt_or_foreign_block_file_is_a_miss(tmp_path: Path) -> None:
    store = BlockStore(str(tmp_path), 100 * BS)
    o = obj("corrupt")
    block_bytes(store, o, 0)
    path = store.block_path(o, 0)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)  # a torn file (e.g. after power loss)
    calls: list = []
    b = store.get(o, 0, fetcher(o, calls))
    assert b.read(0, BS) == payload(o.url, 0, BS) and len(calls) == 1
    b.close()


def test_unwritable_cache_dir_reads_remote_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")  # a file where the cache directory should be: ENOTDIR, even as root
    store = BlockStore(str(blocker / "cache"), 100 * BS)
    o = obj("ro")
    with caplog.at_level(logging.WARNING, logger="ava.cache"):
        for i in range(4):
            assert block_bytes(store, o, i) == payload(o.url, *o.span(i))
    assert len([r for r in caplog.records if "unusable" in r.getMessage()]) == 1


def test_full_cache_disk_reads_remote_with_one_warning(tmp_path: Path) -> None:
    # RLIMIT_FSIZE makes block writes fail (EFBIG) the way a full disk does (ENOSPC)
    code = textwrap.dedent(f"""
        import logging, resource, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from tests.unit.test_cache_store import obj, payload, fetcher
        from ava.cache.store import BlockStore
        logging.basicConfig(level=logging.WARNING)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
        store = BlockStore({str(tmp_path)!r}, 1 << 30)
        o = obj("full")
        for i in range(4):
            b = store.get(o, i, fetcher(o))
            assert b.read(0, b.length) == payload(o.url, *o.span(i)) and not b.cached
        print("OK")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "OK"
    assert r.stderr.count("unusable") == 1
    assert not [f for _r, _d, fs in os.walk(tmp_path / "blocks") for f in fs]


def test_counters_of_gone_processes_are_folded_not_lost(tmp_path: Path) -> None:
    store = BlockStore(str(tmp_path), 100 * BS)
    o = obj("stats")
    block_bytes(store, o, 0)
    block_bytes(store, o, 0)
    gone = tmp_path / "stats" / "999999999.json"  # above any pid_max: not a live process
    gone.write_text(json.dumps({"hits": 5, "misses": 7, "fetched_bytes": 70}))
    os.utime(gone, (1, 1))
    first = store.status()
    assert (first["hits"], first["misses"]) == (6, 8)
    assert not gone.exists() and (tmp_path / "stats" / "archive.json").exists()
    again = store.status()
    assert (again["hits"], again["misses"]) == (6, 8)


def test_a_block_written_behind_its_reader_is_found_by_the_next_reader_who_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    o = obj("behind")
    first = BlockStore(str(tmp_path), 1 << 30)
    other = BlockStore(str(tmp_path), 1 << 30)  # another handle: its flocks conflict, as another process's
    commit = BlockStore._commit
    writing = threading.Event()

    def slow_commit(self: BlockStore, *args: object) -> None:
        writing.set()
        threading.Event().wait(0.5)  # the file lands well after the first reader has its bytes
        commit(self, *args)

    monkeypatch.setattr(BlockStore, "_commit", slow_commit)
    block = first.get(o, 1, fetcher(o), write_behind=True)
    assert not block.cached and block.read(0, block.length) == payload(o.url, BS, 2 * BS)
    assert writing.wait(5)

    def never(start: int, end: int) -> bytes:
        raise AssertionError("fetched a block whose download was already done")

    again = other.get(o, 1, never)  # waits on the block's lock until the file is committed
    try:
        assert again.cached and again.read(0, again.length) == payload(o.url, BS, 2 * BS)
    finally:
        again.close()
    assert block.written is not None
    block.written.result(timeout=5)
    assert verify_block_file(first.block_path(o, 1))


def test_blocks_waiting_for_a_slow_disk_are_bounded_and_the_fetcher_writes_past_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    o = obj("slowdisk", size=24 * BS)
    store = BlockStore(str(tmp_path), 1 << 30)
    commit = BlockStore._commit
    release = threading.Event()

    def slow_commit(self: BlockStore, *args: object) -> None:
        if threading.current_thread().name.startswith("avacache-write"):
            release.wait(10)  # the disk is stuck until the test says
        commit(self, *args)

    monkeypatch.setattr(BlockStore, "_commit", slow_commit)
    blocks = [store.get(o, i, fetcher(o), write_behind=True) for i in range(24)]
    behind = [b for b in blocks if b.written is not None]
    assert len(behind) == 16  # the rest were written by their fetcher, already on disk
    assert all(os.path.exists(store.block_path(o, b.index)) for b in blocks if b.written is None)
    release.set()
    for b in behind:
        assert b.written is not None
        b.written.result(timeout=10)
    assert all(verify_block_file(store.block_path(o, i)) for i in range(24))
