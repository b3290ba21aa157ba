"""Shipped to the nodes as `sitecustomize.py` at the top of ava's runtime tree, which is on every
rank's PYTHONPATH: it notes when a rank's uncaught exception reached the top.

That moment, not the process's exit, orders failures: a rank that raises closes its sockets
while the interpreter winds down, and a peer blocked in a collective can die of the broken
connection and exit before it. Standard library only; it does nothing outside an ava attempt
(no AVA_RANK_ERRORS or RANK), then runs the sitecustomize it shadows (Debian's Python has one).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from types import TracebackType


def _install(where: str, rank: str) -> None:
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        try:
            line = traceback.format_exception_only(kind, value)[-1].strip()
            # The first failure of the rank wins (a worker process inherits RANK too).
            fd = os.open(os.path.join(where, f"{rank}.json"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, json.dumps({"time": time.time(), "error": line[:500]}).encode())
            finally:
                os.close(fd)
        except Exception:
            pass  # never stand between the script and its own traceback
        previous(kind, value, tb)

    sys.excepthook = hook


def _chain() -> None:
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None or spec.origin == os.path.abspath(__file__):
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


_where, _rank = os.environ.get("AVA_RANK_ERRORS"), os.environ.get("RANK")
if _where and _rank is not None and os.path.isdir(_where):
    _install(_where, _rank)
try:
    _chain()
except Exception as _error:  # as Python itself does for a broken sitecustomize
    sys.stderr.write(f"Error in sitecustomize; set PYTHONVERBOSE for traceback:\n{_error!r}\n")
