"""Live facts about the inventory's nodes, gathered in parallel (`ava nodes`)."""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ava.config import Node
from ava.errors import AvaError, CommandError
from ava.transport import connect, run_all, shell_path

FACTS_SOURCE = Path(__file__).with_name("agent") / "facts.py"


@dataclass
class NodeReport:
    name: str
    host: str
    reachable: bool
    error: str | None = None
    cpus: int | None = None
    mem_total: int | None = None
    mem_free: int | None = None
    disk_free: int | None = None
    run_dirs: dict[str, int] | None = None  # {"count", "bytes"}: the runs' own directories
    agent: str | None = None  # this ava's agent build is there: current | older (replaced at the next launch) | none
    python: str | None = None
    torch: str | None = None
    gpus: list[dict[str, Any]] = field(default_factory=list)
    cgroup: str | None = None
    isolation: str | None = None
    hostname: str | None = None
    leases: list[dict[str, Any]] = field(default_factory=list)
    warm: dict[str, Any] | None = None  # {"pid", "ready"}: the spare torchrun kept for the next run
    time: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def facts_command(node: Node) -> str:
    """The shell text that prints the node's facts as one JSON line.

    Pasted into `python3 -c` rather than run through the agent: `ava nodes` and `ava doctor`
    report on nodes that were never provisioned, which have no agent yet, and they must leave a
    node as it is (the facts say which agent builds it has)."""
    source = FACTS_SOURCE.read_text(encoding="utf-8")
    return f"{shell_path(node.python)} -c {shlex.quote(source)} {shlex.quote(node.workdir)}"


def gather_facts(node: Node, *, host_keys: str | None = None, timeout: float = 60) -> dict[str, Any]:
    result = connect(node, host_keys=host_keys).run(facts_command(node), timeout=timeout)
    if not result.ok:
        raise CommandError(
            f"{node.name}: could not read facts with {node.python} (exit {result.exited})",
            tail=result.tail(),
        )
    try:
        return dict(json.loads(result.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError) as error:
        raise CommandError(f"{node.name}: facts were not JSON", tail=result.tail()) from error


def probe(nodes: list[Node], *, host_keys: str | None = None) -> list[NodeReport]:
    """A report for every node, reachable or not; one slow node costs only its own timeout."""
    outcomes = run_all(nodes, lambda node: gather_facts(node, host_keys=host_keys))
    reports = []
    for node in nodes:
        outcome = outcomes[node.name]
        host = node.host or "local"
        if isinstance(outcome, AvaError):
            reports.append(NodeReport(node.name, host, reachable=False, error=outcome.message))
            continue
        known = {k: v for k, v in outcome.items() if k in NodeReport.__dataclass_fields__}
        reports.append(
            NodeReport(name=node.name, host=host, reachable=True, agent=agent_state(outcome.get("agents")), **known)
        )
    return reports


def agent_state(found: Any) -> str:
    """Whether the node has this ava's agent build (named by its hash), an older one, or none."""
    from ava.sync import agent_bundle

    names = list(found or [])
    if f"agent-{agent_bundle()[1][:16]}.pyz" in names:
        return "current"
    return "older" if names else "none"
