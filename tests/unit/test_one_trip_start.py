"""A warm launch's one-trip start with the node calls replaced: what `attempt.start` does when a
node's agent answers that what the launch took for granted is not so (attempt.Stale), and what
launchcache remembers for the next launch."""

from __future__ import annotations

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

    def start_one(launch: NodeLaunch) -> Status:
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

    def start_one(launch: NodeLaunch) -> Status:
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
