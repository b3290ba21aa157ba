"""The avacache filesystem against a real S3 API (moto's server on loopback), read by s3fs.

Bytes fetched from the server are counted by the proxy in tests/support/s3server.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import fsspec
import pytest

from ava.cache import AvaCacheFileSystem
from tests.support.agent_helpers import wait_for
from tests.support.cache_fixtures import direct, proxy, s3
from tests.support.s3server import Proxy, S3Endpoint

REPO = Path(__file__).resolve().parents[2]
BUCKET = "ava-cache-test"
MiB = 1 << 20


def put(direct, key: str, data: bytes) -> str:
    direct.pipe(f"{BUCKET}/{key}", data)
    return f"s3://{BUCKET}/{key}"


def cachefs(s3: S3Endpoint, proxy: Proxy, cache_dir: Path, **kw) -> AvaCacheFileSystem:
    opts = s3.s3fs_kwargs(
        endpoint=proxy.url,
        retries=kw.pop("s3_retries", None),
        timeout=kw.pop("timeout", None),
        skip_instance_cache=True,
    )
    return AvaCacheFileSystem(
        target_protocol="s3", target_options=opts, cache_dir=str(cache_dir), skip_instance_cache=True, **kw
    )


def child_env(s3: S3Endpoint, endpoint: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_", "AVA_"))}
    env.update(s3.env, FSSPEC_S3_ENDPOINT_URL=endpoint, PYTHONPATH=str(REPO), **extra)
    return env


def test_chained_url_reads_exact_bytes_and_second_read_is_local(s3, proxy, direct, tmp_path):
    data = os.urandom(3 * MiB + 123)
    url = put(direct, "chained.bin", data)
    proxy.reset()
    opts = {"s3": s3.s3fs_kwargs(endpoint=proxy.url), "avacache": {"cache_dir": str(tmp_path), "block_size": MiB}}
    with fsspec.open(f"avacache::{url}", "rb", **opts) as f:
        assert f.read() == data
    assert proxy.stats()["get_bytes"] == len(data)
    with fsspec.open(f"avacache::{url}", "rb", **opts) as f:
        f.seek(MiB + 5)
        assert f.read(MiB) == data[MiB + 5 : 2 * MiB + 5]
        f.seek(len(data) - MiB - 10)
        assert f.read(5 * MiB) == data[-MiB - 10 :]  # past the end, across a block boundary
        assert f.read(10) == b""
    assert proxy.stats()["get_bytes"] == len(data)


def test_job_env_alone_configures_the_cache(s3, proxy, direct, tmp_path):
    """A training script with only the exported environment and `ava.data.open`."""
    from ava.cache import job_env

    data = os.urandom(2 * MiB)
    url = put(direct, "jobenv.bin", data)
    code = textwrap.dedent(f"""
        import hashlib, fsspec, ava.data
        with ava.data.open({url!r}) as f:
            a = hashlib.sha256(f.read()).hexdigest()
        with fsspec.open("avacache::{url}") as f:   # plain fsspec, config from FSSPEC_AVACACHE_*
            b = hashlib.sha256(f.read()).hexdigest()
        print(a, b)
    """)
    env = child_env(s3, proxy.url, **job_env(str(tmp_path), "1GiB", "512KiB"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    digest = hashlib.sha256(data).hexdigest()
    assert r.stdout.split() == [digest, digest]
    blocks = [f for _r, _d, fs in os.walk(tmp_path / "blocks") for f in fs if f.endswith(".blk")]
    assert len(blocks) == 4  # 512 KiB blocks from AVA_CACHE_BLOCK_SIZE


READER = textwrap.dedent("""
    import hashlib, os, sys, time
    from ava.cache import AvaCacheFileSystem
    url, cache_dir, gate = sys.argv[1], sys.argv[2], sys.argv[3]
    fs = AvaCacheFileSystem(target_protocol="s3", cache_dir=cache_dir)
    open(f"{gate}.ready-{os.getpid()}", "w").close()  # imported, about to read
    while not os.path.exists(gate):                   # all readers start together
        time.sleep(0.005)
    h = hashlib.sha256()
    with fs.open(url) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    print(h.hexdigest())
""")


def test_eight_cold_readers_get_exact_bytes_and_fetch_the_object_once(s3, proxy, direct, tmp_path):
    data = os.urandom(64 * MiB)
    url = put(direct, "shared-64m.bin", data)
    proxy.reset()
    env = child_env(s3, proxy.url)
    gate = tmp_path / "gate"  # opened once every reader has imported s3fs and made its fs
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", READER, url, str(tmp_path / "cache"), str(gate)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    ready = wait_for(
        lambda: len(list(tmp_path.glob("gate.ready-*"))) == 8 or any(p.poll() is not None for p in procs), timeout=120
    )
    gate.touch()
    assert ready and len(list(tmp_path.glob("gate.ready-*"))) == 8, [p.poll() for p in procs]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _o, e in outs]
    digest = hashlib.sha256(data).hexdigest()
    assert [o.strip() for o, _e in outs] == [digest] * 8
    fetched = proxy.stats()["get_bytes"]
    assert fetched <= 1.02 * len(data), fetched / len(data)


def test_random_reads_fetch_only_the_blocks_they_touch(s3, proxy, direct, tmp_path):
    data = os.urandom(32 * MiB)
    url = put(direct, "random.bin", data)
    proxy.reset()
    fs = cachefs(s3, proxy, tmp_path, block_size=MiB)
    rnd = random.Random(7)
    touched = set()
    with fs.open(url) as f:
        for _ in range(10):
            off = rnd.randrange(len(data) - 4096)
            f.seek(off)
            assert f.read(4096) == data[off : off + 4096]
            touched.update({off // MiB, (off + 4095) // MiB})
    assert proxy.stats()["get_bytes"] == len(touched) * MiB


def test_sequential_reader_triggers_readahead(s3, proxy, direct, tmp_path):
    data = os.urandom(16 * MiB)
    url = put(direct, "seq.bin", data)
    fs = cachefs(s3, proxy, tmp_path, block_size=MiB, readahead=4)
    with fs.open(url) as f:
        assert f.read(MiB) == data[:MiB]
        assert f.read(MiB) == data[MiB : 2 * MiB]
        deadline = time.time() + 20
        while fs.store.status()["blocks"] < 6 and time.time() < deadline:
            time.sleep(0.05)
    assert fs.store.status()["blocks"] >= 6  # blocks 2..5 arrived before they were read


def test_a_cold_sequential_read_never_reads_a_fetched_block_back_and_close_leaves_it_cached(
    s3, proxy, direct, tmp_path, monkeypatch
):
    data = os.urandom(12 * MiB + 5)
    url = put(direct, "behind.bin", data)
    proxy.reset()
    fs = cachefs(s3, proxy, tmp_path, block_size=MiB, readahead=4)
    reopened = []
    open_block = fs.store.open_block

    def spy(obj, index, touch=True):
        block = open_block(obj, index, touch)
        if block is not None:
            reopened.append(index)
        return block

    monkeypatch.setattr(fs.store, "open_block", spy)
    with fs.open(url) as f:
        chunks = []
        while chunk := f.read(256 * 1024):
            chunks.append(chunk)
    assert b"".join(chunks) == data
    assert reopened == []  # readahead handed every block over from memory
    assert proxy.stats()["get_bytes"] == len(data)
    assert fs.store.status()["blocks"] == 13  # written behind the reader, all done by close()
    proxy.reset()
    with fs.open(url) as f:
        assert f.read() == data
    assert proxy.stats()["get_bytes"] == 0


def test_overwritten_object_is_seen_after_the_ttl(s3, proxy, direct, tmp_path):
    ttl = 2.0
    url = put(direct, "mutable.bin", b"A" * 1000)
    fs = cachefs(s3, proxy, tmp_path, check_ttl=ttl)
    assert fs.open(url).read() == b"A" * 1000
    checked = time.monotonic()
    put(direct, "mutable.bin", b"B" * 1000)
    assert fs.open(url).read() == b"A" * 1000  # within the TTL the cached version is trusted
    seen = wait_for(lambda: fs.open(url).read() == b"B" * 1000, timeout=ttl + 10, step=0.05)
    waited = time.monotonic() - checked
    assert seen, f"the new version not seen {waited:.1f}s after the check (TTL {ttl}s)"
    assert waited >= ttl, f"the cached version was rechecked after {waited:.2f}s, before the {ttl}s TTL"


def test_immutable_prefix_skips_the_etag_recheck(s3, proxy, direct, tmp_path):
    url = put(direct, "frozen/x.bin", b"A" * 1000)
    fs = cachefs(s3, proxy, tmp_path, check_ttl=0, immutable=[f"s3://{BUCKET}/frozen/"])
    assert fs.open(url).read() == b"A" * 1000
    proxy.reset()
    for _ in range(3):
        assert fs.open(url).read() == b"A" * 1000
    # An ETag recheck is a HEAD (or a listing GET), a block fetch a ranged GET: none may happen.
    stats = proxy.stats()
    assert stats["requests"] == 0, f"an immutable object was rechecked: {stats}"


def test_object_changed_mid_read_never_mixes_versions(s3, proxy, direct, tmp_path):
    url = put(direct, "racy.bin", b"A" * (2 * MiB))
    fs = cachefs(s3, proxy, tmp_path, block_size=MiB, readahead=0)
    f = fs.open(url)
    assert f.read(MiB) == b"A" * MiB
    put(direct, "racy.bin", b"B" * (2 * MiB))
    with pytest.raises(OSError):
        f.read(MiB)  # If-Match fails: an error, not block 1 of the new version
    f.close()
    assert fs.open(url).read() == b"B" * (2 * MiB)  # the next open sees the new version at once


def test_module_cli_warms_reports_and_clears(s3, proxy, direct, tmp_path):
    objs = {f"shards/train-{i}.tar": os.urandom(MiB + i) for i in range(3)}
    for key, data in objs.items():
        put(direct, key, data)
    env = child_env(s3, proxy.url)
    cache = str(tmp_path / "c")

    def cli(*args: str) -> list[dict]:
        r = subprocess.run(
            [sys.executable, "-m", "ava.cache", *args], env=env, capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0, r.stderr + r.stdout
        assert "testing" not in r.stdout + r.stderr  # no credentials in output
        return [json.loads(line) for line in r.stdout.splitlines()]

    lines = cli(
        "warm", "--dir", cache, "--size-limit", "1GiB", "--block-size", "256KiB", f"s3://{BUCKET}/shards/train-*.tar"
    )
    total = sum(len(d) for d in objs.values())
    assert lines[-1]["summary"] and lines[-1]["done_bytes"] == total
    assert all(line["total_bytes"] == total for line in lines)
    nblocks = sum(-(-len(d) // (256 << 10)) for d in objs.values())
    status = cli("status", "--dir", cache)[0]
    assert status["size_limit"] == 1 << 30 and status["misses"] == status["blocks"] == nblocks
    assert status["bytes"] >= total
    cleared = cli("clear", "--dir", cache)[0]
    assert cleared["blocks"] == nblocks and cleared["freed_bytes"] == status["bytes"]
    assert cli("status", "--dir", cache)[0]["blocks"] == 0


def test_user_side_modules_import_only_stdlib_and_fsspec():
    code = (
        "import sys, ava.cache, ava.data; "
        "print(sorted(m for m in ('s3fs', 'fabric', 'typer', 'rich', 'torch', 'botocore') "
        "if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
