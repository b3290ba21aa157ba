"""The monitor: one detached process per attempt that fences the job, starts it, watches it
and ends it; and its reaper, which ends the job if the monitor itself is killed.

    start ──fork──► child ──setsid, fork──► monitor ──fork──► reaper (holds a pipe's read end)
                                              └──fork──► job child: join fence, exec argv
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from . import layout, leases, procs, status, warm
from .isolation import MARKER, Fence, IsolationError, fence_name, open_fence
from .protocol import AGENT_DIED, DISK_FULL, EXIT, FAILED, OOM, RUNNING, STARTING, STOPPED, STOPPED_REASON, SUCCEEDED
from .ranks import RankWatch
from .spec import Spec
from .teardown import end_fence, teardown
from .zygote import SOCKET as ZYGOTE_SOCKET

TICK = 0.2  # how often the monitor looks at the job
OOM_DRAIN = 3.0  # seconds torchrun gets to wind down after an out-of-memory kill
HEARTBEAT = 1.0  # how often it rewrites status.json
JOB_REAP_TIMEOUT = 10.0
SPARE_DELAY = 30.0  # the next attempt's spare starts at the job's first progress, or after this
# Room kept free in the attempt's directory: on a full disk the monitor gives it back so that
# the final status ("disk-full", and where) can still be written.
RESERVE = "disk-reserve"
RESERVE_BYTES = 64 << 10


class DiskFull(Exception):
    """A write the monitor needs failed for want of space (ENOSPC, EDQUOT) at `path`."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


def job_env(base: dict[str, str], spec: Spec, gpus: list[int], attempt_dir: Path) -> dict[str, str]:
    """Inherited env + spec env + what ava sets: the leased GPUs, the progress file, markers."""
    env = dict(base)
    env.update(spec.env)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    elif spec.gpus_allowed:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU run on a GPU node sees no GPU
    env["AVA_PROGRESS_FILE"] = str(attempt_dir / layout.PROGRESS)
    env["AVA_METRICS_FILE"] = str(attempt_dir / layout.METRICS)
    env["AVA_RANK_ERRORS"] = str(attempt_dir / layout.RANK_ERRORS)  # see ava/rankhook.py
    env["AVA_RUN_ID"] = spec.run
    env[MARKER] = fence_name(spec.run, spec.node, spec.attempt)
    return env


def spawn(spec: Spec, attempt_dir: Path, gpus: list[int], slots: int, ledger_fd: int) -> int:
    """Start the monitor detached from the caller (its session, its stdio, its lifetime) and
    return its pid. The caller holds the ledger lock; the children drop their copy of it."""
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.close(ledger_fd)
            os.setsid()
            if os.fork():
                os._exit(0)
            os.write(w, str(os.getpid()).encode())
            os.close(w)
            _detach(attempt_dir)
            code = Monitor(spec, attempt_dir, gpus, slots).run()
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 64):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    return int(b"".join(chunks) or b"0")


def _detach(attempt_dir: Path) -> None:
    """No fd of the SSH session may stay open, or the connection would wait for the job."""
    null = os.open(os.devnull, os.O_RDONLY)
    log = os.open(attempt_dir / layout.AGENT_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.closerange(3, 65536)
    os.chdir("/")
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Monitor:
    def __init__(self, spec: Spec, attempt_dir: Path, gpus: list[int], slots: int) -> None:
        self.spec = spec
        self.dir = attempt_dir
        self.gpus = gpus
        self.stop_grace: float | None = None
        self._noted = 0  # output.log's size at the last note in output.times
        self._spare: subprocess.Popen[bytes] | None = None  # this attempt's spare for the next
        self._env: dict[str, str] | None = None  # the job's environment, once it is made
        self._children: list[subprocess.Popen[bytes]] = []  # a spare it started for itself
        me = os.getpid()
        self.st: dict[str, Any] = {
            "run": spec.run,
            "attempt": spec.attempt,
            "node": spec.node,
            "user": spec.user,
            "state": STARTING,
            "reason": None,
            "pid": me,
            "pid_start": procs.start_time(me),
            "job_pid": None,
            "job_start": None,
            "started": time.time(),
            "ended": None,
            "exit_code": None,
            "rank_exit_codes": {},
            "rank_fail_times": {},  # rank -> when it failed (raised, else exited): the first is the cause
            "heartbeat": time.time(),
            "progress": None,
            "output_size": 0,
            "output_time": None,
            "gpus": gpus,
            "cpu_slots": slots,
            "cgroup": None,
            "limits": {"memory": spec.limits.memory, "cpus": spec.limits.cpus, "pids": spec.limits.pids},
            "memory_limit": spec.limits.memory,
            "warning": None,
            "error": None,
        }

    def _save(self) -> None:
        self.st["heartbeat"] = time.time()
        self.st["progress"] = status.read_progress(self.dir) or self.st["progress"]
        self.st.update(status.output_fields(self.dir))
        try:
            status.write(self.dir, self.st)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(str(self.dir / layout.STATUS)) from exc
            raise

    def _reserve(self) -> None:
        """Set aside RESERVE_BYTES of real blocks (written, not sparse) for the final status."""
        try:
            fd = os.open(self.dir / RESERVE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                layout.write_all(fd, b"\0" * RESERVE_BYTES)
            finally:
                os.close(fd)
        except OSError:
            self._unreserve()  # already short of space: the heartbeat says so soon enough

    def _unreserve(self) -> None:
        try:
            os.unlink(self.dir / RESERVE)
        except OSError:
            pass

    def _disk_full(self, path: str) -> int:
        """The heartbeat cannot be written: end the job (silent, it would pass for a lost node)
        and report the full disk, in the room the reserve gives back."""
        self.st["error"] = f"disk full: cannot write {path}"
        self.st["disk_full"] = path
        self.st["left_pids"] = end_fence(self.st)[0]
        self._finish(FAILED, DISK_FULL)
        return 1

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.stop_grace = layout.DEFAULT_GRACE

    def _stop_requested(self) -> bool:
        req = layout.read_json(self.dir / layout.STOP)
        if req is not None and self.stop_grace is None:
            self.stop_grace = float(req.get("grace", layout.DEFAULT_GRACE))
        return self.stop_grace is not None

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self._reserve()
        self._save()
        spec = self.spec
        fence = open_fence(spec.isolation, spec.cgroup_parent)
        try:
            fence.create(fence_name(spec.run, spec.node, spec.attempt), spec.limits, self.gpus)
        except IsolationError as exc:
            self.st["cgroup"] = fence.info()
            return self._give_up(f"isolation: {exc}")
        # Record the fence before anything else can die: stop and status find it from here.
        self.st["cgroup"] = fence.info()
        self.st["warning"] = fence.warning
        self._save()
        reaper_w = self._start_reaper(fence)
        self._save()
        try:
            code = self._supervise(fence)
        except DiskFull as full:
            code = self._disk_full(full.path)
        except Exception:
            self.st["error"] = traceback.format_exc(limit=5)
            self.st["left_pids"] = end_fence(self.st)[0]
            code = 1
            self._finish(FAILED, AGENT_DIED)
        # Tell the reaper the monitor ended on purpose.
        try:
            os.write(reaper_w, b"x")
        except OSError:
            pass
        self._keep_warm(fence)
        return code

    def _keep_warm(self, fence: Fence) -> None:
        """After the final status: the node's spare for its next run (see warm.py), where no
        attempt of this run comes after this one (a success, or a run without spares of its
        own, whose next attempt, if any, starts from scratch anyway)."""
        spec = self.spec
        if self._env is None or not warm.keeps_warm(spec.keep_warm, spec.argv, fence.admits()):
            return
        if self.st["state"] != SUCCEEDED and warm.wanted(spec.env, spec.argv, fence.admits()):
            return  # the run's own spare serves its next attempt; this one would compete with it
        warm.start_node_spare(
            spec.workdir, spec.node, self.dir / layout.AGENT_LOG, spec.argv, self._env, spec.keep_warm
        )

    def _start_reaper(self, fence: Fence) -> int:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(w)
                # Its own session: a kill aimed at the monitor's process group spares it.
                os.setsid()
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                if os.read(r, 1) != b"x":
                    self._reap()
            finally:
                os._exit(0)
        os.close(r)
        self.st["reaper_pid"] = pid
        self.st["reaper_start"] = procs.start_time(pid)
        return w

    def _reap(self) -> None:
        """In the reaper: the monitor's pipe hit EOF without its goodbye, so it died."""
        st = status.read(self.dir) or self.st
        if status.is_final(st):
            return
        # The reaper cannot know the job pid the monitor learned after the fork: read it.
        teardown(self.spec.workdir, self.dir, st, FAILED, AGENT_DIED)

    def _give_up(self, error: str) -> int:
        self.st["error"] = error
        with open(self.dir / layout.OUTPUT, "ab") as f:
            f.write(f"ava agent: {error}\n".encode())
        self.st["left_pids"] = end_fence(self.st)[0]
        self._finish(FAILED, EXIT)
        return 1

    def _finish(self, state: str, reason: str) -> None:
        # Processes the kill could not end (D state after a GPU fault) keep their GPUs leased.
        left = [p for p in self.st.get("left_pids") or [] if procs.alive(p)]
        self.st.update(state=state, reason=reason, ended=time.time())
        for last_try in (False, True):
            try:
                leases.release_or_drain(self.spec.workdir, self.spec.run, self.spec.node, self.spec.attempt, left)
                self._save()
                break
            except (DiskFull, OSError) as exc:
                full = isinstance(exc, DiskFull) or exc.errno in (errno.ENOSPC, errno.EDQUOT)
                if last_try or not full:
                    raise
                # The ledger and the final status must land: give back the reserve. A failure
                # on a full disk is put down to it (a rank's write failing is how it shows).
                self._unreserve()
                if state == FAILED:
                    path = self.st.get("disk_full") or getattr(exc, "path", None) or getattr(exc, "filename", None)
                    self.st.update(reason=DISK_FULL, disk_full=str(path or self.dir / layout.STATUS))
        self._unreserve()

    def _supervise(self, fence: Fence) -> int:
        spec = self.spec
        env = job_env(dict(os.environ), spec, self.gpus, self.dir)
        os.makedirs(self.dir / layout.RANK_ERRORS, mode=0o700, exist_ok=True)
        log = os.open(self.dir / layout.OUTPUT, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        spares = warm.wanted(spec.env, spec.argv, fence.admits())
        self._env = env
        try:
            job: warm.Job | None = None
            if warm.keeps_warm(spec.keep_warm, spec.argv, fence.admits()):
                job = self._from_node_spare(fence, env, log, ranks_too=spares)
            if job is None and spares:
                job = self._from_spare(fence, env, log)
            if job is None:
                job = subprocess.Popen(
                    fence.command(spec.argv),
                    cwd=spec.cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    # In the child, before exec: the whole job tree starts inside the fence.
                    preexec_fn=fence.add_self,
                    umask=layout.JOB_UMASK,
                )
        except (OSError, subprocess.SubprocessError) as exc:
            return self._give_up(f"cannot start {spec.argv[0]!r}: {exc}")
        finally:
            os.close(log)
        self.st.update(state=RUNNING, job_pid=job.pid, job_start=procs.start_time(job.pid))
        self._save()
        fence.adopt(job.pid)
        self.st["cgroup"] = fence.info()
        # The next attempt's spare waits until this one trains: started during a resume, even
        # niced, its import would slow the resume down on a busy node.
        spare_due = time.monotonic() + SPARE_DELAY if spares else None
        oom = False
        ranks = RankWatch(job.pid, self.dir / layout.RANK_ERRORS)
        try:
            job_fd: int | None = os.pidfd_open(job.pid)  # wakes the loop the moment torchrun ends
        except (AttributeError, OSError):
            job_fd = None
        last = time.monotonic()
        while job.poll() is None:
            if fence.oom_happened():
                oom = True
                break
            if self._stop_requested():
                self._terminate(job, fence, ranks)
                break
            failed = ranks.failed_codes()
            fail_times = _failing(ranks, failed)
            if (
                fail_times != self.st["rank_fail_times"]
                or failed != self.st["rank_exit_codes"]
                or time.monotonic() - last >= HEARTBEAT
            ):
                # While running: the ranks that raised or exited non-zero, written as soon as
                # one does (a long poll answers on it). The supervisor ends the attempt on a
                # crash from here, and can tell that a failure here came before one another
                # node reported.
                self.st["rank_fail_times"] = fail_times
                self.st["rank_exit_codes"] = failed
                self._save()
                last = time.monotonic()
            ranks.scan()
            ranks.wait(TICK, also=job_fd)
            self._note_output()
            for child in [self._spare, *self._children]:
                if child is not None:
                    child.poll()  # reaped here should it end while this attempt runs
            if spare_due is not None and (self.st["progress"] is not None or time.monotonic() >= spare_due):
                spare_due = None
                self._start_spare(env)
        if job_fd is not None:
            os.close(job_fd)
        # Orphaned workers (torchrun killed, a rank that double-forked) die with the fence.
        oom = oom or fence.oom_happened()
        if oom:
            # Said at once, before the drain: the ranks on other nodes that lose this one fail
            # within moments, and the supervisor must know the cause is memory, here.
            self.st["reason"] = OOM
            self.st["rank_exit_codes"] = ranks.failed_codes()
            self.st["rank_fail_times"] = _failing(ranks, self.st["rank_exit_codes"])
            self._save()
            # Let torchrun end its other ranks and copy their last lines to the log first;
            # the fence is killed whole right after either way.
            try:
                job.wait(timeout=OOM_DRAIN)
            except subprocess.TimeoutExpired:
                pass
        remaining = fence.kill_all_verified()
        try:
            job.wait(timeout=JOB_REAP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass  # stuck in D state: report what is known rather than hang
        oom = oom or fence.oom_happened()
        if not remaining:
            fence.remove()
        else:
            self.st["error"] = f"processes left after kill: {remaining}"
            self.st["left_pids"] = remaining
        ranks.close()
        self.st["rank_fail_times"] = ranks.failures()
        self._note_output()
        rc = job.returncode
        self.st["exit_code"] = rc
        if oom:
            self._finish(FAILED, OOM)
            return 1
        if self.stop_grace is not None:
            self._finish(STOPPED, STOPPED_REASON)
            return 0
        if rc == 0:
            # No attempt comes after a success: its spares go with it.
            warm.end_spares(spec.run, spec.node, layout.run_dir(spec.workdir, spec.run))
            self._finish(SUCCEEDED, EXIT)
            return 0
        # torchrun's summary, and the codes read as ranks exited for ranks it leaves out.
        codes = {**ranks.failed_codes(), **status.parse_rank_exit_codes(status.tail(self.dir / layout.OUTPUT))}
        for rank in ranks.raised():
            if codes.get(rank, 0) < 0:
                # Its exception reached the top, then torchrun ended it by signal while its
                # interpreter wound down: it failed with the exit code that exception gives.
                codes[rank] = 1
        self.st["rank_exit_codes"] = codes
        self._finish(FAILED, EXIT)
        return 1

    def _note_output(self) -> None:
        """Note when output.log grew (each tick): `logs --timestamps` dates a line by the first
        note at or past its end. The job writes the log directly, so this is as close as it gets."""
        try:
            size = os.stat(self.dir / layout.OUTPUT).st_size
            if size > self._noted:
                with open(self.dir / layout.OUTPUT_TIMES, "a", encoding="ascii") as f:
                    f.write(f"{size} {time.time():.3f}\n")
                self._noted = size
        except OSError:
            pass  # a full disk: the log matters more than its dates

    def _start_spare(self, env: dict[str, str]) -> None:
        """The next attempt's torchrun, imported while this one runs (see warm.py)."""
        spec = self.spec
        run_dir = layout.run_dir(spec.workdir, spec.run)
        self._spare = warm.start(spec.run, spec.node, run_dir, self.dir / layout.AGENT_LOG, spec.argv, env)
        if self._spare is not None:
            self.st.update(spare_pid=self._spare.pid, spare_start=procs.start_time(self._spare.pid))
            self._save()

    def _handover(
        self,
        where: Path,
        fence: Fence,
        env: dict[str, str],
        stdio: tuple[int, int, int],
        ranks_too: bool,
        fit_key: str = "",
    ) -> functools.partial[warm.SpareJob | None]:
        """A claim of the spare that listens in WHERE for this attempt's job (see warm.claim)."""
        spec = self.spec
        zygote = str(self.dir / ZYGOTE_SOCKET) if ranks_too else ""
        return functools.partial(
            warm.claim, where, fence.admit, spec.argv, env, spec.cwd, stdio, layout.JOB_UMASK, zygote, fit_key
        )

    def _from_node_spare(self, fence: Fence, env: dict[str, str], log: int, *, ranks_too: bool) -> warm.Job | None:
        """torchrun started by the spare a run before this one left on the node, in the fence,
        if one is ready and fits. RANKS_TOO: it forks the ranks too, as a run's own spare does."""
        spec = self.spec
        key = warm.node_fit(spec.argv, env, spec.workdir)
        null = os.open(os.devnull, os.O_RDONLY)
        handover = self._handover(warm.node_dir(spec.workdir), fence, env, (null, log, log), ranks_too, key)
        try:
            job = handover()
            # Runs back to back (a sweep, CI): the last one's spare may still be importing.
            spare = warm.importing(spec.workdir, key) if job is None else None
            if spare is not None:
                began = time.monotonic()
                job = warm.claim_once_imported(spec.workdir, spare, handover, give_up=self._stop_requested)
                self.st["node_spare_wait"] = round(time.monotonic() - began, 3)
        finally:
            os.close(null)
        if job is not None:
            self.st["from_spare"] = job.spare_pid
            self.st["from_node_spare"] = True
        return job

    def _from_spare(self, fence: Fence, env: dict[str, str], log: int) -> warm.Job | None:
        """torchrun started by the run's spare here, in the fence. Without a spare ready, one
        started now: its ranks are then forked with torch imported, not each importing it."""
        spec = self.spec
        run_dir = layout.run_dir(spec.workdir, spec.run)
        null = os.open(os.devnull, os.O_RDONLY)
        handover = self._handover(run_dir, fence, env, (null, log, log), True)
        try:
            job = handover()
            if job is None:
                fresh = warm.start(
                    spec.run, spec.node, run_dir, self.dir / layout.AGENT_LOG, spec.argv, env, niced=False
                )
                if fresh is not None:
                    self._children.append(fresh)
                    job = warm.claim_when_ready(fresh, handover, give_up=self._stop_requested)
        finally:
            os.close(null)
        if job is not None:
            self.st["from_spare"] = job.spare_pid
        return job

    def _terminate(self, job: warm.Job, fence: Fence, ranks: RankWatch) -> None:
        """SIGTERM the job's process group and give it the grace to exit on its own. The grace
        is the ranks': once all have exited, torchrun's own wind-down (its summary, ~1 s on a
        busy node) is not waited for, the fence's kill ends it (a failover waits on this)."""
        procs.signal_group(job.pid, signal.SIGTERM)
        # A stopped process (SIGSTOP, a hang the supervisor ends) would hold its SIGTERM, and
        # the job its whole grace, until the kill: let every process of the fence act on it.
        procs.signal_pids(fence.pids(), signal.SIGCONT)
        end = time.monotonic() + (self.stop_grace or 0.0)
        while job.poll() is None and time.monotonic() < end:
            ranks.scan()
            if ranks.all_exited():
                break
            ranks.wait(0.05)


def _failing(ranks: RankWatch, failed: dict[str, int]) -> dict[str, float]:
    """When each rank that raised or exited non-zero failed, while the job runs. A rank whose
    exit code was lost to torchrun's reaping is dated too: the supervisor waits for this node's
    final status before it blames a failure that came after it."""
    suspects = failed.keys() | ranks.raised().keys() | ranks.unread
    return {rank: t for rank, t in ranks.failures().items() if rank in suspects}
