"""The supervisor's loop, driven without a cluster: a fake AgentClient answers each poll from a
scenario, a fake clock never sleeps. What is checked is what the loop does with the answers:
the attempts it records, the nodes it restarts on, what it stops, and how the run ends."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ava import runs
from ava.agent.protocol import Progress, Status, StopReport
from ava.attempt import AgentClient, Prepared
from ava.config import Inventory, Node, Recipe, parse_inventory, parse_recipe
from ava.decide import LOST_AFTER, Answer
from ava.errors import AvaError, CommandError
from ava.launch import NodeLaunch, Route
from ava.supervisor import STOP_FILE, Clock, Supervisor

# What a scenario answers: (client, attempt number, poll number in that attempt, node) -> Answer
Script = Callable[["FakeAgents", int, int, str], Answer]


class FakeClock(Clock):
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def now(self) -> float:
        return self.t

    def wait(self, event: threading.Event, seconds: float) -> bool:
        self.t += seconds
        return event.is_set()


class FakeAgents(AgentClient):
    """Every agent call the supervisor makes, answered from the scenario and recorded."""

    def __init__(self, clock: FakeClock, script: Script, *, start: Callable[[int], None] | None = None) -> None:
        super().__init__(status_timeout=4.0)
        self.clock, self.script, self.on_start = clock, script, start
        self.started: list[tuple[int, list[str]]] = []
        self.stopped: list[list[str]] = []
        self.unreachable: set[str] = set()  # nodes a stop cannot reach
        self.polls: dict[int, int] = {}
        self.attempt = 0

    def prepare(self, nodes: list[Node], code_root: Path, manifest: Any, **_: Any) -> Prepared:
        return Prepared(manifest.tree, "runtime")

    def prefetch(self, nodes: list[Node], recipe: Recipe, pythons: dict[str, str], report: Any) -> None:
        pass

    def routes(self, nodes: list[Node], master: str) -> tuple[dict[str, Route], int]:
        return {n.name: Route(n.host or "", "eth0", "/home/u", 4) for n in nodes}, 29500

    def start(self, launches: list[NodeLaunch], master_address: str, port: int, **_: Any) -> int:
        self.attempt = launches[0].spec.attempt
        if self.on_start is not None:
            self.on_start(self.attempt)
        self.started.append((self.attempt, [launch.node.name for launch in launches]))
        return port

    def poll(self, nodes: list[Node], run_id: str, attempt: int, wait: float) -> dict[str, Answer]:
        self.clock.t += 0.05
        number = self.polls[attempt] = self.polls.get(attempt, 0) + 1
        return {n.name: self.script(self, attempt, number, n.name) for n in nodes}

    def stop(
        self, nodes: list[Node], run_id: str, *, grace: float = 10.0, keep_spares: bool = False
    ) -> dict[str, StopReport | AvaError]:
        self.stopped.append([n.name for n in nodes])
        return {
            n.name: CommandError(f"{n.name}: unreachable") if n.name in self.unreachable else StopReport(run_id, True)
            for n in nodes
        }

    def follow_logs(self, node: Node, run_id: str, attempt: int, on_line: Any, *, offset: int = 0) -> int:
        return 0


class Events:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def line(self, node: str, rank: str | None, text: str) -> None:
        pass

    def event(self, text: str) -> None:
        self.lines.append(text)


def running(agents: FakeAgents, step: int = 1) -> Answer:
    now = agents.clock.t
    return Answer(Status("running", heartbeat=now, age=0.1, progress=Progress(step, now)))


def crashed(agents: FakeAgents, rank: str, code: int = 1) -> Answer:
    now = agents.clock.t
    status = Status(
        "failed",
        reason="exit",
        exit_code=1,
        rank_exit_codes={rank: code},
        rank_fail_times={rank: now},
        heartbeat=now,
        age=0.1,
        ended=now,
    )
    return Answer(status)


def succeeded(agents: FakeAgents) -> Answer:
    return Answer(Status("succeeded", reason="exit", exit_code=0, heartbeat=agents.clock.t, age=0.1))


def silent(agents: FakeAgents) -> Answer:
    return Answer(error="n2: connection refused", asked=agents.clock.t)


INVENTORY = """
[defaults]
user = "u"
[nodes.n1]
host = "10.0.0.1"
[nodes.n2]
host = "10.0.0.2"
[nodes.n3]
host = "10.0.0.3"
[nodes.n4]
host = "10.0.0.4"
"""


def recipe(root: Path, **failover: Any) -> Recipe:
    settings = {"max_restarts": 2, "backoff": "1s", **failover}
    lines = "\n".join(f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}" for k, v in settings.items())
    lines = lines.replace("'", '"')
    text = f"""name = "scenario"
[run]
script = "train.py"
[resources]
nodes = 2
procs_per_node = 1
[failover]
{lines}
"""
    return parse_recipe(text, str(root / "recipe.toml"), str(root))


def supervise(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    script: Script,
    *,
    nodes: tuple[str, ...] = ("n1", "n2"),
    pool: tuple[str, ...] = (),
    on_start: Callable[[int], None] | None = None,
    **failover: Any,
) -> tuple[runs.RunRecord, FakeAgents, Events, int]:
    monkeypatch.setenv("AVA_HOME", str(tmp_path / "home"))
    (tmp_path / "train.py").write_text("print('hi')\n")
    inventory_path = tmp_path / "ava.toml"
    inventory_path.write_text(INVENTORY)
    parsed = parse_inventory(INVENTORY, str(inventory_path))
    inventory = Inventory(path=inventory_path, nodes=parsed.nodes)
    the_recipe = recipe(tmp_path, **failover)
    record = runs.RunRecord(
        id="scenario-20261201-1200-abcd",
        recipe="scenario",
        source=str(tmp_path / "recipe.toml"),
        recipe_hash="0" * 16,
        raw=the_recipe.raw,
        inventory=str(inventory_path),
        nodes=list(nodes),
        pool=list(pool),
    )
    (record.dir / "code").mkdir(parents=True)
    (record.dir / "code" / "train.py").write_text("print('hi')\n")
    record.save()
    clock = FakeClock()
    agents = FakeAgents(clock, script, start=on_start)
    events = Events()
    supervisor = Supervisor(record, the_recipe, inventory, events, client=agents, clock=clock)
    outcome = supervisor.run()
    return runs.load(record.id), agents, events, outcome.exit_code


def test_a_crashed_rank_restarts_the_attempt_on_the_same_nodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def script(agents: FakeAgents, attempt: int, poll: int, node: str) -> Answer:
        if attempt == 1 and poll >= 2 and node == "n2":
            return crashed(agents, "1")
        if attempt == 2 and poll >= 2:
            return succeeded(agents)
        return running(agents)

    record, agents, events, code = supervise(tmp_path, monkeypatch, script)
    assert code == 0 and record.state == "succeeded"
    assert agents.started == [(1, ["n1", "n2"]), (2, ["n1", "n2"])]
    first, second = record.attempts
    assert (first.state, first.kind, first.failed_node, first.failed_rank) == ("failed", "crash", "n2", 1)
    assert second.state == "succeeded"
    assert any("restart 1 of 2" in e for e in events.lines)
    # Each attempt is torn down on its nodes when it ends.
    assert agents.stopped == [["n1", "n2"], ["n1", "n2"]]


def test_a_late_answer_is_waited_for_and_the_first_failure_is_the_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def script(agents: FakeAgents, attempt: int, poll: int, node: str) -> Answer:
        if poll == 2 and node == "n1":
            return crashed(agents, "0")
        if poll == 2 and node == "n2":  # its answer is late: asked just now, not yet back
            return Answer(pending=True, asked=agents.clock.t - 1.0)
        if poll >= 3:
            return crashed(agents, "0" if node == "n1" else "1")
        return running(agents)

    record, agents, events, code = supervise(tmp_path, monkeypatch, script, max_restarts=0)
    assert code == 1 and record.state == "failed"
    (only,) = record.attempts
    assert agents.polls[1] == 3  # judged after the late node answered, not before
    assert (only.kind, only.failed_node) == ("crash", "n1")
    assert record.lost_nodes == []


def test_a_node_lost_is_replaced_by_a_spare_and_stopped_once_it_is_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def script(agents: FakeAgents, attempt: int, poll: int, node: str) -> Answer:
        if attempt == 1 and poll >= 2 and node == "n2":
            return silent(agents)
        if attempt == 2 and poll >= 2:
            agents.unreachable.discard("n2")  # its link came back
            return succeeded(agents)
        return running(agents)

    def on_start(attempt: int) -> None:
        if attempt == 1:
            agents_ref[0].unreachable.add("n2")

    agents_ref: list[FakeAgents] = []
    original = FakeAgents.__init__

    def capture(self: FakeAgents, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        agents_ref.append(self)

    monkeypatch.setattr(FakeAgents, "__init__", capture)
    record, agents, events, code = supervise(tmp_path, monkeypatch, script, on_node_loss="replace", on_start=on_start)
    assert code == 0 and record.state == "succeeded"
    assert record.lost_nodes == ["n2"]
    first, second = record.attempts
    assert first.kind == "node-lost" and first.failed_node == "n2"
    assert second.nodes == ["n1", "n3"]  # the first spare in inventory order
    # Lost for LOST_AFTER seconds of silence, not at the first missed answer.
    assert agents.polls[1] > LOST_AFTER / 1.0
    # The lost node is left out of the attempt's teardown, then stopped before the run ends.
    assert agents.stopped[0] == ["n1"]
    assert agents.stopped[-1] == ["n2"]


def test_a_run_without_progress_for_hang_timeout_is_a_hang(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def script(agents: FakeAgents, attempt: int, poll: int, node: str) -> Answer:
        # Progress once, at step 5, then never again though the heartbeat goes on.
        status = Status("running", heartbeat=agents.clock.t, age=0.1, progress=Progress(5, 1_000_000.0))
        return Answer(status)

    record, agents, events, code = supervise(tmp_path, monkeypatch, script, max_restarts=0, hang_timeout="30s")
    assert code == 1
    (only,) = record.attempts
    assert only.kind == "hang"
    assert "no training progress" in (only.cause or "")


def test_stop_during_the_launch_ends_the_run_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"

    def on_start(attempt: int) -> None:
        # `ava stop` lands while the agents start; its teardown makes the start fail.
        for record_dir in (home / "runs").iterdir():
            (record_dir / STOP_FILE).write_text("")
        raise CommandError("n2: the agent could not start the attempt (exit 1)")

    record, agents, events, code = supervise(tmp_path, monkeypatch, lambda *a: running(a[0]), on_start=on_start)
    assert code == 1 and record.state == "stopped"
    (only,) = record.attempts
    assert (only.state, only.kind) == ("stopped", "stopped")
    assert "during the launch" in (only.cause or "")


def test_the_restart_budget_ends_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def script(agents: FakeAgents, attempt: int, poll: int, node: str) -> Answer:
        return crashed(agents, "0") if node == "n1" and poll >= 2 else running(agents)

    record, agents, events, code = supervise(tmp_path, monkeypatch, script, max_restarts=2)
    assert code == 1 and record.state == "failed"
    assert [a.number for a in record.attempts] == [1, 2, 3]
    assert "restart budget exhausted (2 of failover.max_restarts = 2 used)" in events.lines[-1]


@pytest.mark.parametrize(
    ("pool", "replaced_by"),
    [((), "n3"), (("n1", "n2", "n4"), "n4"), (("n1", "n2"), None)],
)
def test_spares_come_from_the_nodes_the_run_was_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pool: tuple[str, ...], replaced_by: str | None
) -> None:
    def script(agents: FakeAgents, attempt: int, poll: int, node: str) -> Answer:
        if attempt == 1 and node == "n2" and poll >= 2:
            return silent(agents)
        return succeeded(agents) if attempt == 2 and poll >= 2 else running(agents)

    record, agents, events, code = supervise(tmp_path, monkeypatch, script, pool=pool, on_node_loss="replace")
    if replaced_by is None:  # `--nodes n1,n2`: no spare outside them, and 2 nodes are needed
        assert code == 1 and len(record.attempts) == 1
        assert "no healthy spare" in events.lines[-1]
    else:
        assert code == 0
        assert record.attempts[1].nodes == ["n1", replaced_by]


def test_metric_lines_are_recorded_once_and_a_new_supervisor_asks_past_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ava.metrics

    recorded: list[tuple[int, str, list[dict[str, Any]]]] = []
    monkeypatch.setattr(
        ava.metrics, "record", lambda run, attempt, node, lines: recorded.append((attempt, node, lines))
    )
    line = {"step": 1, "time": 1.0, "rank": 0, "metrics": {"loss": 2.5}}

    def script(agents: FakeAgents, attempt: int, poll: int, node: str) -> Answer:
        if poll >= 3:
            return succeeded(agents)
        answer = running(agents)
        if node == "n1" and poll == 2:
            assert answer.status is not None
            return Answer(replace(answer.status, metrics=(line,), metrics_end=80))
        return answer

    skipped: dict[str, int] = {}
    monkeypatch.setattr(FakeAgents, "skip_metrics", lambda self, node, offset: skipped.__setitem__(node, offset))
    record, _, _, code = supervise(tmp_path, monkeypatch, script)
    assert code == 0
    assert recorded == [(1, "n1", [line])]
    assert skipped == {"n1": 0, "n2": 0}  # a fresh attempt asks from the start
    consumed = json.loads((record.dir / "metrics-consumed.json").read_text())
    assert consumed == {"1/n1": 80}
