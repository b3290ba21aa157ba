"""The supervisor's decisions, over a table of observed cases (pure: no nodes, no clocks)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ava.config import Failover
from ava.decide import (
    LOST_AFTER,
    MAX_BACKOFF,
    SETTLE_AFTER,
    SETTLE_EARLY,
    STALE_AFTER,
    STARTUP_GRACE,
    STILL_RUNNING,
    NodeView,
    Observation,
    Plan,
    Verdict,
    judge,
    recover,
    startup_signature,
)

HANG = 60.0


def observe(*views: NodeView, elapsed: float = 10.0) -> Verdict:
    return judge(Observation(tuple(views), elapsed), hang_timeout=HANG)


def running(name: str, **kw: object) -> NodeView:
    return NodeView(name, state="running", progress_age=1.0, progressed=True, **kw)  # type: ignore[arg-type]


JUDGE_CASES = [
    ("all running", [running("a"), running("b")], "running", None),
    ("all succeeded", [NodeView("a", state="succeeded"), NodeView("b", state="succeeded")], "succeeded", None),
    ("one succeeded, one running", [NodeView("a", state="succeeded"), running("b")], "running", None),
    (
        "a rank exits non-zero",
        [running("a"), NodeView("b", state="failed", reason="exit", exit_code=1, rank_exit_codes={"3": 1, "2": 0})],
        "failed",
        "crash",
    ),
    (
        "out of memory",
        [NodeView("a", state="failed", reason="oom", memory_limit=200 * 2**20), running("b")],
        "failed",
        "oom",
    ),
    ("agent died", [NodeView("a", state="failed", reason="agent-died"), running("b")], "failed", "agent-died"),
    (
        "unreachable briefly",
        [running("a"), NodeView("b", reachable=False, unreachable_for=LOST_AFTER - 1, state=None)],
        "running",
        None,
    ),
    (
        "unreachable long enough",
        [running("a"), NodeView("b", reachable=False, unreachable_for=LOST_AFTER, state=None)],
        "failed",
        "node-lost",
    ),
    (
        "ranks fail after their peer node went silent",
        [
            NodeView("a", state="failed", reason="exit", exit_code=1, rank_exit_codes={"0": 1}),
            NodeView("b", reachable=False, unreachable_for=0.5, state=None),
        ],
        "failed",
        "node-lost",
    ),
    (
        "a failure waits for a late answer",
        [
            NodeView("a", state="failed", reason="exit", exit_code=1, rank_exit_codes={"0": 1}),
            NodeView("b", reachable=True, state=None),
        ],
        "running",
        None,
    ),
    ("stale heartbeat", [running("a"), running("b", heartbeat_age=STALE_AFTER + 1)], "failed", "node-lost"),
    ("stopped", [NodeView("a", state="stopped"), running("b")], "stopped", "stopped"),
    (
        "no progress for hang_timeout",
        [
            NodeView("a", state="running", progress_age=HANG + 1, progressed=True),
            NodeView("b", state="running", progress_age=HANG + 5, progressed=True),
        ],
        "failed",
        "hang",
    ),
    (
        "one node still progressing",
        [
            NodeView("a", state="running", progress_age=HANG + 1, progressed=True),
            NodeView("b", state="running", progress_age=2.0, progressed=True),
        ],
        "running",
        None,
    ),
]


@pytest.mark.parametrize(("views", "outcome", "kind"), [c[1:] for c in JUDGE_CASES], ids=[c[0] for c in JUDGE_CASES])
def test_judge_over_the_table(views: list[NodeView], outcome: str, kind: str | None) -> None:
    verdict = observe(*views, elapsed=HANG + 10)
    assert (verdict.outcome, verdict.kind) == (outcome, kind)


def test_a_hang_is_not_declared_before_hang_timeout_has_passed_since_the_start() -> None:
    assert observe(NodeView("a", state="running", progressed=True), elapsed=HANG - 1).outcome == "running"
    assert observe(NodeView("a", state="running", progressed=True), elapsed=HANG + 1).kind == "hang"


def test_start_up_gets_a_grace_before_a_short_hang_timeout_applies() -> None:
    quiet = NodeView("a", state="running", progress_age=30.0)
    short = Observation((quiet,), elapsed=30.0)
    assert judge(short, hang_timeout=5.0).outcome == "running"
    assert judge(Observation((quiet,), elapsed=STARTUP_GRACE), hang_timeout=5.0).kind == "hang"


def test_the_first_failure_in_time_is_the_cause() -> None:
    later = NodeView("a", state="failed", reason="exit", exit_code=1, rank_exit_codes={"0": 1}, ended=20.0)
    first = NodeView("b", state="failed", reason="exit", exit_code=1, rank_exit_codes={"3": 7}, ended=10.0)
    verdict = observe(later, first)
    assert (verdict.node, verdict.rank, verdict.exit_code) == ("b", 3, 7)
    assert verdict.cause == "rank 3 on b exited 7"


def test_a_rank_that_exited_on_its_own_is_the_cause_not_one_torchrun_killed() -> None:
    view = NodeView("b", state="failed", reason="exit", exit_code=1, rank_exit_codes={"2": -15, "3": 1})
    verdict = observe(view)
    assert (verdict.rank, verdict.exit_code) == (3, 1)


def test_out_of_memory_names_node_and_limit() -> None:
    verdict = observe(NodeView("gpu2", state="failed", reason="oom", memory_limit=8 * 2**30))
    assert verdict.cause == "out of memory on gpu2 (limit 8GiB)"


POLICY = Failover(max_restarts=3, on_node_loss="replace", hang_timeout=HANG, fatal_exit_codes=(2,), backoff=2.0)
CRASH = Verdict("failed", "crash", "rank 1 on a exited 1", node="a", rank=1, exit_code=1)
LOST_B = Verdict("failed", "node-lost", "node b stopped answering", node="b", lost=("b",))


def plan(
    verdict: Verdict, *, policy: Failover = POLICY, used: int = 0, spares: tuple[str, ...] = ("d",), nodes_min: int = 3
) -> Plan:
    return recover(
        verdict, failover=policy, restarts_used=used, current=("a", "b", "c"), spares=spares, nodes_min=nodes_min
    )


def test_a_crash_restarts_on_the_same_nodes_with_backoff() -> None:
    assert plan(CRASH) == Plan(True, CRASH.cause or "", ("a", "b", "c"), 2.0)
    assert plan(CRASH, used=2).backoff == 8.0


def test_the_restart_budget_counts_for_the_whole_run() -> None:
    decision = plan(CRASH, used=3)
    assert not decision.restart and "budget exhausted" in decision.reason


def test_a_fatal_exit_code_is_never_retried() -> None:
    fatal = Verdict("failed", "crash", "rank 0 on a exited 2", node="a", rank=0, exit_code=2)
    decision = plan(fatal)
    assert not decision.restart and "fatal_exit_codes" in decision.reason


def test_replace_swaps_a_lost_node_for_a_spare_keeping_order() -> None:
    assert plan(LOST_B).nodes == ("a", "c", "d")


def test_replace_without_a_spare_shrinks_only_when_the_range_allows() -> None:
    assert plan(LOST_B, spares=(), nodes_min=2).nodes == ("a", "c")
    assert not plan(LOST_B, spares=(), nodes_min=3).restart


def test_shrink_goes_on_with_the_survivors() -> None:
    shrink = Failover(3, "shrink", HANG, (2,), 2.0)
    assert plan(LOST_B, policy=shrink, nodes_min=2).nodes == ("a", "c")
    assert not plan(LOST_B, policy=shrink, nodes_min=3).restart


def test_fail_policy_gives_up_on_node_loss() -> None:
    failing = Failover(3, "fail", HANG, (2,), 2.0)
    decision = plan(LOST_B, policy=failing)
    assert not decision.restart and "on_node_loss" in decision.reason


def test_a_stop_is_never_restarted() -> None:
    assert not plan(Verdict("stopped", "stopped", "stopped by `ava stop`")).restart


def test_backoff_is_capped() -> None:
    assert plan(CRASH, used=2, policy=Failover(100, "replace", HANG, (2,), 30.0)).backoff == 60.0


def test_the_rank_that_exited_first_is_the_cause_not_the_peer_that_lost_it() -> None:
    # Rank 1 raised first; rank 0 died of the broken connection 0.3 s later, same code.
    node = NodeView(
        "local",
        state="failed",
        reason="exit",
        rank_exit_codes={"0": 1, "1": 1},
        rank_fail_times={"0": 100.3, "1": 100.0},
    )
    verdict = observe(node)
    assert (verdict.rank, verdict.cause) == (1, "rank 1 on local exited 1")


def test_across_nodes_the_earliest_rank_exit_names_the_node() -> None:
    early = NodeView(
        "b", state="failed", reason="exit", rank_exit_codes={"1": 1}, rank_fail_times={"1": 50.0}, ended=52.0
    )
    late = NodeView(
        "a", state="failed", reason="exit", rank_exit_codes={"0": 1}, rank_fail_times={"0": 50.4}, ended=51.0
    )
    verdict = observe(late, early)
    assert (verdict.node, verdict.rank) == ("b", 1)


def test_without_exit_times_a_rank_that_exited_on_its_own_beats_one_killed() -> None:
    node = NodeView("a", state="failed", reason="exit", rank_exit_codes={"0": -15, "3": 1})
    assert observe(node).rank == 3


def test_a_start_up_failure_signature_ignores_node_names_and_skips_retriable_kinds() -> None:
    crash_a = Verdict("failed", "crash", "rank 0 on gpu1 exited 1", node="gpu1", rank=0, exit_code=1)
    crash_b = Verdict("failed", "crash", "rank 0 on gpu2 exited 1", node="gpu2", rank=0, exit_code=1)
    lines_a = ["Traceback (most recent call last):", "OSError: gpu1: no such file 'data.bin'", ""]
    lines_b = ["OSError: gpu2: no such file 'data.bin'"]
    names = ("gpu1", "gpu2")
    assert startup_signature(crash_a, lines_a, names) == startup_signature(crash_b, lines_b, names)
    assert startup_signature(crash_a, ["ValueError: x"], names) != startup_signature(crash_a, lines_a, names)
    oom = Verdict("failed", "oom", "out of memory on gpu1", node="gpu1")
    assert startup_signature(oom, lines_a, names) is None
    assert startup_signature(LOST_B, lines_a, names) is None


def test_a_repeated_start_up_failure_is_not_retried_unless_the_recipe_says_so() -> None:
    decision = recover(
        CRASH,
        failover=POLICY,
        restarts_used=1,
        current=("a",),
        spares=(),
        nodes_min=1,
        repeated="ModuleNotFoundError: No module named 'einops'",
    )
    assert not decision.restart
    assert decision.reason.startswith("the same start-up failure twice; not retrying: ModuleNotFoundError")
    allowed = Failover(3, "replace", HANG, (2,), 2.0, stop_repeated_startup_failure=False)
    assert recover(
        CRASH, failover=allowed, restarts_used=1, current=("a",), spares=(), nodes_min=1, repeated="x"
    ).restart


def test_an_attempt_missing_on_a_node_that_answers_is_interrupted_not_lost() -> None:
    verdict = observe(NodeView("a", state="stopped"), NodeView("b", state="missing"))
    assert (verdict.kind, verdict.node, verdict.lost) == ("interrupted", "b", ())
    assert "never started on b" in (verdict.cause or "")
    # Restarted on the same nodes at once, whatever the budget says.
    decision = recover(
        verdict,
        failover=Failover(0, "replace", HANG, (2,), 2.0),
        restarts_used=0,
        current=("a", "b"),
        spares=("c",),
        nodes_min=2,
    )
    assert decision == Plan(True, verdict.cause or "", ("a", "b"), 0.0)


def test_the_timings_the_readme_promises_are_the_ones_decide_uses() -> None:
    readme = " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text().split())
    promised = {
        "LOST_AFTER": r"a node whose agent does not answer for (\d+) s",
        "STALE_AFTER": r"whose heartbeat is (\d+) s stale is lost",
        "STARTUP_GRACE": r"a hang is declared only after at least (\d+) s",
        "MAX_BACKOFF": r"backoff \* 2\^\(N-1\), at most (\d+) s",
    }
    used = {
        "LOST_AFTER": LOST_AFTER,
        "STALE_AFTER": STALE_AFTER,
        "STARTUP_GRACE": STARTUP_GRACE,
        "MAX_BACKOFF": MAX_BACKOFF,
    }
    for name, pattern in promised.items():
        found = re.search(pattern, readme)
        assert found, f"README.md no longer says /{pattern}/: update this test with it"
        assert used[name] == float(found.group(1)), (
            f"README.md says {found.group(0)!r}, ava.decide.{name} = {used[name]}"
        )


def test_a_failure_waits_for_a_running_node_whose_rank_raised_earlier() -> None:
    # n1's rank 0 died of the lost connection and n1 is final; n2's rank 1 raised first, but
    # n2's torchrun is still winding down: wait for it rather than blame rank 0.
    n1 = NodeView(
        "n1", state="failed", reason="exit", rank_exit_codes={"0": 1}, rank_fail_times={"0": 100.4}, heartbeat_age=1.0
    )
    n2 = NodeView("n2", state="running", rank_fail_times={"1": 100.0})
    assert observe(n1, n2) == STILL_RUNNING
    # Once n2 is final its rank is named; and a node that never ends is not waited for forever.
    n2_done = NodeView("n2", state="failed", reason="exit", rank_exit_codes={"1": 1}, rank_fail_times={"1": 100.0})
    assert observe(n1, n2_done).rank == 1
    n1_old = NodeView(
        "n1",
        state="failed",
        reason="exit",
        rank_exit_codes={"0": 1},
        rank_fail_times={"0": 100.4},
        heartbeat_age=SETTLE_AFTER + 1,
    )
    assert observe(n1_old, n2).node == "n1"


def test_a_long_poll_is_late_until_its_answer_is_overdue_then_silent_since_it_was_sent() -> None:
    from ava.decide import Answer, node_view

    held = Answer(pending=True, asked=100.0, due=101.0)  # the agent may hold it a second
    view, since = node_view("n1", held, now=104.5, silent_since=None, status_timeout=4.0)
    assert view.reachable and view.state is None and since is None  # late, not silent
    view, since = node_view("n1", held, now=105.5, silent_since=None, status_timeout=4.0)
    assert not view.reachable and since == 100.0 and view.unreachable_for == 5.5
    # A failed request keeps the node silent from the first unanswered one.
    failed = Answer(error="connection refused", asked=100.0)
    view, since = node_view("n1", failed, now=107.0, silent_since=100.0, status_timeout=4.0)
    assert not view.reachable and view.unreachable_for == 7.0 >= LOST_AFTER


def test_a_node_silent_while_its_peers_answer_is_lost_before_lost_after() -> None:
    # A cut link: n2's long poll, sent at 100, never comes back; n1 answered a request sent
    # well after (103). Its silence is its own: lost at SILENT_AMONG_PEERS, not LOST_AFTER (plus a
    # retry's grace, as before: 7.6 s median on the test cluster).
    from ava.decide import SILENT_AMONG_PEERS, Answer, node_view

    assert SILENT_AMONG_PEERS < LOST_AFTER
    held = Answer(pending=True, asked=100.0, due=101.0)
    view, since = node_view("n2", held, now=100.0 + SILENT_AMONG_PEERS - 0.1, silent_since=None,
                            status_timeout=4.0, peers_asked=103.0)  # fmt: skip
    assert view.reachable and not view.alone and since is None  # still only late
    view, since = node_view("n2", held, now=100.0 + SILENT_AMONG_PEERS, silent_since=None,
                            status_timeout=4.0, peers_asked=103.0)  # fmt: skip
    assert view.alone and not view.reachable and since == 100.0
    verdict = observe(NodeView("n1", heartbeat_age=0.1), view)
    assert (verdict.outcome, verdict.kind, verdict.lost) == ("failed", "node-lost", ("n2",))
    # Its request failed (the transport's deadline) and a retry is out: still silent since 100.
    retry = Answer(pending=True, asked=100.0, due=105.2)
    view, _ = node_view("n2", retry, now=105.3, silent_since=100.0, status_timeout=4.0, peers_asked=103.5)
    assert view.alone and observe(NodeView("n1", heartbeat_age=0.1), view).lost == ("n2",)


def test_when_every_poll_is_late_at_once_no_node_is_lost_sooner() -> None:
    # A loaded machine: n1's latest answer is to a request sent soon after n2's (or before),
    # so it says nothing of n2 alone; n2 is judged by LOST_AFTER.
    from ava.decide import SILENT_AMONG_PEERS, Answer, node_view

    held = Answer(pending=True, asked=100.0, due=101.0)
    for peers in (0.0, 99.0, 100.0, 101.4, 102.9):  # none well after n2's went out
        view, _ = node_view("n2", held, now=100.0 + SILENT_AMONG_PEERS + 0.5, silent_since=None,
                            status_timeout=4.0, peers_asked=peers)  # fmt: skip
        assert not view.alone
        assert observe(NodeView("n1", heartbeat_age=0.1), view) == STILL_RUNNING
    # Both late at once: neither is lost before LOST_AFTER.
    views = [node_view(n, held, now=105.5, silent_since=None, status_timeout=4.0)[0] for n in ("n1", "n2")]
    assert observe(*views) == STILL_RUNNING


def early(name: str, codes: dict[str, int], failed_at: float, reported: float, **kw: object) -> NodeView:
    """A node whose torchrun still winds down, a rank already seen to exit with CODES."""
    times = {rank: failed_at for rank in codes}
    return NodeView(name, state="running", rank_exit_codes=codes, rank_fail_times=times, reported=reported, **kw)  # type: ignore[arg-type]


def test_a_rank_killed_by_a_signal_is_judged_as_it_exits_before_torchrun_ends() -> None:
    # SIGKILL (-9) names its cause: no wait for torchrun there, nor for the other nodes.
    verdict = observe(running("a", reported=99.0), early("b", {"3": -9}, 100.0, 100.05))
    assert (verdict.kind, verdict.node, verdict.rank, verdict.exit_code) == ("crash", "b", 3, -9)


def test_an_early_exit_with_a_code_waits_for_the_other_nodes_to_answer_past_it() -> None:
    # Rank 3 exited 1: it may have lost a peer on a node that just died. Until "a" answers
    # after the failure it may be that node; once it has, the crash is b's.
    b = early("b", {"3": 1}, 100.0, 100.05)
    assert observe(running("a", reported=99.5), b) == STILL_RUNNING
    assert observe(running("a", reported=100.2), b).rank == 3
    # A node silent since then is the cause.
    silent = NodeView("a", reachable=False, unreachable_for=0.5, state=None)
    assert observe(silent, b).kind == "node-lost"
    # Clocks apart: the failure is judged SETTLE_EARLY after it at the latest.
    assert observe(running("a", reported=90.0), early("b", {"3": 1}, 100.0, 100.0 + SETTLE_EARLY)).rank == 3


def test_a_rank_ended_by_torchruns_sigterm_is_not_a_cause_on_its_own() -> None:
    assert observe(running("a", reported=99.5), early("b", {"0": -15}, 100.0, 100.05)) == STILL_RUNNING


def test_an_out_of_memory_kill_is_judged_before_the_node_drains() -> None:
    # The OOM node says so while torchrun drains; a peer that lost its rank a moment later
    # (exit 1) is not the cause.
    oom = early("a", {"0": -9}, 100.0, 100.1, reason="oom", memory_limit=2**30)
    peer = early("b", {"1": 1}, 100.02, 100.08)
    verdict = observe(peer, oom)
    assert (verdict.kind, verdict.node) == ("oom", "a")


def test_an_early_failure_after_a_rank_that_raised_elsewhere_waits_for_it() -> None:
    # a's rank 0 raised at 100.0 (its torchrun has not reported an exit yet); b's rank 1
    # exited at 100.3 having lost it: a is the cause.
    a = NodeView("a", state="running", rank_fail_times={"0": 100.0}, reported=100.35)
    b = early("b", {"1": 1}, 100.3, 100.35)
    assert observe(a, b) == STILL_RUNNING


def test_no_hang_is_declared_on_answers_that_are_late() -> None:
    # A loaded machine: every node's long poll is overdue this round, so no view carries its
    # progress. That is no evidence of a hang (the soak restarted a training run every minute).
    late = [NodeView(name, reachable=True, state=None) for name in ("a", "b", "c")]
    assert observe(*late, elapsed=STARTUP_GRACE + 46) == STILL_RUNNING
    # One node late, the others answering with fresh progress: still running, of course.
    assert observe(late[0], running("b"), running("c"), elapsed=STARTUP_GRACE + 46) == STILL_RUNNING
    # Answers without progress for hang_timeout past the start-up grace are a hang.
    quiet = [NodeView(name, state="running") for name in ("a", "b")]
    assert observe(*quiet, elapsed=STARTUP_GRACE + 46).kind == "hang"


def test_an_early_failure_waits_for_an_earlier_rank_of_its_own_node_whose_code_is_unknown() -> None:
    # On n1 rank 1 exited at 100.0 but torchrun reaped it before its code was read; rank 0,
    # its victim, exited 1 at 100.2. Blaming rank 0 would be wrong: wait for n1's summary.
    n1 = NodeView(
        "n1", state="running", rank_exit_codes={"0": 1}, rank_fail_times={"1": 100.0, "0": 100.2}, reported=100.3
    )
    assert observe(n1) == STILL_RUNNING
    final = NodeView(
        "n1", state="failed", reason="exit", rank_exit_codes={"0": 1, "1": -9}, rank_fail_times={"1": 100.0, "0": 100.2}
    )
    assert observe(final).rank == 1
