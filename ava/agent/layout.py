"""Where the agent keeps its files under WORKDIR, and how it writes them safely.

WORKDIR/leases.json, WORKDIR/leases.lock                 the GPU/CPU ledger (see leases.py)
WORKDIR/runs/RUN/attempt-N/{status.json,output.log,progress,spec.json,stop.json,agent.log,rank-errors/}
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from typing import Any

STATUS = "status.json"
OUTPUT = "output.log"
OUTPUT_TIMES = "output.times"  # "<size> <unix time>" lines: when output.log grew, for logs --timestamps
PROGRESS = "progress"
METRICS = "metrics.jsonl"  # what ava.env.progress(step, **metrics) records, one JSON line per call
SPEC = "spec.json"
STOP = "stop.json"
AGENT_LOG = "agent.log"
RANK_ERRORS = "rank-errors"  # one JSON per rank whose uncaught exception reached the top
# The umask the job runs under: the one the agent was started with (its own files are 0600,
# but a job's checkpoints and outputs follow the user's umask). Set by the agent's main().
JOB_UMASK = 0o022
DEFAULT_GRACE = 10.0  # seconds a stopped job has to exit on its own

# Run ids and node names become path parts and cgroup names: keep them to a safe alphabet.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:+-]{0,200}$")
_ATTEMPT = re.compile(r"^attempt-([0-9]+)$")


class LayoutError(ValueError):
    """A run id or node name that cannot be used as a file or cgroup name."""


def check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value) or ".." in value:
        raise LayoutError(f"{kind} {value!r}: use letters, digits and . _ - only")
    return value


def workdir(path: str) -> Path:
    return Path(os.path.expanduser(path))


def run_dir(work: Path, run: str) -> Path:
    return work / "runs" / check_name("run", run)


def attempt_dir(work: Path, run: str, attempt: int) -> Path:
    return run_dir(work, run) / f"attempt-{int(attempt)}"


def attempts(work: Path, run: str) -> list[int]:
    """Attempt numbers of RUN present on this node, ascending."""
    try:
        names = os.listdir(run_dir(work, run))
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for n in names if (m := _ATTEMPT.match(n)))


def runs(work: Path) -> list[str]:
    try:
        return sorted(n for n in os.listdir(work / "runs") if _NAME.match(n))
    except FileNotFoundError:
        return []


def read_json(path: Path) -> Any:
    """The parsed file, or None when it is absent or half-written by a crashed writer."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (FileNotFoundError, ValueError):
        return None


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written: a short write (quota, full disk) is an error, not
    a truncated file (a write that cannot continue raises OSError, ENOSPC or EDQUOT)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.ENOSPC, f"short write: {len(view)} bytes not written")
        view = view[n:]


def write_json_atomic(path: Path, obj: Any, mode: int = 0o600) -> None:
    """Write to a temp file beside PATH, fsync, and rename over it: readers never see half a
    file, and a failed write leaves the old file and no temp file. Owner-only by default:
    status and stop requests are the run's own; the node-wide ledger asks for 0o660."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = json.dumps(obj, sort_keys=True).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask must not narrow a shared ledger's group bits
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
