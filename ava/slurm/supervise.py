"""Supervising a run on Slurm: submit an attempt, watch it, decide, fail over. One loop.

Each attempt is one Slurm job. The verdict on a look (see agent/slurmwatch.py) is a pure function,
`judge`; the loop acts on it, within `failover.max_restarts`: a crashed rank restarts the run in
the same allocation while Slurm still holds it (the agents there wait for the next attempt's
template); a lost node ends the job (scancel, verified) and submits a new one with every node
lost so far in `--exclude`. The recipe's checkpoint makes each attempt resume. The run's record (`ava ps`) and its
`node/rank |` lines are the same as on SSH nodes.
"""

from __future__ import annotations

import json
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ava import runs
from ava.agent.protocol import (
    CRASH,
    FAILED,
    FINAL,
    HANG,
    LAUNCH,
    NODE_LOST,
    RUNNING,
    STARTING,
    STOPPED,
    STOPPED_KIND,
    SUCCEEDED,
    FailureKind,
    ProtocolError,
    State,
    Status,
)
from ava.config import Inventory, Recipe
from ava.errors import AvaError
from ava.launch import Launch
from ava.slurm import backend
from ava.slurm.batch import Paths, submission
from ava.slurm.inventory import SlurmSettings, compute_python, login_node

STOP_FILE = "stop"  # ava.supervisor.STOP_FILE: `ava stop` touches it in the run's record folder
STATE_FILE = "slurm.json"  # the run's jobs, beside record.json
# The looks at an attempt are a stream (agent/slurmwatch.py): one SSH command and one interpreter
# on the login node for up to STREAM_LIFE seconds, answering on news, else after LONG_POLL.
LONG_POLL = 2.0
POLL = 1.0  # between answers with news once every node's ranks have written: lines come in batches
POLL_STARTING = 0.05  # between answers with news while starting: the start is what users wait on
STREAM_LIFE = 30.0
WAKE = 0.2  # how often the loop checks for Ctrl-C and `ava stop` while it waits for an answer
STALE_AFTER = 12.0  # a heartbeat this old (login node's clock) on a running attempt: node lost
STARTUP_GRACE = 60.0  # imports, rendezvous, loading a checkpoint: no hang before this
SETTLE_AFTER = 15.0  # after a first failure, how long the other nodes get to end or go stale
CANCEL_WAIT = 30.0  # for a job to leave the queue, or its agents to stop, at the end of an attempt
FINAL_JOB = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
)
LOST_NODE_STATES = ("down", "drain", "fail", "not_responding", "no_respond")
_RANK = re.compile(r"^\[(\d+)\]:(.*)$")


class Sink(Protocol):
    def line(self, node: str, rank: str | None, text: str) -> None: ...

    def event(self, text: str) -> None: ...


@dataclass
class JobState:
    """What ava keeps of a Slurm run beside its record: the login node, every attempt's job, and
    how far into each node's log of the current attempt the run's output.log has got (so that a
    supervisor taking over, `ava attach` or the background one, neither skips nor repeats lines)."""

    login: str
    shared: str
    jobs: list[dict[str, Any]] = field(default_factory=list)  # attempt, job, exclude
    offsets: dict[str, dict[str, int]] = field(default_factory=dict)  # attempt -> node -> offset

    def save(self, folder: Path) -> None:
        text = json.dumps({"login": self.login, "shared": self.shared, "jobs": self.jobs, "offsets": self.offsets})
        temp = folder / f"{STATE_FILE}.{os.getpid()}"
        temp.write_text(text)
        temp.replace(folder / STATE_FILE)  # `ava ps` and `ava stop` read it at any time

    @classmethod
    def load(cls, folder: Path) -> JobState | None:
        try:
            data = json.loads((folder / STATE_FILE).read_text())
        except (OSError, ValueError):
            return None
        offsets = {
            str(attempt): {str(node): int(at) for node, at in nodes.items()}
            for attempt, nodes in (data.get("offsets") or {}).items()
        }
        return cls(str(data["login"]), str(data["shared"]), list(data.get("jobs") or []), offsets)


@dataclass(frozen=True)
class Verdict:
    outcome: State  # running | succeeded | failed | stopped
    kind: FailureKind | None = None  # crash | node-lost | launch | stopped
    cause: str | None = None
    node: str | None = None
    rank: int | None = None
    exit_code: int | None = None
    lost: tuple[str, ...] = ()


STILL_RUNNING = Verdict(RUNNING)


@dataclass(frozen=True)
class Look:
    """One look at an attempt from the login node (the agent's slurm-watch), typed: the job's
    state and reason, every cluster node's sinfo state, each node's agent status (the protocol's
    Status), the new log text per node, and the login node's clock."""

    job_state: str = ""
    job_reason: str = ""
    states: dict[str, str] = field(default_factory=dict)
    status: dict[str, Status] = field(default_factory=dict)
    logs: dict[str, tuple[int, str]] = field(default_factory=dict)  # node -> (next offset, text)
    now: float = 0.0

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Look:
        job = raw.get("job") or {}
        return cls(
            job_state=str(job.get("state") or ""),
            job_reason=str(job.get("reason") or ""),
            states={str(k): str(v) for k, v in (raw.get("states") or {}).items()},
            status=_statuses(raw.get("status") or {}),
            logs={
                str(k): (int(v.get("offset") or 0), str(v.get("text") or ""))
                for k, v in (raw.get("logs") or {}).items()
            },
            now=float(raw.get("now") or 0),
        )


def _statuses(raw: dict[str, Any]) -> dict[str, Status]:
    found = {}
    for node, status in raw.items():
        try:
            found[str(node)] = Status.from_json(status)
        except (ProtocolError, TypeError, ValueError):
            continue  # not (yet) a status: as if the agent had written none
    return found


def lost_nodes(look: Look, nodes: list[str]) -> tuple[str, ...]:
    """Nodes of the attempt that Slurm calls down, or whose agent heartbeat went stale."""
    lost = []
    for name in nodes:
        state = look.states.get(name, "").lower()
        status = look.status.get(name)
        stale = (
            status is not None
            and status.state in (STARTING, RUNNING)
            and look.now - (status.heartbeat or look.now) > STALE_AFTER
        )
        if any(word in state for word in LOST_NODE_STATES) or state.endswith("*") or stale:
            lost.append(name)
    return tuple(lost)


def first_failure(statuses: dict[str, Status]) -> Verdict:
    """The failed node that ended first, and its first failing rank."""
    failed = [(s.ended or 0.0, n, s) for n, s in statuses.items() if s.state == FAILED]
    _, node, status = min(failed, key=lambda f: f[0])
    codes = {int(r): c for r, c in status.rank_exit_codes.items() if c != 0}
    times = {int(r): t for r, t in status.rank_fail_times.items()}
    # As on SSH nodes (ava.decide): the rank that failed first; without times, one that exited
    # on its own beats one killed by a signal (torchrun ending its others), then the lowest.
    rank = min(codes, key=lambda r: (times.get(r, float("inf")), codes[r] < 0, r)) if codes else None
    code = codes.get(rank) if rank is not None else status.exit_code
    where = f"rank {rank} on {node}" if rank is not None else f"{node}"
    return Verdict(FAILED, CRASH, f"{where} exited {code}", node=node, rank=rank, exit_code=code)


def hung(statuses: dict[str, Status], hang_timeout: float) -> str | None:
    """A running node whose ranks neither reported progress nor wrote output for hang_timeout
    (on its own clock: the heartbeat against the last progress or output)."""
    for name, status in sorted(statuses.items()):
        progress = status.progress.time if status.progress else 0.0
        last = max(progress, status.output_time or 0.0, status.started or 0.0)
        if status.state == RUNNING and (status.heartbeat or 0.0) - last > hang_timeout:
            return name
    return None


def judge(
    look: Look,
    nnodes: int,
    failing_since: float | None,
    now: float,
    *,
    hang_timeout: float = float("inf"),
    elapsed: float = 0.0,
) -> Verdict:
    """The attempt's verdict from one look. Pure. `failing_since`: when a first failure was seen;
    `elapsed`: since the attempt was submitted (a hang needs STARTUP_GRACE at least)."""
    job_state = look.job_state.split()[0] if look.job_state else ""
    statuses = look.status
    nodes = sorted(statuses)
    states = [s.state for s in statuses.values()]
    if len(statuses) >= nnodes and all(s == SUCCEEDED for s in states):
        return Verdict(SUCCEEDED, exit_code=0)
    lost = lost_nodes(look, nodes)
    if job_state == "NODE_FAIL" and not lost:
        lost = tuple(n for n in nodes if statuses[n].state not in FINAL)
    if FAILED in states or lost or job_state in FINAL_JOB:
        settled = all(s.state in FINAL or n in lost for n, s in statuses.items())
        waited = failing_since is not None and now - failing_since >= SETTLE_AFTER
        if not (settled or waited or job_state in FINAL_JOB):
            return STILL_RUNNING
        if lost:
            return Verdict(FAILED, NODE_LOST, f"node {', '.join(lost)} lost", node=lost[0], lost=lost)
        if FAILED in states:
            return first_failure(statuses)
        if job_state in FINAL_JOB:
            reason = f" ({look.job_reason})" if look.job_reason not in ("", "None") else ""
            return Verdict(FAILED, LAUNCH, f"Slurm job ended {job_state}{reason} before every agent finished")
    if len(statuses) < nnodes:
        # A node's status is missing from this look (not written yet, or unreadable as it was
        # read): its progress is unknown, not stale. A hang is judged on every node's answer,
        # never on its absence (as on SSH nodes, ava.decide).
        return STILL_RUNNING
    if elapsed >= max(hang_timeout, STARTUP_GRACE) and (node := hung(statuses, hang_timeout)) is not None:
        return Verdict(FAILED, HANG, f"{node}: no progress for {hang_timeout:g}s (failover.hang_timeout)", node=node)
    return STILL_RUNNING


class Left(Exception):
    """The supervisor was asked to leave the run alone (Ctrl-C, `ava attach` taking over)."""


class SlurmSupervisor:
    """Drives one run to its end, or until asked to leave it; a supervisor started later on the
    same run (the background one, `ava attach`) picks it up where its record says it is."""

    def __init__(
        self,
        record: runs.RunRecord,
        recipe: Recipe,
        inventory: Inventory,
        settings: SlurmSettings,
        sink: Sink,
        *,
        role: str = "ava train",
        lock_wait: float = 15.0,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.record, self.recipe, self.inventory, self.settings, self.sink = record, recipe, inventory, settings, sink
        self.role, self.lock_wait = role, lock_wait
        self.login = login_node(settings, inventory)
        self.python = compute_python(settings, inventory)
        self.paths = Paths(settings.shared_dir, record.id)
        self.state = JobState(settings.login, settings.shared_dir)
        self._leave = threading.Event()
        self._sleep = sleep

    def leave(self) -> None:
        """Stop supervising without touching the job (safe from a signal handler)."""
        self._leave.set()

    def sleep(self, seconds: float) -> None:
        """Wait, unless asked to leave first (then raise Left)."""
        if self._sleep is not None:
            self._sleep(seconds)
        elif self._leave.wait(seconds):
            raise Left
        if self._leave.is_set():
            raise Left

    def stop_requested(self) -> bool:
        return (self.record.dir / STOP_FILE).exists()

    def run(self) -> int:
        """Supervise to the end; the exit code (0 succeeded, 1 failed or stopped). Asked to
        leave, it returns with the run not final (`record.final` is False) and its job untouched."""
        from ava.supervisor import hold_supervision  # one supervisor per run, SSH or Slurm

        lock = hold_supervision(self.record, self.role, self.lock_wait)
        record = self.record
        # The holder before us may have moved the run on: read it again under the lock.
        record.__dict__.update(runs.load(record.id).__dict__)
        self.state = JobState.load(record.dir) or self.state
        record.supervisor_pid = os.getpid()
        record.save()
        try:
            return self._drive()
        except Left:
            return 1
        finally:
            if record.supervisor_pid == os.getpid():
                record.supervisor_pid = None
                record.save()
            os.close(lock)

    def _drive(self) -> int:
        record = self.record
        if record.final:
            return record.exit_code if record.exit_code is not None else 1
        current = record.current()
        job = str(self.state.jobs[-1]["job"]) if self.state.jobs else None
        if current is not None and current.state not in (STARTING, RUNNING):
            # Left between attempts (a restart's backoff): the next attempt, in the same
            # allocation only while a crash or hang left Slurm holding it.
            if job is not None and not (current.kind in (CRASH, HANG) and backend.queued(self.login, job)):
                job = None
            current = None
        elif current is None:
            record.state = STARTING
            record.save()
        # What the first submission takes for granted (agent, code on the shared filesystem), and
        # checks in its one command; shipped only where it is not there (a first launch).
        shipped = backend.planned(self.login, self.recipe)
        record.code_tree = shipped.code_tree
        while True:
            if current is None:
                current, job = self._start(shipped, job)
            assert job is not None
            verdict = self._watch(current, job)
            current.ended = time.time()
            current.state = verdict.outcome
            current.kind, current.cause = verdict.kind, verdict.cause
            current.exit_code, current.failed_node, current.failed_rank = verdict.exit_code, verdict.node, verdict.rank
            record.save()
            if verdict.outcome == SUCCEEDED:
                self._job_gone(job)
                return self._finish(SUCCEEDED, 0)
            if verdict.outcome == STOPPED:
                self._end_job(job, current)
                return self._finish(STOPPED, 1)
            self.sink.event(f"attempt {current.number} failed: {verdict.cause}")
            if verdict.kind == LAUNCH and (tail := backend.output_tail(self.login, self.paths, job)):
                self.sink.event(
                    f"the end of Slurm job {job}'s output ({self.paths.output.replace('%j', job)}):\n{tail}"
                )
            if verdict.lost:
                record.lost_nodes = [*record.lost_nodes, *(n for n in verdict.lost if n not in record.lost_nodes)]
            restarts = len(record.attempts) - 1
            fatal = verdict.exit_code in self.recipe.failover.fatal_exit_codes and verdict.kind == CRASH
            if fatal or verdict.kind == LAUNCH or restarts >= self.recipe.failover.max_restarts:
                self._end_job(job, current)
                why = "fatal exit code" if fatal else "no restart left" if verdict.kind != LAUNCH else "not retried"
                self.sink.event(f"run failed ({why}): {verdict.cause}")
                return self._finish(FAILED, 1)
            # A crashed or hung rank restarts in the allocation while Slurm still holds it; a lost node
            # (or an allocation gone) needs a new job, with the lost nodes excluded.
            if verdict.kind not in (CRASH, HANG) or not backend.queued(self.login, job):
                self._end_job(job, current)
                job = None
            record.save()
            where = "a new Slurm job" if job is None else f"the same allocation (Slurm job {job})"
            self.sink.event(f"restart {restarts + 1} of {self.recipe.failover.max_restarts}: {where}")
            self.sleep(min(60.0, self.recipe.failover.backoff * 2**restarts))
            if self.stop_requested():
                if job is not None:
                    self._end_job(job, current)
                return self._finish(STOPPED, 1)
            current = None

    def _start(self, shipped: backend.Shipped, job: str | None) -> tuple[runs.Attempt, str]:
        """Submit the next attempt (a new job, or a restart in JOB's allocation); it and its job."""
        record = self.record
        number = len(record.attempts) + 1
        exclude = tuple(record.lost_nodes)
        launch = Launch(record.id, number, "", 0, shipped.code_tree, shipped.runtime_tree, _user())
        job_files = submission(
            self.recipe, self.settings, launch, self.login, python=self.python, agent=shipped.agent, exclude=exclude
        )
        current = runs.Attempt(number=number, nodes=[], started=time.time())
        record.attempts.append(current)
        if job is None:
            found = backend.submit(self.login, self.paths, number, job_files, shipped=shipped)
            if found is None:
                current.code_sent_bytes = backend.ship(self.login, self.recipe, self.paths.run_dir).sent_bytes
                found = backend.submit(self.login, self.paths, number, job_files)
            assert found is not None
            job = found
            how = f"Slurm job {job}" + (f" (excluding {', '.join(exclude)})" if exclude else "")
        else:
            backend.restart_in(self.login, self.paths, number, job_files, job)
            how = f"in the same allocation (Slurm job {job})"
        self.state.jobs.append({"attempt": number, "job": job, "exclude": list(exclude)})
        self.state.save(record.dir)
        record.save()
        self.sink.event(f"attempt {number}: {how}")
        return current, job

    def _finish(self, state: State, code: int) -> int:
        self.record.state, self.record.ended, self.record.exit_code = state, time.time(), code
        self.record.save()
        return code

    def _job_gone(self, job: str) -> None:
        """Every agent succeeded: the job ends by itself (its tasks exit, then the batch shell).
        Wait for squeue to stop listing it, so that the run is over in Slurm too (sacct says
        COMPLETED, no process of it is left) when `ava train` returns."""
        end = time.monotonic() + CANCEL_WAIT
        while backend.queued(self.login, job):
            if time.monotonic() > end:
                self.sink.event(f"Slurm job {job} still listed by squeue {CANCEL_WAIT:g}s after every node succeeded")
                return
            time.sleep(0.2)

    def _end_job(self, job: str, current: runs.Attempt) -> None:
        left = backend.cancel(self.login, [job])
        if left:
            self.sink.event(f"Slurm job {job} still listed by squeue after scancel")
        # The agents stop their attempt on SIGTERM; wait until every answering node says so.
        end = time.monotonic() + CANCEL_WAIT
        while time.monotonic() < end:
            look = Look.from_json(backend.look(self.login, self.paths, current.number, "", {}))
            lost = lost_nodes(look, sorted(look.status))
            if all(s.state in FINAL or n in lost for n, s in look.status.items()):
                return
            time.sleep(0.5)

    def _watch(self, current: runs.Attempt, job: str) -> Verdict:
        key = str(current.number)
        offsets: dict[str, int] = dict(self.state.offsets.get(key, {}))
        failing_since: float | None = None
        pending_reason = ""
        nnodes = self.recipe.resources.nodes_min
        known: dict[str, str] = {}  # each node's agent state as of the last look
        stream: _Stream | None = None
        while True:
            if self._leave.is_set():
                raise Left
            if self.stop_requested():
                return Verdict(STOPPED, STOPPED_KIND, "stopped by `ava stop`")
            if stream is None or stream.ended():
                if stream is not None and stream.error is not None:
                    self.sink.event(f"could not look at job {job}: {stream.error.message}")
                if stream is not None and time.monotonic() - stream.started < POLL:
                    self.sleep(POLL)  # a stream that ended at once (the job left the queue)
                stream = self._stream(current.number, job, offsets, known, nnodes)
            raw = stream.next(WAKE)
            if raw is None:
                continue
            look = Look.from_json(raw)
            for name, (offset, chunk) in sorted(look.logs.items()):
                offsets[name] = offset
                for text in chunk.splitlines():
                    m = _RANK.match(text)
                    self.sink.line(name, m.group(1) if m else None, m.group(2) if m else text)
            if offsets != self.state.offsets.get(key):
                self.state.offsets = {key: dict(offsets)}
                self.state.save(self.record.dir)
            if look.job_state == "PENDING":
                reason = look.job_reason
                if reason != pending_reason and reason not in ("", "None"):
                    pending_reason = reason
                    self.sink.event(f"Slurm job {job} pending ({reason})")
            statuses = look.status
            if statuses and sorted(statuses) != current.nodes:
                current.nodes = sorted(statuses)
                current.state = RUNNING
                self.record.nodes = list(current.nodes)
                self.record.state = RUNNING
                self.record.save()
            now = time.monotonic()
            if failing_since is None and (
                any(s.state == FAILED for s in statuses.values()) or lost_nodes(look, sorted(statuses))
            ):
                failing_since = now
            verdict = judge(
                look,
                nnodes,
                failing_since,
                now,
                hang_timeout=self.recipe.failover.hang_timeout,
                elapsed=time.time() - current.started,
            )
            if verdict.outcome != RUNNING:
                return verdict
            known = {name: status.state for name, status in statuses.items()}

    def _stream(self, attempt: int, job: str, offsets: dict[str, int], known: dict[str, str], nnodes: int) -> _Stream:
        """Looks at the attempt from where the supervisor has got to (its offsets and states)."""
        login, paths, at, seen = self.login, self.paths, dict(offsets), dict(known)

        def looks(on_look: Callable[[dict[str, Any]], None]) -> None:
            backend.watch(
                login,
                paths,
                attempt,
                job,
                at,
                seen,
                on_look,
                wait=LONG_POLL,
                nnodes=nnodes,
                gap=POLL,
                starting=POLL_STARTING,
                life=STREAM_LIFE,
            )

        return _Stream(looks)


class _Stream:
    """One stream of looks (backend.watch) read in a thread: its answers, in order, and how it
    ended. It ends by itself (its life, the job gone); a supervisor done with it leaves it to end."""

    def __init__(self, looks: Callable[[Callable[[dict[str, Any]], None]], None]) -> None:
        self.answers: queue.Queue[dict[str, Any]] = queue.Queue()
        self.error: AvaError | None = None
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._run, args=(looks,), name="slurm-watch", daemon=True)
        self._thread.start()

    def _run(self, looks: Callable[[Callable[[dict[str, Any]], None]], None]) -> None:
        try:
            looks(self.answers.put)
        except AvaError as exc:
            self.error = exc

    def next(self, timeout: float) -> dict[str, Any] | None:
        """The next answer, or None if none came within TIMEOUT."""
        try:
            return self.answers.get(timeout=timeout)
        except queue.Empty:
            return None

    def ended(self) -> bool:
        """The stream is over and every answer of it was taken."""
        return not self._thread.is_alive() and self.answers.empty()


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


def stop(record: runs.RunRecord, inventory: Inventory, settings: SlurmSettings) -> list[str]:
    """`ava stop` of a Slurm run: scancel its jobs, verified with squeue; the jobs still listed."""
    (record.dir / STOP_FILE).touch()
    state = JobState.load(record.dir)
    if state is None:
        return []
    login = login_node(settings, inventory)
    return backend.cancel(login, [str(j["job"]) for j in state.jobs])
