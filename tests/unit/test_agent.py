"""The node agent end to end: real detached monitors, real torchrun, real cgroups."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from ava.agent import build_zipapp, with_bytecode
from ava.agent.status import parse_rank_exit_codes
from tests.support.agent_helpers import (
    REPO,
    Agent,
    agent,
    cgroup_dirs,
    make_agent,
    marker_pids,
    needs_cgroups,
    torchrun,
    wait_for,
)

STATUS_KEYS = {
    "run", "attempt", "node", "state", "reason", "pid", "job_pid", "started", "ended", "exit_code",
    "rank_exit_codes", "heartbeat", "progress", "output_size", "output_time", "gpus", "cgroup",
    "limits", "memory_limit",
}  # fmt: skip


def assert_gone(agent: Agent, run: str) -> None:
    """No process of RUN anywhere, no cgroup of the test left, no lease held."""
    assert wait_for(lambda: not marker_pids(run), 10.0) is True, f"left: {marker_pids(run)}"
    assert not [d for d in cgroup_dirs(agent.parent) if d.name.startswith(run)]
    assert not [h for h in agent.leases() if h["run"] == run]


@needs_cgroups
def test_torchrun_job_runs_to_success_with_both_ranks_logged(agent: Agent) -> None:
    run = agent.new_run("ok")
    rc, st = agent.start(agent.spec(run, torchrun("ranks.py"), env={"JOB_SLEEP": "1.5"}))
    assert rc == 0 and st["state"] == "running", st
    assert set(st) >= STATUS_KEYS
    assert st["cgroup"]["backend"] in ("v1", "v2") and st["job_pid"] and st["pid"]
    final = agent.wait_final(run)
    assert (final["state"], final["reason"], final["exit_code"]) == ("succeeded", "exit", 0)
    assert final["heartbeat"] >= final["started"] and final["ended"]
    log = (agent.work / "runs" / run / "attempt-1" / "output.log").read_text()
    assert "hello from rank 0" in log and "hello from rank 1" in log
    assert final["output_size"] == len(log.encode())
    assert_gone(agent, run)


@needs_cgroups
def test_failed_rank_exit_code_is_reported(agent: Agent) -> None:
    run = agent.new_run("fail")
    agent.start(agent.spec(run, torchrun("ranks.py"), env={"JOB_FAIL": "1:3"}))
    final = agent.wait_final(run)
    assert (final["state"], final["reason"]) == ("failed", "exit")
    assert final["exit_code"] != 0
    assert final["rank_exit_codes"] == {"1": 3}
    assert_gone(agent, run)


def test_rank_exit_codes_parse_torchrun_summary() -> None:
    summary = """
Root Cause (first observed failure):
[0]:
  time      : 2026-11-23_11:57:22
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : 3 (pid: 2759)
  error_file: <N/A>
Other Failures:
[1]:
  rank      : 2 (local_rank: 0)
  exitcode  : -9 (pid: 2760)
"""
    assert parse_rank_exit_codes(summary) == {"1": 3, "2": -9}
    assert parse_rank_exit_codes("no summary here") == {}


@needs_cgroups
def test_oom_kills_the_job_and_spares_a_concurrent_run(agent: Agent) -> None:
    hog, calm = agent.new_run("hog"), agent.new_run("calm")
    limit = 200 * 1024 * 1024
    agent.start(agent.spec(calm, [sys.executable, "ranks.py"], env={"JOB_SLEEP": "3"}))
    rc, _ = agent.start(
        agent.spec(hog, [sys.executable, "hog.py", str(1 << 30)], limits={"memory": limit, "cpus": None, "pids": None})
    )
    assert rc == 0
    final = agent.wait_final(hog, 30)
    assert (final["state"], final["reason"], final["memory_limit"]) == ("failed", "oom", limit)
    assert agent.wait_final(calm)["state"] == "succeeded"
    assert_gone(agent, hog)
    assert_gone(agent, calm)


@needs_cgroups
def test_stop_leaves_no_process_even_one_that_escaped_its_session(agent: Agent, tmp_path: Path) -> None:
    run = agent.new_run("stop")
    hidden = tmp_path / "hidden.pid"
    agent.start(agent.spec(run, [sys.executable, "escape.py", str(hidden)]))
    assert wait_for(lambda: hidden.exists() and hidden.read_text(), 10)
    hidden_pid = int(hidden.read_text())
    assert hidden_pid in marker_pids(run)
    started = time.monotonic()
    rc, out = agent.stop(run, grace=1)
    assert rc == 0 and out == {"run": run, "stopped": True, "remaining_pids": [], "cgroup_removed": True}
    assert time.monotonic() - started < 10
    assert agent.status(run)["state"] == "stopped"
    assert not os.path.exists(f"/proc/{hidden_pid}/environ") or hidden_pid not in marker_pids(run)
    assert_gone(agent, run)


@needs_cgroups
def test_stop_is_idempotent_and_accepts_unknown_runs(agent: Agent) -> None:
    run = agent.new_run("twice")
    agent.start(agent.spec(run, [sys.executable, "ranks.py"], env={"JOB_SLEEP": "30"}))
    assert agent.stop(run, grace=0.5)[1]["stopped"] is True
    again = agent.stop(run, grace=0.5)
    assert again == (0, {"run": run, "stopped": True, "remaining_pids": [], "cgroup_removed": True})
    assert agent.stop("never-started", grace=0.5)[0] == 0
    assert agent.status(run)["state"] == "stopped"


@needs_cgroups
def test_monitor_sigkill_makes_the_reaper_end_the_job(agent: Agent) -> None:
    run = agent.new_run("reap")
    _, st = agent.start(agent.spec(run, torchrun("ranks.py"), env={"JOB_SLEEP": "60"}))
    assert wait_for(lambda: len(marker_pids(run)) >= 3, 20), "torchrun and two workers"
    os.kill(st["pid"], signal.SIGKILL)
    final = agent.wait_final(run, 20)
    assert (final["state"], final["reason"]) == ("failed", "agent-died")
    assert_gone(agent, run)


@needs_cgroups
def test_killing_the_monitors_process_group_still_leaves_nothing(agent: Agent) -> None:
    run = agent.new_run("pgkill")
    _, st = agent.start(agent.spec(run, [sys.executable, "ranks.py"], env={"JOB_SLEEP": "60"}))
    os.killpg(os.getpgid(st["pid"]), signal.SIGKILL)  # its session, as a hangup or `kill -9 -PGID` would
    final = agent.wait_final(run, 20)
    assert (final["state"], final["reason"]) == ("failed", "agent-died")
    assert_gone(agent, run)


@needs_cgroups
def test_status_ends_the_job_when_monitor_and_reaper_both_died(agent: Agent) -> None:
    run = agent.new_run("orphan")
    _, st = agent.start(agent.spec(run, [sys.executable, "ranks.py"], env={"JOB_SLEEP": "60"}))
    os.kill(st["reaper_pid"], signal.SIGKILL)
    os.kill(st["pid"], signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{st['pid']}/status"), 5)
    assert (agent.status(run)["state"], agent.status(run)["reason"]) == ("failed", "agent-died")
    assert_gone(agent, run)


@needs_cgroups
def test_torchrun_sigkill_takes_its_orphaned_workers_down(agent: Agent) -> None:
    run = agent.new_run("launcher")
    _, st = agent.start(agent.spec(run, torchrun("ranks.py"), env={"JOB_SLEEP": "60"}))
    assert wait_for(lambda: len(marker_pids(run)) >= 3, 20)
    os.kill(st["job_pid"], signal.SIGKILL)
    final = agent.wait_final(run, 20)
    assert (final["state"], final["exit_code"]) == ("failed", -9)
    assert_gone(agent, run)


@needs_cgroups
def test_cpu_limit_holds_two_spinners_near_one_core(agent: Agent) -> None:
    run = agent.new_run("cpu")
    _, st = agent.start(
        agent.spec(run, [sys.executable, "spin.py", "5", "2"], limits={"memory": None, "cpus": 1, "pids": None})
    )
    assert wait_for(lambda: len(marker_pids(run)) >= 3, 10)
    cores = cgroup_cpu_cores(st["cgroup"], 3.0)
    # At most the limit (plus a CFS period at each end of the window); well above zero.
    assert 0.3 < cores <= 1.1, f"cpus = 1: the job used {cores:.2f} cores"
    agent.stop_clean(run, grace=0)
    assert_gone(agent, run)


def cgroup_cpu_cores(cgroup: dict, seconds: float) -> float:
    """CPU used by the fence over SECONDS, in cores (cpuacct on v1, cpu.stat on v2)."""
    if cgroup["backend"] == "v1":
        usage = Path(cgroup["dirs"]["cpuacct"]) / "cpuacct.usage"
        read = lambda: int(usage.read_text()) / 1e9  # noqa: E731
    else:
        stat = Path(cgroup["path"]) / "cpu.stat"
        read = lambda: int(stat.read_text().split()[1]) / 1e6  # noqa: E731
    before = read()
    time.sleep(seconds)
    return (read() - before) / seconds


@needs_cgroups
def test_env_values_reach_the_job_byte_exact(agent: Agent, tmp_path: Path) -> None:
    run = agent.new_run("env")
    pwned = tmp_path / "pwned"  # what a value run through a shell would create
    env = {
        "Q": 'it\'s "quoted" `x`',
        "CMD": f"$(touch {pwned}); rm -rf nothing; echo $HOME",
        "NL": "line one\nline two\n",
        "UNI": "héllo ☃ 日本 \t tab",
        "EMPTY": "",
    }
    out = tmp_path / "env.json"
    agent.start(agent.spec(run, [sys.executable, "envdump.py", str(out), *env, "AVA_RUN_ID"], env=env))
    assert agent.wait_final(run)["state"] == "succeeded"
    got = json.loads(out.read_text())
    assert {k: bytes.fromhex(got[k]).decode() for k in env} == env
    assert bytes.fromhex(got["AVA_RUN_ID"]).decode() == run
    assert not pwned.exists()


@needs_cgroups
def test_run_survives_its_caller_being_killed(agent: Agent) -> None:
    run = agent.new_run("detach")
    spec = agent.spec(run, [sys.executable, "ranks.py"], env={"JOB_SLEEP": "60"})
    path = agent.jobs / "detach.json"
    path.write_text(json.dumps(spec))
    # Like an SSH session: a shell that waits after start; it and its group are SIGKILLed.
    caller = subprocess.Popen(
        ["sh", "-c", f"{sys.executable} -m ava.agent start {path}; sleep 60"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert caller.stdout is not None
    line = caller.stdout.readline()  # start returned although the job runs: stdio detached
    assert json.loads(line)["state"] == "running"
    os.killpg(caller.pid, signal.SIGKILL)
    caller.wait()
    killed = time.time()
    # The monitor outlived its caller: it still beats after the kill, and the job still runs.
    st = wait_for(lambda: (s := agent.status(run))["heartbeat"] > killed and s, 10)
    assert st, f"no heartbeat after the caller was killed: {agent.status(run)}"
    assert st["state"] == "running", st
    assert agent.stop(run, grace=0.5)[1]["stopped"] is True
    assert_gone(agent, run)


@needs_cgroups
def test_logs_follow_streams_until_the_attempt_ends(agent: Agent) -> None:
    run = agent.new_run("logs")
    agent.start(agent.spec(run, torchrun("ranks.py"), env={"JOB_SLEEP": "1"}))
    proc = subprocess.run(
        [sys.executable, "-m", "ava.agent", "logs", str(agent.work), run, "--attempt", "1", "--follow"],
        cwd=REPO, capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    assert b"hello from rank 0" in proc.stdout and b"hello from rank 1" in proc.stdout
    assert agent.status(run)["state"] == "succeeded"
    size = len(proc.stdout)
    tail = subprocess.run(
        [sys.executable, "-m", "ava.agent", "logs", str(agent.work), run, "--attempt", "1", "--offset", str(size - 10)],
        cwd=REPO, capture_output=True, timeout=30, check=True,
    )  # fmt: skip
    assert tail.stdout == proc.stdout[-10:]


@needs_cgroups
def test_progress_file_reaches_the_status(agent: Agent) -> None:
    run = agent.new_run("prog")
    script = "import os, time; open(os.environ['AVA_PROGRESS_FILE'], 'w').write('42 1700000000.5'); time.sleep(30)"
    agent.start(agent.spec(run, [sys.executable, "-c", script]))
    st = wait_for(lambda: (s := agent.status(run))["progress"] and s, 10)
    assert st["progress"] == {"step": 42, "time": 1700000000.5}
    agent.stop_clean(run, grace=0)
    assert_gone(agent, run)


def test_list_and_status_of_unknown_runs(tmp_path: Path) -> None:
    agent = Agent(tmp_path / "w", tmp_path, "unused")
    assert agent.cli("list", str(agent.work)) == (0, {"runs": []})
    rc, out = agent.cli("status", str(agent.work), "nope")
    assert rc == 1 and out["error"] == "not-found"


def test_zipapp_is_deterministic() -> None:
    blob, digest = build_zipapp()
    assert build_zipapp() == (blob, digest) and len(digest) == 64


def _code_file(pyz: Path) -> str:
    """Where the code of a module the zipapp runs came from, as its functions say."""
    probe = f"import sys; sys.path.insert(0, {str(pyz)!r}); import avaagent.layout as m; print(m.run_dir.__code__.co_filename)"
    done = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_shipped_zipapp_runs_its_bytecode_and_falls_back_to_sources_on_another_python(tmp_path: Path) -> None:
    shipped = tmp_path / "shipped.pyz"
    shipped.write_bytes(with_bytecode(build_zipapp()[0]))
    assert _code_file(shipped) == "avaagent/layout.py"  # compiled at build time: no compile here
    # Another Python's magic number: zipimport skips the pycs and compiles the sources.
    other = tmp_path / "other.pyz"
    with zipfile.ZipFile(shipped) as source, zipfile.ZipFile(other, "w") as out:
        for info in source.infolist():
            data = source.read(info)
            out.writestr(info, (b"\0\0" + data[2:]) if info.filename.endswith(".pyc") else data)
    assert _code_file(other) == f"{other}/avaagent/layout.py"


@needs_cgroups
@pytest.mark.parametrize("shipped", [False, True], ids=["sources", "with-bytecode"])
def test_zipapp_runs_isolated_from_a_temp_dir(tmp_path: Path, shipped: bool) -> None:
    blob, _ = build_zipapp()
    blob = with_bytecode(blob) if shipped else blob
    pyz = tmp_path / "x" / "agent.pyz"
    pyz.parent.mkdir()
    pyz.write_bytes(blob)
    for agent in make_agent(tmp_path, prefix=[sys.executable, "-I", str(pyz)]):
        run = agent.new_run("pyz")
        rc, st = agent.start(agent.spec(run, torchrun("ranks.py")))
        assert rc == 0, st
        assert agent.wait_final(run)["state"] == "succeeded"
        assert agent.cli("list", str(agent.work))[1]["runs"][0]["run"] == run
        assert_gone(agent, run)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-I", str(pyz), "status", str(tmp_path / "w"), "nope"],
        cwd=tmp_path, env={**env, "PYTHONPATH": ""}, capture_output=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and json.loads(proc.stdout)["error"] == "not-found"


@needs_cgroups
def test_status_long_poll_answers_when_the_attempt_ends_not_at_its_timeout(agent: Agent, tmp_path: Path) -> None:
    run = agent.new_run("poll")
    release = tmp_path / "release"
    job = f"import os, time\nwhile not os.path.exists({str(release)!r}): time.sleep(0.05)"
    rc, st = agent.start(agent.spec(run, [sys.executable, "-c", job]))
    assert rc == 0 and st["state"] == "running", st
    first = agent.status(run)
    # Unchanged: the agent holds the request for --wait seconds, then answers with a fresh heartbeat.
    asked = time.monotonic()
    _, same = agent.cli("status", str(agent.work), run, "--since", first["digest"], "--wait", "0.3")
    assert time.monotonic() - asked >= 0.3
    assert same["digest"] == first["digest"] and same["state"] == "running"
    # The job ends during a long wait: the answer comes as the status changes, long before 20 s.
    threading.Timer(0.5, release.touch).start()
    asked = time.monotonic()
    _, final = agent.cli("status", str(agent.work), run, "--since", first["digest"], "--wait", "20")
    assert time.monotonic() - asked < 10.0
    assert final["state"] == "succeeded" and final["digest"] != first["digest"]
    assert_gone(agent, run)
    # Ended and verified here: a final answer comes at once and says nothing is left to stop.
    asked = time.monotonic()
    _, again = agent.cli("status", str(agent.work), run, "--since", final["digest"], "--wait", "20")
    assert time.monotonic() - asked < 10.0
    assert again["state"] == "succeeded" and again["ended_clean"] is True


def test_a_spec_read_from_stdin_starts_the_attempt_and_is_kept_owner_only(agent: Agent) -> None:
    """How ava starts an attempt: the spec (the run's environment, secrets included) on the
    start's standard input, never on a command line nor in a file the login's umask made."""
    run = agent.new_run("stdin")
    spec = agent.spec(run, [sys.executable, "-c", "import os; print('got', os.environ['AVA_T_SECRET'])"])
    spec["env"] = {"AVA_T_SECRET": "s3cr3t"}
    data = json.dumps(spec).encode()
    rc, answer = agent.cli("start", "-", stdin=data)
    assert rc == 0 and answer["state"] in ("running", "succeeded"), answer
    final = agent.wait_final(run)
    assert final["state"] == "succeeded", final
    kept = agent.work / "runs" / run / "attempt-1" / "spec.json"
    assert kept.read_bytes() == data and stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert b"got s3cr3t" in (agent.work / "runs" / run / "attempt-1" / "output.log").read_bytes()
    rc, answer = agent.cli("start", "-", stdin=b"{not json")
    assert rc != 0 and "spec (stdin): not JSON" in json.dumps(answer), answer


def test_a_start_whose_expectations_do_not_hold_says_what_and_starts_nothing(agent: Agent) -> None:
    run = agent.new_run("stale")
    spec = agent.spec(run, [sys.executable, "-c", "print('ran')"])
    path = agent.jobs / f"spec-{run}-1.json"
    path.write_text(json.dumps(spec))
    listener = __import__("socket").socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    taken = listener.getsockname()[1]
    try:
        expect = ["--expect-tree", "0123456789abcdef", "--expect-port", str(taken)]
        route = ["--expect-route", "127.0.0.1", "auto", "127.0.0.9", "lo", "/nowhere", "1"]
        rc, answer = agent.cli("start", str(path), *expect, *route)
    finally:
        listener.close()
    assert rc == 1 and answer["error"] == "stale", answer
    assert answer["trees_missing"] == ["0123456789abcdef"]
    assert answer["route"]["address"] == "127.0.0.1" and answer["port"] != taken
    assert not (agent.work / "runs" / run / "attempt-1").exists()  # nothing started
