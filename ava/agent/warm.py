"""Spare torchrun interpreters: a resume does not wait for `import torch` on the node.

Each attempt's monitor starts one spare for its run: a low-priority interpreter that imports
torch.distributed.run, then waits on the run's unix socket (RUN_DIR/spare.sock, 0600). The
next attempt's monitor claims it, moves it into the new attempt's fence and hands it the job's
argv, env, cwd, umask and stdio (SCM_RIGHTS); the spare forks a child that becomes torchrun and
reports the child's pid, then its exit status, over the socket (`SpareJob`, which the monitor
watches as it would a Popen). No spare, or one that does not fit: the monitor spawns as before.

    monitor N ──spawn──► spare ──(attempt N ends)──► monitor N+1 claims ──► spare forks torchrun

A spare never outlives its run: it carries AVA_RUN_ID, exits IDLE seconds after the monitor
that started it is gone with no claim, when a newer spare takes the socket, or when the run
succeeds (`end_spares`); claimed, it is in the attempt's fence and dies with it.
On for a run whose recipe can restart (`[failover] warm_spares`, default true, and max_restarts
> 0): the supervisor puts AVA_WARM_SPARES=1 in its spec's env; a recipe's own [env] value wins.

Between runs, a node keeps one spare of its own (the inventory's `keep_warm`, seconds in the
spec): an attempt after which no other of its run comes starts one in WORKDIR/warm/, and the
next run's first attempt on that node claims it instead of importing torch, so a short run
started again and again (a smoke test, a sweep, CI) pays that import once. It fits only an
interpreter, an environment that shapes `import torch` (NODE_FIT_ENV) and site-packages equal
to its own (a pip install since: stale, it exits), and exits after keep_warm seconds unclaimed.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from . import layout, procs
from .zygote import ENV as ZYGOTE_ENV
from .zygote import Zygote, run_program

SOCKET = "spare.sock"  # in the run's directory on the node (layout.run_dir)
ENABLE = "AVA_WARM_SPARES"  # "1" in a run's env: its attempts keep a spare
MARK = "AVA_SPARE"  # <run>.<node> in a spare's environment: end_spares finds it by that
IDLE = 10.0  # seconds a spare waits for a claim once the monitor that started it is gone
LOOK = 0.25  # how often an idle spare looks at its creator and its socket
NICE = 10  # added while it imports and waits: the running job comes first
HELLO_TIMEOUT = 1.0
FRESH_TIMEOUT = 60.0  # the longest an attempt waits for a spare it started itself to import torch
FORK_TIMEOUT = 10.0
EXIT_WAIT = 1.0  # once torchrun is gone, how long poll() waits for the spare's report of it
TORCHRUN = ["-m", "torch.distributed.run"]
RENDEZVOUS_POLL = 0.1  # how often a spare's torchrun looks whether the other nodes have joined
KILLED = -signal.SIGKILL  # torchrun's code when the spare died before it could say
NODE_DIR = "warm"  # WORKDIR/warm/spare.sock: the node's spare between runs (keep_warm)
NODE_MARK = "/warm/"  # MARK of a node's spare: NODE_MARK + node ("/" is in no run id)
# What `import torch` may read from the environment (library paths, allocator and thread
# settings, torch's own switches): a node's spare made for one run serves the next only where
# these are equal. The rest of the environment is set when the spare forks torchrun.
NODE_FIT_ENV = ("PYTHON", "LD_", "TORCH", "OMP_", "MKL_", "KMP_", "GLIBC_", "MALLOC_", "CUDA_", "NVIDIA_")
NODE_BASIC_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR")  # and LC_*
STALE = "stale"  # a spare's fit once the site-packages it imported from have changed
NEXT = "next.json"  # in the node's directory: its newest spare (pid, start, fit) until claimed


class Job(Protocol):
    """What the monitor needs of a started job: a Popen, or a SpareJob."""

    pid: int
    returncode: Any

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


def wanted(env: dict[str, str], argv: list[str], admits: bool) -> bool:
    """Whether an attempt with this spec env and argv uses and keeps spares; ADMITS: its fence
    can take a running process (Fence.admit)."""
    return env.get(ENABLE) == "1" and admits and argv[1:3] == TORCHRUN


def fit(argv: list[str], env: dict[str, str]) -> str:
    """What must be equal between the job a spare was made for and the one it runs: the
    interpreter and the PYTHON* variables that shaped its start."""
    shaping = {k: v for k, v in sorted(env.items()) if k.startswith("PYTHON")}
    return hashlib.sha256(json.dumps([argv[0], shaping]).encode()).hexdigest()[:32]


def keeps_warm(keep_warm: float, argv: list[str], admits: bool) -> bool:
    """Whether the node keeps a spare between runs for a job with this argv; ADMITS: its fence
    can take a running process (Fence.admit)."""
    return keep_warm > 0 and admits and argv[1:3] == TORCHRUN


def node_dir(work: Path) -> Path:
    return work / NODE_DIR


def _own_pythonpath(env: dict[str, str], work: Path) -> str:
    """The job's PYTHONPATH less ava's entries for one run (its run and runtime directories,
    under WORKDIR): what a recipe added, equal from one run to the next."""
    inside = str(work).rstrip("/") + "/"
    kept = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and not (p + "/").startswith(inside)]
    return os.pathsep.join(kept)


def node_fit(argv: list[str], env: dict[str, str], work: Path) -> str:
    """What must be equal between the run a node's spare was made after and the run it serves:
    the interpreter and the environment `import torch` reads (NODE_FIT_ENV)."""
    shaping = {
        k: v
        for k, v in sorted(env.items())
        if k.startswith(NODE_FIT_ENV) and k not in ("CUDA_VISIBLE_DEVICES", "PYTHONPATH")
    }
    shaping["PYTHONPATH"] = _own_pythonpath(env, work)
    return "node-" + hashlib.sha256(json.dumps([_interpreter(argv[0], env), shaping]).encode()).hexdigest()[:32]


def _interpreter(python: str, env: dict[str, str]) -> str:
    """PYTHON as the job's PATH finds it: a bare `python3` is another interpreter (another
    venv, other packages) under another PATH. Symlinks are kept: a venv's python links to
    the same binary as the interpreter it was made from."""
    if "/" in python:
        return os.path.abspath(python)
    return os.path.abspath(shutil.which(python, path=env.get("PATH", os.defpath)) or python)


def _code_root() -> tuple[str, str]:
    """This module's name and the sys.path entry it is imported from (the agent's zipapp or
    the source tree), so a new interpreter can run it with -m."""
    name = __spec__.name if __spec__ is not None else __name__
    root = os.path.abspath(__file__)
    for _ in name.split("."):
        root = os.path.dirname(root)
    return name, root


def start(
    run: str, node: str, run_dir: Path, log: Path, argv: list[str], env: dict[str, str], *, niced: bool = True
) -> subprocess.Popen[bytes] | None:
    """Start a spare for the next attempt of RUN here; ARGV and ENV are this attempt's job's.
    Its own session, outside the fence (the attempt's end must not end it). NICED: at low
    priority (a spare for later); else at the job's (one this attempt waits for)."""
    _, root = _code_root()
    spare_env = {k: v for k, v in env.items() if k not in ("AVA_JOB_TAG", "CUDA_VISIBLE_DEVICES")}
    spare_env[MARK] = f"{run}.{node}"
    spare_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    me = os.getpid()
    priority = "niced" if niced else "now"
    return _spawn(argv[0], run_dir, log, spare_env, [str(me), str(procs.start_time(me)), fit(argv, env)], priority)


def start_node_spare(
    work: Path, node: str, log: Path, argv: list[str], env: dict[str, str], keep_warm: float
) -> subprocess.Popen[bytes] | None:
    """Start the node's spare for its next run, made after a run with this ARGV and job ENV: it
    waits KEEP_WARM seconds for a claim, then exits. It carries nothing of the run it follows
    (no AVA_* variable, none of its directories): only what NODE_FIT_ENV and NODE_BASIC_ENV name."""
    _, root = _code_root()
    where = node_dir(work)
    try:
        os.makedirs(where, mode=0o700, exist_ok=True)
    except OSError:
        return None
    # What its import may read, and no more: a run's other values (a token in its [env]) do
    # not outlive the run in a process that waits for the next one.
    spare_env = {
        k: v
        for k, v in env.items()
        if (k.startswith(NODE_FIT_ENV) or k in NODE_BASIC_ENV or k.startswith("LC_")) and k != "CUDA_VISIBLE_DEVICES"
    }
    spare_env[MARK] = NODE_MARK + node
    spare_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, _own_pythonpath(env, work)) if p)
    key = node_fit(argv, env, work)
    spare = _spawn(argv[0], where, log, spare_env, ["0", "-", key, f"{keep_warm:g}"], "idle")
    if spare is not None:
        # A run started before it listens waits for it rather than import torch a second time.
        note = {"pid": spare.pid, "start": procs.start_time(spare.pid), "fit": key}
        try:
            layout.write_json_atomic(where / NEXT, note)
        except OSError:
            pass
    return spare


def importing(work: Path, fit_key: str) -> tuple[int, int] | None:
    """The node's newest spare (pid, start time) while it lives and fits FIT_KEY, ready or not
    yet; one that does not fit is ended here (the run's end starts one that does)."""
    note = _read_next(node_dir(work))
    if not isinstance(note, dict) or not isinstance(note.get("pid"), int):
        return None
    pid, started = note["pid"], note.get("start")
    if not isinstance(started, int) or not procs.alive(pid, started):
        return None  # gone (or unknown when it started: its pid may be another process's now)
    if note.get("fit") != fit_key:
        procs.signal_pids([pid], signal.SIGKILL)
        return None
    return pid, started


def _read_next(where: Path) -> Any:
    try:
        return layout.read_json(where / NEXT)
    except OSError:
        return None  # another user's directory (a shared workdir): no spare of ours there


def claim_once_imported(
    work: Path, spare: tuple[int, int], handover: Callable[[], SpareJob | None], give_up: Callable[[], bool]
) -> SpareJob | None:
    """HANDOVER (a claim of the node's spare) once SPARE, still importing torch, listens;
    None once it is gone, another run claimed it, FRESH_TIMEOUT passed or GIVE_UP says so."""
    pid, started = spare
    try:  # it was started at the lowest priority, for later: now a run waits on it
        os.setpriority(os.PRIO_PROCESS, pid, os.getpriority(os.PRIO_PROCESS, 0))
    except OSError:
        pass
    _set_autogroup(pid, 0)
    end = time.monotonic() + FRESH_TIMEOUT
    while time.monotonic() < end and not give_up():
        job = handover()
        if job is not None:
            return job
        note = _read_next(node_dir(work))
        if not (isinstance(note, dict) and note.get("pid") == pid) or not procs.alive(pid, started):
            return handover()
        time.sleep(0.02)
    return None


def _spawn(
    python: str, where: Path, log: Path, env: dict[str, str], args: list[str], priority: str
) -> subprocess.Popen[bytes] | None:
    """PRIORITY: "now" (the job's), "niced" (lowered by NICE once it runs), or "idle": at the
    lowest from its first instruction, for a spare started as a run ends, while the nodes and
    the CLI still wind it down (on one machine, as in the tests, they share its CPUs)."""
    name, _ = _code_root()
    preexec = None
    if priority == "idle":
        now = os.getpriority(os.PRIO_PROCESS, 0)
        if _may_restore(now):
            priority, preexec = f"idle:{now}", functools.partial(os.setpriority, os.PRIO_PROCESS, 0, 19)
        else:
            priority = "niced"
    command = [python, "-m", name, str(where), *args[:3], priority, *args[3:]]
    try:
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError:
        return None  # a full disk: no spare, rather than no run
    try:
        return subprocess.Popen(
            command,
            cwd=where,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            preexec_fn=preexec,
        )
    except OSError:
        return None  # no spare: the next attempt starts torchrun as before
    finally:
        os.close(out)


def end_spares(run: str, node: str, run_dir: Path) -> None:
    """Kill every spare of RUN on NODE and remove its socket (no attempt comes after this one)."""
    procs.signal_pids(procs.pids_with_env(f"{MARK}={run}.{node}"), signal.SIGKILL)
    try:
        os.unlink(run_dir / SOCKET)
    except OSError:
        pass


# -- the monitor's side: claim a spare ---------------------------------------------------------


class SpareJob:
    """torchrun as a spare's child: its pid and exit status come over the spare's socket."""

    def __init__(self, sock: socket.socket, pid: int, spare_pid: int) -> None:
        self.sock = sock
        self.pid = pid
        self.spare_pid = spare_pid
        self.returncode: int | None = None
        self._started = procs.start_time(pid)
        self._buf = b""
        self._eof = False

    def _read(self, timeout: float) -> None:
        if self._eof:
            return
        ready, _, _ = select.select([self.sock], [], [], max(timeout, 0.0))
        if not ready:
            return
        try:
            data = self.sock.recv(4096)
        except OSError:
            data = b""
        if not data:
            self._eof = True
            return
        self._buf += data
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            msg = json.loads(line)
            if "exit" in msg:
                self.returncode = int(msg["exit"])

    def poll(self) -> int | None:
        if self.returncode is None:
            gone = not procs.alive(self.pid, self._started)
            # torchrun gone: its spare reaps it and says how it ended within moments.
            self._read(EXIT_WAIT if gone else 0.0)
            if self.returncode is None and gone and self._eof:
                self.returncode = KILLED  # the spare died with it (the fence's kill)
        if self.returncode is not None and self.sock.fileno() >= 0:
            self.sock.close()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if end is not None and time.monotonic() >= end:
                raise subprocess.TimeoutExpired(["torchrun"], timeout or 0.0)
            left = LOOK if end is None else min(LOOK, end - time.monotonic())
            self._read(left)
        assert self.returncode is not None
        return self.returncode


def _lines(sock: socket.socket, timeout: float) -> dict[str, Any]:
    """One JSON line from SOCK within TIMEOUT seconds."""
    sock.settimeout(timeout)
    buf = b""
    while b"\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("spare closed the socket")
        buf += chunk
    line, _ = buf.split(b"\n", 1)
    found = json.loads(line)
    if not isinstance(found, dict):
        raise ValueError("not a JSON object")
    return found


def _connect(run_dir: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Through a directory fd: a unix socket path holds at most 107 bytes, a workdir more.
        dfd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            sock.settimeout(HELLO_TIMEOUT)
            sock.connect(f"/proc/self/fd/{dfd}/{SOCKET}")
        finally:
            os.close(dfd)
        return sock
    except OSError:
        sock.close()
        return None


def claim(
    run_dir: Path,
    admit: Callable[[int], None],
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    stdio: tuple[int, int, int],
    umask: int,
    zygote_path: str = "",
    fit_key: str = "",
) -> SpareJob | None:
    """Start the job through the spare in RUN_DIR (the run's, or the node's), if one is ready
    and fits (FIT_KEY, else fit()); None: start it as before. ADMIT puts the spare into the
    attempt's fence first (Fence.admit), so torchrun and everything it starts are fenced from
    their first instruction. With ZYGOTE_PATH, the spare also forks the attempt's
    ranks from there (see zygote.py). A spare that does not fit is told to exit."""
    sock = _connect(run_dir)
    if sock is None:
        return None
    spare_pid = 0
    try:
        hello = _lines(sock, HELLO_TIMEOUT)
        spare_pid = int(hello["pid"])
        if hello.get("fit") != (fit_key or fit(argv, env)):
            sock.sendall(b'{"op": "exit"}\n')
            sock.close()
            return None
        admit(spare_pid)
        request = {"op": "run", "argv": argv, "env": env, "cwd": cwd, "umask": umask, "zygote": zygote_path}
        data = json.dumps(request).encode() + b"\n"
        sent = socket.send_fds(sock, [data], list(stdio))
        sock.sendall(data[sent:])
        reply = _lines(sock, FORK_TIMEOUT)
        sock.settimeout(None)
        return SpareJob(sock, int(reply["pid"]), spare_pid)
    except (OSError, ValueError, KeyError, TypeError):
        # Half-way: whatever the spare started is in the fence, which the attempt kills.
        procs.signal_pids([spare_pid] if spare_pid > 0 else [], signal.SIGKILL)
        sock.close()
        return None


def claim_when_ready(
    fresh: subprocess.Popen[bytes], handover: Callable[[], SpareJob | None], give_up: Callable[[], bool]
) -> SpareJob | None:
    """HANDOVER (a claim) once the spare FRESH, started for this attempt, has imported torch and
    listens; None (FRESH killed) if it dies, takes past FRESH_TIMEOUT, or GIVE_UP says so."""
    end = time.monotonic() + FRESH_TIMEOUT
    while fresh.poll() is None and time.monotonic() < end and not give_up():
        job = handover()
        if job is not None:
            return job
        time.sleep(0.02)
    if fresh.poll() is None:
        fresh.kill()
        fresh.wait()
    return None


# -- the spare's side -------------------------------------------------------------------------


def _renice() -> int | None:
    """Lower this process's priority by NICE where it can be raised back for torchrun (root,
    or RLIMIT_NICE allows it); the niceness to restore, None when left as it was."""
    now = os.getpriority(os.PRIO_PROCESS, 0)
    if not _may_restore(now):
        return None
    os.setpriority(os.PRIO_PROCESS, 0, min(now + NICE, 19))
    return now


def _set_autogroup(pid: int, nice: int) -> int | None:
    """Set the niceness of PID's autogroup; the one it had, None where that failed. Where the
    kernel groups processes by session (sched_autogroup), a process's own niceness orders it
    only within its session: a spare, in a session of its own, competes as a whole session
    unless its group is lowered too."""
    where = f"/proc/{pid}/autogroup"
    try:
        with open(where, encoding="ascii") as f:
            before = int(f.read().split()[-1])  # "/autogroup-123 nice 0"
        with open(where, "w", encoding="ascii") as f:
            f.write(str(nice))
        return before
    except (OSError, ValueError, IndexError):
        return None


def _may_restore(now: int) -> bool:
    """Whether a process lowered from niceness NOW may raise itself back to it."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    return os.geteuid() == 0 or (soft != resource.RLIM_INFINITY and 20 - soft <= now)


class Spare:
    def __init__(
        self, run_dir: str, creator: int, creator_start: int | None, fit_key: str, priority: str, idle: float = IDLE
    ) -> None:
        self.dir = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
        self.creator = creator  # 0: none (a node's spare), its idle time runs from the start
        self.creator_start = creator_start
        self.fit = fit_key
        self.idle = idle
        # The niceness torchrun and the ranks get back: "idle:N" was started lowered from N.
        self.restore = int(priority[5:]) if priority.startswith("idle:") else _renice() if priority == "niced" else None
        self.group_restore = _set_autogroup(os.getpid(), 19) if priority.startswith("idle:") else None
        self.listener: socket.socket | None = None
        self.inode = 0
        self.imported_from: dict[str, int] = {}

    def note_site(self) -> None:
        """Remember the site-packages directories torch was imported from, as they are now."""
        self.imported_from = _site_times()

    def stale(self) -> bool:
        """A package installed or removed there since (a directory's mtime moved): the modules
        this interpreter holds may not be what a fresh one would import."""
        return _site_times() != self.imported_from

    def _path(self, name: str) -> str:
        return f"/proc/self/fd/{self.dir}/{name}"

    def listen(self) -> None:
        """Bind a private name, then move it onto the run's socket: a newer spare replaces an
        older one, which sees the name is no longer its own and exits."""
        temp = f".spare-{os.getpid()}.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self._path(temp))
        os.chmod(temp, 0o600, dir_fd=self.dir)
        sock.listen(1)
        self.inode = os.stat(temp, dir_fd=self.dir).st_ino
        os.rename(temp, SOCKET, src_dir_fd=self.dir, dst_dir_fd=self.dir)
        self.listener = sock

    def forget_next(self) -> None:
        """A node's spare, claimed or leaving: NEXT no longer names it (a run that waits on it
        stops waiting)."""
        if self.creator != 0:
            return
        note = _read_next(Path(self._path("")))
        if isinstance(note, dict) and note.get("pid") == os.getpid():
            try:
                os.unlink(NEXT, dir_fd=self.dir)
            except OSError:
                pass

    def _owns_socket(self) -> bool:
        try:
            return os.stat(SOCKET, dir_fd=self.dir).st_ino == self.inode
        except OSError:
            return False

    def _unlisten(self) -> None:
        if self._owns_socket():
            try:
                os.unlink(SOCKET, dir_fd=self.dir)
            except OSError:
                pass
        if self.listener is not None:
            self.listener.close()

    def wait_claim(self) -> socket.socket | None:
        """The claiming monitor's connection; None once idle too long or replaced."""
        assert self.listener is not None
        gone_at: float | None = None
        while True:
            ready, _, _ = select.select([self.listener], [], [], LOOK)
            if ready:
                conn, _ = self.listener.accept()
                uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
                if uid == os.getuid():
                    self._unlisten()
                    return conn
                conn.close()
                continue
            if not self._owns_socket():
                return None
            if gone_at is None and (self.creator == 0 or not procs.alive(self.creator, self.creator_start)):
                gone_at = time.monotonic()
            if gone_at is not None and time.monotonic() - gone_at > self.idle:
                self._unlisten()
                return None

    def serve(self, conn: socket.socket) -> int:
        conn.sendall(json.dumps({"pid": os.getpid(), "fit": STALE if self.stale() else self.fit}).encode() + b"\n")
        conn.settimeout(FORK_TIMEOUT)
        data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
        while not data.endswith(b"\n"):
            chunk = conn.recv(1 << 16)
            if not chunk:
                return 0
            data += chunk
        request = json.loads(data)
        if request.get("op") != "run" or len(fds) != 3:
            return 0
        if self.group_restore is not None:
            _set_autogroup(os.getpid(), self.group_restore)  # its ranks may be forked here
        ranks = Zygote(request["zygote"], self.restore, [self.dir, conn.fileno()]) if request.get("zygote") else None
        if ranks is not None:
            request["env"][ZYGOTE_ENV] = ranks.path
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            conn.close()
            self._become_torchrun(request, fds, ranks.fds() if ranks else [])  # never returns
        for fd in fds:
            os.close(fd)
        conn.settimeout(None)
        try:
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        except OSError:
            pass
        if ranks is not None:
            code = ranks.run(pid)
        else:
            code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        try:
            conn.sendall(json.dumps({"exit": code}).encode() + b"\n")
        except OSError:
            pass
        return 0

    def _become_torchrun(self, request: dict[str, Any], fds: list[int], close: list[int]) -> None:
        code = 1
        try:
            os.setsid()  # its own process group: the monitor signals the job by it
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            # As the monitor's Popen child gets them (the monitor ignores these two).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            if self.restore is not None:
                os.setpriority(os.PRIO_PROCESS, 0, self.restore)
            os.umask(int(request["umask"]))
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
            for fd in {*fds, *close, self.dir} - {0, 1, 2}:
                os.close(fd)
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            run = importlib.import_module("torch.distributed.run")
            _quick_rendezvous()
            sys.argv = [str(run.__file__), *request["argv"][3:]]
            code = run_program(run.main)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)


def _quick_rendezvous() -> None:
    """torchrun's rendezvous polls the store once a second while it waits for the other nodes
    (and waits up to 0.3 s before it joins): a resume would wait up to a second after the last
    node joined. This torchrun polls every RENDEZVOUS_POLL seconds instead; a torch without
    that helper is left as it is."""
    try:
        rendezvous = importlib.import_module("torch.distributed.elastic.rendezvous.dynamic_rendezvous")
    except ImportError:
        return
    delay = getattr(rendezvous, "_delay", None)
    if delay is None:
        return

    def quicker(seconds: float | tuple[float, float]) -> None:
        if isinstance(seconds, tuple):
            delay((seconds[0] / 10, seconds[1] / 10))
        else:
            delay(min(seconds, RENDEZVOUS_POLL))

    rendezvous.__dict__["_delay"] = quicker


def _site_times() -> dict[str, int]:
    """mtime of each site-packages directory on sys.path (pip adds and removes entries there)."""
    found = {}
    for entry in sys.path:
        if entry.endswith(("site-packages", "dist-packages")):
            try:
                found[entry] = os.stat(entry).st_mtime_ns
            except OSError:
                found[entry] = -1
    return found


def main(argv: list[str]) -> int:
    """python -m ava.agent.warm DIR CREATOR_PID CREATOR_START FIT now|niced|idle:N [IDLE]
    (CREATOR_PID 0: no creator, a node's spare, which waits IDLE seconds from its start)."""
    run_dir, creator, creator_start, fit_key, priority, *rest = argv
    started = int(creator_start) if creator_start.isdigit() else None
    idle = float(rest[0]) if rest else IDLE
    spare = Spare(run_dir, int(creator), started, fit_key, priority, idle)
    importlib.import_module("torch.distributed.run")  # what the spare is for
    spare.note_site()
    spare.listen()
    try:
        conn = spare.wait_claim()
    finally:
        spare._unlisten()
        spare.forget_next()
    if conn is None:
        return 0
    return spare.serve(conn)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
