"""ava in CI (issue 16): `ava wait`, `ava ps RUN --json`, `--stop-on-interrupt`, and a CI job's
shell script that uses only --detach, wait, ps --json, logs and stop, from a non-TTY shell."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, processes_of, run_ava
from tests.support.cluster import Cluster
from tests.support.terminal import plain_env, write_recipe

TWO = ["n1", "n2"]


@pytest.fixture()
def home(tmp_path: Path) -> dict[str, str]:
    return {"AVA_HOME": str(tmp_path / "home")}


def detach(recipe: Path, inventory: Path, home: dict[str, str], *sets: str) -> str:
    args = ["train", str(recipe), "--detach"]
    for assignment in sets:
        args += ["--set", assignment]
    done = run_ava(*args, inventory=inventory, env=home)
    assert done.returncode == 0, done.stderr
    (run_id,) = done.stdout.split()  # stdout is the run id alone: RUN=$(ava train … --detach)
    return run_id


def test_wait_exits_with_the_runs_code_for_a_succeeding_and_a_failing_run(
    cluster: Cluster, home: dict[str, str], tmp_path: Path
) -> None:
    inventory = cluster.inventory(TWO)
    recipe = write_recipe(tmp_path / "spam", nodes=2, lines=2)
    good = detach(recipe, inventory, home)
    bad = detach(recipe, inventory, home, "env.SPAM_FAIL=7", "resources.nodes=1")

    done = run_ava("wait", good, "--json", env=home, timeout=300)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["version"] == 1 and shown["id"] == good and shown["state"] == "succeeded"
    assert f"run {good} succeeded after" in done.stderr

    done = run_ava("wait", bad[:-2], env=home, timeout=300)  # a unique prefix names the run
    assert done.returncode == 1, done.stderr
    assert f"run {bad} failed after" in done.stderr and "exited 7" in done.stderr

    one = json.loads(run_ava("ps", bad, "--json", env=home).stdout)
    assert one["version"] == 1 and one["state"] == "failed" and one["exit_code"] == 1
    assert one["attempts"][-1]["cause"].endswith("exited 7")


def test_wait_timeout_leaves_the_run_going_and_exits_3(cluster: Cluster, home: dict[str, str], tmp_path: Path) -> None:
    inventory = cluster.inventory(["n1"])
    run_id = detach(REPO / "tests" / "data" / "recipes" / "echo", inventory, home, "env.ECHO_SLEEP=60")
    try:
        started = time.monotonic()
        done = run_ava("wait", run_id, "--timeout", "3s", env=home, timeout=60)
        assert done.returncode == 3, done.stderr
        assert time.monotonic() - started < 30
        assert "--timeout" in done.stderr and f"ava stop {run_id}" in done.stderr
        assert json.loads(run_ava("ps", run_id, "--json", env=home).stdout)["state"] in ("starting", "running")
    finally:
        stopped = run_ava("stop", run_id, "--json", inventory=inventory, env=home, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    report = json.loads(stopped.stdout)
    assert report == {"version": 1, "run": run_id, "stopped": True, "nodes": ["n1"], "unreachable": {}}
    assert processes_of(run_id) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_stop_on_interrupt_stops_the_run_on_every_node(cluster: Cluster, home: dict[str, str], sig: int) -> None:
    inventory = cluster.inventory(TWO)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ava",
            "--inventory",
            str(inventory),
            "train",
            str(REPO / "tests/data/recipes/echo"),
            "--set",
            "resources.nodes=2",
            "--set",
            "env.ECHO_SLEEP=120",
            "--stop-on-interrupt",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=plain_env(home),
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 120
        run_id = None
        while time.monotonic() < deadline:
            listed = json.loads(run_ava("ps", "--json", env=home).stdout or "[]")
            if listed and listed[-1]["state"] == "running" and processes_of(listed[-1]["id"]):
                run_id = listed[-1]["id"]
                break
            time.sleep(0.5)
        assert run_id, "the run never got going"
        process.send_signal(sig)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err[-2000:]
    assert "--stop-on-interrupt" in err and "detached" not in err
    record = json.loads(run_ava("ps", run_id, "--json", env=home).stdout)
    assert record["state"] == "stopped"
    assert processes_of(run_id) == []  # nothing left holding the nodes


def test_stop_on_interrupt_with_detach_is_a_usage_error(home: dict[str, str]) -> None:
    done = run_ava("train", "tests/data/recipes/echo", "--detach", "--stop-on-interrupt", env=home)
    assert done.returncode == 2 and "--stop-on-interrupt" in done.stderr


CI_SCRIPT = r"""
set -euo pipefail
RUN=$(ava train "$RECIPE" --detach)
ava wait "$RUN" --timeout 5m
test "$(ava ps "$RUN" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')" = succeeded
ava logs "$RUN" | grep -c ' of rank ' > "$OUT/lines"

LONG=$(ava train "$RECIPE" --detach --set env.SPAM_FAIL=0 --set env.SPAM_LINES=0 --set resources.nodes=1 \
       --set 'run.script="sleepy.py"')
ava ps "$LONG" --json > "$OUT/long.json"
ava stop "$LONG"
if ava wait "$LONG"; then echo "a stopped run waited as a success" >&2; exit 9; fi
ava ps "$LONG" --json > "$OUT/stopped.json"
echo all-done
"""


def test_a_ci_script_with_detach_wait_ps_logs_stop(cluster: Cluster, home: dict[str, str], tmp_path: Path) -> None:
    inventory = cluster.inventory(TWO)
    recipe = write_recipe(tmp_path / "spam", nodes=2, lines=3)
    (recipe / "sleepy.py").write_text("import time\nprint('sleeping', flush=True)\ntime.sleep(300)\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ava").write_text(f'#!/bin/sh\nexec {sys.executable} -m ava "$@"\n')
    (bin_dir / "ava").chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    env = plain_env(
        {
            **home,
            "AVA_INVENTORY": str(inventory),
            "RECIPE": str(recipe),
            "OUT": str(out),
            "PATH": f"{bin_dir}:{plain_env()['PATH']}",
            "PYTHONPATH": str(REPO),
        }
    )
    done = subprocess.run(
        ["bash", "-c", CI_SCRIPT],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.strip() == "all-done"
    assert int((out / "lines").read_text()) == 6  # 3 lines from each of 2 ranks, none cut
    assert json.loads((out / "long.json").read_text())["version"] == 1
    stopped = json.loads((out / "stopped.json").read_text())
    assert stopped["state"] == "stopped" and processes_of(stopped["id"]) == []


def test_logs_filters_by_node_and_rank_tails_and_refuses_what_the_run_never_had(
    cluster: Cluster, home: dict[str, str], tmp_path: Path
) -> None:
    inventory = cluster.inventory(TWO)
    recipe = write_recipe(tmp_path / "spam", nodes=2, lines=5)
    done = run_ava("train", str(recipe), inventory=inventory, env=home, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    run_id = json.loads(run_ava("ps", "--json", env=home).stdout)[-1]["id"]

    def lines(*options: str) -> list[str]:
        shown = run_ava("logs", run_id, *options, inventory=inventory, env=home)
        assert shown.returncode == 0, shown.stderr
        return [line for line in shown.stdout.splitlines() if " of rank " in line]

    assert len(lines()) == 10
    ranked = lines("--rank", "1")
    assert len(ranked) == 5 and all(line.startswith("n2/1 ") or line.startswith("n1/1 ") for line in ranked)
    assert [line.split("| ", 1)[1] for line in lines("--rank", "0", "--tail", "2")] == [
        "line 3 of rank 0",
        "line 4 of rank 0",
    ]
    assert len(lines("--tail", "1")) == 2  # the last line of each node
    assert {line.split("/", 1)[0] for line in lines("--node", "n2")} == {"n2"}
    time.sleep(2)
    assert lines("--since", "1s") == []  # the only attempt ended before that

    for options, words in (
        (["--node", "n9"], "no node n9"),
        (["--rank", "2"], "no rank 2"),
        (["--since", "soon"], "--since"),
    ):
        refused = run_ava("logs", run_id, *options, inventory=inventory, env=home)
        assert refused.returncode == 2 and words in refused.stderr, refused.stderr
