"""On-disk block store: one file per block, flock single-flight, LRU eviction by bytes.

Layout under the cache directory::

    blocks/<2 hex>/<object key>-<index>.blk   header + block bytes (visible only once complete)
    blocks/<2 hex>/<...>.blk.lock             per-block download lock, removed by its holder
    blocks/<2 hex>/<...>.blk.tmp.<pid>.<hex>  a download in flight (or left by a killed one)
    meta/<2 hex>/<url hash>.json              an object's size and ETag, and when they were checked
    usage                                     8-byte byte count of committed blocks (+ its flock)
    limit                                     the size limit last configured, for `status`
    stats/<pid>.json                          per-process hit/miss counters (stats.py)

The block files are the truth: `usage` is rebuilt from them whenever it is missing and corrected
by every eviction pass, so no metadata is rewritten per miss. Standard library only.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ava.cache.files import STALE_S, atomic_write, pid_alive, unlink
from ava.cache.stats import counters_for, totals

MAGIC = b"AVB1"
_HEAD = struct.Struct("<4sI")  # magic, header JSON length
_PEEK = 4096  # one read normally covers the whole header
_DEGRADED_S = 30.0  # after a cache write fails, read around the cache this long before retrying

_WRITERS = 4  # threads that write fetched blocks to their files behind the readers
# Blocks waiting for their file write, at most, per process: past it a fetcher writes its block
# itself, so a disk slower than the network holds back the downloads instead of filling memory.
_BEHIND = 16

log = logging.getLogger("ava.cache")
_writer_state: tuple[int, ThreadPoolExecutor, threading.BoundedSemaphore] | None = None
_writer_lock = threading.Lock()


def _writer() -> tuple[ThreadPoolExecutor, threading.BoundedSemaphore]:
    """One block writer pool per process, and its slots (a forked child builds its own). Its
    threads are not daemons: an interpreter that exits finishes the writes it started first."""
    global _writer_state
    with _writer_lock:
        if _writer_state is None or _writer_state[0] != os.getpid():
            pool = ThreadPoolExecutor(_WRITERS, "avacache-write")
            _writer_state = (os.getpid(), pool, threading.BoundedSemaphore(_BEHIND))
        return _writer_state[1], _writer_state[2]


@dataclass(frozen=True)
class ObjectId:
    """A remote object as the cache keys it: URL, ETag or version, size, block size."""

    url: str
    etag: str
    size: int
    block_size: int

    @functools.cached_property
    def key(self) -> str:  # cached: a hashlib call costs tens of µs on OpenSSL 3, once per block read
        text = f"{self.url}\n{self.etag}\n{self.size}\n{self.block_size}"
        return hashlib.sha256(text.encode()).hexdigest()[:40]

    @property
    def nblocks(self) -> int:
        return (self.size + self.block_size - 1) // self.block_size

    def span(self, index: int) -> tuple[int, int]:
        start = index * self.block_size
        return start, min(start + self.block_size, self.size)


class Block:
    """Readable bytes of one block, from its cache file (pinned by a shared flock) or memory."""

    def __init__(
        self,
        index: int,
        length: int,
        fd: int = -1,
        base: int = 0,
        data: bytes | None = None,
        written: Future[None] | None = None,
    ) -> None:
        self.index, self.length = index, length
        self._fd, self._base, self._data = fd, base, data
        self.written = written  # a fetched block's file write still under way (write-behind)

    @property
    def cached(self) -> bool:
        return self._fd >= 0

    def read(self, offset: int, n: int) -> bytes:
        n = max(0, min(n, self.length - offset))
        if self._data is not None:
            return self._data[offset : offset + n]
        out = os.pread(self._fd, n, self._base + offset)
        if len(out) != n:  # the file cannot shrink under a shared lock; this is a real fault
            raise OSError(errno.EIO, f"cache block read short ({len(out)} of {n} bytes)")
        return out

    def readinto(self, offset: int, out: memoryview) -> None:
        """Copy len(out) bytes from `offset` in the block into `out`."""
        n = len(out)
        if offset + n > self.length:
            raise ValueError("read past the end of a block")
        if self._data is not None:
            out[:] = self._data[offset : offset + n]
            return
        got = os.preadv(self._fd, [out], self._base + offset)
        while got < n:  # preadv may return early on signals; the file is complete
            more = os.preadv(self._fd, [out[got:]], self._base + offset + got)
            if more <= 0:
                raise OSError(errno.EIO, f"cache block read short ({got} of {n} bytes)")
            got += more

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # also drops the shared flock that pins the block
            self._fd = -1


def _header(obj: ObjectId, index: int, data: bytes) -> bytes:
    start, end = obj.span(index)
    meta = json.dumps(
        {
            "url": obj.url,
            "etag": obj.etag,
            "size": obj.size,
            "block_size": obj.block_size,
            "index": index,
            "offset": start,
            "length": end - start,
            "crc32": zlib.crc32(data),
        },
        separators=(",", ":"),
    ).encode()
    return _HEAD.pack(MAGIC, len(meta)) + meta


def read_header(fd: int) -> tuple[dict[str, Any], int]:
    """(header fields, offset of the data) of an open block file; ValueError when malformed."""
    head = os.pread(fd, _PEEK, 0)
    if len(head) < _HEAD.size:
        raise ValueError("block file too short")
    magic, n = _HEAD.unpack_from(head)
    if magic != MAGIC or n > 1 << 20:
        raise ValueError("not an ava cache block")
    if _HEAD.size + n > len(head):
        head = os.pread(fd, _HEAD.size + n, 0)
    return json.loads(head[_HEAD.size : _HEAD.size + n]), _HEAD.size + n


def verify_block_file(path: str) -> bool:
    """True when a block file's length and checksum match its header (full read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        meta, base = read_header(fd)
        data = os.pread(fd, meta["length"] + 1, base)
        return bool(len(data) == meta["length"] and zlib.crc32(data) == meta["crc32"])
    except (ValueError, KeyError, OSError):
        return False
    finally:
        os.close(fd)


def _remove_stale_lock(path: str) -> None:
    """Unlink a lock file left by a killed downloader, unless someone holds it now."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        unlink(path)  # waiters that opened it re-check the inode and make a new one
    except OSError:
        pass
    finally:
        os.close(fd)


class BlockStore:
    """Blocks of remote objects in one cache directory, shared by every process on the node."""

    def __init__(
        self, root: str, size_limit: int | None, high: float = 0.9, low: float = 0.8, fsync: bool = False
    ) -> None:
        """`size_limit` None: a handle for status/clear that neither records nor enforces one."""
        self.root = root
        self.size_limit = size_limit
        self.high, self.low, self.fsync = high, low, fsync
        self.blocks_dir = os.path.join(root, "blocks")
        self.meta_dir = os.path.join(root, "meta")
        self.stats = counters_for(os.path.join(root, "stats"))
        self._usage_fd = -1
        self._pid = -1
        self._mutex = threading.Lock()  # flock is per open file; threads share the usage fd
        self._degraded_until = 0.0
        self._warned = False

    # -- paths ---------------------------------------------------------------------------------
    def block_path(self, obj: ObjectId, index: int) -> str:
        key = obj.key
        return os.path.join(self.blocks_dir, key[:2], f"{key}-{index}.blk")

    def iter_block_files(self) -> Iterator[os.DirEntry[str]]:
        """Every committed block file (stale tmp and lock files are skipped, not removed)."""
        try:
            shards = list(os.scandir(self.blocks_dir))
        except FileNotFoundError:
            return
        for shard in shards:
            try:
                entries = list(os.scandir(shard.path))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                if entry.name.endswith(".blk"):
                    yield entry

    # -- reads ---------------------------------------------------------------------------------
    def open_block(self, obj: ObjectId, index: int, touch: bool = True) -> Block | None:
        """The cached block, pinned against eviction until closed, or None if not cached."""
        path = self.block_path(obj, index)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError:
            return None  # unreadable cache: treat as a miss, the caller reads remote
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            meta, base = read_header(fd)
            start, end = obj.span(index)
            if (
                meta.get("url") != obj.url
                or meta.get("etag") != obj.etag
                or meta.get("index") != index
                or meta.get("length") != end - start
                or os.fstat(fd).st_size != base + end - start
            ):
                raise ValueError("block header does not match")
            if touch:  # LRU clock; explicit ns, since kernel file times are jiffy-coarse
                now = time.time_ns()
                try:
                    os.utime(fd, ns=(now, now))
                except OSError:
                    pass
            return Block(index, end - start, fd=fd, base=base)
        except (ValueError, KeyError, OSError):
            os.close(fd)
            return None

    def get(self, obj: ObjectId, index: int, fetch: Callable[[int, int], bytes], write_behind: bool = False) -> Block:
        """Block `index` of `obj`: from the cache, or fetched once across every process.

        `fetch(start, end)` must return exactly those bytes or raise; it is called at most once
        here (retries are the caller's), and nothing is recorded when it fails. When the cache
        directory is unusable (full, read-only, missing) the bytes come back from memory and
        the store warns once. A fetched block comes back in memory; with `write_behind` it comes
        back before its file is written: a writer thread writes it, still holding the block's
        download lock, so another reader of it (any process) waits and then finds the file.
        """
        block = self.open_block(obj, index)
        if block is not None:
            self.stats.add(hits=1)
            return block
        if time.monotonic() < self._degraded_until:
            return self._fetch_to_memory(obj, index, fetch)
        path = self.block_path(obj, index)
        try:
            lock = self._lock(path + ".lock")
        except OSError as e:
            self._degrade(e)
            return self._fetch_to_memory(obj, index, fetch)
        unlock = True
        try:
            block = self.open_block(obj, index)  # another process may have fetched it meanwhile
            if block is not None:
                self.stats.add(hits=1)
                return block
            data = self._fetch_to_memory(obj, index, fetch)._data
            assert data is not None
            written = None
            pool, slots = _writer() if write_behind else (None, None)
            if pool is not None and slots is not None and slots.acquire(blocking=False):
                written = pool.submit(self._commit_and_unlock, obj, index, path, data, lock, slots)
                unlock = False  # the writer's now
            else:
                self._commit_or_degrade(obj, index, path, data)
            return Block(index, len(data), data=data, written=written)  # never read back
        finally:
            if unlock:
                _unlock(path, lock)

    def _commit_or_degrade(self, obj: ObjectId, index: int, path: str, data: bytes) -> None:
        try:
            self._commit(obj, index, path, data)
        except OSError as e:
            self._degrade(e)

    def _commit_and_unlock(
        self, obj: ObjectId, index: int, path: str, data: bytes, lock: int, slots: threading.BoundedSemaphore
    ) -> None:
        """Write-behind: commit a fetched block's file, then release its download lock."""
        try:
            self._commit_or_degrade(obj, index, path, data)
        except Exception as e:  # no reader waits on this thread: say it, never lose it silently
            log.warning("cache %s: writing block %d of %s failed: %s", self.root, index, obj.url, e)
        finally:
            _unlock(path, lock)
            slots.release()

    def _fetch_to_memory(self, obj: ObjectId, index: int, fetch: Callable[[int, int], bytes]) -> Block:
        start, end = obj.span(index)
        data = fetch(start, end)
        if len(data) != end - start:
            raise OSError(errno.EIO, f"short fetch: {len(data)} of {end - start} bytes")
        self.stats.add(misses=1, fetched=len(data))
        return Block(index, len(data), data=bytes(data))

    def _degrade(self, err: OSError) -> None:
        """Read around the cache for a while; warn once per process, not once per block."""
        self._degraded_until = time.monotonic() + _DEGRADED_S
        if not self._warned:
            self._warned = True
            log.warning("cache %s unusable (%s); reading directly from remote storage", self.root, err.strerror or err)

    # -- locking -------------------------------------------------------------------------------
    @staticmethod
    def _lock(path: str) -> int:
        """Exclusive flock on `path`, re-taken if the file was unlinked while we waited."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def _usage(self) -> int:
        """The usage file's fd, opened once per process; created by a scan when missing."""
        if self._usage_fd >= 0 and self._pid == os.getpid():
            return self._usage_fd
        os.makedirs(self.root, exist_ok=True)
        path = os.path.join(self.root, "usage")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._usage_fd, self._pid = fd, os.getpid()
        self._write_limit()
        return fd

    def _write_limit(self) -> None:
        if self.size_limit is None:
            return
        path = os.path.join(self.root, "limit")
        try:
            with open(path, "rb") as f:
                if f.read().strip() == str(self.size_limit).encode():
                    return
        except OSError:
            pass
        atomic_write(path, str(self.size_limit).encode())

    def _locked_usage(self) -> _UsageLock:
        return _UsageLock(self)

    # -- writes --------------------------------------------------------------------------------
    def _commit(self, obj: ObjectId, index: int, path: str, data: bytes) -> None:
        head = _header(obj, index, data)
        tmp = f"{path}.tmp.{os.getpid()}.{os.urandom(4).hex()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            try:
                view = memoryview(head + data) if len(data) < 65536 else None
                if view is None:
                    _write_all(fd, memoryview(head))
                    _write_all(fd, memoryview(data))
                else:
                    _write_all(fd, view)
                if self.fsync:
                    os.fsync(fd)
                now = time.time_ns()
                os.utime(fd, ns=(now, now))
            finally:
                os.close(fd)
            with self._locked_usage() as usage:
                os.rename(tmp, path)  # the block becomes visible only now, complete
                usage.add(len(head) + len(data))
                if self.size_limit is not None and usage.value > self.high * self.size_limit:
                    usage.value = self._evict_locked(int(self.low * self.size_limit))
        except BaseException:
            unlink(tmp)
            raise

    # -- eviction ------------------------------------------------------------------------------
    def _evict_locked(self, target: int) -> int:
        """Evict least recently used unpinned blocks until at most `target` bytes remain.

        Called with the usage lock held, so no block is committed during the scan and the
        returned total is exact; it also removes tmp and lock files left by killed processes.
        """
        entries: list[tuple[int, int, str]] = []
        total = 0
        now = time.time()
        for entry in self._scan_all():
            name = entry.name
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            if name.endswith(".blk"):
                entries.append((st.st_mtime_ns, st.st_size, entry.path))
                total += st.st_size
            elif ".blk.tmp." in name:
                pid = name.rsplit(".", 2)[-2]
                if (pid.isdigit() and not pid_alive(int(pid))) or now - st.st_mtime > STALE_S:
                    unlink(entry.path)
            elif name.endswith(".blk.lock") and now - st.st_mtime > STALE_S:
                _remove_stale_lock(entry.path)
        if total <= target:
            return total
        entries.sort()
        for mtime_ns, size, path in entries:
            if total <= target:
                break
            if self._evict_one(path, mtime_ns):
                total -= size
        return total

    def _scan_all(self) -> Iterator[os.DirEntry[str]]:
        try:
            shards = list(os.scandir(self.blocks_dir))
        except FileNotFoundError:
            return
        for shard in shards:
            try:
                yield from list(os.scandir(shard.path))
            except (FileNotFoundError, NotADirectoryError):
                continue

    @staticmethod
    def _evict_one(path: str, mtime_ns: int) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a reader's shared lock pins it
            if os.fstat(fd).st_mtime_ns != mtime_ns:
                return False  # read since the scan: no longer least recently used
            os.unlink(path)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def evict_to(self, target: int) -> int:
        """Evict down to `target` bytes now; returns the bytes left."""
        with self._locked_usage() as usage:
            usage.value = self._evict_locked(target)
            return usage.value

    def rescan(self) -> int:
        """Recount committed bytes from the block files and store the count; returns it."""
        with self._locked_usage() as usage:
            usage.value = self._evict_locked(1 << 62)
            return usage.value

    def drop_block(self, obj: ObjectId, index: int) -> bool:
        """Remove one block unless it is being read; True if it was removed."""
        path = self.block_path(obj, index)
        with self._locked_usage() as usage:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return False
            if self._evict_one(path, st.st_mtime_ns):
                usage.add(-st.st_size)
                return True
        return False

    def clear(self) -> dict[str, int]:
        """Remove every block, object record and counter; returns what was freed."""
        freed = blocks = 0
        with self._locked_usage() as usage:
            for entry in self._scan_all():
                try:
                    size = entry.stat().st_size
                    os.unlink(entry.path)
                except FileNotFoundError:
                    continue
                if entry.name.endswith(".blk"):
                    freed += size
                    blocks += 1
            usage.value = 0
        for sub in (self.meta_dir, self.stats.directory):
            for dirpath, _dirs, files in os.walk(sub, topdown=False):
                for name in files:
                    unlink(os.path.join(dirpath, name))
        return {"freed_bytes": freed, "blocks": blocks}

    # -- object records ------------------------------------------------------------------------
    def _meta_path(self, url: str) -> str:
        h = hashlib.sha256(url.encode()).hexdigest()[:40]
        return os.path.join(self.meta_dir, h[:2], h + ".json")

    def load_object(self, url: str) -> dict[str, Any] | None:
        try:
            with open(self._meta_path(url), "rb") as f:
                rec = json.loads(f.read())
            return rec if rec.get("url") == url else None
        except (OSError, ValueError):
            return None

    def save_object(self, url: str, size: int, etag: str) -> None:
        path = self._meta_path(url)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write(path, json.dumps({"url": url, "size": size, "etag": etag, "checked": time.time()}).encode())
        except OSError:
            pass  # only a HEAD saved; never fail a read over it

    def forget_object(self, url: str) -> None:
        unlink(self._meta_path(url))

    # -- reporting -----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Bytes and blocks on disk (scanned), summed hit/miss counters, the size limit."""
        self.stats.flush()
        total = blocks = 0
        for entry in self.iter_block_files():
            try:
                total += entry.stat().st_size
                blocks += 1
            except FileNotFoundError:
                continue
        counts = totals(self.stats.directory, self._locked_usage)
        limit = None
        try:
            with open(os.path.join(self.root, "limit"), "rb") as f:
                limit = int(f.read().strip())
        except (OSError, ValueError):
            pass
        return {
            "dir": self.root,
            "bytes": total,
            "blocks": blocks,
            **counts,
            "size_limit": limit,
        }


class _UsageLock:
    """`with store._locked_usage() as u`: exclusive flock on the usage count, u.value in bytes."""

    def __init__(self, store: BlockStore) -> None:
        self.store = store
        self.value = 0
        self._fd = -1
        self._rebuild = False

    def __enter__(self) -> _UsageLock:
        store = self.store
        if store._pid not in (-1, os.getpid()):  # forked: never share the parent's flock or mutex
            os.close(store._usage_fd)
            store._usage_fd, store._pid, store._mutex = -1, -1, threading.Lock()
        self.store._mutex.acquire()
        try:
            self._fd = self.store._usage()
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self.store._mutex.release()
            raise
        raw = os.pread(self._fd, 8, 0)
        if len(raw) == 8:
            self.value = struct.unpack("<q", raw)[0]
        else:  # new or torn usage file: the block files say how much is there
            self.value = self.store._evict_locked(1 << 62)
        return self

    def add(self, n: int) -> None:
        self.value = max(0, self.value + n)

    def __exit__(self, *exc: object) -> None:
        try:
            os.pwrite(self._fd, struct.pack("<q", self.value), 0)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self.store._mutex.release()


def _unlock(path: str, lock: int) -> None:
    """Release a block's download lock: unlink while still holding it, so waiters re-check the
    inode and never lock a file nobody else will see."""
    unlink(path + ".lock")
    os.close(lock)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        n = os.write(fd, view)
        view = view[n:]
