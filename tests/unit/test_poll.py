"""AgentClient.poll's bookkeeping with the node calls replaced: which answer each node gets in a
round (fresh, unchanged, late, silent, missing), and that a round waits until every node's state
is known. The transport itself is tested on the cluster."""

from __future__ import annotations

import threading
import time

import pytest

from ava import attempt
from ava.agent.protocol import Status
from ava.config import Node
from ava.errors import CommandError

NODES = [Node(name="n1", host="10.0.0.1"), Node(name="n2", host="10.0.0.2")]


def test_a_round_waits_for_every_node_then_a_late_one_is_pending(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    asked: list[tuple[str, str | None]] = []

    def status_of(node: Node, run: str, number: int, *, since: str | None = None, **_: object) -> Status:
        asked.append((node.name, since))
        if node.name == "n2" and not release.is_set():
            release.wait(5)
        return Status("running", digest=f"d-{node.name}")

    monkeypatch.setattr(attempt, "status_of", status_of)
    client = attempt.AgentClient(status_timeout=4.0, long_poll=0.3)
    try:
        began = time.monotonic()
        first = client.poll(NODES, "run", 1, wait=0.4)
        assert time.monotonic() - began >= 0.35  # n1 answered at once; n2's state still unknown
        assert first["n1"].status is not None and first["n1"].status.digest == "d-n1"
        assert first["n2"].pending and first["n2"].status is None
        release.set()
        second = client.poll(NODES, "run", 1, wait=2.0)
        assert second["n2"].status is not None
        # n1 was asked again with its digest: a long poll, held until something changes.
        assert ("n1", "d-n1") in asked
    finally:
        client.close()


def test_a_failed_node_stays_silent_from_its_first_unanswered_request(monkeypatch: pytest.MonkeyPatch) -> None:
    def status_of(node: Node, run: str, number: int, **_: object) -> Status:
        if node.name == "n2":
            raise CommandError("n2: connection refused")
        return Status("running")

    monkeypatch.setattr(attempt, "status_of", status_of)
    client = attempt.AgentClient(status_timeout=4.0, long_poll=0.1)
    try:
        first = client.poll(NODES, "run", 1, wait=0.5)
        assert first["n2"].error and not first["n2"].pending
        since = first["n2"].asked
        for _ in range(3):
            later = client.poll(NODES, "run", 1, wait=0.5)
            assert later["n2"].error is not None and later["n2"].asked == since
    finally:
        client.close()


def test_an_attempt_missing_on_a_node_is_said_so(monkeypatch: pytest.MonkeyPatch) -> None:
    def status_of(node: Node, run: str, number: int, **_: object) -> Status:
        raise attempt.AttemptMissing(f"{node.name}: attempt 1 of run never started there")

    monkeypatch.setattr(attempt, "status_of", status_of)
    client = attempt.AgentClient()
    try:
        answers = client.poll(NODES, "run", 1, wait=0.5)
        assert all(a.missing for a in answers.values())
    finally:
        client.close()


def test_a_node_that_ended_is_not_asked_again_and_its_verified_end_needs_no_stop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[str] = []

    def status_of(node: Node, run: str, number: int, **_: object) -> Status:
        asked.append(node.name)
        if node.name == "n1":
            return Status("succeeded", digest="d-n1", ended_clean=True)
        return Status("running", digest="d-n2")

    monkeypatch.setattr(attempt, "status_of", status_of)
    client = attempt.AgentClient(status_timeout=4.0, long_poll=0.1)
    try:
        client.poll(NODES, "run", 1, wait=0.5)
        for _ in range(3):
            later = client.poll(NODES, "run", 1, wait=0.5)
            assert later["n1"].status is not None and later["n1"].status.state == "succeeded"
        # An ended node's answer stands: no further long poll holds the CLI's exit back.
        assert asked.count("n1") == 1 and asked.count("n2") > 1
        assert client.ended_clean(NODES, "run", 1) == ["n1"]
        assert client.ended_clean(NODES, "run", 2) == []  # another attempt's teardown stops every node
    finally:
        client.close()


def test_an_answer_carries_when_its_request_was_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    # A node's silence is judged against its peers' answers (decide.node_view): each status
    # answer says when the request it answers went out, an unchanged one too.
    held = threading.Event()

    def status_of(node: Node, run: str, number: int, *, since: str | None = None, **_: object) -> Status:
        if since is not None:  # a long poll: held, nothing changes
            held.wait(5)
        return Status("running", digest=f"d-{node.name}")

    monkeypatch.setattr(attempt, "status_of", status_of)
    client = attempt.AgentClient(status_timeout=4.0, long_poll=5.0)
    try:
        before = time.time()
        first = client.poll(NODES, "run", 1, wait=0.5)
        assert all(a.status is not None and before <= a.asked <= time.time() for a in first.values())
        again = client.poll(NODES, "run", 1, wait=0.1)  # the long polls are held: unchanged
        assert all(again[n].status is not None and again[n].asked == first[n].asked for n in ("n1", "n2"))
    finally:
        held.set()
        client.close()
