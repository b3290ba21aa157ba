"""What the supervisor concludes from what it observed. Pure functions, table-tested.

`judge` turns one poll of every node into a verdict (still running, succeeded, or failed and
why); `recover` turns a failure into a plan (restart on which nodes after what backoff, or give
up and why). Nothing here touches a node or a clock.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

from ava.agent.protocol import (
    AGENT_DIED,
    AGENT_DIED_KIND,
    CRASH,
    DISK_FULL,
    DISK_FULL_KIND,
    FAILED,
    HANG,
    INTERRUPTED,
    NODE_LOST,
    OOM,
    OOM_KIND,
    RUNNING,
    STARTING,
    STOPPED,
    STOPPED_KIND,
    SUCCEEDED,
    FailureKind,
    Reason,
    Status,
)
from ava.config import Failover
from ava.units import format_size


def liveness_scale() -> float:
    """Hidden, for tests on an emulated node (tests/vm.py, ~30x slower than the hardware it
    stands for): AVA_LIVENESS_SCALE stretches the times below that judge a node alive."""
    try:
        return max(1.0, float(os.environ.get("AVA_LIVENESS_SCALE") or 1))
    except ValueError:
        return 1.0


# A node whose agent has not answered for this long is lost (SSH fails or times out).
LOST_AFTER = 6.0 * liveness_scale()
# Sooner while its peers answer: a node silent this long (a long poll's second of hold, then as
# overdue as a status request may be: the transport's deadline) is lost once another node has
# answered a request sent PEERS_LEAD after its own; its silence is then its own, not this
# machine's load. A cut link makes no rank fail (the collectives hang): silence is all there is.
SILENT_AMONG_PEERS = 5.0 * liveness_scale()
# The peer's whole round trip fit in the last 2 s of this node's silence. Measured on a healthy
# run whose supervisor, sshd and agents shared 0.4 CPU with 3 busy loops: silences up to 4.4 s,
# with a peer lead of 2.2 s at most (link cuts are still judged in ~4 s: the peers answer within
# the second they hold a poll).
PEERS_LEAD = 3.0 * liveness_scale()
# A heartbeat older than this, on the node's own clock, means its agent is stuck.
STALE_AFTER = 10.0 * liveness_scale()
MAX_BACKOFF = 60.0
# How long a failure waits for a node still running whose rank raised earlier to end too.
SETTLE_AFTER = 10.0
# A failure reported while torchrun there still winds down, with an exit code a rank that lost
# its peer gives too, waits this long at most for the other nodes to report past it (a lost node
# is the cause, not the ranks that lost it; see _settled).
SETTLE_EARLY = 2.0
# Start-up (imports, rendezvous, loading a checkpoint) reports no progress yet: until an attempt
# has progressed, a hang needs this long at least, however short hang_timeout is.
STARTUP_GRACE = 60.0


MISSING = "missing"  # a NodeView state: the agent answered that it has no such attempt


@dataclass(frozen=True)
class Answer:
    """One node's answer to one round of polling (see AgentClient.poll).

    Exactly one of: `status`; `missing` (reachable, no such attempt there); or no answer, with
    `asked` the time the request still unanswered (`pending`, its answer due at `due`) or the
    first that failed (`error`) was sent: the node has been silent since then. With a status,
    `asked` is when the request it answers was sent (0: unknown)."""

    status: Status | None = None
    missing: bool = False
    pending: bool = False
    error: str | None = None
    asked: float = 0.0
    due: float | None = None  # a long poll's answer may take this long; None: at once


@dataclass(frozen=True)
class NodeView:
    name: str
    reachable: bool = True
    unreachable_for: float = 0.0
    alone: bool = False  # silent for SILENT_AMONG_PEERS while the other nodes answered: lost
    state: str | None = RUNNING  # the agent's state; None when it did not answer this round;
    # MISSING when it answered that it has no such attempt
    reason: Reason | None = None
    exit_code: int | None = None
    rank_exit_codes: dict[str, int] = field(default_factory=dict)
    rank_fail_times: dict[str, float] = field(default_factory=dict)  # on the node's clock
    heartbeat_age: float | None = 0.0
    reported: float | None = None  # when the agent answered, on the node's clock
    ended: float | None = None  # on the node's clock: orders failures, first is the cause
    memory_limit: int | None = None
    progress_age: float | None = None  # since the last progress report (or output line)
    progressed: bool = False  # the script reported progress in this attempt
    disk_full: str | None = None  # the file the agent could not write, with reason "disk-full"


@dataclass(frozen=True)
class Observation:
    nodes: tuple[NodeView, ...]
    elapsed: float  # since the attempt started
    stop_requested: bool = False  # `ava stop` asked for the run to end


@dataclass(frozen=True)
class Verdict:
    outcome: str  # running | succeeded | failed | stopped
    kind: FailureKind | None = None
    cause: str | None = None
    node: str | None = None
    rank: int | None = None
    exit_code: int | None = None
    lost: tuple[str, ...] = ()


STILL_RUNNING = Verdict(RUNNING)
STOP = Verdict(STOPPED, STOPPED_KIND, "stopped by `ava stop`")


def node_view(
    name: str,
    answer: Answer,
    now: float,
    silent_since: float | None,
    status_timeout: float,
    *,
    peers_asked: float = 0.0,
) -> tuple[NodeView, float | None]:
    """What one node's answer says this round, and since when it has been silent (None: it
    answered). A request out for less than `status_timeout` past when its answer was due is
    late, not silent: a busy node answers slowly, and only silence for LOST_AFTER makes a node
    lost, counted from when the unanswered request was sent. PEERS_ASKED is when the latest
    request another node answered was sent: one sent after this node's answer was due says the
    supervisor, its machine and the network answer on time, so SILENT_AMONG_PEERS of silence
    is enough (when every poll is late at once, it is this machine's load: LOST_AFTER holds)."""
    if answer.status is not None:
        return view_of(name, answer.status), None
    if answer.missing:
        return NodeView(name, reachable=True, state=MISSING), None
    first = answer.asked if silent_since is None else silent_since
    if peers_asked >= first + PEERS_LEAD and now - first >= SILENT_AMONG_PEERS:
        return NodeView(name, reachable=False, unreachable_for=now - first, alone=True, state=None), first
    due = answer.asked if answer.due is None else answer.due
    if answer.pending and now - due < status_timeout:
        return NodeView(name, reachable=True, state=None), silent_since
    return NodeView(name, reachable=False, unreachable_for=now - first, state=None), first


def view_of(name: str, status: Status) -> NodeView:
    heartbeat, progress = status.heartbeat, status.progress
    reference = progress.time if progress else status.output_time
    progress_age = None
    if heartbeat and reference:
        progress_age = max(0.0, heartbeat - reference)
    return NodeView(
        name=name,
        state=status.state,
        reason=status.reason,
        exit_code=status.exit_code,
        rank_exit_codes=dict(status.rank_exit_codes),
        rank_fail_times=dict(status.rank_fail_times),
        heartbeat_age=status.age,
        reported=None if status.heartbeat is None or status.age is None else status.heartbeat + status.age,
        ended=status.ended,
        memory_limit=status.memory_limit,
        progress_age=progress_age,
        progressed=progress is not None,
        disk_full=status.disk_full,
    )


def launch_failure(message: str, *, node: str | None, unreachable: bool, attempt: int) -> Verdict | None:
    """A failed launch that failover may recover from: a node lost while restarting (the first
    attempt's launch failing is the user's to fix). None: the run fails."""
    if unreachable and attempt > 1:
        lost = (node,) if node else ()
        return Verdict(FAILED, NODE_LOST, message, node=node, lost=lost)
    return None


def judge(observation: Observation, *, hang_timeout: float) -> Verdict:
    verdict = _judge(observation, hang_timeout=hang_timeout)
    if verdict.outcome == RUNNING and observation.stop_requested:
        return STOP
    return verdict


def _judge(observation: Observation, *, hang_timeout: float) -> Verdict:
    views = observation.nodes
    lost = tuple(
        v.name
        for v in views
        if (not v.reachable and (v.unreachable_for >= LOST_AFTER or v.alone))
        or (
            v.reachable
            and v.state in (STARTING, RUNNING)
            and v.heartbeat_age is not None
            and v.heartbeat_age > STALE_AFTER
        )
    )
    if lost:
        return Verdict(FAILED, NODE_LOST, f"node {', '.join(lost)} stopped answering", node=lost[0], lost=lost)

    missing = tuple(v.name for v in views if v.state == MISSING)
    if missing:
        # Its launch was cut short (the CLI killed mid-start): a new attempt, not a lost node.
        return Verdict(
            FAILED,
            INTERRUPTED,
            f"attempt never started on {', '.join(missing)} (its launch was cut short)",
            node=missing[0],
        )

    failed = sorted((v for v in views if _failing(v)), key=_first_failure)
    silent = tuple(v.name for v in views if not v.reachable)
    if failed and any(v.reachable and v.state is None for v in views):
        # A node's answer is late: it may be the node whose loss made these ranks fail. Its
        # poll either answers or turns into "unreachable" within seconds; judge then.
        return STILL_RUNNING
    if failed and silent:
        # Ranks die in their collectives soon after a peer node does: the node that stopped
        # answering is the cause, not the ranks that lost it.
        return Verdict(FAILED, NODE_LOST, f"node {', '.join(silent)} stopped answering", node=silent[0], lost=silent)
    if failed:
        first = _first_failure(failed[0])
        earlier = [
            v
            for v in views
            if v.state in (STARTING, RUNNING) and not _failing(v) and any(t < first for t in v.rank_fail_times.values())
        ]
        if earlier and (failed[0].heartbeat_age or 0.0) < SETTLE_AFTER:
            # A rank on a node still winding down raised before this failure: that node's
            # torchrun ends within moments, and its rank is the cause.
            return STILL_RUNNING
        if not _settled(failed[0], first, views):
            return STILL_RUNNING
        return _failure(failed[0])
    if views and all(v.state == SUCCEEDED for v in views):
        return Verdict(SUCCEEDED, exit_code=0)
    if any(v.state == STOPPED for v in views):
        return STOP
    if any(v.state is None for v in views):
        # A node's answer is late: it carries no progress this round, and the progress it would
        # report is unknown. A hang is judged on answers, never on their absence (on a loaded
        # machine every long poll can be overdue at once).
        return STILL_RUNNING
    ages = [v.progress_age for v in views if v.progress_age is not None]
    quiet_for = min(ages) if ages else observation.elapsed
    started = any(v.progressed for v in views) or observation.elapsed >= STARTUP_GRACE
    if started and observation.elapsed >= hang_timeout and quiet_for >= hang_timeout:
        return Verdict(FAILED, HANG, f"no training progress for {quiet_for:.0f}s (hang_timeout {hang_timeout:g}s)")
    return STILL_RUNNING


def _failing(view: NodeView) -> bool:
    """The attempt failed on this node: it ended so, or it still runs (torchrun winding down)
    but a rank already exited non-zero, or ran out of memory. The agent says so as it happens."""
    if view.state == FAILED:
        return True
    return view.state in (STARTING, RUNNING) and (
        view.reason == OOM or any(code != 0 for code in view.rank_exit_codes.values())
    )


def _settled(view: NodeView, first: float, views: tuple[NodeView, ...]) -> bool:
    """Whether VIEW's failure at FIRST can be judged now. A node whose attempt ended, an
    out-of-memory kill and a rank killed by a signal other than torchrun's (SIGKILL, SIGSEGV,
    SIGABRT) name their cause at once. A rank that exited with a code may have lost a peer whose
    node just died: then every other node must have answered since the failure (a dead one
    turns late, then silent, and is the cause), or SETTLE_EARLY passed (clocks apart)."""
    if view.state == FAILED or view.reason == OOM:
        return True
    codes = {int(r): c for r, c in view.rank_exit_codes.items() if c != 0}
    since = None if view.reported is None else view.reported - first
    if any(t < first for r, t in view.rank_fail_times.items() if int(r) not in codes):
        # A rank here failed earlier (it raised, or torchrun reaped it before its code was
        # read): this node's final status, within moments, names it.
        return since is not None and since >= SETTLE_AFTER
    code = codes[_first_rank(view, codes)] if codes else 0
    if code < 0 and -code not in _STOP_SIGNALS:
        return True
    others = [v for v in views if v.name != view.name and v.state in (STARTING, RUNNING)]
    if all(v.reported is not None and v.reported >= first for v in others):
        return True
    return since is not None and since >= SETTLE_EARLY


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _failure(view: NodeView) -> Verdict:
    if view.reason == OOM:
        limit = f" (limit {format_size(view.memory_limit, exact=True)})" if view.memory_limit else ""
        return Verdict(FAILED, OOM_KIND, f"out of memory on {view.name}{limit}", node=view.name)
    if view.reason == AGENT_DIED:
        return Verdict(FAILED, AGENT_DIED_KIND, f"the agent on {view.name} died", node=view.name)
    if view.reason == DISK_FULL:
        return Verdict(FAILED, DISK_FULL_KIND, f"disk full on {view.name} ({view.disk_full})", node=view.name)
    codes = {int(r): c for r, c in view.rank_exit_codes.items() if c != 0}
    if codes:
        rank = _first_rank(view, codes)
        code = codes[rank]
        return Verdict(
            FAILED, CRASH, f"rank {rank} on {view.name} exited {code}", node=view.name, rank=rank, exit_code=code
        )
    return Verdict(
        FAILED, CRASH, f"torchrun on {view.name} exited {view.exit_code}", node=view.name, exit_code=view.exit_code
    )


def _first_rank(view: NodeView, codes: dict[int, int]) -> int:
    """The failing rank that exited first: ranks that lose a peer fail moments after it (a
    broken connection), often with the same code. Without exit times, or on a tie, a rank that
    exited on its own beats one killed by a signal (torchrun ending the others), then the
    lowest rank."""
    times = view.rank_fail_times
    return min(codes, key=lambda r: (times.get(str(r), float("inf")), codes[r] < 0, r))


def _first_failure(view: NodeView) -> float:
    """Orders failed nodes: by when their first failing rank exited, else when the attempt
    there ended (both on the node's clock)."""
    times = [t for r, t in view.rank_fail_times.items() if view.rank_exit_codes.get(r, 0) != 0]
    if times:
        return min(times)
    return view.ended if view.ended is not None else float("inf")


def startup_signature(verdict: Verdict, last_lines: list[str], node_names: tuple[str, ...] = ()) -> str | None:
    """What identifies a crash, for telling that the next attempt failed the same way: its exit
    code and the failing rank's last line, node names aside. None for failures a retry may
    fix: OOM, node loss, hangs."""
    if verdict.kind != CRASH:
        return None
    last = next((line.strip() for line in reversed(last_lines) if line.strip()), "")
    for name in sorted(node_names, key=len, reverse=True):
        last = last.replace(name, "<node>")
    return f"exit {verdict.exit_code}: {last}" if last else f"exit {verdict.exit_code}"


@dataclass(frozen=True)
class Plan:
    restart: bool
    reason: str
    nodes: tuple[str, ...] = ()
    backoff: float = 0.0


def recover(
    verdict: Verdict,
    *,
    failover: Failover,
    restarts_used: int,
    current: tuple[str, ...],
    spares: tuple[str, ...],
    nodes_min: int,
    repeated: str | None = None,
) -> Plan:
    """After a failed attempt: the next attempt's nodes, or why there is none. `repeated` is
    the signature of a start-up failure that the attempt before this one failed with too."""
    if verdict.kind == STOPPED_KIND:
        return Plan(False, "stopped")
    if verdict.kind == INTERRUPTED:
        # Nothing of the job failed: its launch was cut short. Start it again, free of charge.
        return Plan(True, verdict.cause or "interrupted", current, 0.0)
    if repeated is not None and failover.stop_repeated_startup_failure:
        return Plan(
            False,
            f"the same start-up failure twice; not retrying: {repeated}"
            " (failover.stop_repeated_startup_failure = false retries it)",
        )
    if verdict.kind == CRASH and verdict.exit_code in failover.fatal_exit_codes:
        return Plan(False, f"exit code {verdict.exit_code} is in failover.fatal_exit_codes: no retry can fix it")
    if restarts_used >= failover.max_restarts:
        return Plan(
            False, f"restart budget exhausted ({restarts_used} of failover.max_restarts = {failover.max_restarts} used)"
        )
    nodes = current
    if verdict.kind == NODE_LOST:
        survivors = tuple(n for n in current if n not in verdict.lost)
        missing = len(current) - len(survivors)
        if failover.on_node_loss == "fail":
            return Plan(False, f'{verdict.cause}; failover.on_node_loss = "fail"')
        if failover.on_node_loss == "replace" and len(spares) >= missing:
            nodes = survivors + spares[:missing]
        elif len(survivors) >= nodes_min and failover.on_node_loss in ("shrink", "replace"):
            # replace without enough spares still goes on when the recipe's range allows fewer.
            nodes = survivors
        else:
            return Plan(False, f"{verdict.cause}; no healthy spare and resources.nodes needs at least {nodes_min}")
    backoff = min(MAX_BACKOFF, failover.backoff * (2**restarts_used))
    return Plan(True, verdict.cause or "the attempt failed", nodes, backoff)
