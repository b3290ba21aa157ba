"""What ava and its agent say to each other: one typed vocabulary, imported by both sides.

The core writes a `StartSpec` for each node and reads back a `Status` (and lease `Holder`s when
a node is busy); the agent exits with one of `ExitCode`. Every state and failure kind is named
here once. Standard library only: this module ships to the nodes inside the agent's zipapp.

Both sides carry `PROTOCOL`: an agent that finds a spec of another version refuses it with
`ExitCode.PROTOCOL` rather than misread it, and the core re-provisions that node's agent.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

from .cgroups import PARENT

PROTOCOL = 1

# -- states ----------------------------------------------------------------------------------

# An attempt on one node (the agent's status.json), an attempt of a run and the run itself.
State = Literal["starting", "running", "succeeded", "failed", "stopped"]
STARTING: State = "starting"
RUNNING: State = "running"
SUCCEEDED: State = "succeeded"
FAILED: State = "failed"
STOPPED: State = "stopped"
FINAL: tuple[State, ...] = (SUCCEEDED, FAILED, STOPPED)
STATES: tuple[State, ...] = get_args(State)

# Why an attempt ended on a node, as the agent saw it.
Reason = Literal["exit", "oom", "stopped", "agent-died", "disk-full"]
EXIT: Reason = "exit"
OOM: Reason = "oom"
STOPPED_REASON: Reason = "stopped"
AGENT_DIED: Reason = "agent-died"
DISK_FULL: Reason = "disk-full"

# What kind of failure ended an attempt, as the supervisor judged it.
FailureKind = Literal[
    "crash", "oom", "node-lost", "hang", "agent-died", "disk-full", "interrupted", "launch", "stopped"
]
CRASH: FailureKind = "crash"
OOM_KIND: FailureKind = "oom"
NODE_LOST: FailureKind = "node-lost"
HANG: FailureKind = "hang"
AGENT_DIED_KIND: FailureKind = "agent-died"
DISK_FULL_KIND: FailureKind = "disk-full"
INTERRUPTED: FailureKind = "interrupted"
LAUNCH: FailureKind = "launch"
STOPPED_KIND: FailureKind = "stopped"
FAILURE_KINDS: tuple[FailureKind, ...] = get_args(FailureKind)


def is_final(state: str | None) -> bool:
    return state in FINAL


class ExitCode(enum.IntEnum):
    """The agent's exit codes."""

    OK = 0
    FAILED = 1  # the attempt failed, or the run/attempt is unknown
    USAGE = 2  # a bad spec or arguments
    BUSY = 4  # the leases the attempt needs are held by another run
    PROTOCOL = 5  # the spec speaks another protocol version


# Errors the agent answers with (`{"error": ..., ...}`) instead of a status.
AgentError = Literal["not-found", "busy", "bad-spec", "run-directory", "protocol", "stale"]
NOT_FOUND: AgentError = "not-found"
BUSY: AgentError = "busy"
BAD_SPEC: AgentError = "bad-spec"
RUN_DIRECTORY: AgentError = "run-directory"
PROTOCOL_MISMATCH: AgentError = "protocol"
# A one-trip start's answer when what it took for granted (route, code trees, port) is not so:
# nothing started; the answer says what is missing (`trees_missing`, `route`, `port`).
STALE: AgentError = "stale"

# The master's `start --wait-store` answers twice: "waiting" as soon as its torchrun is started
# (the launcher starts the other nodes on it), then "ready" once the rendezvous store listens,
# or why it never came up (the attempt's state, or "timeout").
STORE_WAITING = "waiting"
STORE_READY = "ready"


# -- JSON helpers ----------------------------------------------------------------------------


def _opt_float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _opt_int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _ints(value: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in value or ())


# -- the start spec --------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecLimits:
    memory: int | None = None  # bytes
    cpus: float | None = None
    pids: int | None = None


@dataclass(frozen=True)
class StartSpec:
    """What one node's agent is asked to run for one attempt (the core builds it: ava.launch)."""

    run: str
    attempt: int
    node: str
    workdir: str
    cwd: str
    argv: tuple[str, ...]
    env: dict[str, str]
    tree: str = ""
    limits: SpecLimits = field(default_factory=SpecLimits)
    gpus_want: int = 0
    gpus_allowed: tuple[int, ...] = ()
    cpu_slots_want: int | None = None  # None: the attempt leases GPUs, not CPU slots
    cpu_total: int | None = None
    cgroup_parent: str = PARENT
    user: str = ""
    ledger: str = ""
    isolation: str = ""  # "": the agent probes; else a forced back-end (tests, odd nodes)
    keep_warm: float = 0.0  # seconds the node keeps a spare torchrun for its next run
    protocol: int = PROTOCOL

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "protocol": self.protocol,
            "run": self.run,
            "attempt": self.attempt,
            "node": self.node,
            "workdir": self.workdir,
            "cwd": self.cwd,
            "tree": self.tree,
            "argv": list(self.argv),
            "env": dict(self.env),
            "limits": {"memory": self.limits.memory, "cpus": self.limits.cpus, "pids": self.limits.pids},
            "gpus": {"want": self.gpus_want, "allowed": list(self.gpus_allowed)},
            "cpu_slots": None
            if self.cpu_slots_want is None
            else {"want": self.cpu_slots_want, "total": self.cpu_total},
            "cgroup_parent": self.cgroup_parent,
            "user": self.user,
        }
        if self.ledger:
            data["ledger"] = self.ledger
        if self.isolation:
            data["isolation"] = self.isolation
        if self.keep_warm:
            data["keep_warm"] = self.keep_warm
        return data


# -- what the agent answers ------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    step: int
    time: float  # on the node's clock


@dataclass(frozen=True)
class Status:
    """One attempt on one node, as its agent reports it (status.json; see agent/status.py)."""

    state: State
    run: str = ""
    attempt: int = 0
    node: str = ""
    reason: Reason | None = None
    exit_code: int | None = None  # torchrun's; negative: killed by that signal
    rank_exit_codes: dict[str, int] = field(default_factory=dict)
    rank_fail_times: dict[str, float] = field(default_factory=dict)  # on the node's clock
    heartbeat: float | None = None  # on the node's clock
    started: float | None = None
    ended: float | None = None
    progress: Progress | None = None
    output_time: float | None = None
    output_size: int = 0
    memory_limit: int | None = None
    disk_full: str | None = None
    warning: str | None = None
    error: str | None = None
    gpus: tuple[int, ...] = ()
    cpu_slots: int | None = None
    pid: int | None = None
    user: str = ""
    age: float | None = None  # seconds since the heartbeat, measured by the core on the node's clock
    digest: str = ""  # a fingerprint of what the supervisor judges by: `status --since` waits for a change
    # With `status --metrics-from N`: the metric lines recorded past byte N, and the offset after them.
    metrics: tuple[dict[str, Any], ...] = ()
    metrics_end: int | None = None
    store: str | None = None  # `start --wait-store`: "ready", or why the rendezvous store never came up
    # A final status whose agent verified that nothing of the attempt is left on its node (no
    # process, no fence; its leases went with its final state): no `stop` trip is needed there.
    ended_clean: bool = False
    protocol: int = PROTOCOL

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Status:
        """A status as read from the agent; ProtocolError when it is not one."""
        state = raw.get("state")
        if state not in STATES:
            raise ProtocolError(f"unknown state {state!r}")
        reason = raw.get("reason")
        progress = raw.get("progress")
        memory = raw.get("memory_limit")
        if memory is None and isinstance(raw.get("limits"), dict):
            memory = raw["limits"].get("memory")
        return cls(
            state=state,
            run=str(raw.get("run") or ""),
            attempt=int(raw.get("attempt") or 0),
            node=str(raw.get("node") or ""),
            reason=reason if reason in get_args(Reason) else None,
            exit_code=_opt_int(raw.get("exit_code")),
            rank_exit_codes={str(k): int(v) for k, v in (raw.get("rank_exit_codes") or {}).items()},
            rank_fail_times={str(k): float(v) for k, v in (raw.get("rank_fail_times") or {}).items()},
            heartbeat=_opt_float(raw.get("heartbeat")),
            started=_opt_float(raw.get("started")),
            ended=_opt_float(raw.get("ended")),
            progress=Progress(int(progress["step"]), float(progress["time"])) if isinstance(progress, dict) else None,
            output_time=_opt_float(raw.get("output_time")),
            output_size=int(raw.get("output_size") or 0),
            memory_limit=_opt_int(memory),
            disk_full=_opt_str(raw.get("disk_full")),
            warning=_opt_str(raw.get("warning")),
            error=_opt_str(raw.get("error")),
            gpus=_ints(raw.get("gpus")),
            cpu_slots=_opt_int(raw.get("cpu_slots")),
            pid=_opt_int(raw.get("pid")),
            user=str(raw.get("user") or ""),
            age=_opt_float(raw.get("age")),
            digest=str(raw.get("digest") or ""),
            metrics=tuple(m for m in raw.get("metrics") or () if isinstance(m, dict)),
            metrics_end=_opt_int(raw.get("metrics_end")),
            store=_opt_str(raw.get("store")),
            ended_clean=raw.get("ended_clean") is True,
            protocol=int(raw.get("protocol") or PROTOCOL),
        )

    @property
    def final(self) -> bool:
        return self.state in FINAL


@dataclass(frozen=True)
class Holder:
    """A lease holder, as a `busy` answer names it."""

    run: str
    user: str = ""
    attempt: int | None = None
    node: str = ""
    gpus: tuple[int, ...] = ()
    cpu_slots: int = 0
    pid: int | None = None
    started: float | None = None
    workdir: str = ""
    draining: bool = False

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Holder:
        return cls(
            run=str(raw.get("run") or ""),
            user=str(raw.get("user") or ""),
            attempt=_opt_int(raw.get("attempt")),
            node=str(raw.get("node") or ""),
            gpus=_ints(raw.get("gpus")),
            cpu_slots=int(raw.get("cpu_slots") or 0),
            pid=_opt_int(raw.get("pid")),
            started=_opt_float(raw.get("started")),
            workdir=str(raw.get("workdir") or ""),
            draining=bool(raw.get("draining")),
        )

    def to_json(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    def describe(self) -> str:
        what = []
        if self.gpus:
            what.append("GPUs " + ",".join(str(g) for g in self.gpus))
        if self.cpu_slots:
            what.append(f"{self.cpu_slots} CPU slots")
        return f"run {self.run} of {self.user} ({', '.join(what) or 'leases'})"


@dataclass(frozen=True)
class StopReport:
    """What `stop` verified on a node."""

    run: str
    stopped: bool
    remaining_pids: tuple[int, ...] = ()
    cgroup_removed: bool = True

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> StopReport:
        return cls(
            run=str(raw.get("run") or ""),
            stopped=bool(raw.get("stopped")),
            remaining_pids=_ints(raw.get("remaining_pids")),
            cgroup_removed=bool(raw.get("cgroup_removed", True)),
        )


class ProtocolError(ValueError):
    """An answer that does not follow this protocol."""


class SpecError(ValueError):
    """A start spec the agent cannot run: names the key and the problem."""


class ProtocolMismatch(SpecError):
    """A spec written for another version of the agent protocol: refused, never guessed at."""
