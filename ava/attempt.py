"""One attempt of a run on its nodes, through each node's agent: prepare, start, poll, stop, logs.

The one place that runs agent commands for a run.

The imperative half of a launch (ava.launch builds what runs; this makes it run). Every call
goes through a node's transport to the agent's command line (`ava/agent/main.py`) and comes back
as a type of `ava.agent.protocol`, or an AvaError naming the node. Calls over several nodes fan
out in parallel and report a result or an error for each. The supervisor takes an AgentClient as
an argument, so its loop can be driven by a fake one in tests.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ava import launchcache, provision, sync
from ava.agent import protocol
from ava.agent.protocol import ExitCode, Holder, Status, StopReport
from ava.config import Node, Recipe
from ava.decide import Answer, liveness_scale
from ava.errors import AvaError, CommandError
from ava.launch import Expect, NodeLaunch, Route
from ava.provision import ReadyCheck
from ava.sync import agent_command
from ava.transport import connect, run_all

STATUS_TIMEOUT = 4.0 * liveness_scale()  # a status poll slower than this counts as the node not answering
STORE_TIMEOUT = 120.0  # how long the workers' start waits for the master's rendezvous store
LONG_POLL = 1.0  # the longest an agent holds a status request before answering unchanged
RETRY_AFTER = 0.2  # after a failed status request, how long before asking that node again
# Printed before the log's bytes: lines ahead of it come from the node's shell start-up files
# (conda's and pyenv's init print on every SSH command), not from the run, and count for no offset.
LOG_START = "ava-logs-start"
# A warm launch picks the master's rendezvous port itself (its agent checks that it is free):
# below Linux's ephemeral range, so outgoing connections do not hold it.
PORTS = (20000, 32000)


class LeaseBusy(AvaError):
    def __init__(self, node: str, holders: list[Holder]) -> None:
        self.node, self.holders = node, holders
        held = "; ".join(h.describe() for h in holders) or "another run"
        super().__init__(f"{node} is busy: held by {held} (`ava train --wait` waits for it, or `ava stop` that run)")


class AttemptMissing(AvaError):
    """The node's agent answered that it has no such attempt: reachable, never started there."""


class Stale(CommandError):
    """A one-trip start refused by the node's agent: what the launch took for granted there (its
    launch.Expect) is not so. Nothing started; the facts for a second try come with it."""

    def __init__(
        self, node: str, trees: list[str], route: Route | None, port: int | None, *, unready: bool = False
    ) -> None:
        what = ["its setup changed since it was last found ready"] if unready else []
        what += [f"code trees {', '.join(trees)} missing"] if trees else []
        what += ["its route to the master changed"] if route is not None else []
        what += [f"the rendezvous port is taken (port {port} is free)"] if port is not None else []
        super().__init__(f"{node}: {'; '.join(what) or 'the start was refused'}")
        self.node, self.trees, self.route, self.port = node, trees, route, port
        self.unready = unready  # the provision facts changed: provision it before the second try


@dataclass
class Prepared:
    code_tree: str
    runtime_tree: str
    code_stats: dict[str, sync.SyncStats] = field(default_factory=dict)
    pythons: dict[str, str] = field(default_factory=dict)  # the interpreter of the run, per node
    routes: dict[str, Route] | None = None  # found while preparing (see prepare's MASTER)
    port: int | None = None
    # The routes and port were not asked for but remembered (launchcache) or picked: the start
    # takes them for granted and each agent checks them (see expecting).
    remembered: bool = False
    # Nodes whose provision check rides in their start (see expecting): not checked before it.
    ready: dict[str, ReadyCheck] = field(default_factory=dict)


def fail_on_errors(outcomes: dict[str, Any], what: str) -> None:
    errors = [(name, o) for name, o in outcomes.items() if isinstance(o, AvaError)]
    if errors:
        first = errors[0][1]
        more = f" (and {len(errors) - 1} more nodes)" if len(errors) > 1 else ""
        raise (
            type(first)(f"{what}: {first.message}{more}", tail=first.tail) if isinstance(first, CommandError) else first
        )


def prepare(
    nodes: list[Node],
    code_root: Path,
    manifest: sync.Manifest,
    *,
    recipe: Recipe,
    inventory_dir: Path,
    master: str | None = None,
    provisioned: bool = False,
) -> Prepared:
    """Provision what is missing on every node (agent, runtime, cache config, cgroup parent,
    the run's venv), then put the run's code where it is not yet. With MASTER, the nodes' routes
    to it are found in the same trip that asks whether the code is there: on a warm launch that
    is two trips per node (the provision check, this probe), and the start is the third; on a
    warm one, the start alone (the provision check rides in it: `ready`)."""
    prepared = Prepared(manifest.tree, sync.runtime_manifest()[0].tree)
    known = launchcache.load(nodes, master) if master is not None else {}
    if not provisioned and master is not None and len(known) == len(nodes):
        prepared.ready = ready_checks(nodes, recipe=recipe, base=inventory_dir)
    if not provisioned and len(prepared.ready) < len(nodes):
        # PROVISIONED: the caller has just made sure, a moment ago
        fail_on_errors(provision.ensure(nodes, recipe=recipe, base=inventory_dir), "provisioning nodes")
        prepared.ready = {}
    lacking = nodes
    if master is not None and len(known) == len(nodes):
        # A warm launch: the routes are remembered and the start checks them (no probe).
        prepared.routes = {name: entry.route for name, entry in known.items()}
        prepared.port, prepared.remembered = random.randrange(*PORTS), True
        lacking = [node for node in nodes if manifest.tree not in known[node.name].trees]
    elif master is not None:
        found = probe(nodes, master, trees=[manifest.tree])
        prepared.routes, prepared.port = found.routes, found.port
        lacking = [node for node in nodes if manifest.tree in found.missing.get(node.name, ())]
    prepared.code_stats = {
        node.name: sync.SyncStats(manifest.tree, len(manifest.files), 0, 0) for node in nodes if node not in lacking
    }
    outcomes = run_all(lacking, lambda node: sync.ship_tree(node, manifest, code_root))
    fail_on_errors(outcomes, "sending the code")
    prepared.code_stats.update({name: o for name, o in outcomes.items() if isinstance(o, sync.SyncStats)})
    if master is not None and prepared.routes is not None and not prepared.remembered:
        trees = (prepared.code_tree, prepared.runtime_tree)
        launchcache.remember(master, [(node, prepared.routes[node.name], trees) for node in nodes])
    prepared.pythons = {node.name: provision.venv_python(node, recipe=recipe, root=inventory_dir) for node in nodes}
    return prepared


def ready_checks(nodes: list[Node], *, recipe: Recipe, base: Path) -> dict[str, ReadyCheck]:
    """Each node's remembered provision check for RECIPE (ava.launchcache), where it has one."""
    checks = {node.name: provision.ready_check(node, recipe=recipe, base=base) for node in nodes}
    return {name: check for name, check in checks.items() if check is not None}


def one_trip(nodes: list[Node], master: str, *, recipe: Recipe, base: Path) -> bool:
    """Whether a launch on NODES can be one trip per node: each one's route to MASTER and its
    provision check are remembered (`ava train` then leaves the check to the start)."""
    return len(launchcache.load(nodes, master)) == len(nodes) and len(
        ready_checks(nodes, recipe=recipe, base=base)
    ) == len(nodes)


@dataclass(frozen=True)
class Probe:
    routes: dict[str, Route]  # each node's route to the master
    port: int  # a free port on the master for the rendezvous
    missing: dict[str, list[str]]  # per node, the asked-about code trees it does not have


def routes(nodes: list[Node], master: str) -> tuple[dict[str, Route], int]:
    """Each node's route to the master, and a free port on the master for the rendezvous.
    Asks the agent, put on a node that has none yet (`ava train --dry-run` on fresh nodes): a
    launch provisions first and asks in `probe`."""
    fail_on_errors(run_all(nodes, sync.ship_agent), "putting ava's agent on the nodes")
    found = probe(nodes, master)
    return found.routes, found.port


def probe(nodes: list[Node], master: str, *, trees: Sequence[str] = ()) -> Probe:
    """One agent call per node: its route to the master (and on the master a free port), and
    which of TREES it lacks."""

    def one(node: Node) -> dict[str, Any]:
        args = ["route", master, node.interface, *(["--port"] if node is nodes[0] else [])]
        for tree in trees:
            args += ["--tree", tree]
        if trees:
            args += ["--workdir", node.workdir]
        result = connect(node).run(agent_command(node, *args), timeout=30).check("route probe")
        facts = _last_json(result.stdout)
        if facts.get("error"):
            raise CommandError(f"{node.name}: {facts['error']}")
        if not facts.get("interface"):
            raise CommandError(f"{node.name}: no interface holds {facts.get('address')}; set `interface` in ava.toml")
        return facts

    outcomes = run_all(nodes, one)
    fail_on_errors(outcomes, "finding routes to the master")
    found: dict[str, Route] = {}
    missing: dict[str, list[str]] = {}
    for name, facts in outcomes.items():
        if isinstance(facts, dict):
            found[name] = Route(
                str(facts["address"]),
                str(facts["interface"]),
                str(facts.get("home") or "/"),
                int(facts.get("cpus") or 1),
            )
            ready = facts.get("trees_ready") or {}
            missing[name] = [tree for tree in trees if not ready.get(tree)]
    first = outcomes[nodes[0].name]
    assert isinstance(first, dict)
    return Probe(found, int(first["port"]), missing)


# Every node's launch again, for these routes and this rendezvous port (the supervisor's plan).
Replan = Callable[[dict[str, Route], int], list[NodeLaunch]]


@dataclass(frozen=True)
class Again:
    """How `start` makes good a node's Stale answer: the code to ship, and the plan to redo."""

    manifest: sync.Manifest
    code_root: Path
    replan: Replan
    provision: Callable[[Node], None] | None = None  # for a node whose setup changed (Stale.unready)


def expecting(
    launches: list[NodeLaunch],
    master: str,
    routes: dict[str, Route],
    port: int,
    trees: tuple[str, ...],
    ready: dict[str, ReadyCheck] | None = None,
) -> list[NodeLaunch]:
    """The launches as one-trip starts: each agent checks the route and trees they were planned
    with (and the master, that the port is free) before it starts; where READY has the node, its
    provision facts are checked in the same trip (provision.guarded)."""
    ready = ready or {}
    return [
        replace(
            launch,
            expect=Expect(
                master,
                launch.node.interface,
                routes[launch.node.name],
                trees,
                port if i == 0 else None,
                ready.get(launch.node.name),
            ),
        )
        for i, launch in enumerate(launches)
    ]


def start(launches: list[NodeLaunch], master_address: str, port: int, *, again: Again | None = None) -> int:
    """Master first; once its torchrun is started, every other node at once (their torchruns wait
    for its store). All or nothing. Returns the rendezvous port (a Stale master may have named
    another).

    One agent call per node when its launch's expectations hold; a node that answers Stale is
    given what it lacks (code, a fresh route, another port) and started again, once.

    On failure every node tried is stopped, not only those that answered: a start whose reply
    was lost (timeout, dropped connection) may have started the attempt there. Stop is idempotent.
    """
    tried: list[Node] = []
    try:
        try:
            outcomes = _start_all(launches, master_address, port, tried)
        except Stale as refused:  # the master's: nothing started anywhere
            if again is None:
                raise
            port = refused.port or port  # the others' plans change with it too
            launches = _made_good(launches, {refused.node: refused}, port, again)
            outcomes = _start_all(launches, master_address, port, tried)
        stale = {name: o for name, o in outcomes.items() if isinstance(o, Stale)}
        if stale and again is not None:
            fixed = {launch.node.name: launch for launch in _made_good(launches, stale, port, again)}
            outcomes.update(run_all([fixed[name].node for name in stale], lambda node: start_one(fixed[node.name])))
            launches = [fixed[launch.node.name] if launch.node.name in stale else launch for launch in launches]
        for name, outcome in outcomes.items():
            if isinstance(outcome, Stale):  # made good once already (or no way to): a plain failure
                outcomes[name] = CommandError(outcome.message + (" (again after a second try)" if again else ""))
        busy = [o for o in outcomes.values() if isinstance(o, LeaseBusy)]
        if busy:
            raise busy[0]
        fail_on_errors(outcomes, "starting the attempt")
    except BaseException:
        stop(tried, launches[0].spec.run)
        raise
    if launches[0].expect is not None:
        found = [(launch.node, launch.expect.route, launch.expect.trees) for launch in launches if launch.expect]
        launchcache.remember(launches[0].expect.master, found)
    return port


def _start_all(
    launches: list[NodeLaunch], master_address: str, port: int, tried: list[Node]
) -> dict[str, Status | AvaError]:
    """Start the master, then the others as soon as its agent says its torchrun is started,
    not when its store listens: every node's torch import runs at the same time. Raises the
    master's failure (Stale, LeaseBusy, ...) when it comes before that; the others' outcomes
    are returned. Every node asked is added to TRIED, for the caller's stop on failure."""
    master = replace(launches[0], wait_store=(master_address, port))
    started = threading.Event()
    tried += [master.node] if master.node not in tried else []
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(start_one, master, on_started=started.set)
        first.add_done_callback(lambda _: started.set())
        started.wait()
        if first.done():
            first.result()  # failed before starting anything (or an agent that answers once)
        others = {launch.node.name: launch for launch in launches[1:]}
        tried += [launch.node for launch in others.values() if launch.node not in tried]
        outcomes = run_all([launch.node for launch in others.values()], lambda node: start_one(others[node.name]))
        first.result()  # its store listens; or its failure, the others already started: the caller stops all
    return outcomes


def _made_good(launches: list[NodeLaunch], stale: dict[str, Stale], port: int, again: Again) -> list[NodeLaunch]:
    """Ship the trees the STALE nodes lack, take their fresh routes; every launch planned anew."""
    by_name = {launch.node.name: launch for launch in launches}

    def ship(node: Node) -> None:
        if stale[node.name].unready:
            if again.provision is None:
                raise stale[node.name]
            again.provision(node)  # first: a new agent or runtime may come with it
        for tree in stale[node.name].trees:
            if tree == again.manifest.tree:
                sync.ship_tree(node, again.manifest, again.code_root)
            else:  # the only other tree a launch expects: ava's runtime
                sync.ship_runtime(node)

    fail_on_errors(run_all([by_name[name].node for name in stale], ship), "sending the code")
    routes = {}
    for launch in launches:
        assert launch.expect is not None, "only a one-trip start answers Stale"
        fresh = stale[launch.node.name].route if launch.node.name in stale else None
        routes[launch.node.name] = fresh or launch.expect.route
    # A node provisioned just now: its facts changed, so the old check would refuse it again.
    return [
        replace(launch, expect=replace(launch.expect, ready=None))
        if launch.expect is not None and launch.node.name in stale
        else launch
        for launch in again.replan(routes, port)
    ]


def start_one(launch: NodeLaunch, *, on_started: Callable[[], None] | None = None) -> Status:
    """Start LAUNCH on its node. The master's (`wait_store`) answers once its store listens;
    ON_STARTED is called before that, when its agent says its torchrun is started."""
    node, spec = launch.node, launch.spec
    transport = connect(node)
    # The spec (environment included) travels as the start's standard input: its values never
    # appear on a command line, and no second channel (SFTP) is opened for it.
    args = ["start", "-"]
    if launch.wait_store is not None:
        address, port = launch.wait_store
        args += ["--wait-store", address, str(port), "--store-timeout", f"{STORE_TIMEOUT:g}"]
    if launch.expect is not None:
        args += _expect_args(launch.expect)

    def said(stream: str, text: str) -> None:
        if on_started is not None and stream == "out" and _last_json(text).get("store") == protocol.STORE_WAITING:
            on_started()

    command = agent_command(node, *args)
    if launch.expect is not None and launch.expect.ready is not None:
        command = provision.guarded(command, launch.expect.ready)
    spec_bytes = json.dumps(spec.to_json()).encode()
    result = transport.run(command, timeout=120 + STORE_TIMEOUT, on_line=said, stdin=spec_bytes)
    if launch.expect is not None and provision.FACTS_CHANGED in result.stdout.split():
        raise Stale(node.name, [], None, None, unready=True)
    payload = _last_json(result.stdout)
    if payload.get("error") == protocol.STALE and launch.expect is not None:
        raise _stale(node, payload, launch.expect)
    if result.exited == ExitCode.BUSY:
        raise LeaseBusy(node.name, [Holder.from_json(h) for h in payload.get("holders", [])])
    if result.exited == ExitCode.PROTOCOL:
        raise CommandError(
            f"{node.name}: its agent speaks another protocol ({payload.get('problem')}); "
            "`ava provision` installs this version's agent"
        )
    started = payload.get("state") in (protocol.RUNNING, protocol.SUCCEEDED)
    if (
        launch.wait_store is not None
        and (payload.get("store") or started)
        and payload.get("store") != protocol.STORE_READY
    ):
        why = payload.get("store") or payload.get("state")
        raise CommandError(f"{node.name}: the master's rendezvous never came up ({why})", tail=result.tail())
    if not result.ok:
        raise CommandError(
            f"{node.name}: the agent could not start the attempt (exit {result.exited})", tail=result.tail()
        )
    return _status(node, payload, result.tail())


def _expect_args(expect: Expect) -> list[str]:
    route = expect.route
    args = [
        "--expect-route",
        expect.master,
        expect.interface,
        route.address,
        route.interface,
        route.home,
        str(route.cpus),
    ]
    for tree in expect.trees:
        args += ["--expect-tree", tree]
    if expect.port is not None:
        args += ["--expect-port", str(expect.port)]
    return args


def _stale(node: Node, payload: dict[str, Any], expect: Expect) -> CommandError:
    """What a Stale answer says: the trees missing, a route other than the one expected, a free port."""
    facts = payload.get("route")
    route = None
    if isinstance(facts, dict):
        if facts.get("error"):
            return CommandError(f"{node.name}: {facts['error']}")
        if not facts.get("interface"):
            return CommandError(f"{node.name}: no interface holds {facts.get('address')}; set `interface` in ava.toml")
        route = Route(
            str(facts.get("address")),
            str(facts.get("interface")),
            str(facts.get("home") or "/"),
            int(facts.get("cpus") or 1),
        )
    port = payload.get("port")
    return Stale(
        node.name,
        [str(t) for t in payload.get("trees_missing") or ()],
        route if route != expect.route else None,
        int(port) if isinstance(port, int) else None,
    )


def status_of(
    node: Node,
    run_id: str,
    attempt: int,
    *,
    timeout: float = STATUS_TIMEOUT,
    since: str | None = None,
    wait: float = 0.0,
    metrics_from: int | None = None,
) -> Status:
    """The node's agent status for the attempt, with `age` = seconds since its heartbeat. With
    `since` (an earlier answer's digest), the agent answers once the status differs from it, or
    after `wait` seconds: a long poll that learns of a failure as it happens."""
    args = ["status", node.workdir, run_id, "--attempt", str(attempt)]
    if since is not None:
        args += ["--since", since, "--wait", f"{wait:g}"]
    if metrics_from is not None:
        args += ["--metrics-from", str(metrics_from)]
    # The node's own clock dates the heartbeat, so clock skew between machines never matters.
    command = agent_command(node, *args) + "; date +%s.%N"
    result = connect(node).run(command, timeout=timeout + (wait if since is not None else 0.0))
    lines = result.stdout.strip().splitlines()
    if len(lines) < 2:
        raise CommandError(f"{node.name}: agent status failed (exit {result.exited})", tail=result.tail())
    payload = _last_json("\n".join(lines[:-1]))
    if payload.get("error") == protocol.NOT_FOUND:
        # The node answered: it never got this attempt (a launch cut short), it is not lost.
        raise AttemptMissing(f"{node.name}: attempt {attempt} of {run_id} never started there")
    try:
        payload["age"] = float(lines[-1]) - float(payload.get("heartbeat") or 0)
    except ValueError:
        payload["age"] = None
    return _status(node, payload, result.tail())


def stop(
    nodes: list[Node], run_id: str, *, grace: float = 10.0, keep_spares: bool = False
) -> dict[str, StopReport | AvaError]:
    """Verified teardown of the run on every node: its processes gone, cgroups removed, leases
    freed; its spare interpreters too, unless KEEP_SPARES (a failover: the next attempt's)."""

    def one(node: Node) -> StopReport:
        args = ["stop", node.workdir, run_id, "--grace", f"{grace:g}", *(["--keep-spares"] if keep_spares else [])]
        result = connect(node).run(agent_command(node, *args), timeout=grace + 60)
        report = StopReport.from_json(_last_json(result.stdout))
        if not result.ok or report.remaining_pids:
            raise CommandError(f"{node.name}: stop left processes {list(report.remaining_pids)}", tail=result.tail())
        return report

    return run_all(nodes, one)


def follow_logs(
    node: Node,
    run_id: str,
    attempt: int,
    on_line: Callable[[str], None],
    *,
    offset: int = 0,
    follow: bool = True,
    timestamps: bool = False,
) -> int:
    """Stream the attempt's output on one node, line by line; returns the bytes read. With
    `timestamps` each line comes as `<unix time> <line>` (the time is not counted in the bytes)."""
    args = ["logs", node.workdir, run_id, "--attempt", str(attempt), "--offset", str(offset)]
    if follow:
        args.append("--follow")
    if timestamps:
        args.append("--timestamps")
    seen, started = 0, False

    def line(stream: str, text: str) -> None:
        nonlocal seen, started
        if stream != "out":
            return
        if not started:  # what the node's shell printed before the command (a noisy ~/.bashrc)
            started = text == LOG_START
            return
        seen += len((text.split(" ", 1)[-1] if timestamps else text).encode()) + 1
        on_line(text)

    command = f"echo {LOG_START}; {agent_command(node, *args)}"
    result = connect(node).run(command, on_line=line)
    if result is not None and result.exited == 2 and "can't open file" in result.stderr:
        # A run an earlier ava started: this ava's agent is not on the node yet.
        sync.ship_agent(node)
        started = False
        result = connect(node).run(command, on_line=line)
    if result is not None and not result.ok and result.exited != ExitCode.FAILED:
        # (ExitCode.FAILED: no such attempt there, which has no log to show.)
        raise CommandError(f"{node.name}: reading the log failed (exit {result.exited})", tail=result.tail())
    return seen


class AgentClient:
    """The agent commands a supervisor uses, over each node's transport. Tests of the
    supervisor's loop pass a fake one (tests/unit/test_supervisor.py)."""

    def __init__(self, status_timeout: float = STATUS_TIMEOUT, long_poll: float = LONG_POLL) -> None:
        self.status_timeout = status_timeout
        self.long_poll = long_poll
        # One status request in flight per node at most (see poll), with when its answer is due.
        self._pending: dict[str, tuple[concurrent.futures.Future[Status], float, float]] = {}
        self._latest: dict[str, Status] = {}  # each node's last answer in this attempt
        self._retry_at: dict[str, float] = {}  # after a failed request: when to ask again
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._asking: tuple[str, int] | None = None
        self._failed: dict[str, float] = {}  # nodes whose requests fail, since when
        self._answered: dict[str, float] = {}  # per node: when the request it last answered was sent
        self._metrics_from: dict[str, int] = {}  # per node: the metric bytes already handed over

    def prepare(
        self,
        nodes: list[Node],
        code_root: Path,
        manifest: sync.Manifest,
        *,
        recipe: Recipe,
        inventory_dir: Path,
        master: str | None = None,
        provisioned: bool = False,
    ) -> Prepared:
        return prepare(
            nodes,
            code_root,
            manifest,
            recipe=recipe,
            inventory_dir=inventory_dir,
            master=master,
            provisioned=provisioned,
        )

    def prefetch(
        self, nodes: list[Node], recipe: Recipe, pythons: dict[str, str], report: Callable[[str], None]
    ) -> None:
        """Warm the recipe's `[data] prefetch` in the nodes' caches."""
        if not recipe.data.prefetch:
            return  # (cachenodes is not imported on every launch for nothing)
        from ava import cachenodes

        cachenodes.prefetch(nodes, recipe, pythons=pythons, report=report)

    def routes(self, nodes: list[Node], master: str) -> tuple[dict[str, Route], int]:
        return routes(nodes, master)

    def start(self, launches: list[NodeLaunch], master_address: str, port: int, *, again: Again | None = None) -> int:
        return start(launches, master_address, port, again=again)

    def status(self, node: Node, run_id: str, attempt: int) -> Status:
        return status_of(node, run_id, attempt, timeout=self.status_timeout)

    def poll(self, nodes: list[Node], run_id: str, attempt: int, wait: float) -> dict[str, Answer]:
        """Every node's latest status, back as soon as one of them changes, or within WAIT seconds.

        Each node has one long poll out at a time (`status --since`): the agent answers when what
        the supervisor judges by changes, or after `long_poll` seconds with a fresh heartbeat. A
        node whose answer is overdue shows as pending (late, then silent: see decide.node_view),
        however long its transport takes to give up; one that failed is asked again at once, and
        its silence counts from its first unanswered request until one is answered."""
        if self._asking is not None and self._asking != (run_id, attempt):
            self.close()
        self._asking = (run_id, attempt)
        self._ask(nodes, run_id, attempt)
        self._wait_for_news(nodes, wait)
        now = time.time()
        return {node.name: self._answer(node.name, now) for node in nodes}

    def _ask(self, nodes: list[Node], run_id: str, attempt: int) -> None:
        """A long poll to every node that has none out and is not waiting to be asked again."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, 2 * len(nodes)))
        now = time.time()
        for node in nodes:
            if node.name in self._pending or self._retry_at.get(node.name, 0.0) > now:
                continue
            latest = self._latest.get(node.name)
            if latest is not None and latest.final and not latest.metrics:
                continue  # it ended and handed over its last metric lines: nothing more to learn
            since = latest.digest if latest is not None and latest.digest else None
            future = self._pool.submit(
                status_of,
                node,
                run_id,
                attempt,
                timeout=self.status_timeout,
                since=since,
                wait=self.long_poll,
                metrics_from=self._metrics_from.get(node.name, 0),
            )
            self._pending[node.name] = (future, now, now + (self.long_poll if since else 0.0))

    def _wait_for_news(self, nodes: list[Node], wait: float) -> None:
        """Until an answer came and every node's state is known (each judgement sees the whole
        attempt), or WAIT seconds passed."""
        deadline = time.time() + wait
        waiting = [future for future, _, _ in self._pending.values()]
        if not waiting:  # every node failed a moment ago: until the first is asked again
            time.sleep(max(0.0, min(min(self._retry_at.values(), default=deadline) - time.time(), wait)))
            return
        while waiting:
            done, _ = concurrent.futures.wait(
                waiting, timeout=max(0.0, deadline - time.time()), return_when=concurrent.futures.FIRST_COMPLETED
            )
            unknown = [
                n.name
                for n in nodes
                if n.name not in self._latest and n.name in self._pending and not self._pending[n.name][0].done()
            ]
            if (done and not unknown) or time.time() >= deadline:
                return
            waiting = [future for future in waiting if not future.done()]

    def _answer(self, name: str, now: float) -> Answer:
        """What NODE's answer is this round, its request settled if it came back."""
        if name not in self._pending:
            latest = self._latest.get(name)
            if latest is not None and latest.final:  # ended: not asked again
                return Answer(status=replace(latest, metrics=()), asked=self._answered.get(name, 0.0))
            # failed recently, not asked again yet
            return Answer(error="no answer", asked=self._failed_since(name))
        future, sent, due = self._pending[name]
        if not future.done():
            latest = self._latest.get(name)
            if latest is not None and now < due:
                # Nothing changed since it answered; its metric lines were handed over then.
                return Answer(status=replace(latest, metrics=()), asked=self._answered.get(name, 0.0))
            if name in self._failed:
                # Asked again after failing: late while this request is young (a loaded node answers
                # slowly), then silent since the first unanswered request went out.
                return Answer(pending=True, asked=self._failed[name], due=sent)
            return Answer(pending=True, asked=sent, due=due)
        del self._pending[name]
        try:
            status = self._latest[name] = future.result()
        except AttemptMissing:
            self._latest.pop(name, None)
            self._retry_at[name] = now + RETRY_AFTER
            return Answer(missing=True)
        except AvaError as error:
            self._latest.pop(name, None)
            self._retry_at[name] = now + RETRY_AFTER
            self._failed.setdefault(name, sent)
            return Answer(error=error.message, asked=self._failed[name])
        if status.metrics_end is not None:
            self._metrics_from[name] = status.metrics_end
        self._retry_at.pop(name, None)
        self._failed.pop(name, None)
        self._answered[name] = sent
        return Answer(status=status, asked=sent)

    def ended_clean(self, nodes: list[Node], run_id: str, attempt: int) -> list[str]:
        """The nodes whose agent last answered, for this attempt, that it ended and left nothing
        behind there (Status.ended_clean): a teardown skips their `stop`."""
        if self._asking != (run_id, attempt):
            return []
        return [n.name for n in nodes if (latest := self._latest.get(n.name)) is not None and latest.ended_clean]

    def skip_metrics(self, node: str, offset: int) -> None:
        """Ask NODE for metric lines past OFFSET only (a supervisor taking over a run)."""
        self._metrics_from[node] = offset

    def _failed_since(self, name: str) -> float:
        return self._failed.get(name, time.time())

    def stop(
        self, nodes: list[Node], run_id: str, *, grace: float = 10.0, keep_spares: bool = False
    ) -> dict[str, StopReport | AvaError]:
        return stop(nodes, run_id, grace=grace, keep_spares=keep_spares)

    def follow_logs(
        self, node: Node, run_id: str, attempt: int, on_line: Callable[[str], None], *, offset: int = 0
    ) -> int:
        return follow_logs(node, run_id, attempt, on_line, offset=offset)

    def close(self) -> None:
        """Forget requests still in flight (their threads end with their transports' timeouts)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        self._pool, self._pending, self._asking = None, {}, None
        self._latest, self._retry_at, self._failed, self._metrics_from = {}, {}, {}, {}
        self._answered = {}


def _status(node: Node, payload: dict[str, Any], tail: str) -> Status:
    try:
        return Status.from_json(payload)
    except (protocol.ProtocolError, TypeError, ValueError, KeyError) as error:
        raise CommandError(f"{node.name}: the agent's status is not readable ({error})", tail=tail) from None


def _last_json(text: str) -> dict[str, Any]:
    for candidate in reversed(text.strip().splitlines()):
        candidate = candidate.strip()
        if candidate.startswith("{"):
            try:
                return dict(json.loads(candidate))
            except ValueError:
                continue
    return {}
