"""Supervise a run: start an attempt, poll every node's agent, decide, act; repeat until done.

It runs inside `ava train` while attached, or as a background process (`--detach`, or after
Ctrl-C), or in `ava attach`. If it dies, the run keeps going on the nodes; a new supervisor
picks up the current attempt from the run's record.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ava import attempt as nodes_ops
from ava import cachenodes, sync
from ava.config import Inventory, Node, Recipe, parse_recipe
from ava.decide import STARTUP_GRACE, NodeView, Observation, Verdict, judge, recover, startup_signature
from ava.errors import AvaError, ConnectError
from ava.launch import Launch, NodeLaunch, plan
from ava.runs import Attempt, RunRecord
from ava.runs import load as runs_load

POLL_INTERVAL = 1.0
STATUS_WAIT = 2.0  # how long one poll waits for the nodes' answers before judging
RANK_LINE = re.compile(r"^\[(\d+)\]:(.*)$", re.S)
STOP_FILE = "stop"


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
) -> tuple[list[NodeLaunch], str, int]:
    """What each node runs for this attempt (asks the nodes their routes and the master a free
    port); a launch and `ava train --dry-run` both come through here."""
    master = master_address(nodes[0])
    routes, port = nodes_ops.routes(nodes, master)
    launch = Launch(run_id, number, master, port, code_tree, runtime_tree, current_user())
    return plan(recipe, nodes, launch, routes, pythons=pythons), master, port


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
    from dataclasses import replace

    from ava import runs

    text = (record.dir / "recipe.toml").read_text(encoding="utf-8")
    env = runs.read_env(record)
    if env is None:  # a record from before env.json: the copied text and --set hold everything
        return parse_recipe(text, record.source, str(record.dir / "code"), record.overrides)
    recipe = parse_recipe(text, record.source, str(record.dir / "code"))
    return replace(recipe, env=env, raw={**recipe.raw, "env": env})


class Supervisor:
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
    ) -> None:
        self.record, self.recipe, self.inventory, self.sink = record, recipe, inventory, sink
        self.wait_for_leases = wait_for_leases
        self.role, self.lock_wait = role, lock_wait
        self.code_root = record.dir / "code"
        self.manifest = sync.manifest_of(self.code_root)
        self.last_lines: dict[tuple[str, str | None], collections.deque[str]] = {}
        self._lines_lock = threading.Lock()
        self._leave = threading.Event()
        self._unreached: set[str] = set()  # nodes the last teardown could not reach

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> Outcome:
        lock = hold_supervision(self.record, self.role, self.lock_wait)
        # The holder before us may have moved the run on: read it again under the lock.
        record = self.record
        record.__dict__.update(runs_load(record.id).__dict__)
        record.supervisor_pid = os.getpid()
        record.save()
        try:
            while True:
                current = record.current()
                if current is None or current.state in ("succeeded", "failed", "stopped"):
                    names = self._next_nodes(current)
                    if names is None:
                        break
                    current = self._start_attempt(names)
                    if current is None:
                        break
                verdict = self._watch(current)
                self._end_attempt(current, verdict)
                if verdict.outcome == "succeeded":
                    self._finish("succeeded", 0)
                    break
                if verdict.outcome == "stopped" or self.stop_requested():
                    self._finish("stopped", 1)
                    break
                restart = self._plan_restart(current, verdict)
                if restart is None:
                    break
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

    # -- attempts -------------------------------------------------------------------------------

    def _next_nodes(self, previous: Attempt | None) -> list[str] | None:
        if previous is None:
            return list(self.record.nodes)
        return self._pending_nodes

    _pending_nodes: list[str] | None = None

    def _start_attempt(self, names: list[str]) -> Attempt | None:
        record = self.record
        number = len(record.attempts) + 1
        current = Attempt(number=number, nodes=names, started=time.time())
        record.attempts.append(current)
        record.nodes = names
        with self._lines_lock:
            self.last_lines.clear()  # the summary shows the failing attempt's lines only
        record.save()
        self.sink.event(f"attempt {number} starting on {', '.join(names)}")
        nodes = [self.inventory.nodes[n] for n in names]
        last_wait = ""
        while True:
            try:
                self._launch(nodes, current)
                break
            except nodes_ops.LeaseBusy as busy:
                if self.stop_requested():
                    current.state, current.ended, current.kind = "stopped", time.time(), "stopped"
                    current.cause = "stopped by `ava stop` while waiting for busy nodes"
                    self._finish("stopped", 1)
                    return None
                if not self.wait_for_leases:
                    self._fail_launch(current, busy)
                    return None
                held = "; ".join(nodes_ops.describe_holder(h) for h in busy.holders) or "another run"
                if held != last_wait:
                    self.sink.event(f"waiting: {busy.node} is held by {held}")
                    last_wait = held
                self._sleep(5.0)
            except AvaError as failure:
                if self.stop_requested():
                    # `ava stop` during the launch: its teardown is what made the launch fail.
                    current.state, current.ended, current.kind = "stopped", time.time(), "stopped"
                    current.cause = "stopped by `ava stop` during the launch"
                    self._finish("stopped", 1)
                    return None
                self._fail_launch(current, failure)
                if isinstance(failure, ConnectError) and number > 1:
                    # A node lost while restarting: count it lost and try to recover once more.
                    verdict = Verdict("failed", "node-lost", failure.message, node=failure.node, lost=(failure.node,))
                    if self._plan_restart(current, verdict) is not None:
                        return self._start_attempt(self._pending_nodes or [])
                return None
        if self.stop_requested():
            nodes_ops.stop(nodes, record.id)
        current.state = "running"
        record.state = "running"
        record.save()
        return current

    def _launch(self, nodes: list[Node], current: Attempt) -> None:
        prepared = nodes_ops.prepare(
            nodes, self.code_root, self.manifest, recipe=self.recipe, inventory_dir=self.inventory.path.resolve().parent
        )
        cachenodes.prefetch(nodes, self.recipe, pythons=prepared.pythons, report=self.sink.event)
        self.record.code_tree = prepared.code_tree
        current.code_sent_bytes = sum(stats.sent_bytes for stats in prepared.code_stats.values())
        sent = {name: stats for name, stats in prepared.code_stats.items() if stats.sent_files}
        if sent:
            files = sum(stats.sent_files for stats in sent.values())
            self.sink.event(
                f"code: sent {files} file{'s' if files != 1 else ''}, {current.code_sent_bytes:,} bytes"
                f" to {', '.join(sorted(sent))}"
            )
        launches, master, port = plan_attempt(
            self.recipe,
            nodes,
            self.record.id,
            current.number,
            prepared.code_tree,
            prepared.runtime_tree,
            prepared.pythons,
        )
        current.master_port = port
        nodes_ops.start(launches, master, port)

    def _fail_launch(self, current: Attempt, failure: AvaError) -> None:
        current.state, current.ended, current.kind = "failed", time.time(), "launch"
        current.cause = failure.message
        tail = "".join(f"\n    {line}" for line in failure.tail.splitlines()[-10:])
        self.sink.event(f"attempt {current.number} could not start: {failure.message}{tail}")
        self._finish("failed", 3 if not isinstance(failure, nodes_ops.LeaseBusy) else 1)

    def _plan_restart(self, current: Attempt, verdict: Verdict) -> list[str] | None:
        record = self.record
        if verdict.lost:
            record.lost_nodes += [n for n in verdict.lost if n not in record.lost_nodes]
        # Attempts whose launch was cut short (kind "interrupted") cost the budget nothing.
        used = sum(1 for a in record.attempts[:-1] if a.kind != "interrupted")
        spares = self._spares(current.nodes)
        decision = recover(
            verdict,
            failover=self.recipe.failover,
            restarts_used=used,
            current=tuple(current.nodes),
            spares=tuple(spares),
            nodes_min=self.recipe.resources.nodes_min,
            repeated=self._repeated(current, verdict),
        )
        if not decision.restart:
            self.sink.event(
                f"run failed: {verdict.cause}; {decision.reason}"
                if decision.reason != verdict.cause
                else f"run failed: {verdict.cause}"
            )
            self._finish("failed", 1)
            return None
        if verdict.kind == "interrupted":
            self.sink.event(f"attempt {current.number}: {verdict.cause}; starting it again (no restart counted)")
        else:
            self.sink.event(
                f"attempt {current.number} failed: {verdict.cause}; restarting in {decision.backoff:g}s"
                f" on {', '.join(decision.nodes)} (restart {used + 1} of {self.recipe.failover.max_restarts})"
            )
        self._sleep(decision.backoff)
        if self.stop_requested():
            self._finish("stopped", 1)
            return None
        self._pending_nodes = list(decision.nodes)
        return self._pending_nodes

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

    def _spares(self, current: list[str]) -> list[str]:
        from ava.placement import why_ineligible

        return [
            n.name
            for n in self.inventory.nodes.values()
            if n.name not in current
            and n.name not in self.record.lost_nodes
            and n.transport != "local"
            and why_ineligible(n, self.recipe) is None
        ]

    def _finish(self, state: str, code: int) -> None:
        if self._unreached:
            self._stop_unreached()
        self.record.state, self.record.exit_code, self.record.ended = state, code, time.time()
        self.record.save()

    # -- watching one attempt -------------------------------------------------------------------

    def _watch(self, current: Attempt) -> Verdict:
        nodes = [self.inventory.nodes[n] for n in current.nodes]
        done = threading.Event()
        followers = [
            threading.Thread(target=self._follow, args=(node, current.number, done), daemon=True) for node in nodes
        ]
        for follower in followers:
            follower.start()
        unreachable_since: dict[str, float] = {}
        # One status request in flight per node at most; a node that has not answered one for
        # LOST_AFTER seconds is lost, however long its transport takes to give up.
        pending: dict[str, tuple[concurrent.futures.Future[dict[str, Any]], float]] = {}
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=2 * len(nodes))
        try:
            while True:
                if self._leave.is_set():
                    raise Detached()
                asked = time.time()
                for node in nodes:
                    if node.name not in pending:
                        pending[node.name] = (
                            pool.submit(nodes_ops.status_of, node, self.record.id, current.number),
                            asked,
                        )
                concurrent.futures.wait([f for f, _ in pending.values()], timeout=STATUS_WAIT)
                now = time.time()
                views = []
                for node in nodes:
                    future, since = pending[node.name]
                    found: dict[str, Any] | None = None
                    missing = False
                    if future.done():
                        del pending[node.name]
                        try:
                            found = future.result()
                        except nodes_ops.AttemptMissing:
                            missing = True
                        except AvaError:
                            found = None
                    if missing:
                        unreachable_since.pop(node.name, None)
                        views.append(NodeView(node.name, reachable=True, state="missing"))
                    elif found is None and not future.done() and now - since < nodes_ops.STATUS_TIMEOUT:
                        # Late, not yet silent: unknown this round (a busy node answers slowly).
                        views.append(NodeView(node.name, reachable=True, state=None))
                    elif found is None:
                        first = unreachable_since.setdefault(node.name, since)
                        views.append(NodeView(node.name, reachable=False, unreachable_for=now - first, state=None))
                    else:
                        unreachable_since.pop(node.name, None)
                        views.append(_view(node.name, found))
                if any(v.progressed for v in views) or now - current.started >= STARTUP_GRACE:
                    current.progressed = True
                verdict = judge(
                    Observation(tuple(views), now - current.started), hang_timeout=self.recipe.failover.hang_timeout
                )
                if verdict.outcome != "running":
                    return verdict
                if self.stop_requested():
                    return Verdict("stopped", "stopped", "stopped by `ava stop`")
                self._sleep(max(0.0, POLL_INTERVAL - (time.time() - asked)))
        finally:
            pool.shutdown(wait=False)
            if not self._leave.is_set():
                self._teardown(nodes, unreachable_since)
            done.set()
            for follower in followers:
                follower.join(timeout=5)

    def _stop_unreached(self) -> None:
        """Before ending a run, try once more to stop it on nodes that did not answer: a node
        whose link came back still runs its part of the job and holds its leases."""
        nodes = [self.inventory.nodes[n] for n in sorted(self._unreached)]
        for name, outcome in nodes_ops.stop(nodes, self.record.id).items():
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
        started = time.monotonic()
        outcomes = nodes_ops.stop(reachable, self.record.id)
        for name, outcome in outcomes.items():
            if isinstance(outcome, AvaError):
                self.sink.event(f"teardown on {name} failed: {outcome.message}")
        took = time.monotonic() - started
        clean = sorted(name for name, outcome in outcomes.items() if not isinstance(outcome, AvaError))
        if clean and took >= 1.0:  # a quick teardown of a finished job is not news
            self.sink.event(f"teardown: nothing of the attempt left on {', '.join(clean)} ({took:.1f}s)")

    def _end_attempt(self, current: Attempt, verdict: Verdict) -> None:
        current.ended = time.time()
        current.state = {"succeeded": "succeeded", "stopped": "stopped"}.get(verdict.outcome, "failed")
        current.kind, current.cause = verdict.kind, verdict.cause
        current.exit_code, current.failed_node, current.failed_rank = verdict.exit_code, verdict.node, verdict.rank
        self.record.save()
        if verdict.outcome != "succeeded":
            self.sink.event(f"attempt {current.number} ended: {verdict.cause}")

    def _follow(self, node: Node, number: int, done: threading.Event) -> None:
        offset = 0
        while not done.is_set() and not self._leave.is_set():

            def on_line(text: str) -> None:
                self._line(node.name, text)

            try:
                offset += nodes_ops.follow_logs(node, self.record.id, number, on_line, offset=offset)
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
        if self._leave.wait(seconds):
            raise Detached()


def _view(name: str, status: dict[str, Any]) -> NodeView:
    heartbeat = status.get("heartbeat")
    progress = status.get("progress")
    reference = (progress or {}).get("time") if progress else status.get("output_time")
    progress_age = None
    if heartbeat and reference:
        progress_age = max(0.0, float(heartbeat) - float(reference))
    codes = {str(k): int(v) for k, v in (status.get("rank_exit_codes") or {}).items()}
    times = {str(k): float(v) for k, v in (status.get("rank_fail_times") or {}).items()}
    return NodeView(
        name=name,
        state=status.get("state"),
        reason=status.get("reason"),
        exit_code=status.get("exit_code"),
        rank_exit_codes=codes,
        rank_fail_times=times,
        heartbeat_age=status.get("age"),
        ended=status.get("ended"),
        memory_limit=status.get("memory_limit") or (status.get("limits") or {}).get("memory"),
        progress_age=progress_age,
        progressed=bool(progress),
        disk_full=status.get("disk_full"),
    )


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
