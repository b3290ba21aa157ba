"""The Slurm supervisor's verdict on one look at an attempt (ava/slurm/supervise.judge): pure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ava.slurm.supervise import SETTLE_AFTER, STALE_AFTER, STARTUP_GRACE, JobState, Look, judge

NOW = 1000.0


def look(statuses: dict[str, dict[str, Any]], job: str = "RUNNING", states: dict[str, str] | None = None) -> Look:
    # As the agent's slurm-watch prints it, read the way the supervisor reads it.
    return Look.from_json({"job": {"state": job}, "status": statuses, "states": states or {}, "now": NOW})


def running(heartbeat: float = NOW) -> dict[str, Any]:
    return {"state": "running", "heartbeat": heartbeat}


def test_every_node_succeeded_is_success_and_fewer_nodes_than_asked_is_not() -> None:
    done = {"state": "succeeded", "heartbeat": NOW}
    assert judge(look({"n1": done, "n2": done}), 2, None, 0).outcome == "succeeded"
    assert judge(look({"n1": done}), 2, None, 0).outcome == "running"


def test_a_crashed_rank_names_the_first_failing_rank_once_the_others_ended() -> None:
    failed = {
        "state": "failed",
        "ended": 5.0,
        "exit_code": 1,
        "rank_exit_codes": {"2": 0, "3": 1},
        "rank_fail_times": {"3": 4.0},
    }
    later = {
        "state": "failed",
        "ended": 9.0,
        "exit_code": 1,
        "rank_exit_codes": {"0": 1},
        "rank_fail_times": {"0": 8.0},
    }
    assert judge(look({"n1": running(), "n2": failed}), 2, 0.0, 1.0).outcome == "running"  # n1 may still end
    verdict = judge(look({"n1": later, "n2": failed}), 2, 0.0, 1.0)
    assert (verdict.outcome, verdict.kind, verdict.node, verdict.rank, verdict.exit_code) == (
        "failed",
        "crash",
        "n2",
        3,
        1,
    )


def test_without_fail_times_a_rank_that_exited_beats_one_killed_by_a_signal() -> None:
    failed = {"state": "failed", "ended": 5.0, "exit_code": 1, "rank_exit_codes": {"2": -15, "3": 1}}
    assert judge(look({"n2": failed}), 1, 0.0, 1.0).rank == 3


def test_a_node_slurm_calls_down_or_whose_heartbeat_went_stale_is_lost() -> None:
    failed = {"state": "failed", "ended": 5.0, "exit_code": 1}
    verdict = judge(look({"n1": failed, "n2": running()}, states={"n2": "down*"}), 2, 0.0, 1.0)
    assert (verdict.kind, verdict.lost) == ("node-lost", ("n2",))
    stale = running(heartbeat=NOW - STALE_AFTER - 1)
    verdict = judge(look({"n1": failed, "n2": stale}), 2, 0.0, 1.0)
    assert (verdict.kind, verdict.lost) == ("node-lost", ("n2",))


def test_a_failure_waits_for_the_others_at_most_the_settle_time() -> None:
    failed = {"state": "failed", "ended": 5.0, "exit_code": 1}
    assert judge(look({"n1": failed, "n2": running()}), 2, 0.0, SETTLE_AFTER - 1).outcome == "running"
    assert judge(look({"n1": failed, "n2": running()}), 2, 0.0, SETTLE_AFTER).kind == "crash"


def test_a_job_that_ended_before_its_agents_did_is_a_launch_failure() -> None:
    verdict = judge(look({}, job="FAILED"), 2, None, 0)
    assert (verdict.outcome, verdict.kind) == ("failed", "launch")
    assert judge(look({}, job="PENDING"), 2, None, 0).outcome == "running"


def test_a_running_node_without_progress_or_output_for_hang_timeout_is_hung_after_the_grace() -> None:
    quiet = {"state": "running", "heartbeat": NOW, "started": NOW - 100, "output_time": NOW - 31}
    busy = {"state": "running", "heartbeat": NOW, "started": NOW - 100, "progress": {"step": 3, "time": NOW - 1}}
    assert (
        judge(look({"n1": busy, "n2": quiet}), 2, None, 0, hang_timeout=30, elapsed=STARTUP_GRACE - 1).outcome
        == "running"
    )
    verdict = judge(look({"n1": busy, "n2": quiet}), 2, None, 0, hang_timeout=30, elapsed=STARTUP_GRACE)
    assert (verdict.kind, verdict.node) == ("hang", "n2")
    assert judge(look({"n1": busy, "n2": busy}), 2, None, 0, hang_timeout=30, elapsed=999).outcome == "running"


def test_no_hang_is_declared_on_a_look_that_misses_a_nodes_status() -> None:
    # n2's status is not in this look (not yet written, or unreadable as it was read): its
    # progress is unknown, which is no evidence of a hang on n1 or anywhere (ava.decide does
    # the same for a late answer on SSH nodes).
    quiet = {"state": "running", "heartbeat": NOW, "started": NOW - 100, "output_time": NOW - 31}
    late = judge(look({"n1": quiet}), 2, None, 0, hang_timeout=30, elapsed=STARTUP_GRACE + 46)
    assert late.outcome == "running"
    unreadable = judge(look({"n1": quiet, "n2": {"state": 7}}), 2, None, 0, hang_timeout=30, elapsed=999)
    assert unreadable.outcome == "running"
    # Both answering, n1 quiet for hang_timeout past the grace: a hang.
    both = judge(look({"n1": quiet, "n2": quiet}), 2, None, 0, hang_timeout=30, elapsed=STARTUP_GRACE + 46)
    assert (both.kind, both.node) == ("hang", "n1")


def test_the_job_state_keeps_each_nodes_log_offset_for_a_supervisor_taking_over(tmp_path: Path) -> None:
    state = JobState("n1", "/shared/ava", [{"attempt": 1, "job": "7", "exclude": []}], {"1": {"n1": 120, "n2": 64}})
    state.save(tmp_path)
    assert JobState.load(tmp_path) == state
    assert [p.name for p in tmp_path.iterdir()] == ["slurm.json"]  # written whole, no temporary left
    # A record from before the offsets: the lines of the current attempt are read from the start.
    (tmp_path / "slurm.json").write_text('{"login": "n1", "shared": "/s", "jobs": []}')
    assert JobState.load(tmp_path) == JobState("n1", "/s")
