"""What a training script needs to know about its place in a run, and its progress heartbeat.

Imported on the nodes by training scripts: standard library only. Every function also works
when the script runs outside ava (plain `python train.py`, or torchrun without ava), falling back
to a single process: rank 0 of 1, no run id, no heartbeat.

The values come from the environment that torchrun (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`,
`LOCAL_WORLD_SIZE`) and ava's agent (`AVA_*`) set for each process.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import time
import warnings
from typing import IO

__all__ = [
    "PROGRESS_MIN_INTERVAL_S",
    "attempt",
    "cache_dir",
    "checkpoint_dir",
    "checkpoint_keep",
    "local_rank",
    "local_world_size",
    "node",
    "progress",
    "rank",
    "run_id",
    "world_size",
]

# progress() writes at most this often, so calling it every step costs a clock read.
PROGRESS_MIN_INTERVAL_S = 0.5


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}: expected an integer, got {raw!r}") from None


def _str(name: str) -> str | None:
    return os.environ.get(name) or None


def rank() -> int:
    """Global rank of this process (`RANK`); 0 outside a launcher."""
    return _int("RANK", 0)


def local_rank() -> int:
    """Rank of this process on its node (`LOCAL_RANK`): the GPU index to use; 0 outside a launcher."""
    return _int("LOCAL_RANK", 0)


def world_size() -> int:
    """Number of processes in the job (`WORLD_SIZE`); 1 outside a launcher."""
    return _int("WORLD_SIZE", 1)


def local_world_size() -> int:
    """Number of processes of the job on this node (`LOCAL_WORLD_SIZE`); 1 outside a launcher."""
    return _int("LOCAL_WORLD_SIZE", 1)


def run_id() -> str | None:
    """The ava run id (`AVA_RUN_ID`), e.g. `charlm-20261123-101200-a3f1`; None outside ava."""
    return _str("AVA_RUN_ID")


def attempt() -> int:
    """Which start of the run this is (`AVA_ATTEMPT`): 0 first, +1 after each failover."""
    return _int("AVA_ATTEMPT", 0)


def node() -> str | None:
    """Inventory name of the node this process runs on (`AVA_NODE`); None outside ava."""
    return _str("AVA_NODE")


def checkpoint_dir() -> str | None:
    """The recipe's checkpoint directory (`AVA_CHECKPOINT_DIR`): a local path or fsspec URL."""
    return _str("AVA_CHECKPOINT_DIR")


def checkpoint_keep() -> int | None:
    """How many checkpoints to keep (`AVA_CHECKPOINT_KEEP`, the recipe's checkpoint.keep), or None."""
    keep = _int("AVA_CHECKPOINT_KEEP", 0)
    return keep if keep > 0 else None


def cache_dir() -> str | None:
    """The node-local cache directory (`AVA_CACHE_DIR`); None outside ava."""
    return _str("AVA_CACHE_DIR")


# Monotonic time of the last heartbeat written by this process (None: never written).
_last_progress: float | None = None
_progress_warned = False
# Monotonic time of the last metrics line without metrics (a step-rate point), None: never.
_last_line: float | None = None

# The metrics file (AVA_METRICS_FILE) stays open between calls, buffered, and is flushed at
# most every METRICS_FLUSH_S (and at exit): a write per line would cost more than the line.
METRICS_FLUSH_S = 0.2
_metrics_path: str | None = None
_metrics_out: IO[str] | None = None
_metrics_rank = 0  # this process's rank, read once when the file is opened
_metrics_flushed = 0.0  # monotonic time of the last flush
_metrics_warned = False
_metric_names: dict[str, str] = {}  # a metric's name -> its JSON text, made once


def progress(step: int, *, force: bool = False, all_ranks: bool = False, **metrics: float) -> None:
    """Tell the agent that training advanced to `step` (a heartbeat; no heartbeat = hung), and
    record scalar metrics for it: `progress(step, loss=2.31, lr=3e-4)`.

    Heartbeat: writes `"<step> <unix time>"` (e.g. `"1200 1763892000.125"`, no newline) to the
    file named by `AVA_PROGRESS_FILE`, atomically (temporary file, then os.replace), so the agent
    never reads a half-written line. It writes at most once per PROGRESS_MIN_INTERVAL_S (0.5 s),
    the first call always writes, and `force=True` writes regardless (e.g. after a checkpoint).

    Metrics: every call with metrics appends one JSON line
    `{"step": 1200, "time": 1763892000.125, "rank": 0, "metrics": {"loss": 2.31}}` to the file
    named by `AVA_METRICS_FILE` (set by ava; set it yourself outside ava to keep them locally),
    from rank 0 only unless `all_ranks=True`; a call without metrics appends a line when it
    writes a heartbeat, so the step rate is known too. Values are anything float() takes. The
    file stays open, buffered, flushed every METRICS_FLUSH_S (0.2 s) and at exit, never synced:
    a few µs per call (benchmarks/metrics_call.py); a rank killed outright loses its last 0.2 s.

    A no-op without either variable (outside ava). A failed write is reported once as a warning
    and never stops training.
    """
    global _last_progress, _progress_warned, _last_line
    now = time.monotonic()
    if metrics or force or _last_line is None or now - _last_line >= PROGRESS_MIN_INTERVAL_S:
        if not metrics:
            _last_line = now
        _record(step, metrics, all_ranks, now)
    path = os.environ.get("AVA_PROGRESS_FILE")
    if not path:
        return
    if not force and _last_progress is not None and now - _last_progress < PROGRESS_MIN_INTERVAL_S:
        return
    _last_progress = now
    # Per-process temporary name: several local ranks may share one progress file.
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"{int(step)} {time.time():.3f}")
        os.replace(tmp, path)
    except OSError as e:
        if not _progress_warned:
            _progress_warned = True
            warnings.warn(f"ava: cannot write progress heartbeat to {path}: {e}", stacklevel=2)


def _record(step: int, metrics: dict[str, float], all_ranks: bool, now: float) -> None:
    """One line for `step` in AVA_METRICS_FILE (see progress); nothing without the variable."""
    global _metrics_flushed
    path = os.environ.get("AVA_METRICS_FILE")
    if not path:
        return
    out = _metrics_out if path == _metrics_path else _open_metrics(path)
    if out is None or (_metrics_rank != 0 and not all_ranks):
        return
    parts = []
    for name, value in metrics.items():
        key = _metric_names.get(name)
        if key is None:
            key = _metric_names[name] = json.dumps(name)
        try:
            number = float(value)
        except (TypeError, ValueError):
            _warn_metrics(f"metric {name}: expected a number, got {type(value).__name__}")
            continue
        # repr() is the shortest exact text of a float; JSON has no nan or inf, Python's reader takes these.
        text = repr(number) if math.isfinite(number) else ("NaN" if number != number else json.dumps(number))
        parts.append(f"{key}: {text}")
    try:
        out.write(
            f'{{"step": {int(step)}, "time": {time.time():.6f}, "rank": {_metrics_rank}, '
            f'"metrics": {{{", ".join(parts)}}}}}\n'
        )
        if now - _metrics_flushed >= METRICS_FLUSH_S:
            _metrics_flushed = now
            out.flush()
    except OSError as e:
        _warn_metrics(f"cannot write metrics to {path}: {e}")


def _open_metrics(path: str) -> IO[str] | None:
    """Open (append) the metrics file named by AVA_METRICS_FILE, closing one opened before."""
    global _metrics_path, _metrics_out, _metrics_rank
    _close_metrics()
    _metrics_path, _metrics_rank = path, rank()
    try:
        _metrics_out = open(path, "a", encoding="utf-8")
    except OSError as e:
        _warn_metrics(f"cannot write metrics to {path}: {e}")
    return _metrics_out


def _close_metrics() -> None:
    """Flush and close the metrics file (at exit too: a rank that raises keeps its last lines)."""
    global _metrics_out
    if _metrics_out is not None:
        try:
            _metrics_out.close()
        except OSError:
            pass
        _metrics_out = None


atexit.register(_close_metrics)


def _warn_metrics(message: str) -> None:
    global _metrics_warned
    if not _metrics_warned:
        _metrics_warned = True
        warnings.warn(f"ava: {message}", stacklevel=4)
