"""Supervise a run: start an attempt, poll every node's agent, decide, act; repeat until done.

It runs inside `ava train` while attached, or as a background process (`--detach`, or after
Ctrl-C), or in `ava attach`. If it dies, the run keeps going on the nodes; a new supervisor
picks up the current attempt from the run's record.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Protocol

from ava import placement, provision, sync
from ava.agent.protocol import (
    FAILED,
    INTERRUPTED,
    LAUNCH,
    RUNNING,
    STOPPED,
    STOPPED_KIND,
    SUCCEEDED,
    State,
    Status,
    is_final,
)
from ava.agent.warm import ENABLE as WARM_SPARES
from ava.attempt import Again, AgentClient, LeaseBusy, expecting, fail_on_errors
from ava.config import Inventory, Node, Recipe, parse_recipe
from ava.decide import (
    STARTUP_GRACE,
    Observation,
    Verdict,
    judge,
    launch_failure,
    node_view,
    recover,
    startup_signature,
)
from ava.errors import AvaError, ConnectError
from ava.launch import Launch, NodeLaunch, Route, plan
from ava.runs import Attempt, RunRecord
from ava.runs import load as runs_load
from ava.units import format_duration

# The longest one observation waits for news: a poll returns as soon as a node's status changes.
POLL_INTERVAL = 1.0
LEASE_RETRY = 5.0  # how often a launch waiting for busy nodes (--wait) tries again
RANK_LINE = re.compile(r"^\[(\d+)\]:(.*)$", re.S)
STOP_FILE = "stop"
METRICS_CONSUMED = "metrics-consumed.json"  # per attempt and node: the metric bytes recorded


class LogSink(Protocol):
    def line(self, node: str, rank: str | None, text: str) -> None: ...

    def event(self, text: str) -> None: ...


@dataclass
class Outcome:
    record: RunRecord
    exit_code: int
    last_lines: dict[tuple[str, str | None], list[str]] = field(default_factory=dict)

    def failing_lines(self) -> list[str]:
        attempt = self.record.current()
        if attempt is None or attempt.failed_node is None:
            return []
        rank = None if attempt.failed_rank is None else str(attempt.failed_rank)
        return self.last_lines.get((attempt.failed_node, rank)) or self.last_lines.get((attempt.failed_node, None), [])


class Detached(Exception):
    """The supervisor was asked to leave the run alone (another one takes over)."""


class Supervised(AvaError):
    """Another process supervises the run and did not let go of it."""


LOCK_FILE = "supervisor.lock"


def hold_supervision(record: RunRecord, role: str, wait: float) -> int:
    """The run's supervision lock (a flock on the record's supervisor.lock, freed by the kernel
    when its holder dies): one supervisor drives a run at a time. Returns the open file;
    raises Supervised naming the holder when it is still held after WAIT seconds."""
    import fcntl

    path = record.dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise Supervised(
                    f"run {record.id} is supervised by {holder}, which did not let go within {wait:g}s "
                    "(it may be inside a launch); try again once it has"
                ) from None
            time.sleep(0.1)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{role} (pid {os.getpid()})\n".encode(), 0)
    return fd


def master_address(node: Node) -> str:
    return "127.0.0.1" if node.transport == "local" else str(node.host)


def plan_attempt(
    recipe: Recipe,
    nodes: list[Node],
    run_id: str,
    number: int,
    code_tree: str,
    runtime_tree: str,
    pythons: dict[str, str],
    *,
    client: AgentClient | None = None,
    found: tuple[dict[str, Route], int] | None = None,
) -> tuple[list[NodeLaunch], str, int]:
    """What each node runs for this attempt (asks the nodes their routes and the master a free
    port, unless FOUND already has them); a launch and `ava train --dry-run` both come through here."""
    master = master_address(nodes[0])
    routes, port = found if found is not None else (client or AgentClient()).routes(nodes, master)
    launch = Launch(run_id, number, master, port, code_tree, runtime_tree, current_user())
    return plan(with_spares(recipe), nodes, launch, routes, pythons=pythons), master, port


def spares_wanted(recipe: Recipe) -> bool:
    """Whether the run's nodes keep spare interpreters for its next attempt (ava/agent/warm.py):
    `[failover] warm_spares` where a restart can come at all (max_restarts > 0); an `[env]
    AVA_WARM_SPARES` of "1" or "0" overrides both."""
    chosen = recipe.env.get(WARM_SPARES)
    if chosen is not None:
        return chosen == "1"
    return recipe.failover.warm_spares and recipe.failover.max_restarts > 0


def with_spares(recipe: Recipe) -> Recipe:
    """The recipe as its nodes get it: an agent learns that its run keeps spares from the
    spec's env (AVA_WARM_SPARES=1), as a recipe that sets it itself says."""
    if WARM_SPARES in recipe.env or not spares_wanted(recipe):
        return recipe
    return replace(recipe, env={**recipe.env, WARM_SPARES: "1"})


def snapshot_code(record: RunRecord, root: Path, leave_out: str | None = None) -> Path:
    """Copy the recipe's code into the run's records: every attempt runs the code launched.

    `leave_out` is the recipe file itself: its [env] may hold secrets, and the run's records
    keep the recipe apart (runs.private_recipe), so it reaches neither this copy nor the nodes."""
    target = record.dir / "code"
    manifest = sync.manifest_of(root)
    for entry in manifest.files:
        if entry.path == leave_out:
            continue
        dest = target / entry.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes((root / entry.path).read_bytes())
        if entry.exec:
            dest.chmod(0o700)
    target.mkdir(parents=True, exist_ok=True)
    return target


def recipe_of(record: RunRecord) -> Recipe:
    """The recipe as launched: recipe.toml (every --set applied, no [env]) + env.json's values."""
    from ava import runs

    text = (record.dir / "recipe.toml").read_text(encoding="utf-8")
    env = runs.read_env(record)
    if env is None:  # a record from before env.json: the copied text and --set hold everything
        return parse_recipe(text, record.source, str(record.dir / "code"), record.overrides)
    recipe = parse_recipe(text, record.source, str(record.dir / "code"))
    return replace(recipe, env=env, raw={**recipe.raw, "env": env})


class Clock:
    """Time as the supervisor sees it. Tests drive the loop with one that never sleeps."""

    def now(self) -> float:
        return time.time()

    def wait(self, event: threading.Event, seconds: float) -> bool:
        """Sleep SECONDS unless EVENT is set first; True when it is."""
        return event.wait(seconds)


# -- the actions of the loop: each step returns the next one, None when the run is done -------


@dataclass(frozen=True)
class StartAttempt:
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class LaunchAttempt:
    attempt: Attempt


@dataclass(frozen=True)
class WaitForLeases:
    attempt: Attempt
    busy: LeaseBusy


@dataclass(frozen=True)
class Watch:
    attempt: Attempt


@dataclass(frozen=True)
class Restart:
    nodes: tuple[str, ...]
    backoff: float


@dataclass(frozen=True)
class Finish:
    state: State
    exit_code: int


Action = StartAttempt | LaunchAttempt | WaitForLeases | Watch | Restart | Finish


class Supervisor:
    """One run's loop, in the shape of torch's elastic agent: observe every node, `judge`,
    `recover` from a failure, act. Every decision is in ava.decide; every node is reached
    through the AgentClient."""

    def __init__(
        self,
        record: RunRecord,
        recipe: Recipe,
        inventory: Inventory,
        sink: LogSink,
        *,
        wait_for_leases: bool = False,
        role: str = "ava train",
        lock_wait: float = 15.0,
        client: AgentClient | None = None,
        clock: Clock | None = None,
        provisioned: list[str] | None = None,
    ) -> None:
        self.record, self.recipe, self.inventory, self.sink = record, recipe, inventory, sink
        self.wait_for_leases = wait_for_leases
        self.role, self.lock_wait = role, lock_wait
        self.client = client or AgentClient()
        self.clock = clock or Clock()
        self.code_root = record.dir / "code"
        self.manifest = sync.manifest_of(self.code_root)
        self.last_lines: dict[tuple[str, str | None], collections.deque[str]] = {}
        self._lines_lock = threading.Lock()
        self._leave = threading.Event()
        self._unreached: set[str] = set()  # nodes the last teardown could not reach
        self._last_wait = ""  # the holders last reported while waiting for leases
        # Nodes the CLI has just provisioned in front of the user: the first launch skips that check.
        self._provisioned = set(provisioned or ())
        # The run keeps spare interpreters between attempts (ava/agent/warm.py).
        self._spares = spares_wanted(recipe)

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> Outcome:
        lock = hold_supervision(self.record, self.role, self.lock_wait)
        # The holder before us may have moved the run on: read it again under the lock.
        record = self.record
        record.__dict__.update(runs_load(record.id).__dict__)
        record.supervisor_pid = os.getpid()
        record.save()
        try:
            action = self._resume()
            while action is not None:
                action = self._act(action)
        except Detached:
            pass
        finally:
            if record.supervisor_pid == os.getpid():
                record.supervisor_pid = None
                record.save()
            os.close(lock)
        code = record.exit_code if record.exit_code is not None else 1
        return Outcome(record, code, {k: list(v) for k, v in self.last_lines.items()})

    def leave(self) -> None:
        """Stop supervising without touching the run (Ctrl-C, or `ava attach` taking over)."""
        self._leave.set()

    def stop_requested(self) -> bool:
        return (self.record.dir / STOP_FILE).exists()

    def _resume(self) -> Action | None:
        """Where a supervisor starting on this run picks it up."""
        current = self.record.current()
        if current is None:
            return StartAttempt(tuple(self.record.nodes))
        if is_final(current.state):
            return None  # the run ended under the supervisor before us
        return Watch(current)

    def _act(self, action: Action) -> Action | None:
        if isinstance(action, StartAttempt):
            return self._start_attempt(action.nodes)
        if isinstance(action, LaunchAttempt):
            return self._launch_attempt(action.attempt)
        if isinstance(action, WaitForLeases):
            return self._wait_for_leases(action.attempt, action.busy)
        if isinstance(action, Watch):
            return self._watch_attempt(action.attempt)
        if isinstance(action, Restart):
            self._sleep(action.backoff)
            if self.stop_requested():
                return Finish(STOPPED, 1)
            return StartAttempt(action.nodes)
        self._finish(action.state, action.exit_code)
        return None

    # -- the actions ----------------------------------------------------------------------------

    def _start_attempt(self, names: tuple[str, ...]) -> Action:
        record = self.record
        number = len(record.attempts) + 1
        current = Attempt(number=number, nodes=list(names), started=self.clock.now())
        record.attempts.append(current)
        record.nodes = list(names)
        with self._lines_lock:
            self.last_lines.clear()  # the summary shows the failing attempt's lines only
        record.save()
        self.sink.event(f"attempt {number} starting on {', '.join(names)}")
        return LaunchAttempt(current)

    def _launch_attempt(self, current: Attempt) -> Action:
        nodes = [self.inventory.nodes[n] for n in current.nodes]
        try:
            self._launch(nodes, current)
        except LeaseBusy as busy:
            if self.stop_requested():
                return self._stopped_at_launch(current, "stopped by `ava stop` while waiting for busy nodes")
            if not self.wait_for_leases:
                return self._launch_failed(current, busy)
            return WaitForLeases(current, busy)
        except AvaError as failure:
            if self.stop_requested():
                # `ava stop` during the launch: its teardown is what made the launch fail.
                return self._stopped_at_launch(current, "stopped by `ava stop` during the launch")
            return self._launch_failed(current, failure)
        if self.stop_requested():
            self.client.stop(nodes, self.record.id)
        current.state = RUNNING
        self.record.state = RUNNING
        self.record.save()
        return Watch(current)

    def _wait_for_leases(self, current: Attempt, busy: LeaseBusy) -> Action:
        held = "; ".join(h.describe() for h in busy.holders) or "another run"
        if held != self._last_wait:
            self.sink.event(f"waiting: {busy.node} is held by {held}")
            self._last_wait = held
        self._sleep(LEASE_RETRY)
        return LaunchAttempt(current)

    def _watch_attempt(self, current: Attempt) -> Action:
        verdict = self._watch(current)
        self._end_attempt(current, verdict)
        if verdict.outcome == SUCCEEDED:
            return Finish(SUCCEEDED, 0)
        if verdict.outcome == STOPPED or self.stop_requested():
            return Finish(STOPPED, 1)
        return self._after_failure(current, verdict)

    def _launch(self, nodes: list[Node], current: Attempt) -> None:
        prepared = self.client.prepare(
            nodes,
            self.code_root,
            self.manifest,
            recipe=self.recipe,
            inventory_dir=self.inventory.path.resolve().parent,
            master=master_address(nodes[0]),
            provisioned={n.name for n in nodes} <= self._provisioned,
        )
        self._provisioned.clear()  # later attempts check again (a node may have changed meanwhile)
        self.client.prefetch(nodes, self.recipe, prepared.pythons, self.sink.event)
        self.record.code_tree = prepared.code_tree
        current.code_sent_bytes = sum(stats.sent_bytes for stats in prepared.code_stats.values())
        sent = {name: stats for name, stats in prepared.code_stats.items() if stats.sent_files}
        if sent:
            files = sum(stats.sent_files for stats in sent.values())
            self.sink.event(
                f"code: sent {files} file{'s' if files != 1 else ''}, {current.code_sent_bytes:,} bytes"
                f" to {', '.join(sorted(sent))}"
            )
        master = master_address(nodes[0])
        if prepared.routes is None or prepared.port is None:
            prepared.routes, prepared.port = self.client.routes(nodes, master)
        trees = (prepared.code_tree, prepared.runtime_tree)

        def replan(routes: dict[str, Route], port: int) -> list[NodeLaunch]:
            launches, _, _ = plan_attempt(
                self.recipe,
                nodes,
                self.record.id,
                current.number,
                prepared.code_tree,
                prepared.runtime_tree,
                prepared.pythons,
                found=(routes, port),
            )
            # Remembered routes and a picked port: each agent checks them before it starts.
            if not prepared.remembered:
                return launches
            return expecting(launches, master, routes, port, trees, prepared.ready)

        def provision_node(node: Node) -> None:  # its setup changed since last found ready
            def said(name: str, step: provision.Step, state: str) -> None:
                self.sink.event(
                    f"{name}: {step.kind}: {step.description} …" if state == "start" else f"{name}: {step.kind} {state}"
                )

            base = self.inventory.path.resolve().parent
            fail_on_errors(provision.ensure([node], recipe=self.recipe, base=base, on_step=said), "provisioning nodes")

        launches = replan(prepared.routes, prepared.port)
        again = Again(self.manifest, self.code_root, replan, provision_node)
        current.master_port = self.client.start(launches, master, prepared.port, again=again)

    def _stopped_at_launch(self, current: Attempt, cause: str) -> Action:
        current.state, current.ended, current.kind = STOPPED, self.clock.now(), STOPPED_KIND
        current.cause = cause
        return Finish(STOPPED, 1)

    def _launch_failed(self, current: Attempt, failure: AvaError) -> Action:
        current.state, current.ended, current.kind = FAILED, self.clock.now(), LAUNCH
        current.cause = failure.message
        tail = "".join(f"\n    {line}" for line in failure.tail.splitlines()[-10:])
        self.sink.event(f"attempt {current.number} could not start: {failure.message}{tail}")
        self.record.save()
        verdict = launch_failure(
            failure.message,
            node=getattr(failure, "node", None),
            unreachable=isinstance(failure, ConnectError),
            attempt=current.number,
        )
        if verdict is not None:
            return self._after_failure(current, verdict)
        return Finish(FAILED, 1 if isinstance(failure, LeaseBusy) else 3)

    def _after_failure(self, current: Attempt, verdict: Verdict) -> Action:
        record = self.record
        if verdict.lost:
            record.lost_nodes += [n for n in verdict.lost if n not in record.lost_nodes]
        # Attempts whose launch was cut short (kind "interrupted") cost the budget nothing.
        used = sum(1 for a in record.attempts[:-1] if a.kind != INTERRUPTED)
        spares = placement.spares(
            self.recipe, self.inventory, only=record.pool, exclude=[*current.nodes, *record.lost_nodes]
        )
        decision = recover(
            verdict,
            failover=self.recipe.failover,
            restarts_used=used,
            current=tuple(current.nodes),
            spares=tuple(n.name for n in spares),
            nodes_min=self.recipe.resources.nodes_min,
            repeated=self._repeated(current, verdict),
        )
        if not decision.restart:
            self.sink.event(
                f"run failed: {verdict.cause}; {decision.reason}"
                if decision.reason != verdict.cause
                else f"run failed: {verdict.cause}"
            )
            return Finish(FAILED, 1)
        if verdict.kind == INTERRUPTED:
            self.sink.event(f"attempt {current.number}: {verdict.cause}; starting it again (no restart counted)")
        else:
            self.sink.event(
                f"attempt {current.number} failed: {verdict.cause}; restarting in {decision.backoff:g}s"
                f" on {', '.join(decision.nodes)} (restart {used + 1} of {self.recipe.failover.max_restarts})"
            )
        return Restart(decision.nodes, decision.backoff)

    def _repeated(self, current: Attempt, verdict: Verdict) -> str | None:
        """The signature of this attempt's failure when it came before any progress and the
        attempt before failed the same way (a missing module, a bad argument: no retry fixes
        those); else None."""
        if current.progressed:
            return None
        lines = self._failing_lines(verdict)
        current.signature = startup_signature(verdict, lines, tuple(self.inventory.nodes))
        self.record.save()
        earlier = [a for a in self.record.attempts if a.number < current.number]
        if current.signature is None or not earlier or earlier[-1].progressed:
            return None
        if earlier[-1].signature != current.signature:
            return None
        return next((line.strip() for line in reversed(lines) if line.strip()), str(verdict.cause))

    def _failing_lines(self, verdict: Verdict) -> list[str]:
        rank = None if verdict.rank is None else str(verdict.rank)
        with self._lines_lock:
            found = self.last_lines.get((verdict.node or "", rank)) or self.last_lines.get((verdict.node or "", None))
            return list(found or [])

    def _finish(self, state: State, code: int) -> None:
        if self._unreached:
            self._stop_unreached()
        if self._spares and state != SUCCEEDED:
            # No attempt comes after this one: end the spare interpreters its teardowns kept
            # (a success ends them on each node itself).
            used = {name for attempt in self.record.attempts for name in attempt.nodes} - self._unreached
            self.client.stop([self.inventory.nodes[n] for n in sorted(used)], self.record.id)
        self.record.state, self.record.exit_code, self.record.ended = state, code, self.clock.now()
        self.record.save()

    # -- watching one attempt -------------------------------------------------------------------

    def _watch(self, current: Attempt) -> Verdict:
        """Observe and judge the attempt until it is over; then tear it down."""
        nodes = [self.inventory.nodes[n] for n in current.nodes]
        done = threading.Event()
        followers = [
            threading.Thread(target=self._follow, args=(node, current.number, done), daemon=True) for node in nodes
        ]
        for follower in followers:
            follower.start()
        silent_since: dict[str, float] = {}  # nodes that stopped answering, and since when
        consumed = self._metrics_consumed()
        for node in nodes:
            self.client.skip_metrics(node.name, consumed.get(f"{current.number}/{node.name}", 0))
        try:
            while True:
                if self._leave.is_set():
                    raise Detached()
                answers = self.client.poll(nodes, self.record.id, current.number, wait=POLL_INTERVAL)
                now = self.clock.now()
                views = []
                # When each node's latest answered request was sent: a node's silence is judged
                # against its peers' answers (decide.node_view).
                answered = {name: a.asked for name, a in answers.items() if a.status is not None}
                for node in nodes:
                    answer = answers[node.name]
                    if answer.status is not None and answer.status.metrics:
                        self._record_metrics(current.number, node.name, answer.status)
                    peers = max((t for name, t in answered.items() if name != node.name), default=0.0)
                    view, since = node_view(
                        node.name,
                        answer,
                        now,
                        silent_since.get(node.name),
                        self.client.status_timeout,
                        peers_asked=peers,
                    )
                    if since is None:
                        silent_since.pop(node.name, None)
                    else:
                        silent_since[node.name] = since
                    views.append(view)
                if any(v.progressed for v in views) or now - current.started >= STARTUP_GRACE:
                    current.progressed = True
                observation = Observation(tuple(views), now - current.started, stop_requested=self.stop_requested())
                verdict = judge(observation, hang_timeout=self.recipe.failover.hang_timeout)
                if verdict.outcome != RUNNING:
                    if verdict.outcome == FAILED:
                        # Said as it is known: the teardown that follows may take a while.
                        self.sink.event(f"attempt {current.number} failed: {verdict.cause}; stopping it everywhere")
                    return verdict
        finally:
            # Nodes whose last answer verified that the attempt left nothing there need no stop.
            ended = set(self.client.ended_clean(nodes, self.record.id, current.number))
            self.client.close()
            if not self._leave.is_set():
                self._teardown([n for n in nodes if n.name not in ended], silent_since)
            done.set()
            for follower in followers:
                follower.join(timeout=5)

    def _record_metrics(self, attempt: int, node: str, status: Status) -> None:
        from ava import metrics  # only runs whose scripts record metrics need it

        metrics.record(self.record, attempt, node, list(status.metrics))
        # How far each node's lines are recorded: a supervisor taking over asks from there.
        consumed = self._metrics_consumed()
        consumed[f"{attempt}/{node}"] = status.metrics_end or 0
        temp = self.record.dir / f".{METRICS_CONSUMED}.{os.getpid()}"
        descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(consumed, handle)
        os.replace(temp, self.record.dir / METRICS_CONSUMED)

    def _metrics_consumed(self) -> dict[str, int]:
        try:
            found = json.loads((self.record.dir / METRICS_CONSUMED).read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): int(v) for k, v in found.items()} if isinstance(found, dict) else {}

    def _stop_unreached(self) -> None:
        """Before ending a run, try once more to stop it on nodes that did not answer: a node
        whose link came back still runs its part of the job and holds its leases."""
        nodes = [self.inventory.nodes[n] for n in sorted(self._unreached)]
        for name, outcome in self.client.stop(nodes, self.record.id).items():
            if not isinstance(outcome, AvaError):
                self._unreached.discard(name)
        if self._unreached:
            names = ", ".join(sorted(self._unreached))
            self.sink.event(
                f"could not reach {names} to stop the run there; processes may remain: "
                f"`ava stop {self.record.id}` once it answers"
            )

    def _teardown(self, nodes: list[Node], unreachable: dict[str, float]) -> None:
        self._unreached.update(unreachable)
        reachable = [n for n in nodes if n.name not in unreachable]
        if not reachable:
            return
        started = time.monotonic()
        # A failover's teardown: the nodes' spare interpreters wait for the next attempt. The
        # run's end takes them (`_finish`), as does `ava stop`.
        outcomes = self.client.stop(reachable, self.record.id, keep_spares=self._spares)
        for name, outcome in outcomes.items():
            if isinstance(outcome, AvaError):
                self.sink.event(f"teardown on {name} failed: {outcome.message}")
        took = time.monotonic() - started
        clean = sorted(name for name, outcome in outcomes.items() if not isinstance(outcome, AvaError))
        if clean and took >= 1.0:  # a quick teardown of a finished job is not news
            self.sink.event(f"teardown: nothing of the attempt left on {', '.join(clean)} ({format_duration(took)})")

    def _end_attempt(self, current: Attempt, verdict: Verdict) -> None:
        current.ended = self.clock.now()
        current.state = verdict.outcome if verdict.outcome in (SUCCEEDED, STOPPED) else FAILED
        current.kind, current.cause = verdict.kind, verdict.cause
        current.exit_code, current.failed_node, current.failed_rank = verdict.exit_code, verdict.node, verdict.rank
        self.record.save()
        if verdict.outcome != SUCCEEDED:
            self.sink.event(f"attempt {current.number} ended: {verdict.cause}")

    def _follow(self, node: Node, number: int, done: threading.Event) -> None:
        offset = 0
        while not done.is_set() and not self._leave.is_set():
            try:
                offset += self.client.follow_logs(
                    node, self.record.id, number, partial(self._line, node.name), offset=offset
                )
                return
            except AvaError:
                if done.wait(1.0):
                    return

    def _line(self, node: str, text: str) -> None:
        match = RANK_LINE.match(text)
        rank, body = (match.group(1), match.group(2)) if match else (None, text)
        with self._lines_lock:
            self.last_lines.setdefault((node, rank), collections.deque(maxlen=20)).append(body)
        self.sink.line(node, rank, body)

    def _sleep(self, seconds: float) -> None:
        if self.clock.wait(self._leave, seconds):
            raise Detached()


def current_user() -> str:
    import getpass

    return getpass.getuser()


def spawn_background(record: RunRecord, inventory_path: Path) -> int:
    """Start a detached supervisor for the run; its output goes to the run's supervisor.log."""
    from ava.onefile import child_env, python_module  # the one-file ava starts itself again

    log = open(record.dir / "supervisor.log", "ab")
    process = subprocess.Popen(
        [*python_module("ava.supervisor"), record.id, str(inventory_path)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
        env={**os.environ, "AVA_HOME": str(record.dir.parent.parent), **child_env("ava.supervisor")},
    )
    log.close()
    return process.pid


class FileSink:
    """Where a background supervisor writes: the run's log file, prefixed like the terminal."""

    def __init__(self, path: Path) -> None:
        self.handle = open(path, "a", encoding="utf-8", buffering=1)

    def line(self, node: str, rank: str | None, text: str) -> None:
        self.handle.write(f"{node}/{rank if rank is not None else '-'} | {text}\n")

    def event(self, text: str) -> None:
        self.handle.write(f"{time.strftime('%H:%M:%S')} ava: {text}\n")


def _background_main(argv: list[str]) -> int:
    from ava import runs
    from ava.config import load_inventory

    os.umask(0o077)  # as the CLI: what the run's records gain stays the user's own
    record = runs.load(argv[0])
    inventory = load_inventory(argv[1])
    supervisor = Supervisor(
        record,
        recipe_of(record),
        inventory,
        FileSink(record.dir / "output.log"),
        role="a background supervisor",
        lock_wait=60.0,
    )
    # SIGHUP too: a background supervisor outlives the terminal that started it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: supervisor.leave())
    try:
        return supervisor.run().exit_code
    except Supervised as taken:
        print(f"{time.strftime('%H:%M:%S')} ava: {taken.message}", file=sys.stderr)
        return 0


if __name__ == "__main__":
    sys.exit(_background_main(sys.argv[1:]))
