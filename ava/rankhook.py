"""Shipped to the nodes as `sitecustomize.py` at the top of ava's runtime tree, which is on every
rank's PYTHONPATH: it notes when a rank's uncaught exception reached the top, and, where the
attempt's torchrun came from a spare (AVA_ZYGOTE, see ava/agent/zygote.py), has the spare fork
the rank's script with torch already imported while this interpreter only proxies for it.

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
from typing import Any


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


def _proxy(path: str) -> None:
    """Hand this rank's script to the zygote at PATH and proxy for the worker it forks: forward
    signals, exit as it exits. Returns (the rank runs itself) when the zygote cannot take it."""
    import json
    import signal
    import socket

    if not sys.argv or sys.argv[0] in ("", "-c", "-m") or not os.path.isfile(sys.argv[0]):
        return  # only `python script.py ...`, as torchrun starts a script
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        folder = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            sock.settimeout(5.0)
            sock.connect(f"/proc/self/fd/{folder}/{os.path.basename(path)}")
        finally:
            os.close(folder)
        umask = os.umask(0)
        os.umask(umask)
        names = {"SIGINT": signal.SIGINT, "SIGHUP": signal.SIGHUP, "SIGTERM": signal.SIGTERM}
        request = {
            "argv": sys.argv,
            "env": dict(os.environ),
            "cwd": os.getcwd(),
            "path": sys.path,
            "umask": umask,
            "unbuffered": bool(getattr(sys.stdout, "write_through", False)),
            "ignored": [name for name, number in names.items() if signal.getsignal(number) == signal.SIG_IGN],
        }
        data = json.dumps(request).encode() + b"\n"
        sent = socket.send_fds(sock, [data], [0, 1, 2])
        sock.sendall(data[sent:])
        reply = b""
        while b"\n" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("the zygote closed")
            reply += chunk
        worker = int(json.loads(reply.split(b"\n", 1)[0])["pid"])
        reply = reply.split(b"\n", 1)[1]
    except (OSError, ValueError, KeyError):
        sock.close()
        return
    # From here this process is the worker's stand-in: it never runs the script itself, not
    # even when something below fails (site.py would carry on into the script after an error
    # in sitecustomize: the script would run a second time, in this process).
    try:
        _stand_in(sock, worker, reply)
    finally:
        os._exit(1)


def _stand_in(sock: Any, worker: int, reply: bytes) -> None:
    """Forward signals to WORKER and exit as it exits (its status comes on SOCK)."""
    import json
    import signal

    def forward(signum: int, frame: object) -> None:
        try:
            os.kill(worker, signum)
        except ProcessLookupError:
            pass

    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT):
        if signal.getsignal(number) != signal.SIG_IGN:
            signal.signal(number, forward)
    sock.settimeout(None)
    while b"\n" not in reply:
        try:
            chunk = sock.recv(4096)
        except InterruptedError:
            continue
        if not chunk:
            os._exit(1)  # the zygote is gone (the attempt's fence was killed)
        reply += chunk
    code = int(json.loads(reply.split(b"\n", 1)[0])["exit"])
    if code < 0:
        # Die of the worker's signal, as torchrun would have seen the worker die; no core file.
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
        if -code not in (signal.SIGKILL, signal.SIGSTOP):  # (those two cannot be set, only sent)
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        code = 128 - code
    os._exit(code)


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
_zygote = os.environ.get("AVA_ZYGOTE")
if _zygote and _rank is not None:
    _proxy(_zygote)
