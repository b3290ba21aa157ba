"""A warm launch's one-trip start with the node calls replaced: what `attempt.start` does when a
node's agent answers that what the launch took for granted is not so (attempt.Stale), and what
launchcache remembers for the next launch."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ava import attempt, launchcache, sync
from ava.agent.protocol import StartSpec, Status
from ava.config import Node
from ava.errors import CommandError
from ava.launch import NodeLaunch, Route

NODES = [Node(name="n1", host="10.0.0.1"), Node(name="n2", host="10.0.0.2")]
OLD = Route("10.0.0.2", "eth0", "/home/u", 4)
NEW = Route("10.0.1.2", "eth1", "/home/u", 4)


def launches(routes: dict[str, Route], port: int) -> list[NodeLaunch]:
    planned = [
        NodeLaunch(
            n,
            [f"--local-addr={routes[n.name].address}", f"--port={port}"],
            StartSpec("r", 1, n.name, "~", "~", ("x",), {}),
        )
        for n in NODES
    ]
    return attempt.expecting(planned, "10.0.0.1", routes, port, ("code", "runtime"))


def test_a_stale_node_gets_what_it_lacks_and_starts_on_the_second_trip(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AVA_HOME", str(tmp_path))
    calls: list[tuple[str, list[str]]] = []
    shipped: list[str] = []

    def start_one(launch: NodeLaunch, **_: object) -> Status:
        calls.append((launch.node.name, launch.argv))
        assert launch.expect is not None
        if launch.node.name == "n1" and launch.expect.port == 20001:
            raise attempt.Stale("n1", [], None, 20002)  # the picked port is taken
        if launch.node.name == "n2" and launch.expect.route == OLD:
            raise attempt.Stale("n2", ["code"], NEW, None)
        return Status("running")

    monkeypatch.setattr(attempt, "start_one", start_one)
    monkeypatch.setattr(sync, "ship_tree", lambda node, *_: shipped.append(node.name))
    monkeypatch.setattr(attempt, "stop", lambda *_, **__: pytest.fail("nothing failed: nothing to stop"))
    routes = {"n1": Route("10.0.0.1", "eth0", "/home/u", 4), "n2": OLD}
    again = attempt.Again(sync.Manifest(()), tmp_path, launches)
    port = attempt.start(launches(routes, 20001), "10.0.0.1", 20001, again=again)
    assert port == 20002
    # n1 twice (the port), n2 first with the new port, then with its new route and its code sent.
    assert calls == [
        ("n1", ["--local-addr=10.0.0.1", "--port=20001"]),
        ("n1", ["--local-addr=10.0.0.1", "--port=20002"]),
        ("n2", ["--local-addr=10.0.0.2", "--port=20002"]),
        ("n2", ["--local-addr=10.0.1.2", "--port=20002"]),
    ]
    assert shipped == ["n2"]
    known = launchcache.load(NODES, "10.0.0.1")
    assert known["n2"].route == NEW and known["n2"].trees == ("code", "runtime")


def test_a_node_stale_twice_fails_the_start_and_every_node_tried_is_stopped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AVA_HOME", str(tmp_path))
    stopped: list[list[str]] = []

    def start_one(launch: NodeLaunch, **_: object) -> Status:
        if launch.node.name == "n2":
            raise attempt.Stale("n2", [], NEW, None)  # a route that moves every time
        return Status("running")

    monkeypatch.setattr(attempt, "start_one", start_one)
    monkeypatch.setattr(attempt, "stop", lambda nodes, *_, **__: stopped.append([n.name for n in nodes]))
    routes = {"n1": Route("10.0.0.1", "eth0", "/home/u", 4), "n2": OLD}
    again = attempt.Again(sync.Manifest(()), tmp_path, launches)
    with pytest.raises(CommandError, match="route to the master changed .again after a second try"):
        attempt.start(launches(routes, 20001), "10.0.0.1", 20001, again=again)
    assert stopped == [["n1", "n2"]]
    assert launchcache.load(NODES, "10.0.0.1") == {}  # nothing remembered from a failed start


def test_the_cache_keeps_recent_trees_and_a_node_elsewhere_is_another_entry(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AVA_HOME", str(tmp_path))
    node = NODES[0]
    launchcache.remember("m", [(node, OLD, ["a"])])
    launchcache.remember("m", [(node, NEW, ["b", "rt"])])
    assert launchcache.load([node], "m")["n1"] == launchcache.Known(NEW, ("b", "rt", "a"))
    assert launchcache.load([node], "another master") == {}
    moved = Node(name="n1", host="10.9.9.9")
    assert launchcache.load([moved], "m") == {}


def test_the_others_start_while_the_master_waits_for_its_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Once the master's agent says its torchrun is started (its first answer), the other nodes
    start, their torch imports beside the master's; the master's call ends when its store
    listens, after them here."""
    monkeypatch.setenv("AVA_HOME", str(tmp_path))
    others_started = threading.Event()
    order: list[str] = []

    def start_one(launch: NodeLaunch, *, on_started: Callable[[], None] | None = None) -> Status:
        if launch.node.name == "n1":
            assert launch.wait_store is not None and on_started is not None
            on_started()  # "store": "waiting"
            # Its store listens only once n2 started: a launcher that waited for it would hang.
            assert others_started.wait(10), "n2 was not started while the master waited for its store"
            order.append("n1 store ready")
            return Status("running", store="ready")
        order.append(f"{launch.node.name} started")
        others_started.set()
        return Status("running")

    monkeypatch.setattr(attempt, "start_one", start_one)
    monkeypatch.setattr(attempt, "stop", lambda *_, **__: pytest.fail("nothing failed: nothing to stop"))
    routes = {"n1": Route("10.0.0.1", "eth0", "/home/u", 4), "n2": OLD}
    assert attempt.start(launches(routes, 20001), "10.0.0.1", 20001) == 20001
    assert order == ["n2 started", "n1 store ready"]


def test_a_master_that_fails_after_its_first_answer_stops_the_others_started_meanwhile(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AVA_HOME", str(tmp_path))
    started: list[str] = []
    stopped: list[list[str]] = []

    def start_one(launch: NodeLaunch, *, on_started: Callable[[], None] | None = None) -> Status:
        if launch.node.name == "n1":
            assert on_started is not None
            on_started()
            time.sleep(0.2)  # n2 starts meanwhile
            raise CommandError("n1: the master's rendezvous never came up (timeout)")
        started.append(launch.node.name)
        return Status("running")

    monkeypatch.setattr(attempt, "start_one", start_one)
    monkeypatch.setattr(attempt, "stop", lambda nodes, *_, **__: stopped.append([n.name for n in nodes]))
    routes = {"n1": Route("10.0.0.1", "eth0", "/home/u", 4), "n2": OLD}
    with pytest.raises(CommandError, match="never came up"):
        attempt.start(launches(routes, 20001), "10.0.0.1", 20001)
    assert started == ["n2"]
    assert stopped == [["n1", "n2"]]


def test_a_master_refused_before_its_first_answer_starts_no_other_node(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AVA_HOME", str(tmp_path))
    asked: list[str] = []

    def start_one(launch: NodeLaunch, *, on_started: Callable[[], None] | None = None) -> Status:
        asked.append(launch.node.name)
        raise CommandError(f"{launch.node.name}: the agent could not start the attempt (exit 1)")

    monkeypatch.setattr(attempt, "start_one", start_one)
    monkeypatch.setattr(attempt, "stop", lambda *_, **__: None)
    routes = {"n1": Route("10.0.0.1", "eth0", "/home/u", 4), "n2": OLD}
    with pytest.raises(CommandError, match="n1: the agent could not start"):
        attempt.start(launches(routes, 20001), "10.0.0.1", 20001)
    assert asked == ["n1"]
