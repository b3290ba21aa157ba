"""Faults against a real S3 API: injected errors, timeouts, short bodies, and kill -9.

The kill -9 trial count defaults to 15 (a few seconds); the full stress run is
`AVA_CACHE_KILL_TRIALS=1000 pytest tests/unit/test_cache_faults.py -k kill` (several minutes).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ava.cache import AvaCacheFileSystem
from ava.cache.store import read_header, verify_block_file
from tests.support.cache_fixtures import direct, proxy, s3
from tests.support.s3server import Proxy, S3Endpoint

REPO = Path(__file__).resolve().parents[2]
BUCKET = "ava-cache-faults"
KiB, MiB = 1 << 10, 1 << 20
KILL_TRIALS = int(os.environ.get("AVA_CACHE_KILL_TRIALS", "15"))


@pytest.fixture(autouse=True)
def no_faults_left(proxy: Proxy) -> Iterator[None]:
    proxy.reset()  # counters and fault plan
    yield
    proxy.set_faults([])


def content(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def cachefs(s3, proxy, cache_dir, **kw) -> AvaCacheFileSystem:
    import s3fs

    # s3fs and botocore try once and time out after 1 s; the cache adds its own retries
    remote = s3fs.S3FileSystem(**s3.s3fs_kwargs(endpoint=proxy.url, retries=1, timeout=1.0, skip_instance_cache=True))
    remote.retries = 1
    return AvaCacheFileSystem(fs=remote, cache_dir=str(cache_dir), block_size=256 * KiB, skip_instance_cache=True, **kw)


def files(root: Path, marker: str) -> list[str]:
    return [f for _r, _d, fs in os.walk(root) for f in fs if marker in f]


def blocks(root: Path) -> list[str]:
    return [f for _r, _d, fs in os.walk(root) for f in fs if f.endswith(".blk")]


@pytest.mark.parametrize("kind", ["error", "timeout", "short"])
def test_persistent_fault_raises_after_retries_and_records_nothing(kind, s3, proxy, direct, tmp_path):
    data = content(1, 600 * KiB)
    direct.pipe(f"{BUCKET}/{kind}.bin", data)
    fs = cachefs(s3, proxy, tmp_path, retries=2, readahead=0)
    proxy.set_faults([{"kind": kind, "count": -1, "delay": 2.0}])
    t0 = time.monotonic()
    with pytest.raises(OSError, match="failed after 2 attempts"):
        fs.open(f"s3://{BUCKET}/{kind}.bin").read()
    assert time.monotonic() - t0 < 30
    assert proxy.stats()["faults"] >= 2
    assert blocks(tmp_path) == []
    proxy.set_faults([])
    assert fs.open(f"s3://{BUCKET}/{kind}.bin").read() == data  # later reads succeed


@pytest.mark.parametrize("kind", ["error", "short"])
def test_transient_fault_is_retried_into_exact_bytes(kind, s3, proxy, direct, tmp_path):
    data = content(2, 600 * KiB)
    direct.pipe(f"{BUCKET}/t-{kind}.bin", data)
    fs = cachefs(s3, proxy, tmp_path, retries=3, readahead=0)
    proxy.set_faults([{"kind": kind, "count": 2}])
    assert fs.open(f"s3://{BUCKET}/t-{kind}.bin").read() == data
    assert proxy.stats()["faults"] == 2
    assert all(
        verify_block_file(os.path.join(r, f)) for r, _d, fs_ in os.walk(tmp_path) for f in fs_ if f.endswith(".blk")
    )


# -- kill -9 ------------------------------------------------------------------------------------
# A zygote imports everything once and forks a reader per trial, so a trial costs milliseconds
# of start-up instead of an interpreter start; the readers verify every byte they read.
ZYGOTE = textwrap.dedent("""
    import os, random, sys
    import s3fs  # noqa: F401  imported before forking, no filesystem instantiated yet
    from ava.cache import AvaCacheFileSystem
    cache_dir, objects, errors = sys.argv[1], eval(sys.argv[2]), sys.argv[3]  # [(url, seed, size)]

    def reader(seed):
        rnd = random.Random(seed)
        fs = AvaCacheFileSystem(target_protocol="s3", cache_dir=cache_dir, block_size=256 << 10,
                                readahead=4, skip_instance_cache=True)
        while True:
            url, s, size = rnd.choice(objects)
            data = random.Random(s).randbytes(size)
            with fs.open(url) as f:
                kind = rnd.random()
                if kind < 0.4:
                    pos = 0
                    while chunk := f.read(64 << 10):
                        if chunk != data[pos:pos + len(chunk)]:
                            os._exit(3)
                        pos += len(chunk)
                elif kind < 0.7:
                    for _ in range(8):
                        off = rnd.randrange(size)
                        f.seek(off)
                        if f.read(100_000) != data[off:off + 100_000]:
                            os._exit(3)
                elif f.read() != data:
                    os._exit(3)

    for line in sys.stdin:
        cmd, arg = line.split()
        if cmd == "fork":
            pid = os.fork()
            if pid == 0:
                sys.stdin.close()
                try:
                    reader(int(arg))
                except BaseException:
                    import traceback
                    with open(errors, "a") as f:
                        f.write(traceback.format_exc())
                finally:
                    os._exit(4)
            print(pid, flush=True)
        elif cmd == "reap":
            _, status = os.waitpid(int(arg), 0)
            print(status, flush=True)
""")


def test_kill9_during_reads_leaves_no_corrupt_block_and_keeps_finished_ones(s3, proxy, direct, tmp_path):
    objects = []
    for k, size in enumerate((3 * MiB + 5, 2 * MiB)):
        url = f"s3://{BUCKET}/kill-{k}.bin"
        direct.pipe(url, content(100 + k, size))
        objects.append((url, 100 + k, size))
    expected = {url: content(seed, size) for url, seed, size in objects}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_", "AVA_"))}
    env.update(s3.env, FSSPEC_S3_ENDPOINT_URL=proxy.url, PYTHONPATH=str(REPO))
    errors = tmp_path.parent / "reader-errors.txt"
    zygote = subprocess.Popen(
        [sys.executable, "-c", ZYGOTE, str(tmp_path), repr(objects), str(errors)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    checker = cachefs(s3, proxy, tmp_path, readahead=0)
    rnd = random.Random(1234)
    killed_mid_download = reused_bytes = 0
    try:
        for trial in range(KILL_TRIALS):
            # slow bodies (4 MiB/s: 64 ms a block) so kills land inside downloads too
            proxy.set_faults([{"kind": "slow", "count": -1, "rate": 4 << 20}])
            # forget a random part of the cache so the reader has downloads to be killed in
            for url, _seed, _size in objects:
                obj = checker.object_id(url)[0]
                for i in range(obj.nblocks):
                    if rnd.random() < 0.5:
                        checker.store.drop_block(obj, i)
            assert zygote.stdin and zygote.stdout
            zygote.stdin.write(f"fork {trial}\n")
            zygote.stdin.flush()
            pid = int(zygote.stdout.readline())
            time.sleep(rnd.uniform(0.0, 0.6))
            os.kill(pid, signal.SIGKILL)
            zygote.stdin.write(f"reap {pid}\n")
            zygote.stdin.flush()
            status = int(zygote.stdout.readline())
            assert os.WIFSIGNALED(status), f"trial {trial}: reader " + (
                "saw corrupt bytes" if os.WEXITSTATUS(status) == 3 else "failed: " + errors.read_text()[-3000:]
            )
            # a lock file left behind is a download the kill interrupted
            killed_mid_download += bool(files(tmp_path, ".blk.lock") or files(tmp_path, ".tmp."))
            # every visible block is complete, verified and holds the right bytes
            for root, _d, names in os.walk(tmp_path / "blocks"):
                for name in names:
                    if not name.endswith(".blk"):
                        continue
                    path = os.path.join(root, name)
                    assert verify_block_file(path), f"trial {trial}: bad block {name}"
                    fd = os.open(path, os.O_RDONLY)
                    meta, base = read_header(fd)
                    got = os.pread(fd, meta["length"], base)
                    os.close(fd)
                    want = expected[meta["url"]][meta["offset"] : meta["offset"] + meta["length"]]
                    assert got == want, f"trial {trial}: wrong bytes in {name}"
            # a fresh reader gets exact bytes and fetches only the blocks that are missing
            url, _seed, size = objects[trial % len(objects)]
            obj = checker.object_id(url)[0]
            present = sum(
                obj.span(i)[1] - obj.span(i)[0]
                for i in range(obj.nblocks)
                if os.path.exists(checker.store.block_path(obj, i))
            )
            proxy.reset()  # also lifts the throttle
            with checker.open(url) as f:
                assert f.read() == expected[url], f"trial {trial}: corrupt read after kill"
            assert proxy.stats()["get_bytes"] == size - present
            reused_bytes += present
    finally:
        zygote.kill()
        zygote.wait()
    # Without kills inside downloads the test would pass without exercising what it is for.
    assert killed_mid_download > 0, f"no kill of {KILL_TRIALS} landed inside a download"
    # Blocks a killed reader finished stay and are served to the next reader: none re-fetched.
    assert reused_bytes > 0, (
        f"no block a killed reader finished was kept in {KILL_TRIALS} trials "
        f"({killed_mid_download} kills inside a download)"
    )
