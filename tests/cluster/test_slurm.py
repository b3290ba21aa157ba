"""The Slurm back-end against a real Slurm (tests/support/slurm.py): slurmctld, one slurmd per
test node in its namespaces, munge; n1 is the login node, reached over SSH like any other.
No mock of sbatch, squeue, scancel or sinfo."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, processes_of, run_ava
from tests.support import slurm as slurm_support
from tests.support.leak_check import snapshot
from tests.support.slurm import SlurmCluster

slurm_cluster = slurm_support.slurm_cluster  # the module's fixture: a 3-node cluster with Slurm

DDP = REPO / "recipes" / "ddp-minimal"
STEPS = REPO / "tests" / "data" / "recipes" / "steps"


@pytest.fixture(autouse=True)
def nothing_left_in_slurm(slurm_cluster: SlurmCluster) -> Iterator[None]:
    """After each test, as tests/support/leak_check.py does for the SSH cluster: no process of
    a run on any node, no lease held, no job left in the queue, and no background supervisor
    left running here. What is left is ended too, so that one failing test leaves nothing to
    the next ones (a detached run's supervisor would watch its job forever)."""
    before = snapshot(slurm_cluster.cluster)
    supervisors_before = background_supervisors()
    yield
    deadline = time.monotonic() + 15
    while True:
        left = snapshot(slurm_cluster.cluster).minus(before)
        queued = slurm_cluster.sh("squeue", "-h", check=False).stdout.strip()
        supervisors = background_supervisors() - supervisors_before
        if not (left or queued or supervisors) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for pid in supervisors:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if queued:
        slurm_cluster.sh("scancel", "--full", "--partition", slurm_cluster.partition, check=False)
    assert not supervisors, f"this test left background supervisors running: {sorted(supervisors)}"
    assert not left, f"this test left on the Slurm nodes: {left}"
    assert not queued, f"this test left jobs in the queue:\n{queued}"


def background_supervisors() -> set[int]:
    """Pids of ava's background Slurm supervisors on this machine."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if b"ava.slurm.background" in (entry / "cmdline").read_bytes():
                    found.add(int(entry.name))
    return found


@pytest.fixture()
def home(tmp_path: Path) -> dict[str, str]:
    return {"AVA_HOME": str(tmp_path / "home")}


class LiveRun:
    """`ava train` in the background, its lines collected as they arrive."""

    def __init__(self, args: list[str], inventory: Path, home: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ava", "--inventory", str(inventory), *args],
            cwd=REPO,
            env={**os.environ, **home, "COLUMNS": "200"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, pattern: str, timeout: float = 180.0) -> str:
        deadline, regex = time.monotonic() + timeout, re.compile(pattern)
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if regex.search(line):
                    return line
            if self.process.poll() is not None:
                self._reader.join(2)
                if not any(regex.search(line) for line in self.lines):
                    break
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r}:\n" + self.text()[-3000:])

    def text(self) -> str:
        return "\n".join(self.lines)

    def finish(self, timeout: float = 300.0) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def ps(home: dict[str, str]) -> list[dict]:  # type: ignore[type-arg]
    listed = run_ava("ps", "--json", env=home)
    assert listed.returncode == 0, listed.stderr
    return list(json.loads(listed.stdout))


def jobs_of(home: dict[str, str], run_id: str) -> list[str]:
    state = json.loads((Path(home["AVA_HOME"]) / "runs" / run_id / "slurm.json").read_text())
    return [str(j["job"]) for j in state["jobs"]]


def run_id_in(text: str) -> str:
    match = re.search(r"ava: run (\S+) on Slurm", text)
    assert match, text[-2000:]
    return match.group(1)


def final_sha(text: str) -> str:
    match = re.search(r"final step \d+ sha256 ([0-9a-f]{64})", text)
    assert match, text[-3000:]
    return match.group(1)


def accounted(slurm: SlurmCluster, job: str) -> str:
    """The job's final state as Slurm's accounting has it: sacct where slurmdbd runs, else the
    jobcomp record and scontrol (what this Slurm keeps without a database)."""
    if slurm.accounting:
        # slurmctld hands the job's end to slurmdbd a moment after squeue stops listing it.
        deadline = time.monotonic() + 20
        while True:
            out = slurm.sh("sacct", "-n", "-P", "-X", "-j", job, "-o", "State").stdout.split()
            if (out and out[0] not in ("PENDING", "RUNNING", "COMPLETING")) or time.monotonic() > deadline:
                return out[0] if out else ""
            time.sleep(0.5)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and f"JobId={job} " not in slurm.completed():
        time.sleep(0.5)
    line = next((l for l in slurm.completed().splitlines() if l.startswith(f"JobId={job} ")), "")
    found = re.search(r"JobState=(\S+)", line)
    return found.group(1) if found else ""


def test_ddp_minimal_on_two_of_three_slurm_nodes(slurm_cluster: SlurmCluster, home: dict[str, str]) -> None:
    inventory = slurm_cluster.inventory()
    secret = "env.AVA_T_TOKEN=s3cr3t-ddp-value"
    done = run_ava(
        "train", str(DDP), "--set", "resources.nodes=2", "--set", secret, inventory=inventory, env=home, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = re.findall(r"^(n\d)/(\d+)\s*\| rank (\d+) world_size (\d+)$", done.stdout, re.M)
    procs = 2  # the recipe's procs_per_node
    assert sorted(int(r[2]) for r in ranks) == list(range(2 * procs)), done.stdout[-3000:]
    assert {r[3] for r in ranks} == {str(2 * procs)}  # every rank sees the world of both nodes
    assert len({r[0] for r in ranks}) == 2
    run_id = run_id_in(done.stderr)
    (record,) = ps(home)
    assert record["id"] == run_id and record["state"] == "succeeded"
    assert len(record["nodes"]) == 2 and len(record["attempts"]) == 1
    (job,) = jobs_of(home, run_id)
    assert accounted(slurm_cluster, job) == "COMPLETED"
    assert processes_of(run_id) == []
    # The environment's values reach the shared filesystem in 0600 files only (the template, the
    # agents' specs), never the batch script or the shipped code.
    holding = [p for p in slurm_cluster.shared.rglob("*") if p.is_file() and b"s3cr3t-ddp-value" in p.read_bytes()]
    assert holding and all(p.stat().st_mode & 0o777 == 0o600 for p in holding), holding
    assert not [p for p in holding if p.suffix == ".sbatch" or "trees" in p.parts or "objects" in p.parts]


def test_the_same_recipe_file_runs_unchanged_on_ssh_and_on_slurm(
    slurm_cluster: SlurmCluster, home: dict[str, str]
) -> None:
    recipe = DDP / "recipe.toml"
    before = hashlib.sha256(recipe.read_bytes()).hexdigest()
    on_ssh = run_ava("train", str(DDP), inventory=slurm_cluster.cluster.inventory(["n2"]), env=home, timeout=300)
    assert on_ssh.returncode == 0, on_ssh.stdout[-2000:] + on_ssh.stderr[-2000:]
    on_slurm = run_ava("train", str(DDP), inventory=slurm_cluster.inventory(), env=home, timeout=300)
    assert on_slurm.returncode == 0, on_slurm.stdout[-2000:] + on_slurm.stderr[-2000:]
    for out in (on_ssh.stdout, on_slurm.stdout):
        assert sorted(re.findall(r"\| rank (\d) world_size 2$", out, re.M)) == ["0", "1"], out[-2000:]
    assert hashlib.sha256(recipe.read_bytes()).hexdigest() == before
    assert [r["state"] for r in ps(home)] == ["succeeded", "succeeded"]


def test_nodes_shows_the_partitions_nodes_from_sinfo(slurm_cluster: SlurmCluster) -> None:
    shown = run_ava("nodes", "--json", inventory=slurm_cluster.inventory())
    assert shown.returncode == 0, shown.stderr
    nodes = json.loads(shown.stdout)
    assert sorted(n["name"] for n in nodes) == ["n1", "n2", "n3"]
    assert all(n["partitions"] == [slurm_cluster.partition] and n["version"] == 1 for n in nodes)


def test_doctor_says_isolation_is_slurms(slurm_cluster: SlurmCluster) -> None:
    shown = run_ava("doctor", "--json", inventory=slurm_cluster.inventory())
    report = json.loads(shown.stdout)
    checks = {c["check"]: c for c in report["checks"]}
    assert shown.returncode == 0 and report["status"] == "warn", shown.stdout + shown.stderr
    assert {k: c["status"] for k, c in checks.items() if k != "isolation"} == {
        "login": "pass",
        "slurm": "pass",
        "shared_dir": "pass",
        "python": "pass",
        "accounting": "pass" if slurm_cluster.accounting else "warn",
    }
    # The test Slurm runs task/none (several slurmd share one kernel here): said, with the fix.
    assert "Slurm's (TaskPlugin=task/none" in checks["isolation"]["detail"] and checks["isolation"]["fix"]


def test_dry_run_prints_the_whole_batch_script_and_submits_nothing(slurm_cluster: SlurmCluster) -> None:
    shown = run_ava("train", str(DDP), "--dry-run", "--set", "resources.nodes=2", inventory=slurm_cluster.inventory())
    assert shown.returncode == 0, shown.stderr
    assert "#SBATCH --nodes=2\n" in shown.stdout and "exec srun " in shown.stdout
    assert slurm_cluster.sh("squeue", "-h").stdout.strip() == ""


def test_a_detached_run_is_waited_for_and_a_pending_job_says_why(
    slurm_cluster: SlurmCluster, home: dict[str, str]
) -> None:
    inventory = slurm_cluster.inventory()
    # Every node busy with a job of someone else's: ava's job waits for Resources, and says so.
    blocker = slurm_cluster.sh(
        "sbatch", "--parsable", "--exclusive", "-N3", "--output=/dev/null", "--wrap", "sleep 300"
    ).stdout.strip()
    try:
        started = run_ava("train", str(DDP), "--detach", inventory=inventory, env=home)
        assert started.returncode == 0, started.stderr
        run_id = started.stdout.strip()
        log = Path(home["AVA_HOME"]) / "runs" / run_id / "output.log"
        deadline = time.monotonic() + 60
        while "pending (Resources)" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "pending (Resources)" in log.read_text(), log.read_text()
    finally:
        slurm_cluster.sh("scancel", blocker, check=False)
    waited = run_ava("wait", run_id, "--timeout", "3m", env=home, timeout=240)
    assert waited.returncode == 0, waited.stdout + waited.stderr + log.read_text()[-2000:]
    assert re.search(r"^n\d/\d+ \| rank 1 world_size 2$", log.read_text(), re.M), log.read_text()[-2000:]
    assert ps(home)[0]["state"] == "succeeded"
    shown = run_ava("logs", run_id, "--rank", "1", env=home)
    assert shown.returncode == 0, shown.stderr
    assert "rank 1 world_size 2" in shown.stdout
    assert all(re.match(r"n\d/1 \| ", line) for line in shown.stdout.splitlines()), shown.stdout[-2000:]


def test_a_crashed_rank_restarts_in_the_same_allocation_within_the_budget(
    slurm_cluster: SlurmCluster, home: dict[str, str]
) -> None:
    overrides = ["resources.nodes=2", "failover.max_restarts=1", "failover.backoff=1s"]
    overrides.append('run.args=["--steps", "3", "--fail-rank", "3"]')
    sets = [word for o in overrides for word in ("--set", o)]
    done = run_ava("train", str(DDP), *sets, inventory=slurm_cluster.inventory(), env=home, timeout=300)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    (record,) = ps(home)
    assert [a["kind"] for a in record["attempts"]] == ["crash", "crash"]
    # Rank 3 leaves with sys.exit(1), which no excepthook sees; its node-mate rank 2 raises on the
    # broken all_reduce first: the first failure is on rank 3's node, rank 2 or 3.
    assert all(a["failed_rank"] in (2, 3) for a in record["attempts"]), record["attempts"]
    job, again = jobs_of(home, record["id"])
    assert job == again  # one allocation, two attempts
    assert "same allocation" in done.stderr
    assert slurm_cluster.sh("squeue", "-h", "-j", job, check=False).stdout.strip() == ""
    assert processes_of(record["id"]) == []


def test_prefetch_warms_the_cache_of_every_allocated_node(slurm_cluster: SlurmCluster, home: dict[str, str]) -> None:
    import logging

    import s3fs  # type: ignore[import-untyped]  # s3fs ships no type hints
    from moto.server import ThreadedMotoServer

    from tests.support import nodepy

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address=slurm_cluster.cluster.gateway, port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=url)
        fs.mkdir("data")
        fs.pipe("data/shards/a.bin", os.urandom(3 << 20))
        sets = ["resources.nodes=2", 'data.prefetch=["s3://data/shards/*.bin"]', f"env.AWS_ENDPOINT_URL={url}"]
        sets += [
            "env.AWS_ACCESS_KEY_ID=testing",
            "env.AWS_SECRET_ACCESS_KEY=testing",
            "env.AWS_DEFAULT_REGION=us-east-1",
        ]
        inventory = slurm_cluster.inventory(python=nodepy.node_python(s3fs=True))
        argv = [word for s in sets for word in ("--set", s)]
        done = run_ava("train", str(DDP), *argv, inventory=inventory, env=home, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    finally:
        server.stop()
    (record,) = ps(home)
    for node in record["nodes"]:
        cache = slurm_cluster.shared / "ava" / "nodes" / node / "cache"
        cached = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
        assert cached >= 3 << 20, (node, cached)


def test_stop_cancels_the_job_and_leaves_no_process(slurm_cluster: SlurmCluster, home: dict[str, str]) -> None:
    inventory = slurm_cluster.inventory()
    args = ["--set", "resources.nodes=2", "--set", 'run.args=["--steps", "600", "--step-time", "0.2"]']
    args += ["--set", f"checkpoint.dir={slurm_cluster.shared}/ckpt/{{run}}"]
    run = LiveRun(["train", str(STEPS), *args], inventory, home)
    try:
        run.wait_line(r"\| step 3$")
        run_id = run_id_in(run.text())
        stopped = run_ava("stop", run_id, inventory=inventory, env=home, timeout=120)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert run.finish(timeout=60) == 1
    finally:
        run.kill()
    (job,) = jobs_of(home, run_id)
    assert slurm_cluster.sh("squeue", "-h", "-j", job, check=False).stdout.strip() == ""
    deadline = time.monotonic() + 10
    while processes_of(run_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_of(run_id) == []
    (record,) = ps(home)
    assert record["state"] == "stopped"


def steps_args(slurm: SlurmCluster, steps: int) -> list[str]:
    """The steps recipe on 2 nodes, a step every 0.2 s, its checkpoints on the shared filesystem."""
    args = ["resources.nodes=2", f'run.args=["--steps", "{steps}", "--step-time", "0.2"]']
    args.append(f"checkpoint.dir={slurm.shared}/ckpt/{{run}}")
    return [word for a in args for word in ("--set", a)]


def output_log(home: dict[str, str], run_id: str) -> str:
    path = Path(home["AVA_HOME"]) / "runs" / run_id / "output.log"
    return path.read_text() if path.exists() else ""  # a background supervisor makes it


def wait_for_step_after(home: dict[str, str], run_id: str, step: int, timeout: float = 60.0) -> int:
    """The highest step rank 0 reported in the run's output.log, once it is past STEP."""
    deadline = time.monotonic() + timeout
    while True:
        steps = [int(s) for s in re.findall(r"^n\d/0 \| step (\d+)$", output_log(home, run_id), re.M)]
        if steps and max(steps) > step:
            return max(steps)
        assert time.monotonic() < deadline, f"no step after {step}:\n" + output_log(home, run_id)[-2000:]
        time.sleep(0.5)


def interrupted(
    slurm_cluster: SlurmCluster, inventory: Path, home: dict[str, str], *extra: str, timeout: float = 60
) -> tuple[LiveRun, str]:
    """A foreground `ava train` of the steps recipe, Ctrl-C'd once it trains: it exits 130."""
    run = LiveRun(["train", str(STEPS), *steps_args(slurm_cluster, 600), *extra], inventory, home)
    try:
        run.wait_line(r"\| step 3$")
        run_id = run_id_in(run.text())
        run.process.send_signal(signal.SIGINT)
        assert run.finish(timeout=timeout) == 130, run.text()[-3000:]
    finally:
        run.kill()
    return run, run_id


def test_ctrl_c_detaches_and_the_job_keeps_running_until_ava_stop(
    slurm_cluster: SlurmCluster, home: dict[str, str]
) -> None:
    inventory = slurm_cluster.inventory()
    run, run_id = interrupted(slurm_cluster, inventory, home)
    assert f"detached from {run_id}" in run.text() and f"reattach: ava attach {run_id}" in run.text(), run.text()
    (job,) = jobs_of(home, run_id)
    assert slurm_cluster.sh("squeue", "-h", "-j", job, "-o", "%T", check=False).stdout.strip() == "RUNNING"
    # A background supervisor took over: ps and wait see the run going on, its lines keep coming.
    (record,) = ps(home)
    assert record["state"] == "running", record
    waited = run_ava("wait", run_id, "--timeout", "3s", env=home, timeout=60)
    assert waited.returncode == 3 and "still running" in waited.stderr, waited.stderr
    last = max(int(s) for s in re.findall(r"\| step (\d+)$", run.text(), re.M))
    wait_for_step_after(home, run_id, last + 3)
    stopped = run_ava("stop", run_id, inventory=inventory, env=home, timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert slurm_cluster.sh("squeue", "-h", "-j", job, check=False).stdout.strip() == ""
    deadline = time.monotonic() + 20
    while (processes_of(run_id) or ps(home)[0]["state"] != "stopped") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_of(run_id) == []
    assert ps(home)[0]["state"] == "stopped"


def test_ctrl_c_with_stop_on_interrupt_cancels_the_job(slurm_cluster: SlurmCluster, home: dict[str, str]) -> None:
    inventory = slurm_cluster.inventory()
    run, run_id = interrupted(slurm_cluster, inventory, home, "--stop-on-interrupt", timeout=90)
    assert "(--stop-on-interrupt)" in run.text() and "squeue lists none of it" in run.text(), run.text()[-2000:]
    (job,) = jobs_of(home, run_id)
    assert slurm_cluster.sh("squeue", "-h", "-j", job, check=False).stdout.strip() == ""
    deadline = time.monotonic() + 10
    while processes_of(run_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_of(run_id) == []
    (record,) = ps(home)
    assert record["state"] == "stopped" and record["attempts"][0]["cause"] == "stopped by --stop-on-interrupt"


def test_attach_takes_over_a_detached_run_and_hands_it_back_on_ctrl_c(
    slurm_cluster: SlurmCluster, home: dict[str, str]
) -> None:
    inventory = slurm_cluster.inventory()
    args = steps_args(slurm_cluster, 90)
    started = run_ava("train", str(STEPS), *args, "--detach", inventory=inventory, env=home)
    assert started.returncode == 0, started.stderr
    run_id = started.stdout.strip()
    seen = wait_for_step_after(home, run_id, 2, timeout=120)
    attached = LiveRun(["attach", run_id], inventory, home)
    try:
        attached.wait_line(rf"ava: attached to {run_id} \(attempt 1\)")
        # Its lines now come to this terminal: a step after those the background supervisor wrote.
        line = attached.wait_line(r"^n\d/0\s*\| step \d+$", timeout=60)
        assert int(line.rsplit(" ", 1)[1]) > seen, (line, seen)
        attached.process.send_signal(signal.SIGINT)
        assert attached.finish(timeout=60) == 130, attached.text()[-3000:]
    finally:
        attached.kill()
    assert f"reattach: ava attach {run_id}" in attached.text()
    waited = run_ava("wait", run_id, "--timeout", "3m", env=home, timeout=240)
    assert waited.returncode == 0, waited.stdout + waited.stderr + output_log(home, run_id)[-2000:]
    # Three supervisors in turn (background, attach, background) wrote the run's output.log:
    # every step once, none skipped, none repeated; one attempt, one job.
    steps = [int(s) for s in re.findall(r"^n\d/0 \| step (\d+)$", output_log(home, run_id), re.M)]
    assert steps == list(range(1, 91)), steps
    (record,) = ps(home)
    assert record["state"] == "succeeded" and len(record["attempts"]) == 1
    assert len(jobs_of(home, run_id)) == 1


def test_a_killed_node_is_excluded_and_the_run_ends_with_the_unfaulted_weights(
    slurm_cluster: SlurmCluster, home: dict[str, str], tmp_path: Path
) -> None:
    """Last in the module: the killed node stays dead until the module's Slurm is torn down."""
    inventory = slurm_cluster.inventory()
    shared = slurm_cluster.shared / "ckpt"
    args = ["--set", "resources.nodes=2", "--set", f"checkpoint.dir={shared}/{{run}}"]
    steps = ["--set", 'run.args=["--steps", "60", "--ckpt-every", "10", "--step-time", "0.25"]']
    reference = run_ava(
        "train",
        str(STEPS),
        *args,
        "--set",
        'run.args=["--steps", "60", "--ckpt-every", "10", "--step-time", "0"]',
        inventory=inventory,
        env={"AVA_HOME": str(tmp_path / "reference")},
        timeout=300,
    )
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]
    run = LiveRun(["train", str(STEPS), *args, *steps], inventory, home)
    try:
        line = run.wait_line(r"^n\d/\d+\s*\| step (1[5-9]|2\d)$")
        nodes = sorted(set(re.findall(r"^(n\d)/", run.text(), re.M)))
        victim = next(n for n in reversed(nodes) if n != slurm_cluster.login)
        slurm_cluster.kill_node(victim)
        assert run.finish() == 0, run.text()[-4000:]
    finally:
        run.kill()
    (record,) = ps(home)
    first, second = record["attempts"]
    assert first["kind"] == "node-lost" and victim in first["cause"], first
    assert second["state"] == "succeeded" and victim not in second["nodes"] and len(second["nodes"]) == 2
    run_id = record["id"]
    job1, job2 = jobs_of(home, run_id)
    submitted = Path(slurm_cluster.shared / "ava" / "slurm" / run_id / "attempt-2.sbatch").read_text()
    assert f"#SBATCH --exclude={victim}\n" in submitted
    assert "resumed from step" in run.text() and line
    assert final_sha(run.text()) == final_sha(reference.stdout)
    assert processes_of(run_id) == []
