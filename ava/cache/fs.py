"""The `avacache` fsspec filesystem: remote objects read through the node's block cache.

    fsspec.open("avacache::s3://bucket/key")           # URL chaining
    AvaCacheFileSystem().open("s3://bucket/key")       # or give the remote URL directly

Reads are served from block files (see store.py). A sequential reader makes the next
`readahead` blocks download concurrently in the background; a block downloaded ahead is handed
to the reader from memory as it is written, never read back from its file. A random reader
fetches only the blocks its reads touch. Writes and listings go straight to the remote filesystem.
Imports only the standard library and fsspec; the remote backend (s3fs, ...) loads lazily.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

# fsspec ships neither type hints nor stubs: its imports are unchecked, its classes Any.
import fsspec  # type: ignore[import-untyped]
from fsspec.core import split_protocol  # type: ignore[import-untyped]
from fsspec.implementations.chained import ChainedFileSystem  # type: ignore[import-untyped]
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem  # type: ignore[import-untyped]

from ava.cache.settings import CacheSettings
from ava.cache.store import Block, BlockStore, ObjectId

log = logging.getLogger("ava.cache")

_NOT_RETRIED = (FileNotFoundError, PermissionError, IsADirectoryError)
_POOL_WORKERS = 16
_pool_state: tuple[int, ThreadPoolExecutor] | None = None
_pool_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """One download pool per process (a forked child builds its own)."""
    global _pool_state
    with _pool_lock:
        if _pool_state is None or _pool_state[0] != os.getpid():
            _pool_state = (os.getpid(), ThreadPoolExecutor(_POOL_WORKERS, "avacache"))
        return _pool_state[1]


class ObjectChanged(OSError):
    """The remote object changed while a file was open on it; reopen to read the new version."""


def _protocol_of(fs: AbstractFileSystem) -> str:
    proto = fs.protocol
    return str(proto[0] if isinstance(proto, (tuple, list)) else proto)


def _tag_of(info: dict[str, Any]) -> str:
    """What identifies one version of an object: ETag, else version id, else mtime and size."""
    for key in ("ETag", "etag", "VersionId", "version_id", "generation", "md5Hash"):
        if info.get(key):
            return str(info[key])
    for key in ("mtime", "LastModified", "last_modified", "modified", "created"):
        if info.get(key) is not None:
            return f"{key}={info[key]}"
    return ""


def _range_fetcher(fs: AbstractFileSystem, inner: str, etag: str) -> Callable[[int, int], bytes]:
    """fetch(start, end) for one object version. On S3 the GET carries If-Match: ETag, so a
    block can never mix bytes of two versions; elsewhere it is a plain ranged cat_file."""
    if _protocol_of(fs) == "s3" and hasattr(fs, "_call_s3") and hasattr(fs, "split_path"):
        from fsspec.asyn import sync  # type: ignore[import-untyped]

        bucket, key, version = fs.split_path(inner)
        extra: dict[str, Any] = {"IfMatch": etag} if etag.startswith('"') else {}
        if version:
            extra["VersionId"] = version

        async def _get(start: int, end: int) -> bytes:
            resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}", **extra)
            try:
                body: bytes = await resp["Body"].read()
                return body
            finally:
                resp["Body"].close()

        def fetch_s3(start: int, end: int) -> bytes:
            try:
                data: bytes = sync(fs.loop, _get, start, end)
                return data
            except OSError as e:
                if "pre-condition" in str(e).lower() or "precondition" in str(e).lower():
                    raise ObjectChanged(errno.ESTALE, f"{inner} changed while open") from e
                raise

        return fetch_s3
    return lambda start, end: fs.cat_file(inner, start=start, end=end)


def _with_retries(fetch: Callable[[int, int], bytes], url: str, attempts: int) -> Callable[[int, int], bytes]:
    """Retry failed and short fetches; after the last attempt raise, never return wrong bytes."""

    def fetch_checked(start: int, end: int) -> bytes:
        last: BaseException | None = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))
            try:
                data = fetch(start, end)
            except (*_NOT_RETRIED, ObjectChanged):
                raise
            except Exception as e:
                last = e
                continue
            if len(data) == end - start:
                return data
            last = OSError(errno.EIO, f"short body: {len(data)} of {end - start} bytes")
        raise OSError(
            errno.EIO, f"{url}: bytes {start}-{end} failed after {attempts} attempts: {type(last).__name__}: {last}"
        ) from last

    return fetch_checked


class AvaCacheFileSystem(ChainedFileSystem):  # type: ignore[misc]
    """fsspec filesystem `avacache`: read remote objects through the node-local block cache.

    Settings (keyword, else FSSPEC_AVACACHE_<KWARG>, else AVA_CACHE_<NAME>, else default):
    cache_dir, cache_size (bytes or "100GiB"), block_size (8 MiB), readahead (8 blocks),
    check_ttl (60 s between ETag rechecks), immutable (URL prefixes never rechecked),
    retries (3 per block), high_watermark/low_watermark (0.9/0.8), fsync (False).
    """

    protocol = "avacache"
    root_marker = ""

    def __init__(
        self,
        target_protocol: str | None = None,
        target_options: dict[str, Any] | None = None,
        fs: AbstractFileSystem | None = None,
        cache_dir: str | None = None,
        cache_size: int | str | None = None,
        block_size: int | str | None = None,
        readahead: int | None = None,
        check_ttl: float | None = None,
        immutable: list[str] | str | None = None,
        retries: int | None = None,
        high_watermark: float | None = None,
        low_watermark: float | None = None,
        fsync: bool | None = None,
        fo: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.settings = CacheSettings.resolve(
            cache_dir=cache_dir,
            cache_size=cache_size,
            block_size=block_size,
            readahead=readahead,
            check_ttl=check_ttl,
            immutable=immutable,
            retries=retries,
            high_watermark=high_watermark,
            low_watermark=low_watermark,
            fsync=fsync,
        )
        s = self.settings
        self.store = BlockStore(s.cache_dir, s.cache_size, s.high_watermark, s.low_watermark, s.fsync)
        self.target_protocol = target_protocol or (_protocol_of(fs) if fs is not None else None)
        self.target_options = dict(target_options or {})
        self._target = fs
        self._objects: dict[str, tuple[ObjectId, float]] = {}

    # -- remote side ---------------------------------------------------------------------------
    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        path = str(path)
        for prefix in ("avacache::", "avacache://"):
            if path.startswith(prefix):
                path = path[len(prefix) :]
        return path if "://" in path else path.rstrip("/")

    @property
    def target(self) -> AbstractFileSystem | None:
        if self._target is None and self.target_protocol:
            self._target = fsspec.filesystem(self.target_protocol, **self.target_options)
        return self._target

    def _resolve(self, path: str) -> tuple[AbstractFileSystem, str, str]:
        """(remote filesystem, its path, canonical URL) for a path given to this filesystem."""
        path = self._strip_protocol(path)
        proto, _rest = split_protocol(path)
        if proto is None:
            fs = self.target
            if fs is None:
                raise ValueError(f"avacache: no remote for {path!r}; use avacache::s3://bucket/key or a full URL")
        else:
            fs = self.target
            if fs is None or proto not in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)):
                fs = fsspec.filesystem(proto)
        inner = fs._strip_protocol(path)
        return fs, inner, f"{_protocol_of(fs)}://{inner}"

    def object_id(self, path: str) -> tuple[ObjectId, AbstractFileSystem, str]:
        """The object's current identity (size, ETag), rechecked after `check_ttl` seconds."""
        fs, inner, url = self._resolve(path)
        s = self.settings
        now = time.time()
        trusted = any(url.startswith(p) for p in s.immutable)
        hit = self._objects.get(url)
        if hit is not None and (trusted or now - hit[1] < s.check_ttl):
            return hit[0], fs, inner
        rec = self.store.load_object(url)
        if rec is not None and (trusted or now - rec.get("checked", 0) < s.check_ttl):
            obj = ObjectId(url, rec["etag"], int(rec["size"]), s.block_size)
            self._objects[url] = (obj, rec["checked"])
            return obj, fs, inner
        fs.invalidate_cache(inner)
        info = fs.info(inner)
        if info.get("type") == "directory":
            raise IsADirectoryError(errno.EISDIR, "is a directory", url)
        obj = ObjectId(url, _tag_of(info), int(info["size"]), s.block_size)
        self.store.save_object(url, obj.size, obj.etag)
        self._objects[url] = (obj, now)
        return obj, fs, inner

    def forget(self, url: str) -> None:
        """Drop what this node knows about an object's version (not its blocks)."""
        self._objects.pop(url, None)
        self.store.forget_object(url)

    # -- fsspec API ----------------------------------------------------------------------------
    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: Any = None,
        autocommit: bool = True,
        cache_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        if "r" not in mode or "+" in mode:
            fs, inner, _url = self._resolve(path)
            return fs.open(inner, mode, **kwargs)  # writes bypass the cache
        obj, fs, inner = self.object_id(path)
        return AvaCacheFile(self, path, obj, fs, inner)

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        fs, inner, _url = self._resolve(path)
        found: dict[str, Any] = fs.info(inner, **kwargs)
        return found

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        fs, inner, _url = self._resolve(path)
        found: list[Any] = fs.ls(inner, detail=detail, **kwargs)
        return found

    def warm(self, path: str, on_progress: Callable[[int, int], None] | None = None) -> int:
        """Fetch every block of one object into the cache; returns its size."""
        obj, fs, inner = self.object_id(path)
        fetch = _with_retries(_range_fetcher(fs, inner, obj.etag), obj.url, self.settings.retries)
        done = 0
        batch = max(1, self.settings.readahead)
        for first in range(0, obj.nblocks, batch):
            idx = range(first, min(first + batch, obj.nblocks))
            futures = [_pool().submit(self.store.get, obj, i, fetch) for i in idx]
            try:
                while futures:
                    block = futures.pop(0).result()
                    done += block.length
                    block.close()
            finally:
                for fut in futures:  # after a failure: let the rest finish, unpinned
                    _discard(fut)
            if on_progress is not None:
                on_progress(done, obj.size)
        return obj.size


class AvaCacheFile(AbstractBufferedFile):  # type: ignore[misc]
    """A read-only file whose bytes come from cache blocks; see the module docstring."""

    _KEEP_OPEN = 4  # block files kept open (and pinned) per file
    loc: int  # the file position, kept by AbstractBufferedFile

    def __init__(
        self, cfs: AvaCacheFileSystem, path: str, obj: ObjectId, remote: AbstractFileSystem, inner: str
    ) -> None:
        super().__init__(cfs, path, mode="rb", block_size=obj.block_size, cache_type="none", size=obj.size)
        self.obj, self.remote, self.inner = obj, remote, inner
        self.store = cfs.store
        self.readahead = cfs.settings.readahead
        fetch = _with_retries(_range_fetcher(remote, inner, obj.etag), obj.url, cfs.settings.retries)

        def fetch_or_forget(start: int, end: int) -> bytes:
            try:
                return fetch(start, end)
            except ObjectChanged:
                cfs.forget(obj.url)  # the next open looks the object up again, TTL or not
                raise

        self._fetch = fetch_or_forget
        self._blocks: OrderedDict[int, Block] = OrderedDict()
        # Readahead started by this file (never twice); a future's block is the one it fetched,
        # in memory, until the reader takes it (None: already in the cache, or taken).
        self._ahead: dict[int, Future[Block | None] | None] = {}
        self._last_end = -1
        self._ahead_upto = 0  # readahead has been considered for every block below this
        self._writes: list[Future[None]] = []  # blocks of this file still being written

    def _block(self, index: int) -> Block:
        block = self._blocks.get(index)
        if block is not None:
            self._blocks.move_to_end(index)
            return block
        block = self._fetched_ahead(index)
        if block is None:
            block = self.store.get(self.obj, index, self._fetch, write_behind=True)
        self._keep(index, block, pin_all=True)  # trimmed when the read is done
        return block

    def _fetched_ahead(self, index: int) -> Block | None:
        """The block readahead fetched for `index` (waiting for it if in flight), or None."""
        fut = self._ahead.get(index)
        if fut is None:
            return None
        self._ahead[index] = None
        try:
            return fut.result()
        except Exception:
            return None  # logged by _prefetch; the caller fetches it itself and raises

    def _keep(self, index: int, block: Block, pin_all: bool = False) -> None:
        """Hold a block open (pinned); `pin_all` defers trimming until the read is done."""
        self._note_write(block)
        old = self._blocks.pop(index, None)
        if old is not None and old is not block:
            old.close()
        self._blocks[index] = block
        if not pin_all:
            self._trim()

    def _trim(self) -> None:
        while len(self._blocks) > self._KEEP_OPEN:
            self._blocks.popitem(last=False)[1].close()

    def read(self, length: int = -1) -> bytes:
        """Read up to `length` bytes (all when negative); fsspec's cache layer is bypassed."""
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        loc = self.loc
        end = self.size if length is None or length < 0 else min(self.size, loc + int(length))
        if end <= loc:
            return b""
        out = self._fetch_range(loc, end)
        self.loc = loc + len(out)
        return out

    def _fetch_range(self, start: int, end: int) -> bytes:
        end = min(end, self.size)  # fsspec's cache layer does not clamp reads past the end
        if start >= end:
            return b""
        bs = self.obj.block_size
        index = start // bs
        if index == (end - 1) // bs:  # within one block: one pread, one copy
            block = self._blocks.get(index)
            if block is None:  # the general path fetches it (and starts readahead)
                out: list[bytes] = []
                self._copy(start, end, lambda block, lo, n: out.append(block.read(lo, n)))
                return out[0]
            self._window(start, end, index)  # hot path: a block this file already holds
            return block.read(start - index * bs, end - start)
        buf, view = new_bytes(end - start)  # spanning blocks: still one copy, no join
        pos = 0

        def put(block: Block, lo: int, n: int) -> None:
            nonlocal pos
            block.readinto(lo, view[pos : pos + n])
            pos += n

        self._copy(start, end, put)
        return buf

    def readinto(self, b: Any) -> int:
        """Read straight into `b`: one copy from the block files, no intermediate bytes."""
        out = memoryview(b).cast("B")
        end = min(self.loc + out.nbytes, self.size)
        if end <= self.loc:
            return 0
        pos = 0

        def put(block: Block, lo: int, n: int) -> None:
            nonlocal pos
            block.readinto(lo, out[pos : pos + n])
            pos += n

        self._copy(self.loc, end, put)
        self.loc += pos
        return pos

    def _copy(self, start: int, end: int, sink: Callable[[Block, int, int], None]) -> None:
        """Call sink(block, offset in block, length) for [start, end), fetching what is missing."""
        bs = self.obj.block_size
        first, last = start // bs, (end - 1) // bs
        self._window(start, end, last)
        pending: dict[int, Future[Block]] = {}
        if last > first:  # a read spanning blocks fetches the missing ones concurrently
            for i in range(first + 1, last + 1):
                if i not in self._blocks and self._ahead.get(i) is None:
                    block = self.store.open_block(self.obj, i)
                    if block is not None:
                        self.store.stats.add(hits=1)
                        self._keep(i, block, pin_all=True)
                    else:
                        pending[i] = _pool().submit(self.store.get, self.obj, i, self._fetch, True)
        try:
            for i in range(first, last + 1):
                if i in pending:
                    self._keep(i, pending.pop(i).result(), pin_all=True)
                block = self._block(i)
                lo = max(start, i * bs) - i * bs
                hi = min(end, (i + 1) * bs) - i * bs
                sink(block, lo, hi - lo)
        finally:
            for fut in pending.values():
                _discard(fut)
            self._trim()

    def _window(self, start: int, end: int, last: int) -> None:
        """Readahead policy. A read continuing the previous one opens the full window; a first
        read at offset 0 is probably a scan starting, so it bets on one block; any other read
        fetches only the blocks it touches."""
        if start == self._last_end and start > 0:
            window = self.readahead
        elif start == 0 and self._last_end < 0:
            window = min(1, self.readahead)
        else:
            window = 0
            self._ahead_upto = 0  # after a jump, consider the window afresh when it resumes
            self._drop_ahead()
        self._last_end = end
        stop = min(last + 1 + window, self.obj.nblocks)
        if window and stop > self._ahead_upto:
            self._read_ahead(max(last + 1, self._ahead_upto), stop)
            self._ahead_upto = stop

    def _read_ahead(self, first: int, stop: int) -> None:
        for i in range(first, stop):
            if i in self._blocks or i in self._ahead:
                continue
            self._ahead[i] = None
            if not os.path.exists(self.store.block_path(self.obj, i)):  # warm: nothing to do
                self._ahead[i] = _pool().submit(_prefetch, self.store, self.obj, i, self._fetch)

    def _note_write(self, block: Block) -> None:
        if block.written is not None and not block.written.done():
            self._writes.append(block.written)
            self._writes = [w for w in self._writes if not w.done()]

    def _drop_ahead(self) -> None:
        """After a jump, let go of the readahead blocks already fetched: they are cached, and
        this reader may never come back for them (memory stays bounded by the window)."""
        for i, fut in self._ahead.items():
            if fut is not None and fut.done():
                self._ahead[i] = None
                if not fut.cancelled() and fut.exception() is None and (block := fut.result()) is not None:
                    self._note_write(block)

    def close(self) -> None:
        """Close; once it returns, every block this file fetched is in the cache's files
        (running readahead of blocks never read finishes on its own)."""
        if getattr(self, "closed", True):
            return
        self._drop_ahead()
        for fut in self._ahead.values():
            if fut is not None:
                fut.cancel()  # queued ones only; running downloads finish and stay cached
        self._ahead.clear()
        for written in self._writes:
            written.result()  # never raises: a failed write is logged and the cache degraded
        self._writes.clear()
        for block in self._blocks.values():
            block.close()
        self._blocks.clear()
        super().close()


def _bytes_writer() -> Callable[[int], tuple[bytes, memoryview]] | None:
    """CPython: a new, uninitialised bytes object and a writable view of its buffer.

    This is how CPython's own FileIO.readall fills a bytes object: the object is filled before
    anyone else sees it. It lets a read spanning blocks cost one copy, like a local file read,
    instead of a pread per block plus a join. None elsewhere (falls back to a bytearray copy).
    """
    try:
        import ctypes

        new = ctypes.pythonapi.PyBytes_FromStringAndSize
        new.restype, new.argtypes = ctypes.py_object, (ctypes.c_void_p, ctypes.c_ssize_t)
        addr = ctypes.pythonapi.PyBytes_AsString
        addr.restype, addr.argtypes = ctypes.c_void_p, (ctypes.py_object,)
    except (ImportError, AttributeError, OSError):
        return None

    def make(n: int) -> tuple[bytes, memoryview]:
        buf = new(None, n)
        return buf, memoryview((ctypes.c_char * n).from_address(addr(buf))).cast("B")

    return make


_make_bytes = _bytes_writer()


def new_bytes(n: int) -> tuple[bytes, memoryview]:
    """(result, writable view of it); the result is only valid once the view is filled."""
    if _make_bytes is not None and n > 0:
        return _make_bytes(n)
    ba = bytearray(n)  # non-CPython: returned as is (bytes-like), one copy still
    return ba, memoryview(ba)  # type: ignore[return-value]


def _discard(fut: Future[Block]) -> None:
    """Drop a block future nobody will read: close its block (and unpin it) once it is done."""
    if not fut.cancel():
        fut.add_done_callback(lambda f: f.result().close() if not f.cancelled() and f.exception() is None else None)


def _prefetch(store: BlockStore, obj: ObjectId, index: int, fetch: Callable[[int, int], bytes]) -> Block | None:
    """Download one block ahead of the reader. The bytes just fetched go to the reader from
    memory (no read back from the file just written); a block that was already cached is
    unpinned and the reader reopens it (cheap)."""
    try:
        block = store.get(obj, index, fetch, write_behind=True)
    except Exception as e:
        log.debug("readahead of %s block %d failed: %s", obj.url, index, e)
        raise
    if block.cached:
        block.close()
        return None
    return block


# Where no entry point names the protocol (a tree on PYTHONPATH without its dist-info).
fsspec.register_implementation("avacache", AvaCacheFileSystem, clobber=True)
