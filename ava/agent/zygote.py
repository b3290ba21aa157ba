"""A claimed spare's second service: a zygote for its attempt's ranks.

torchrun starts each rank as a fresh interpreter; its `import torch` is what a resume waits on.
The spare that became torchrun's parent has torch imported already, so it also listens on the
attempt's zygote socket (AVA_ZYGOTE in torchrun's environment, hence every rank's). A rank's
interpreter, in its sitecustomize (ava/rankhook.py), hands the zygote its argv, env, cwd,
sys.path and stdio, and from then on only proxies: the zygote forks a worker that runs the
script; signals sent to the rank are forwarded to it, and the rank exits with its exit status.

    torchrun ──exec──► rank (proxy) ──socket──► zygote (the spare) ──fork──► worker: the script

The rank stays torchrun's child, with the job's environment: torchrun, the monitor's rank
watch and the fence see it as before. A rank that dies (SIGKILL) takes its worker with it.
"""

from __future__ import annotations

import atexit
import io
import json
import os
import runpy
import select
import signal
import socket
import struct
import sys
import traceback
from typing import Any

ENV = "AVA_ZYGOTE"  # the zygote socket's path, in torchrun's and the ranks' environment
SOCKET = "zygote.sock"  # in the attempt's directory
REQUEST_TIMEOUT = 5.0
LOOK = 0.2  # how often the zygote looks whether a rank was stopped (SIGSTOP) or continued
SIGNALS = {"SIGINT": signal.SIGINT, "SIGHUP": signal.SIGHUP, "SIGTERM": signal.SIGTERM}


def _recv_request(conn: socket.socket, nfds: int) -> tuple[dict[str, Any], list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, nfds)
    while not data.endswith(b"\n"):
        chunk = conn.recv(1 << 16)
        if not chunk:
            raise ConnectionError("closed mid-request")
        data += chunk
    found = json.loads(data)
    if not isinstance(found, dict):
        raise ValueError("not a JSON object")
    return found, list(fds)


def _send(conn: socket.socket, msg: dict[str, Any]) -> None:
    try:
        conn.sendall(json.dumps(msg).encode() + b"\n")
    except OSError:
        pass  # the rank is gone: its worker is killed when its socket reads closed


class Zygote:
    """Bound before torchrun is forked (its ranks find it from their first instruction); run()
    serves them until torchrun ends, then ends what is left of its workers."""

    def __init__(self, path: str, restore_nice: int | None, keep_open: list[int]) -> None:
        self.path = path
        self.restore_nice = restore_nice
        self.keep_open = keep_open  # the spare's own fds, closed in each worker
        dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            name = os.path.basename(path)
            try:
                os.unlink(name, dir_fd=dfd)
            except FileNotFoundError:
                pass
            sock.bind(f"/proc/self/fd/{dfd}/{name}")  # a unix socket path holds 107 bytes at most
            os.chmod(name, 0o600, dir_fd=dfd)
            sock.listen(64)
        finally:
            os.close(dfd)
        self.listener = sock
        self.workers: dict[int, tuple[socket.socket, int, int]] = {}  # conn fd -> (conn, pid, pidfd)
        self.ranks: dict[int, int] = {}  # worker pid -> its rank's pid
        self.stopped: set[int] = set()  # workers stopped because their rank is

    def fds(self) -> list[int]:
        return [self.listener.fileno()]

    def run(self, torchrun: int) -> int:
        """Serve ranks until torchrun (this process's child) ends; its exit code."""
        tfd = os.pidfd_open(torchrun)
        try:
            while True:
                by_pidfd = {w[2]: fd for fd, w in self.workers.items()}
                watched = [self.listener.fileno(), tfd, *self.workers, *by_pidfd]
                ready, _, _ = select.select(watched, [], [], LOOK)
                self._mirror_stops()
                for fd in ready:
                    if fd in by_pidfd and by_pidfd[fd] in self.workers:
                        self._ended(by_pidfd[fd])
                for fd in ready:
                    if fd in self.workers and fd not in by_pidfd:
                        self._rank_spoke(fd)
                if self.listener.fileno() in ready:
                    self._accept()
                if tfd in ready:
                    _, status = os.waitpid(torchrun, 0)
                    return os.waitstatus_to_exitcode(status)
        finally:
            os.close(tfd)
            self.close()

    def _mirror_stops(self) -> None:
        """A rank stopped (SIGSTOP: a debugger, a test's hang) stops its worker; continued, it
        continues it. Stop signals cannot be caught, so the rank cannot forward them."""
        for worker, rank in self.ranks.items():
            stopped = _state(rank) in ("T", "t")
            if stopped and worker not in self.stopped:
                os.kill(worker, signal.SIGSTOP)
                self.stopped.add(worker)
            elif not stopped and worker in self.stopped:
                os.kill(worker, signal.SIGCONT)
                self.stopped.discard(worker)

    def close(self) -> None:
        for fd in list(self.workers):
            conn, pid, pidfd = self.workers.pop(fd)
            _kill(pid)
            os.waitpid(pid, 0)
            os.close(pidfd)
            conn.close()
        self.listener.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def _ended(self, fd: int) -> None:
        conn, pid, pidfd = self.workers.pop(fd)
        self.ranks.pop(pid, None)
        self.stopped.discard(pid)
        _, status = os.waitpid(pid, 0)
        os.close(pidfd)
        _send(conn, {"exit": os.waitstatus_to_exitcode(status)})
        conn.close()

    def _rank_spoke(self, fd: int) -> None:
        conn, pid, _ = self.workers[fd]
        try:
            data = conn.recv(64)
        except OSError:
            data = b""
        if not data:
            _kill(pid)  # the rank died (SIGKILL): its worker goes too; its pidfd reports the end

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        try:
            peer, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if uid != os.getuid():
                raise PermissionError("another user")
            conn.settimeout(REQUEST_TIMEOUT)
            request, fds = _recv_request(conn, 3)
            if len(fds) != 3:
                raise ValueError("expected stdin, stdout and stderr")
        except (OSError, ValueError):
            conn.close()
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for other in [c.fileno() for c, _, _ in self.workers.values()] + [conn.fileno()]:
                    os.close(other)
                code = self._become_worker(request, fds)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        for fd in fds:
            os.close(fd)
        conn.settimeout(None)
        _send(conn, {"pid": pid})
        self.workers[conn.fileno()] = (conn, pid, os.pidfd_open(pid))
        self.ranks[pid] = peer  # the rank's own process

    def _become_worker(self, request: dict[str, Any], fds: list[int]) -> int:
        os.setsid()  # the rank forwards what it is sent; nothing else reaches the worker
        ignored = set(request.get("ignored") or [])
        for name, number in SIGNALS.items():
            if name in ignored:
                signal.signal(number, signal.SIG_IGN)
            elif number == signal.SIGINT:
                signal.signal(number, signal.default_int_handler)
            else:
                signal.signal(number, signal.SIG_DFL)
        if self.restore_nice is not None:
            os.setpriority(os.PRIO_PROCESS, 0, self.restore_nice)
        os.umask(int(request["umask"]))
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in {*fds, *self.keep_open, self.listener.fileno()} - {0, 1, 2}:
            try:
                os.close(fd)
            except OSError:
                pass
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = list(request["argv"])
        sys.path[:] = list(request["path"])
        if request.get("unbuffered"):
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True, write_through=True)
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True, write_through=True)
        hook = sys.modules.get("sitecustomize")
        where, rank = os.environ.get("AVA_RANK_ERRORS"), os.environ.get("RANK")
        if hook is not None and hasattr(hook, "_install") and where and rank is not None and os.path.isdir(where):
            hook._install(where, rank)  # the rank hook, as the rank's own interpreter would have it
        return run_program(lambda: runpy.run_path(sys.argv[0], run_name="__main__"))


def _state(pid: int) -> str:
    """The state letter of PID (R, S, T...), "" when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return ""


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_program(main: Any) -> int:
    """MAIN() as an interpreter runs its program: the exit code, a traceback for an uncaught
    exception, then the exit handlers and flushed output."""
    try:
        main()
        code = 0
    except SystemExit as done:
        if done.code is None:
            code = 0
        elif isinstance(done.code, int):
            code = done.code
        else:
            print(done.code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    return code & 0xFF
