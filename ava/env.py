"""What a training script needs to know about its place in a run, and its progress heartbeat.

Imported on the nodes by training scripts: standard library only. Every function also works
when the script runs outside ava (plain `python train.py`, or torchrun without ava), falling back
to a single process: rank 0 of 1, no run id, no heartbeat.

The values come from the environment that torchrun (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`,
`LOCAL_WORLD_SIZE`) and ava's agent (`AVA_*`) set for each process.
"""

from __future__ import annotations

import os
import time
import warnings

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


def progress(step: int, *, force: bool = False) -> None:
    """Tell the agent that training advanced to `step` (a heartbeat; no heartbeat = hung).

    Writes `"<step> <unix time>"` (e.g. `"1200 1763892000.125"`, no newline) to the file named by
    `AVA_PROGRESS_FILE`, atomically (temporary file, then os.replace), so the agent never reads a
    half-written line. A no-op when the variable is unset (outside ava).

    Cheap enough to call every step: it writes at most once per PROGRESS_MIN_INTERVAL_S (0.5 s),
    the first call always writes, and `force=True` writes regardless (e.g. after a checkpoint).
    A failed write is reported once as a warning and never stops training.
    """
    global _last_progress, _progress_warned
    path = os.environ.get("AVA_PROGRESS_FILE")
    if not path:
        return
    now = time.monotonic()
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
