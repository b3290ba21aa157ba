"""Checkpoints that a crash mid-save can never corrupt, on a local directory or any fsspec URL.

Imported on the nodes by training scripts: standard library, torch and fsspec only.

Layout under the checkpoint directory (a local path, `s3://bucket/prefix`, any fsspec URL):

    step-00000100/state.pt         save(): one file, written by rank 0
    step-00000100.COMMITTED        the commit marker: small JSON, written LAST
    step-00000200/__0_0.distcp …   save_sharded(): torch.distributed.checkpoint, one file per rank
    step-00000200/.metadata
    step-00000200.COMMITTED

Object stores have no atomic rename, so a checkpoint is committed by its marker, one small
object put in a single request after everything else is durable (on a local directory the
marker itself is written under a temporary name and renamed). Listing trusts markers only: a
step directory without its marker is a save that died and is never loaded; it is deleted by a
later save. The marker records each file's size and CRC-32, so a checkpoint whose bytes changed
after the commit (truncated, overwritten, lost) is detected and `load_latest` falls back to the
previous one. One run history per directory: steps are ordered by number.

S3 credentials and endpoint come from the environment, read by s3fs/botocore: `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, and for a non-AWS endpoint (MinIO, Ceph, moto)
`AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`, or fsspec's own `FSSPEC_S3_ENDPOINT_URL`); all three
verified with s3fs 2026.9 / botocore 1.43 against a moto server (tests/test_ckpt.py).

An async save() to a remote store blocks training only while the state is copied to host
memory; a background thread writes it to node-local disk (`AVA_CHECKPOINT_STAGING`, else the
temporary directory), frees the copy, uploads the file and then commits. A process killed during
the upload never committed that step: the previous one stays the newest. An interpreter that
exits with a save in flight finishes it first, and reports a failure on stderr.

How often to save: `due(step)` follows the recipe's `[checkpoint] every` (AVA_CHECKPOINT_EVERY):
a number of steps, a duration, or "auto", the Young/Daly interval √(2 · save cost · MTBF) from
the measured stall of this run's saves and its observed time between failures (attempts). Each
commit marker records the save's stall and, under "auto", the interval chosen and its inputs.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import contextlib
import copy
import ctypes
import hashlib
import io
import json
import logging
import math
import os
import pickle
import re
import shutil
import sys
import tempfile
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import IO, TYPE_CHECKING, Any, cast

import fsspec  # type: ignore[import-untyped,unused-ignore]  # fsspec has no stubs or py.typed
import torch
import torch.distributed as dist
from fsspec.implementations.local import LocalFileSystem  # type: ignore[import-untyped,unused-ignore]  # fsspec has no stubs or py.typed

from ava import env

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.checkpoint.storage import StorageReader, StorageWriter

__all__ = [
    "CheckpointError",
    "committed_steps",
    "due",
    "interval",
    "latest_step",
    "load_latest",
    "load_sharded",
    "save",
    "save_sharded",
    "wait",
]

log = logging.getLogger("ava.ckpt")

STATE_FILE = "state.pt"
INIT_ENV = "AVA_INIT_CHECKPOINT"  # `ava train --from`: the checkpoint a new run starts from
STAGING_ENV = "AVA_CHECKPOINT_STAGING"  # node-local directory for async saves to a remote store
EVERY_ENV = "AVA_CHECKPOINT_EVERY"  # the recipe's checkpoint.every: "500" steps, "600s", "auto"
MARKER_SUFFIX = ".COMMITTED"
_NAME = re.compile(r"^step-(\d+)(\.COMMITTED)?$")
_CHUNK = 8 << 20


class CheckpointError(Exception):
    """No checkpoint directory was given, or a save failed."""


class _Unreadable(Exception):
    """A committed checkpoint whose bytes are not what was committed: fall back to an older one."""


class _OtherFormat(_Unreadable):
    """A committed checkpoint of the other kind (save() vs save_sharded()): skipped quietly."""


# ---------------------------------------------------------------------------------------------
# Storage: the few operations the protocol needs, on fsspec, with local-directory durability.


class _Store:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/") or url
        self.fs, root = fsspec.core.url_to_fs(self.url)
        self.root = root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)

    def step_dir(self, step: int) -> str:
        return f"{self.root}/step-{step:08d}"

    def marker(self, step: int) -> str:
        return self.step_dir(step) + MARKER_SUFFIX

    def url_of(self, path: str) -> str:
        """A path of this store as a URL that fsspec (and DCP's FsspecWriter) can open again."""
        if self.local:
            return path
        url: str = self.fs.unstrip_protocol(path)
        return url

    def scan(self) -> tuple[set[int], set[int]]:
        """(committed steps, steps that have a directory), fresh from storage, never a cache."""
        self.fs.invalidate_cache(self.root)
        try:
            names = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return set(), set()
        committed: set[int] = set()
        dirs: set[int] = set()
        for name in names:
            m = _NAME.match(name.rstrip("/").rsplit("/", 1)[-1])
            if m:
                (committed if m.group(2) else dirs).add(int(m.group(1)))
        return committed, dirs

    def put_atomic(self, path: str, data: bytes) -> None:
        """Put a small object whole or not at all."""
        if not self.local:
            self.fs.pipe_file(path, data)  # one PUT: atomic on object stores
            return
        tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(path))

    def remove(self, step: int) -> None:
        """Uncommit first, then delete the data: never a marker that points at missing files."""
        for path, recursive in ((self.marker(step), False), (self.step_dir(step), True)):
            try:
                self.fs.rm(path, recursive=recursive)
            except FileNotFoundError:
                pass

    def read_marker(self, step: int) -> dict[str, Any]:
        try:
            marker = json.loads(self.fs.cat_file(self.marker(step)))
        except (OSError, ValueError) as e:
            raise _Unreadable(f"commit marker: {e}") from e
        # Valid JSON of another shape is as damaged as invalid JSON: fall back, never raise.
        if not isinstance(marker, dict) or not isinstance(marker.get("format"), str):
            raise _Unreadable(f"commit marker: not an ava.ckpt marker: {str(marker)[:80]}")
        return marker


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _CrcWriter:
    """File-like sink for torch.save that counts and checksums what passes through."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.size, self.crc = f, 0, 0

    def write(self, data: bytes) -> int:
        self.crc = zlib.crc32(data, self.crc)
        n = len(memoryview(data).cast("B"))
        self.size += n
        self.f.write(data)
        return n

    def flush(self) -> None:
        self.f.flush()


# ---------------------------------------------------------------------------------------------
# Where, who, and the background writer.


def _resolve(dir: str | os.PathLike[str] | None) -> _Store:
    url = os.fspath(dir) if dir is not None else env.checkpoint_dir()
    if not url:
        raise CheckpointError(
            "no checkpoint directory: pass dir= or set AVA_CHECKPOINT_DIR "
            "(a recipe's [checkpoint] dir sets it under ava)"
        )
    return _Store(url)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _keep(keep: int | None) -> int:
    """`keep` if given, else the recipe's checkpoint.keep (AVA_CHECKPOINT_KEEP), else 3; 0 = all."""
    if keep is not None:
        return keep
    return env.checkpoint_keep() or 3


def _distributed(group: ProcessGroup | None = None) -> bool:
    return _initialized() and dist.get_world_size(group) > 1


def _rank(group: ProcessGroup | None = None) -> int:
    if _initialized():
        return dist.get_rank(group)
    return env.rank()


_executor: concurrent.futures.ThreadPoolExecutor | None = None
_pending: list[concurrent.futures.Future[int]] = []


def _submit(fn: Callable[..., int], *args: Any) -> concurrent.futures.Future[int]:
    global _executor
    if _executor is None:
        # Not a daemon: an interpreter that exits right after an async save still commits it.
        _executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ava-ckpt")
        # Finish the saves at exit before concurrent.futures stops taking work (its hook, run
        # after ours): s3fs's client resolves names through asyncio's executor. The hook is
        # private to threading (3.9+, what concurrent.futures uses); else plain atexit.
        register = getattr(threading, "_register_atexit", atexit.register)
        register(_finish_at_exit)
    fut = _executor.submit(fn, *args)
    _pending.append(fut)
    return fut


def wait() -> None:
    """Block until every async save of this process is committed; re-raise the first failure."""
    pending = list(_pending)
    _pending.clear()
    for fut in pending:
        fut.result()


def _finish_at_exit() -> None:
    """At exit: wait for the saves still in flight and say on stderr which ones failed."""
    pending = list(_pending)
    _pending.clear()
    if any(not fut.done() for fut in pending):
        sys.stderr.write("ava.ckpt: finishing a checkpoint save before exit\n")
        sys.stderr.flush()
    for fut in pending:
        try:
            fut.result()
        except BaseException as e:
            sys.stderr.write(f"ava.ckpt: a background checkpoint save failed before exit: {type(e).__name__}: {e}\n")
            sys.stderr.flush()


# Host copies of the last async save's tensors, by their place in the state, reused by the next
# save of the same shapes: copying into memory already faulted in (and, from a GPU, pinned) is
# what keeps the stall short. Costs host memory of one state; save() waits for the previous save
# before copying, so a buffer is never written while the background still reads it.
_buffers: dict[str, torch.Tensor] = {}


def _host_copy(t: torch.Tensor, place: str) -> torch.Tensor:
    t = t.detach()
    buf = _buffers.get(place)
    if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or buf.stride() != t.stride():
        pin = t.is_cuda and torch.cuda.is_available()
        buf = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu", pin_memory=pin)
        _buffers[place] = buf
    buf.copy_(t, non_blocking=t.is_cuda)
    return buf


def _to_cpu(obj: Any, place: str = "") -> Any:
    """A private CPU copy of `obj`: training may change the original as soon as we return."""
    devices: set[torch.device] = set()
    copied = _copy_tree(obj, place, devices, {})
    for device in devices:
        torch.cuda.synchronize(device)  # the device-to-host copies were queued, not waited for
    return copied


_View = tuple[torch.device, int, int, tuple[int, ...], tuple[int, ...], torch.dtype]


def _copy_tree(obj: Any, place: str, devices: set[torch.device], seen: dict[_View, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        if obj.is_cuda:
            devices.add(obj.device)
        # Tied weights (an embedding shared with the output layer) are one tensor under two
        # names: copied once, and saved once, as torch.save stores the original.
        storage = obj.untyped_storage().data_ptr()
        view: _View = (obj.device, storage, int(obj.storage_offset()), tuple(obj.shape), obj.stride(), obj.dtype)
        if view not in seen:
            seen[view] = _host_copy(obj, place)
        return seen[view]
    if isinstance(obj, Mapping):
        out: Any = {k: _copy_tree(v, f"{place}/{k!r}", devices, seen) for k, v in obj.items()}
        # nn.Module.state_dict() keeps per-module versions in `_metadata`; load_state_dict reads them.
        if hasattr(obj, "_metadata"):
            out = collections.OrderedDict(out)
            out._metadata = copy.deepcopy(obj._metadata)
        return out
    if isinstance(obj, list):
        return [_copy_tree(v, f"{place}/{i}", devices, seen) for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        items = [_copy_tree(v, f"{place}/{i}", devices, seen) for i, v in enumerate(obj)]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return copy.deepcopy(obj)


# ---------------------------------------------------------------------------------------------
# How often to save: `every` as steps, a duration, or "auto" (Young/Daly).

# Before a run's first failure its age is only a lower bound of its MTBF: this prior keeps the
# early interval sane (Llama 3 405B saw an interruption about every 3 hours).
MTBF_PRIOR_S = 3 * 3600.0
# "auto" before any save of the run was measured: the first save comes this long after start.
FIRST_AUTO_S = 60.0
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([smh]?)\s*$")


class _Timing:
    """This process's save costs and the run's history: what `every = "auto"` is computed from."""

    def __init__(self) -> None:
        self.run_started = time.time()  # until a marker of this run says earlier
        self.process_started = time.monotonic()
        self.saved_at: float | None = None  # monotonic time of this process's last save() call
        self.stalls: collections.deque[float] = collections.deque(maxlen=5)
        self.background: float | None = None  # the last save's write-to-commit seconds

    def stalled(self, seconds: float) -> None:
        self.stalls.append(seconds)

    def learn(self, marker: Mapping[str, Any]) -> None:
        """What a committed marker (read at resume) tells: the save cost, and the run's start if
        it is this run's (a run started `--from` another run's checkpoint reads that one's)."""
        started, stall, seconds = marker.get("run_started"), marker.get("stall"), marker.get("seconds")
        if isinstance(started, (int, float)) and marker.get("run") == env.run_id():
            self.run_started = min(self.run_started, float(started))
        if not self.stalls and isinstance(stall, (int, float)):
            self.stalls.append(float(stall))
        if self.background is None and isinstance(seconds, (int, float)):
            self.background = float(seconds)

    def auto(self) -> dict[str, float] | None:
        """The Young/Daly interval and its inputs, or None before any save was measured."""
        if not self.stalls:
            return None
        cost = sorted(self.stalls)[len(self.stalls) // 2]
        failures = env.attempt()  # each failover starts a new attempt
        age = max(time.time() - self.run_started, 1.0)
        mtbf = age / failures if failures else max(age, MTBF_PRIOR_S)
        young = math.sqrt(2.0 * cost * mtbf)
        # Never so often that a save waits for the previous one's upload.
        seconds = max(young, self.background or 0.0, 1.0)
        return {"seconds": round(seconds, 3), "cost": round(cost, 4), "mtbf": round(mtbf, 1), "failures": failures}

    def marker_fields(self, seconds: float, stall: float | None) -> dict[str, Any]:
        self.background = seconds
        fields: dict[str, Any] = {
            "stall": round(seconds if stall is None else stall, 4),
            "run": env.run_id(),
            "attempt": env.attempt(),
            "run_started": self.run_started,
        }
        if _rule() == "auto":
            fields["every"] = self.auto()
        return fields


_timing = _Timing()


def _rule(every: int | float | str | None = None) -> str | None:
    return os.environ.get(EVERY_ENV) or (None if every is None else str(every))


def _seconds(rule: str) -> float:
    match = _DURATION.match(rule)
    if match is None:
        raise CheckpointError(f"checkpoint every {rule!r}: expected a step count, a duration like 10m or 90s, or auto")
    return float(match.group(1)) * _UNITS[match.group(2)]


def interval(every: int | float | str | None = None) -> float | None:
    """Seconds between saves under the recipe's checkpoint.every (else `every`): a duration's
    length, "auto"'s current Young/Daly interval; None for a step count, or nothing set."""
    rule = _rule(every)
    if rule is None or rule.isdigit():
        return None
    if rule == "auto":
        auto = _timing.auto()
        return None if auto is None else auto["seconds"]
    return _seconds(rule)


def due(step: int, every: int | float | str | None = None) -> bool:
    """Whether to save at `step`, by the recipe's `[checkpoint] every` (AVA_CHECKPOINT_EVERY),
    or by `every` when the recipe sets none; never when neither is set.

    An int (or "500") saves every that many steps; a duration (600.0 seconds, "10m", "90s") when
    that long passed since this process's last save (or its start); "auto" at the Young/Daly
    interval √(2 · save cost · MTBF): the cost is the measured stall of the last saves, the MTBF
    the run's age over its failures so far (before any: the larger of its age and 3 h). Under a
    time rule rank 0 decides and, in a distributed job, tells the others (a one-element
    broadcast on a Gloo group): call it on every rank, as save() and save_sharded() are.
    """
    rule = _rule(every)
    if rule is None:
        return False
    if rule.isdigit():
        n = int(rule)
        return n > 0 and step % n == 0
    if rule == "auto":
        auto = _timing.auto()
        wait_s = FIRST_AUTO_S if auto is None else auto["seconds"]
    else:
        wait_s = _seconds(rule)
    since = _timing.saved_at if _timing.saved_at is not None else _timing.process_started
    now = _rank() == 0 and time.monotonic() - since >= wait_s
    if _distributed():
        group = _checkpoint_group(None)
        flag = torch.tensor([1 if now else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        now = bool(flag.item())
    return now


# ---------------------------------------------------------------------------------------------
# Whole-state checkpoints: torch.save by rank 0.


def save(
    state: Mapping[str, Any],
    step: int,
    *,
    dir: str | os.PathLike[str] | None = None,
    keep: int | None = None,
    async_: bool = False,
) -> concurrent.futures.Future[int] | None:
    """Save `state` (anything torch.save takes) as checkpoint `step` and keep the last `keep`
    (default: AVA_CHECKPOINT_KEEP, else 3; 0 keeps all).

    Call it on every rank: in a distributed job only rank 0 writes (the state is the same on
    every rank under DDP); other ranks return None at once. `dir` defaults to
    AVA_CHECKPOINT_DIR. With `async_=True` training is blocked only while the state is copied to
    CPU; writing (to node-local disk first when `dir` is remote), uploading and committing run in
    a background thread and the returned Future gives the step once committed. One save is in
    flight at a time: a new save first waits for the previous one (and re-raises its failure),
    as does `wait()`; the process does not exit before it is done.
    """
    started = time.monotonic()
    store, keep = _resolve(dir), _keep(keep)
    _timing.saved_at = started
    if _rank() != 0:
        return None
    wait()
    if not async_:
        _save_now(store, state, step, keep, None)
        _timing.stalled(time.monotonic() - started)
        return None
    box = [_to_cpu(state)]  # the worker takes it out: nothing else is held once it is written
    stall = time.monotonic() - started
    _timing.stalled(stall)
    write = _save_staged if not store.local else _save_now
    return _submit(write, store, box, step, keep, stall)


def _torch_save(state: Any, f: IO[bytes]) -> _CrcWriter:
    sink = _CrcWriter(f)
    torch.save(state, cast(IO[bytes], sink))  # typed IO[bytes]; torch.save only writes and flushes
    return sink


def _save_now(
    store: _Store, state: Mapping[str, Any] | list[Mapping[str, Any]], step: int, keep: int, stall: float | None
) -> int:
    """Write and commit `state` (or the one state in a list, taken out of it) straight to the store."""
    started = time.monotonic()
    if isinstance(state, list):
        state = state.pop()
    store.remove(step)  # a leftover of a save that died, or an older history's same step
    step_dir = store.step_dir(step)
    path = f"{step_dir}/{STATE_FILE}"
    if store.local:
        os.makedirs(step_dir, exist_ok=True)
        with open(path, "wb") as f:
            sink = _torch_save(state, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(step_dir)
    else:
        with store.fs.open(path, "wb", block_size=_CHUNK * 8) as f:
            sink = _torch_save(state, f)
    del state
    _commit(store, step, keep, {STATE_FILE: {"size": sink.size, "crc32": sink.crc}}, started, stall)
    return step


def _staging_dir(store: _Store) -> str:
    """This store's node-local staging directory (one per store and user)."""
    root = os.environ.get(STAGING_ENV) or os.path.join(tempfile.gettempdir(), f"ava-ckpt-staging-{os.getuid()}")
    return os.path.join(root, hashlib.sha256(store.url.encode()).hexdigest()[:16])


def _save_staged(store: _Store, box: list[Mapping[str, Any]], step: int, keep: int, stall: float | None) -> int:
    """Async save to a remote store: to node-local disk (freeing the host copy), upload, commit."""
    started = time.monotonic()
    staging = _staging_dir(store)
    shutil.rmtree(staging, ignore_errors=True)  # what a process killed mid-upload left behind
    os.makedirs(staging, exist_ok=True)
    local = os.path.join(staging, f"step-{step:08d}.pt")
    try:
        with open(local, "wb") as f:  # no fsync: a node that crashes now loses no committed step
            sink = _torch_save(box.pop(), f)
        store.remove(step)
        # put_file uploads a large file as a multipart upload, its parts in parallel.
        store.fs.put_file(local, f"{store.step_dir(step)}/{STATE_FILE}")
        _commit(store, step, keep, {STATE_FILE: {"size": sink.size, "crc32": sink.crc}}, started, stall)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return step


def _commit(store: _Store, step: int, keep: int, files: dict[str, Any], started: float, stall: float | None) -> None:
    """Write the marker of a save() checkpoint whose files are durable, then prune."""
    seconds = time.monotonic() - started
    marker: dict[str, Any] = {
        "step": step,
        "format": "torch",
        "files": files,
        "time": time.time(),
        "seconds": round(seconds, 3),
    }
    marker.update(_timing.marker_fields(seconds, stall))
    store.put_atomic(store.marker(step), json.dumps(marker).encode())
    _prune(store, step, keep)


def _prune(store: _Store, step: int, keep: int) -> None:
    """Keep the last `keep` committed steps up to `step`, the one just written.

    Committed steps above `step` are of a history this run resumed below (they were unreadable,
    or it would have resumed from them): they stop counting, so they never push out the step
    just written, and a later save of the same step replaces them.
    """
    committed, dirs = store.scan()
    if keep > 0:
        for old in sorted(s for s in committed if s <= step)[:-keep]:
            if old != step:
                store.remove(old)
    # Directories older than this commit and never committed: saves that died.
    for old in dirs - committed:
        if old < step:
            store.remove(old)


def committed_steps(dir: str | os.PathLike[str] | None = None) -> list[int]:
    """Every committed step in `dir` (default AVA_CHECKPOINT_DIR), oldest first."""
    return sorted(_resolve(dir).scan()[0])


def latest_step(dir: str | os.PathLike[str] | None = None) -> int | None:
    """The newest committed step in `dir` (default AVA_CHECKPOINT_DIR), or None; reads no data."""
    steps = committed_steps(dir)
    return steps[-1] if steps else None


def _read_state(store: _Store, step: int, map_location: Any, weights_only: bool) -> Any:
    marker = store.read_marker(step)
    if marker.get("format") != "torch":
        raise _OtherFormat(f"format {marker.get('format')!r}, not a save() checkpoint")
    _timing.learn(marker)
    files = marker.get("files")
    want = files.get(STATE_FILE) if isinstance(files, dict) else None
    if not (isinstance(want, dict) and isinstance(want.get("size"), int) and isinstance(want.get("crc32"), int)):
        raise _Unreadable(f"commit marker: no size and crc32 for {STATE_FILE}")
    try:
        path = f"{store.step_dir(step)}/{STATE_FILE}"
        if store.local:
            size, crc = 0, 0
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    size, crc = size + len(chunk), zlib.crc32(chunk, crc)
            source: Any = path  # read again from the page cache by torch.load
        else:
            data = store.fs.cat_file(path)
            size, crc = len(data), zlib.crc32(data)
            source = io.BytesIO(data)
    except (OSError, KeyError, TypeError) as e:
        raise _Unreadable(str(e)) from e
    if (size, crc) != (want["size"], want["crc32"]):
        raise _Unreadable(
            f"{STATE_FILE} is {size} bytes crc32 {crc:08x}, committed {want['size']} bytes crc32 {want['crc32']:08x}"
        )
    # The bytes are those committed: a failure from here on is a real error, not corruption.
    return torch.load(source, map_location=map_location, weights_only=weights_only)


def load_latest(
    *,
    dir: str | os.PathLike[str] | None = None,
    map_location: Any = "cpu",
    weights_only: bool = True,
    agree: bool | None = None,
) -> tuple[Any, int] | None:
    """Load the newest committed save() checkpoint: (state, step), or None when there is none.

    A committed checkpoint whose bytes no longer match its marker (truncated, missing, I/O
    error) is skipped with a warning on the `ava.ckpt` logger and the previous one is tried.
    `weights_only` is torch.load's (True: tensors, dicts, lists, numbers, strings only).

    `agree` (default: on when a torch.distributed job of more than one process is initialized)
    makes the ranks settle on the same step: a collective, so call it on every rank.

    A run started with `ava train --from RUN[@STEP]` gets AVA_INIT_CHECKPOINT, another run's
    committed step directory: while this run has no readable checkpoint of its own (in
    AVA_CHECKPOINT_DIR), that one is loaded, and only read. It must load: CheckpointError if not.
    """
    init = os.environ.get(INIT_ENV) or None
    if init is not None and dir is None and not env.checkpoint_dir():
        return _load_init(init, map_location, weights_only)
    store = _resolve(dir)
    agree = _distributed() if agree is None else agree
    steps = sorted(store.scan()[0], reverse=True)
    if agree:
        steps = _from_rank0(steps)
    for step in steps:
        try:
            state, ok = _read_state(store, step, map_location, weights_only), True
        except _OtherFormat:
            state, ok = None, False
        except _Unreadable as e:
            log.warning("ava.ckpt: %s: step %d is unreadable (%s); trying the previous checkpoint", store.url, step, e)
            state, ok = None, False
        if agree:
            ok = _all_ranks(ok)
        if ok:
            return state, step
    if init is not None and _own(dir):
        return _load_init(init, map_location, weights_only)
    return None


def _own(dir: str | os.PathLike[str] | None) -> bool:
    """Whether `dir` is the run's own checkpoint directory (AVA_CHECKPOINT_DIR, the default)."""
    own = env.checkpoint_dir()
    return dir is None or (own is not None and os.fspath(dir).rstrip("/") == own.rstrip("/"))


def _init_checkpoint(url: str) -> tuple[_Store, int]:
    """The store and step of the checkpoint AVA_INIT_CHECKPOINT names (…/step-00000100)."""
    parent, _, name = url.rstrip("/").rpartition("/")
    match = _NAME.match(name)
    if not parent or match is None or match.group(2):
        raise CheckpointError(f"{INIT_ENV}={url}: expected a checkpoint's step directory (…/step-00000100)")
    store, step = _Store(parent), int(match.group(1))
    if step not in store.scan()[0]:
        raise CheckpointError(f"{INIT_ENV}={url}: no such committed checkpoint")
    return store, step


def _load_init(url: str, map_location: Any, weights_only: bool) -> tuple[Any, int]:
    """The checkpoint AVA_INIT_CHECKPOINT names (…/step-00000100 of another run), read only."""
    store, step = _init_checkpoint(url)
    try:
        state = _read_state(store, step, map_location, weights_only)
    except _Unreadable as e:
        raise CheckpointError(f"{INIT_ENV}={url}: unreadable ({e})") from e
    log.info("ava.ckpt: no checkpoint of this run yet; starting from %s (%s)", url, INIT_ENV)
    return state, step


def _from_rank0(obj: Any, group: ProcessGroup | None = None) -> Any:
    """Rank 0's `obj` on every rank of `group` (a collective).

    torch's broadcast_object_list unpickles through `tensor.numpy()`, and torch's wheel does not
    bring numpy: a fresh environment fails there. The pickle travels as a uint8 tensor instead,
    read back with the standard library.
    """
    device = _collective_device(group)
    src = 0 if group is None else dist.get_global_rank(group, 0)
    data = pickle.dumps(obj) if _rank(group) == 0 else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=src, group=group)
    n = int(size.item())
    if _rank(group) == 0:
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    else:
        payload = torch.empty(n, dtype=torch.uint8, device=device)
    dist.broadcast(payload, src=src, group=group)
    if _rank(group) == 0:
        return obj
    payload = payload.cpu().contiguous()
    return pickle.loads(ctypes.string_at(payload.data_ptr(), n))


def _all_ranks(flag: bool, group: ProcessGroup | None = None) -> bool:
    """True when `flag` is true on every rank (a collective; numpy-free, unlike *_object)."""
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_collective_device(group))
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=group)
    return bool(value.item())


def _collective_device(group: ProcessGroup | None = None) -> torch.device:
    # NCCL moves CUDA tensors only; Gloo (and the rest) take CPU tensors.
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Sharded checkpoints: torch.distributed.checkpoint, every rank writes its own shards.

_gloo: ProcessGroup | None = None


def _checkpoint_group(group: ProcessGroup | None) -> ProcessGroup | None:
    """A Gloo group for background collectives: async DCP must not share NCCL's training group."""
    global _gloo
    if group is not None or not _distributed() or "gloo" in dist.get_backend():
        return group
    if _gloo is None:
        _gloo = dist.new_group(backend="gloo")
    return _gloo


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """Without a process group DCP warns that it assumes one process: that is what we asked for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier(group: ProcessGroup | None) -> None:
    if _distributed(group):
        dist.barrier(group=group)


def _dcp_writer(store: _Store, step: int) -> StorageWriter:
    path = store.step_dir(step)
    if store.local:
        from torch.distributed.checkpoint.filesystem import FileSystemWriter

        return FileSystemWriter(path)
    # Public in torch 2.2+ docs, but exported only from this module.
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    # sync_files would call os.sync() for non-local streams: pointless for object stores.
    return FsspecWriter(store.url_of(path), sync_files=False)


def _dcp_reader(store: _Store, step: int) -> StorageReader:
    path = store.step_dir(step)
    if store.local:
        from torch.distributed.checkpoint.filesystem import FileSystemReader

        return FileSystemReader(path)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(store.url_of(path))


def save_sharded(
    state: dict[str, Any],
    step: int,
    *,
    dir: str | os.PathLike[str] | None = None,
    keep: int | None = None,
    async_: bool = False,
    process_group: ProcessGroup | None = None,
) -> concurrent.futures.Future[int] | None:
    """Save FSDP-style (or any) state with torch.distributed.checkpoint: each rank its shards.

    A collective: call it on every rank with the same `step`. `state` may hold Stateful objects
    (DCP calls their state_dict()). Rank 0 writes the commit marker after DCP's `.metadata`.
    With `async_=True` only DCP's copy to CPU blocks; persisting and committing run in the
    background (collectives on a separate Gloo group, created once, when the job uses another
    backend). Returns a Future of the step (async) or None.
    """
    from torch.distributed.checkpoint import state_dict_saver

    entered = time.monotonic()
    store, keep = _resolve(dir), _keep(keep)
    _timing.saved_at = entered
    wait()
    rank0 = _rank(process_group) == 0
    if rank0:
        store.remove(step)
        if store.local:
            os.makedirs(store.step_dir(step), exist_ok=True)
    _barrier(process_group)
    started = time.monotonic()
    stall: list[float] = []  # known once save_sharded returns; the commit may run before (sync)

    def commit() -> int:
        if rank0:
            seconds = time.monotonic() - started
            marker: dict[str, Any] = {
                "step": step,
                "format": "dcp",
                "time": time.time(),
                "seconds": round(seconds, 3),
                "world_size": dist.get_world_size(process_group) if _distributed() else 1,
            }
            marker.update(_timing.marker_fields(seconds, stall[0] if stall else None))
            store.put_atomic(store.marker(step), json.dumps(marker).encode())
            _prune(store, step, keep)
        return step

    if not async_:
        with _single_process_quiet():
            state_dict_saver.save(
                state,
                storage_writer=_dcp_writer(store, step),
                process_group=process_group,
                no_dist=not _initialized(),
            )
        commit()
        _barrier(process_group)  # every rank sees the commit once save_sharded returns
        _timing.stalled(time.monotonic() - entered)
        return None
    group = _checkpoint_group(process_group)
    persisted = state_dict_saver.async_save(
        state, storage_writer=_dcp_writer(store, step), process_group=group, no_dist=not _initialized()
    )
    # The upload's Future, or (newer torch) a response that holds it.
    upload = cast("concurrent.futures.Future[Any]", getattr(persisted, "upload_completion", persisted))

    stall.append(time.monotonic() - entered)
    _timing.stalled(stall[0])

    def finish() -> int:
        upload.result()
        return commit()

    return _submit(finish)


def _dcp_problem(store: _Store, step: int) -> str | None:
    """Why a committed DCP step cannot be read whole (missing `.metadata` or short files), or None."""
    try:
        marker = store.read_marker(step)
        if marker.get("format") != "dcp":
            raise _OtherFormat(f"format {marker.get('format')!r}, not a save_sharded() checkpoint")
        reader = _dcp_reader(store, step)
        metadata = reader.read_metadata()
        need: dict[str, int] = {}
        for info in (metadata.storage_data or {}).values():
            need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
        path = store.step_dir(step)
        store.fs.invalidate_cache(path)
        sizes = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e["size"] for e in store.fs.ls(path, detail=True)}
    except _OtherFormat:
        raise
    except _Unreadable as e:
        return str(e)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    for name, size in need.items():
        if sizes.get(name, -1) < size:
            return f"{name} is {sizes.get(name, 0)} bytes, needs {size}"
    return None


def load_sharded(
    state: dict[str, Any],
    *,
    dir: str | os.PathLike[str] | None = None,
    process_group: ProcessGroup | None = None,
) -> int | None:
    """Load the newest intact save_sharded() checkpoint into `state` in place; its step or None.

    A collective: call it on every rank. Rank 0 picks the step (skipping, with a warning, a
    committed step whose `.metadata` or shard files are missing or short) and every rank loads
    it, so all ranks resume from the same step. Other load errors (keys that do not match the
    state, say) are raised, not skipped. Like load_latest, a run without a checkpoint of its own
    loads AVA_INIT_CHECKPOINT (`ava train --from`), only reading it.
    """
    from torch.distributed.checkpoint import state_dict_loader

    init = os.environ.get(INIT_ENV) or None
    chosen: int | None
    if init is not None and dir is None and not env.checkpoint_dir():
        store, chosen = _init_sharded(init)
    else:
        store, chosen = _choose_sharded(dir, process_group)
        if chosen is None and init is not None and _own(dir):
            store, chosen = _init_sharded(init)
    if chosen is None:
        return None
    with _single_process_quiet():
        state_dict_loader.load(
            state,
            storage_reader=_dcp_reader(store, chosen),
            process_group=process_group,
            no_dist=not _initialized(),
        )
    return chosen


def _init_sharded(url: str) -> tuple[_Store, int]:
    """AVA_INIT_CHECKPOINT's store and step, checked whole as save_sharded() wrote it."""
    store, step = _init_checkpoint(url)
    try:
        problem = _dcp_problem(store, step)
    except _OtherFormat as e:
        raise CheckpointError(f"{INIT_ENV}={url}: {e}") from e
    if problem is not None:
        raise CheckpointError(f"{INIT_ENV}={url}: unreadable ({problem})")
    log.info("ava.ckpt: no checkpoint of this run yet; starting from %s (%s)", url, INIT_ENV)
    return store, step


def _choose_sharded(
    dir: str | os.PathLike[str] | None, process_group: ProcessGroup | None
) -> tuple[_Store, int | None]:
    """The run's newest intact save_sharded() step, rank 0's choice on every rank (a collective)."""
    store = _resolve(dir)
    chosen: int | None = None
    if _rank(process_group) == 0:
        for step in sorted(store.scan()[0], reverse=True):
            try:
                problem = _dcp_problem(store, step)
            except _OtherFormat:
                continue
            if problem is None:
                chosen = step
                break
            log.warning(
                "ava.ckpt: %s: step %d is unreadable (%s); trying the previous checkpoint", store.url, step, problem
            )
    if _distributed(process_group):
        chosen = _from_rank0(chosen, process_group)
    return store, chosen
