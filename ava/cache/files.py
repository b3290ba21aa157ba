"""File operations the cache's modules share: every process on the node reads and writes the
same cache directory, so a file is replaced whole or not at all, and a leftover is judged by
whether the process that wrote it still runs. Standard library only.
"""

from __future__ import annotations

import os

STALE_S = 3600.0  # a leftover this old is garbage even if its pid was reused


def atomic_write(path: str, data: bytes) -> None:
    """Replace PATH with DATA: readers see the old bytes or the new ones, never a part."""
    tmp = f"{path}.tmp.{os.getpid()}.{os.urandom(4).hex()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        unlink(tmp)
        raise


def unlink(path: str) -> None:
    """Remove PATH; one already gone is fine (another process may have removed it)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
