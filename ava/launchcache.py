"""What launches remember of each node between runs: its route to a master, the code trees
seen complete there, and what its provision facts read when they last showed nothing to do
(`$AVA_HOME/launch-cache.json`).

A warm launch builds its specs from this without asking the nodes first; each node's agent
checks it at start (launch.Expect) and answers what is not so instead of starting. A wrong or
old entry costs a second trip to that node, never a wrong launch; a missing one, the probe.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ava.config import Node
from ava.launch import Route

FILE = "launch-cache.json"
KEEP_TREES = 16  # per node: code trees are content-addressed, a handful of recent ones is plenty
KEEP_FACTS = 8  # per node: one per recipe environment (a facts command) recently launched there
_lock = threading.Lock()


@dataclass(frozen=True)
class Known:
    route: Route
    trees: tuple[str, ...]


def path() -> Path:
    from ava import runs

    return runs.home() / FILE


def _key(node: Node, master: str) -> str:
    # Everything that changes where the node is, what it runs from, or how it reaches the master.
    return json.dumps(
        [node.name, node.transport, node.host, node.user, node.port, node.workdir, node.interface, master]
    )


def _read() -> dict[str, Any]:
    try:
        found = json.loads(path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def load(nodes: Sequence[Node], master: str) -> dict[str, Known]:
    """What is remembered of each of NODES toward MASTER (nodes with no entry left out)."""
    data = _read()
    known: dict[str, Known] = {}
    for node in nodes:
        entry = data.get(_key(node, master))
        if not isinstance(entry, dict):
            continue
        try:
            route = Route(str(entry["address"]), str(entry["interface"]), str(entry["home"]), int(entry["cpus"]))
            known[node.name] = Known(route, tuple(str(t) for t in entry.get("trees") or ()))
        except (KeyError, TypeError, ValueError):
            continue
    return known


def _facts_key(node: Node) -> str:
    return json.dumps(["facts", node.name, node.transport, node.host, node.user, node.port, node.workdir])


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def ready_facts(node: Node, command: str) -> str | None:
    """The sha256 of what COMMAND (provision's facts) printed on NODE when it last found nothing
    to do there, or None: a launch whose node still prints exactly that needs no provisioning."""
    entry = _read().get(_facts_key(node))
    found = entry.get(_digest(command)) if isinstance(entry, dict) else None
    return found if isinstance(found, str) else None


def remember_ready_facts(node: Node, command: str, output: str) -> None:
    """Note that COMMAND printed OUTPUT on NODE, and that nothing was missing there."""

    def update(data: dict[str, Any]) -> None:
        old = data.get(_facts_key(node))
        kept = [(k, v) for k, v in old.items() if k != _digest(command)] if isinstance(old, dict) else []
        data[_facts_key(node)] = dict([(_digest(command), _digest(output)), *kept][:KEEP_FACTS])

    _update(update)


def remember(master: str, found: Sequence[tuple[Node, Route, Sequence[str]]]) -> None:
    """Note each node's route to MASTER and trees now complete there. Best effort: a cache that
    cannot be written only costs the next launch its probe."""

    def update(data: dict[str, Any]) -> None:
        for node, route, trees in found:
            key = _key(node, master)
            old = data.get(key)
            earlier = old.get("trees") or [] if isinstance(old, dict) else []
            kept = [t for t in earlier if isinstance(t, str) and t not in trees]
            data[key] = {
                "address": route.address,
                "interface": route.interface,
                "home": route.home,
                "cpus": route.cpus,
                "trees": [*trees, *kept][:KEEP_TREES],
            }

    _update(update)


def _update(change: Callable[[dict[str, Any]], None]) -> None:
    with _lock:
        data = _read()
        change(data)
        target = path()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            temp = target.with_name(f".{FILE}.{os.getpid()}.{threading.get_ident()}")
            temp.write_text(json.dumps(data, sort_keys=True), encoding="utf-8")
            os.replace(temp, target)
        except OSError:
            pass
