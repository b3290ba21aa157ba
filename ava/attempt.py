"""One attempt of a run on its nodes, through each node's agent: prepare, start, poll, stop, logs.

The imperative half of a launch (ava.launch builds what runs; this makes it run). Every step
fans out over the nodes in parallel and reports a result or an error for each.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ava import sync
from ava.config import Node, Recipe
from ava.decide import liveness_scale
from ava.errors import AvaError, CommandError
from ava.launch import NodeLaunch, Route
from ava.nodes import FACTS_SOURCE
from ava.transport import connect, run_all, shell_path

BUSY_EXIT = 4  # the agent's exit code when the leases it needs are held by another run
STATUS_TIMEOUT = 4.0 * liveness_scale()  # a status poll slower than this counts as the node not answering


class LeaseBusy(AvaError):
    def __init__(self, node: str, holders: list[dict[str, Any]]) -> None:
        self.node, self.holders = node, holders
        held = "; ".join(describe_holder(h) for h in holders) or "another run"
        super().__init__(f"{node} is busy: held by {held} (`ava train --wait` waits for it, or `ava stop` that run)")


class AttemptMissing(AvaError):
    """The node's agent answered that it has no such attempt: reachable, never started there."""


def describe_holder(holder: dict[str, Any]) -> str:
    what = []
    if holder.get("gpus"):
        what.append("GPUs " + ",".join(str(g) for g in holder["gpus"]))
    if holder.get("cpu_slots"):
        what.append(f"{holder['cpu_slots']} CPU slots")
    return f"run {holder.get('run')} of {holder.get('user')} ({', '.join(what) or 'leases'})"


@dataclass
class Prepared:
    code_tree: str
    runtime_tree: str
    code_stats: dict[str, sync.SyncStats] = field(default_factory=dict)
    pythons: dict[str, str] = field(default_factory=dict)  # the interpreter of the run, per node


def agent_command(node: Node, *args: str) -> str:
    # shell_path keeps a leading `~/` for the node's shell to expand; everything else is quoted.
    return " ".join([shell_path(node.python), shell_path(sync.agent_path(node)), *map(shell_path, args)])


def fail_on_errors(outcomes: dict[str, Any], what: str) -> None:
    errors = [(name, o) for name, o in outcomes.items() if isinstance(o, AvaError)]
    if errors:
        name, first = errors[0]
        more = f" (and {len(errors) - 1} more nodes)" if len(errors) > 1 else ""
        raise (
            type(first)(f"{what}: {first.message}{more}", tail=first.tail) if isinstance(first, CommandError) else first
        )


def prepare(
    nodes: list[Node], code_root: Path, manifest: sync.Manifest, *, recipe: Recipe, inventory_dir: Path
) -> Prepared:
    """Provision what is missing on every node (agent, runtime, cache config, cgroup parent,
    the run's venv), then put the run's code there. Costs one check per node when all is there."""
    from ava import provision

    prepared = Prepared(manifest.tree, sync.runtime_manifest()[0].tree)
    fail_on_errors(provision.ensure(nodes, recipe=recipe, base=inventory_dir), "provisioning nodes")
    outcomes = run_all(nodes, lambda node: sync.ship_tree(node, manifest, code_root))
    fail_on_errors(outcomes, "sending the code")
    prepared.code_stats = {name: o for name, o in outcomes.items() if isinstance(o, sync.SyncStats)}
    prepared.pythons = {node.name: provision.venv_python(node, recipe=recipe, root=inventory_dir) for node in nodes}
    return prepared


def routes(nodes: list[Node], master: str) -> tuple[dict[str, Route], int]:
    """Each node's route to the master, and a free port on the master for the rendezvous."""
    source = shlex.quote(FACTS_SOURCE.read_text(encoding="utf-8"))

    def one(node: Node) -> dict[str, Any]:
        want_port = node is nodes[0]
        command = f"{shell_path(node.python)} -c {source} --route {shlex.quote(master)} {shlex.quote(node.interface)}"
        result = connect(node).run(command + (" --port" if want_port else ""), timeout=30).check("route probe")
        facts = json.loads(result.stdout.strip().splitlines()[-1])
        if facts.get("error"):
            raise CommandError(f"{node.name}: {facts['error']}")
        if not facts.get("interface"):
            raise CommandError(f"{node.name}: no interface holds {facts.get('address')}; set `interface` in ava.toml")
        return facts

    outcomes = run_all(nodes, one)
    fail_on_errors(outcomes, "finding routes to the master")
    found = {
        name: Route(str(f["address"]), str(f["interface"]), str(f.get("home") or "/"), int(f.get("cpus") or 1))
        for name, f in outcomes.items()
        if isinstance(f, dict)
    }
    first = outcomes[nodes[0].name]
    assert isinstance(first, dict)
    return found, int(first["port"])


def start_one(launch: NodeLaunch) -> dict[str, Any]:
    node, spec = launch.node, launch.spec
    spec_path = f"{node.workdir.rstrip('/')}/runs/{spec['run']}/spec-{spec['attempt']}.json"
    transport = connect(node)
    # The spec (environment included) travels as a file: values never appear on a command line.
    transport.put(json.dumps(spec).encode(), spec_path, mode=0o600)
    result = transport.run(agent_command(node, "start", spec_path), timeout=120)
    payload = _last_json(result.stdout)
    if result.exited == BUSY_EXIT:
        raise LeaseBusy(node.name, list(payload.get("holders", [])))
    if not result.ok:
        raise CommandError(
            f"{node.name}: the agent could not start the attempt (exit {result.exited})", tail=result.tail()
        )
    return payload


def wait_for_store(launch: NodeLaunch, address: str, port: int, timeout: float = 120.0) -> None:
    """Block until the master's rendezvous store accepts connections, or its attempt ended.

    Workers started before the store listens back off for up to ~30 s; waiting here first
    makes the whole start fast. One remote loop, not one SSH round trip per try.
    """
    node, spec = launch.node, launch.spec
    status = f"{node.workdir.rstrip('/')}/runs/{spec['run']}/attempt-{spec['attempt']}/status.json"
    probe = (
        "import json,os,socket,sys,time\n"
        "addr,port,status,limit=sys.argv[1],int(sys.argv[2]),os.path.expanduser(sys.argv[3]),float(sys.argv[4])\n"
        "end=time.time()+limit\n"
        "while time.time()<end:\n"
        "    try:\n"
        "        socket.create_connection((addr,port),timeout=1).close(); print('ready'); sys.exit(0)\n"
        "    except OSError: pass\n"
        "    try:\n"
        "        st=json.load(open(status))\n"
        "        if st.get('state') in ('succeeded','failed','stopped'): print(st['state']); sys.exit(1)\n"
        "    except (OSError,ValueError): pass\n"
        "    time.sleep(0.05)\n"
        "print('timeout'); sys.exit(1)\n"
    )
    command = " ".join(
        [
            shell_path(node.python),
            "-c",
            shlex.quote(probe),
            shlex.quote(address),
            str(port),
            shell_path(status),
            str(timeout),
        ]
    )
    result = connect(node).run(command, timeout=timeout + 30)
    if not result.ok:
        state = result.stdout.strip() or "unknown"
        raise CommandError(f"{node.name}: the master's rendezvous never came up ({state})")


def start(launches: list[NodeLaunch], master_address: str, port: int) -> None:
    """Master first; once its store listens, every other node at once. All or nothing.

    On failure every node tried is stopped, not only those that answered: a start whose reply
    was lost (timeout, dropped connection) may have started the attempt there. Stop is idempotent.
    """
    tried: list[Node] = []
    try:
        tried.append(launches[0].node)
        start_one(launches[0])
        wait_for_store(launches[0], master_address, port)
        tried += [l.node for l in launches[1:]]
        outcomes = run_all(
            [l.node for l in launches[1:]], lambda node: start_one(next(l for l in launches if l.node is node))
        )
        busy = [o for o in outcomes.values() if isinstance(o, LeaseBusy)]
        if busy:
            raise busy[0]
        fail_on_errors(outcomes, "starting the attempt")
    except BaseException:
        stop(tried, launches[0].spec["run"])
        raise


def status_of(node: Node, run_id: str, attempt: int) -> dict[str, Any]:
    """The node's agent status for the attempt, with `age` = seconds since its heartbeat."""
    # The node's own clock dates the heartbeat, so clock skew between machines never matters.
    command = agent_command(node, "status", node.workdir, run_id, "--attempt", str(attempt)) + "; date +%s.%N"
    result = connect(node).run(command, timeout=STATUS_TIMEOUT)
    lines = result.stdout.strip().splitlines()
    if len(lines) < 2:
        raise CommandError(f"{node.name}: agent status failed (exit {result.exited})", tail=result.tail())
    payload = _last_json("\n".join(lines[:-1]))
    if payload.get("error") == "not-found":
        # The node answered: it never got this attempt (a launch cut short), it is not lost.
        raise AttemptMissing(f"{node.name}: attempt {attempt} of {run_id} never started there")
    if not payload.get("state"):
        raise CommandError(f"{node.name}: the agent reported no state for attempt {attempt}", tail=result.tail())
    try:
        payload["age"] = float(lines[-1]) - float(payload.get("heartbeat") or 0)
    except ValueError:
        payload["age"] = None
    return payload


def stop(nodes: list[Node], run_id: str, *, grace: float = 10.0) -> dict[str, dict[str, Any] | AvaError]:
    """Verified teardown of the run on every node: its processes gone, cgroups removed, leases freed."""

    def one(node: Node) -> dict[str, Any]:
        result = connect(node).run(
            agent_command(node, "stop", node.workdir, run_id, "--grace", f"{grace:g}"), timeout=grace + 60
        )
        payload = _last_json(result.stdout)
        if not result.ok or payload.get("remaining_pids"):
            raise CommandError(f"{node.name}: stop left processes {payload.get('remaining_pids')}", tail=result.tail())
        return payload

    return run_all(nodes, one)


# Printed before the log's bytes: lines ahead of it come from the node's shell start-up files
# (conda's and pyenv's init print on every SSH command), not from the run, and count for no offset.
LOG_START = "ava-logs-start"


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

    def line(_stream: str, text: str) -> None:
        nonlocal seen, started
        if _stream != "out":
            return
        if not started:  # what the node's shell printed before the command (a noisy ~/.bashrc)
            started = text == LOG_START
            return
        seen += len((text.split(" ", 1)[-1] if timestamps else text).encode()) + 1
        on_line(text)

    connect(node).run(f"echo {LOG_START}; {agent_command(node, *args)}", on_line=line)
    return seen


def _last_json(text: str) -> dict[str, Any]:
    for candidate in reversed(text.strip().splitlines()):
        candidate = candidate.strip()
        if candidate.startswith("{"):
            try:
                return dict(json.loads(candidate))
            except ValueError:
                continue
    return {}
