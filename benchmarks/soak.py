"""Soak: goodput of a 3-node run while faults keep coming, beside the same run without faults.

    python benchmarks/soak.py [--minutes 20] [--fault-every 5] [--step-time 0.2] [--faults rank,node,link,hang,oom]

The steps recipe (tests/data/recipes/steps, ava.ckpt) on 3 nodes of a 4-node test cluster (the 4th is
the spare), checkpoints every --ckpt-every steps in a local directory every test node shares (they
share this machine's disk; no S3 server). Its --steps are --minutes of pure step time, so each run
lasts at least --minutes. First the run without faults, then the same run (same steps, same seed,
same settings) with a fault every --fault-every minutes, rotating through:
  rank  SIGKILL of rank 1's worker
  node  rank 1's node killed (its sshd and every process); the spare takes over; the killed node is
        restarted once the run trains again, to be the next spare
  link  rank 1's node's link cut; restored once ava declared the attempt failed
  hang  rank 1's worker stopped with SIGSTOP (hang_timeout is --hang-timeout for both runs)
  oom   rank 1's worker allocates until the kernel's OOM killer ends it: both runs set
        resources.memory (--memory-gib) and put a sitecustomize.py on the ranks' PYTHONPATH whose thread
        allocates once a trigger file names its pid (it does nothing else; capped at --memory-gib + 1 GiB)
A fault waits until the run trains again after the previous one. ava does not take a node it declared
lost back within the same run (a restarted node is not a spare again), so each node or link fault
uses up one of the --spares (default 1: the 4-node test cluster); one with no spare left is skipped.

Per fault, from the lines of `ava train` (time they arrived here):
  detect     fault -> `attempt N failed:` (the supervisor's verdict)
  teardown   -> `attempt N ended`
  plan       -> `attempt N+1 starting`
  torchrun   -> the first line a node's torchrun printed (`nX/- |`: it started and imported torch)
  workers    -> the first line a rank printed (`nX/R |`: a worker started and imported torch)
  load       -> rank 0's `resumed from step S` (rendezvous, process group, checkpoint load)
  first step -> the first `step` line of attempt N+1
  restart    ended -> first step (the sum of the five above; a mark the output lacks folds into the next)
  redone     steps S+1..last of attempt N (computed again: not productive), and their time
ETTR = productive step time / wall time: each step's time (gap to the previous step line of its
attempt; an attempt's first step gets that attempt's median) counted once, for the attempt whose
result was kept (the last one to compute it). Medians where there are several faults of a kind.
Also checks the final weights hash equals the unfaulted run's and that no process of either run is
left on any node (tests.conftest.processes_of) once it ended. Nothing is asserted: exit 1 only when
a check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import median, table, test_cluster
from benchmarks.failover import worker_pid
from tests.cluster.test_failover import STEPS, LiveRun, run_id_of
from tests.conftest import processes_of, run_ava
from tests.support.cluster import Cluster

NODES = ["n1", "n2", "n3", "n4"]  # 3 in the run (the recipe's resources.nodes), the rest spares (--spares)
# What the supervisor's verdict should say for each fault: a fault it names otherwise is flagged.
NAMED = {"rank": "exited -9", "node": "stopped answering", "link": "stopped answering", "hang": "no training progress"}
NAMED["oom"] = "out of memory"
LOSSES = ("node", "link")  # faults that lose a node: ava does not take a lost node back within a run
KINDS = ["rank", "node", "link", "hang", "oom"]
STEP_LINE = re.compile(r"\| step (\d+)$")
RESUMED = re.compile(r"\| resumed from step (\d+)$")
STARTING = re.compile(r"attempt (\d+) starting on (.+)$")
TORCHRUN = re.compile(r"^\S+/-\s+\| ")
RANK_OUTPUT = re.compile(r"^\S+/\d+\s+\| ")
FINAL = re.compile(r"final step \d+ sha256 ([0-9a-f]{64})")

# Runs in every rank of both runs (the recipe's PYTHONPATH, chained by ava's own sitecustomize).
HOG = '''"""soak.py's OOM fault: allocates once {folder}/oom-<this pid> exists; else only waits."""
import os
import threading
import time


def _hog() -> None:
    trigger = os.path.join({folder!r}, "oom-%d" % os.getpid())
    while not os.path.exists(trigger):
        time.sleep(0.2)
    held = []
    while len(held) * 64 < {cap_mib}:
        held.append(b"\\x01" * (64 << 20))  # touched: counted against the node's memory limit
    while True:  # the cap reached without an OOM kill: a hang, which the soak reports
        time.sleep(1)


if os.environ.get("RANK") is not None and os.environ.get("AVA_RUN_ID"):
    threading.Thread(target=_hog, daemon=True).start()
'''


@dataclass
class Fault:
    kind: str
    node: str
    pid: int
    injected: float
    attempt: int = 0
    cause: str = ""
    detect: float | None = None
    teardown: float | None = None
    plan: float | None = None
    torchrun: float | None = None
    workers: float | None = None
    load: float | None = None
    first_step: float | None = None
    restart: float | None = None
    redone: int | None = None
    redone_time: float | None = None

    def lost(self) -> float | None:
        parts = [self.detect, self.teardown, self.restart, self.redone_time]
        return None if any(p is None for p in parts) else sum(p for p in parts if p is not None)


@dataclass
class Outcome:
    wall: float
    exit_code: int
    sha: str | None
    productive: float
    steps_done: int
    left: list[int]
    faults: list[Fault] = field(default_factory=list)
    lines: list[tuple[float, str]] = field(default_factory=list)


def node_of(cluster: Cluster, pid: int) -> str | None:
    return next((n for n in NODES if pid in cluster.namespace_pids(n)), None)


def attempts_of(lines: list[tuple[float, str]]) -> list[tuple[int, float, str, int]]:
    """(attempt, stamp, line, index) for each line, the attempt being the last one started."""
    current, out = 0, []
    for index, (stamp, line) in enumerate(lines):
        if match := STARTING.search(line):
            current = int(match.group(1))
        out.append((current, stamp, line, index))
    return out


def step_times(lines: list[tuple[float, str]], nominal: float) -> dict[int, dict[int, float]]:
    """attempt -> step -> seconds it took (the gap to the attempt's previous step line)."""
    gaps: dict[int, dict[int, float]] = {}
    previous: dict[int, float] = {}
    for attempt, stamp, line, _ in attempts_of(lines):
        if match := STEP_LINE.search(line):
            step = int(match.group(1))
            steps = gaps.setdefault(attempt, {})
            steps[step] = stamp - previous[attempt] if attempt in previous else -1.0
            previous[attempt] = stamp
    for steps in gaps.values():
        known = [t for t in steps.values() if t >= 0]
        fill = median(known) if known else nominal
        for step, took in steps.items():
            if took < 0:
                steps[step] = fill
    return gaps


def productive(lines: list[tuple[float, str]], nominal: float) -> tuple[float, int]:
    """Each step's time counted once, from the last attempt that computed it."""
    kept: dict[int, float] = {}
    for _, steps in sorted(step_times(lines, nominal).items()):
        kept.update(steps)
    return sum(kept.values()), len(kept)


def training_again(run: LiveRun) -> bool:
    """A step line after the newest `attempt N starting` line."""
    for _, line in reversed(run.lines):
        if STEP_LINE.search(line):
            return True
        if STARTING.search(line):
            return False
    return False


def wait_after(run: LiveRun, start: int, pattern: re.Pattern[str], timeout: float) -> tuple[float, str, int] | None:
    deadline = time.monotonic() + timeout
    seen = start
    while time.monotonic() < deadline:
        lines = run.lines
        for index in range(seen, len(lines)):
            if pattern.search(lines[index][1]):
                return lines[index][0], lines[index][1], index
        seen = len(lines)
        if run.process.poll() is not None:
            run._reader.join(2)
            if len(run.lines) == seen:
                return None
        time.sleep(0.05)
    return None


def inject(cluster: Cluster, run_id: str, kind: str, hog_dir: Path) -> Fault | None:
    pid = worker_pid(run_id, "1")
    node = node_of(cluster, pid) if pid else None
    if pid is None or node is None:
        return None
    injected = time.monotonic()
    if kind == "rank":
        os.kill(pid, signal.SIGKILL)
    elif kind == "node":
        cluster.kill_node(node)
    elif kind == "link":
        cluster.cut_link(node)
    elif kind == "hang":
        os.kill(pid, signal.SIGSTOP)
    else:
        (hog_dir / f"oom-{pid}").write_text("")
    return Fault(kind, node, pid, injected)


def follow(cluster: Cluster, run: LiveRun, fault: Fault, start: int, hang_timeout: float, step_time: float) -> None:
    """Fills the fault's timings from the run's lines; puts the faulted node back as it goes."""
    try:
        failed = wait_after(run, start, re.compile(r"attempt (\d+) failed: (.*)$"), hang_timeout + 180)
        if fault.kind == "link":
            cluster.restore_link(fault.node)
        if failed is None:
            return
        fault.detect = failed[0] - fault.injected
        match = re.search(r"attempt (\d+) failed: (.*)$", failed[1])
        assert match
        fault.attempt, fault.cause = int(match.group(1)), match.group(2)
        ended = wait_after(run, failed[2], re.compile(rf"attempt {fault.attempt} ended"), 180)
        if ended is None:
            return
        fault.teardown = ended[0] - failed[0]
        starting = wait_after(run, ended[2], re.compile(rf"attempt {fault.attempt + 1} starting"), 180)
        if starting is None:
            return
        step = wait_after(run, starting[2], STEP_LINE, 300)
        if step is None:
            return
        fault.plan, fault.restart = starting[0] - ended[0], step[0] - ended[0]
        window = run.lines[starting[2] : step[2] + 1]
        previous = starting[0]
        for name, pattern in (
            ("torchrun", TORCHRUN),
            ("workers", RANK_OUTPUT),
            ("load", RESUMED),
            ("first_step", STEP_LINE),
        ):
            found = next((stamp for stamp, line in window if pattern.search(line)), None)
            if found is not None and found >= previous:
                setattr(fault, name, found - previous)
                previous = found
        resumed = wait_after(run, starting[2], RESUMED, 0.1)
        start_step = int(resumed[1].rsplit(" ", 1)[1]) if resumed and resumed[2] < step[2] else 0
        times = step_times(run.lines[: step[2] + 1], step_time).get(fault.attempt, {})
        redone = [s for s in times if s > start_step]
        fault.redone = len(redone)
        fault.redone_time = sum(times[s] for s in redone)
    finally:
        if fault.kind == "link":
            cluster.restore_link(fault.node)
        if fault.kind == "hang":
            with contextlib.suppress(ProcessLookupError):
                os.kill(fault.pid, signal.SIGCONT)
        if fault.kind == "node":
            cluster.restart_node(fault.node)


def leftovers(run_id: str, wait: float = 20.0) -> list[int]:
    deadline = time.monotonic() + wait
    while (left := processes_of(run_id)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def soak(
    cluster: Cluster, home: dict[str, str], settings: list[str], options: argparse.Namespace, kinds: list[str]
) -> Outcome:
    every = options.fault_every * 60
    run = LiveRun(["train", str(STEPS), *settings], cluster.inventory(NODES), home)
    run_id: str | None = None
    faults: list[Fault] = []
    rotation = 0
    try:
        run_id = run_id_of(run)
        next_at = run.started + every
        while run.process.poll() is None:
            if kinds and time.monotonic() >= next_at and training_again(run):
                kind = kinds[rotation % len(kinds)]
                rotation += 1
                if kind in LOSSES and sum(f.kind in LOSSES for f in faults) >= options.spares:
                    print(f"  {time.monotonic() - run.started:6.0f}s  {kind} fault skipped: no spare left", flush=True)
                    continue
                marker = len(run.lines)
                fault = inject(cluster, run_id, kind, options.hog_dir)
                if fault is not None:
                    faults.append(fault)
                    print(f"  {time.monotonic() - run.started:6.0f}s  {kind} fault on {fault.node}", flush=True)
                    follow(cluster, run, fault, marker, options.hang_timeout, options.step_time)
                    print(f"          {fault.cause or 'no verdict seen'}", flush=True)
                next_at = max(next_at + every, time.monotonic() + 5)
            time.sleep(0.2)
        code = run.finish(timeout=60)
        wall = time.monotonic() - run.started
    finally:
        run.kill()
        for name in NODES:
            cluster.restore_link(name)
            cluster.restart_node(name)
        if run_id and run.process.returncode != 0:
            run_ava("stop", run_id, env=home, inventory=cluster.inventory(NODES))
    text = run.text()
    sha = FINAL.search(text)
    work, done = productive(run.lines, options.step_time)
    left = leftovers(run_id) if run_id else []
    return Outcome(wall, code, sha.group(1) if sha else None, work, done, left, faults, list(run.lines))


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def breakdown(faults: list[Fault]) -> None:
    rows = []
    for kind in KINDS:
        mine = [f for f in faults if f.kind == kind]
        if not mine:
            continue

        def med(attr: str, mine: list[Fault] = mine) -> str:
            values = [getattr(f, attr) for f in mine if getattr(f, attr) is not None]
            return fmt(median(values)) if values else "-"

        lost = [f.lost() for f in mine]
        rows.append(
            [
                kind,
                str(len(mine)),
                med("detect"),
                med("teardown"),
                med("plan"),
                med("torchrun"),
                med("workers"),
                med("load"),
                med("first_step"),
                med("restart"),
                med("redone"),
                med("redone_time"),
                fmt(median([x for x in lost if x is not None])) if any(x is not None for x in lost) else "-",
            ]
        )
    table(
        [
            "fault",
            "n",
            "detect",
            "teardown",
            "plan",
            "torchrun",
            "workers",
            "load",
            "1st step",
            "restart",
            "redone",
            "redone s",
            "lost",
        ],
        rows,
        title="time lost per fault, seconds (medians per kind; restart = plan + torchrun + workers + load + 1st step)",
    )
    each = [
        [
            f.kind,
            f.node,
            str(f.attempt),
            fmt(f.detect),
            fmt(f.teardown),
            fmt(f.plan),
            fmt(f.torchrun),
            fmt(f.workers),
            fmt(f.load),
            fmt(f.first_step),
            fmt(f.restart),
            "-" if f.redone is None else str(f.redone),
            fmt(f.redone_time),
            fmt(f.lost()),
            ("" if NAMED[f.kind] in f.cause else "(misnamed) ") + f.cause[:60],
        ]
        for f in faults
    ]
    table(
        ["fault", "node", "att", "detect", "teardown", "plan", "torchrun", "workers", "load", "1st step", "restart"]
        + ["redone", "redone s", "lost", "verdict"],
        each,
        title="every fault (seconds)",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="pure step time of each run")
    parser.add_argument("--fault-every", type=float, default=5.0, help="minutes between faults")
    parser.add_argument("--faults", default=",".join(KINDS), help="rotation, from " + ",".join(KINDS))
    parser.add_argument("--spares", type=int, default=1, help="test nodes beyond the run's 3 (one per node loss)")
    parser.add_argument("--step-time", type=float, default=0.2)
    parser.add_argument("--ckpt-every", type=int, default=10)
    parser.add_argument("--hang-timeout", type=float, default=20.0)
    parser.add_argument("--log", type=Path, help="write both runs' lines here, each with its time (s)")
    parser.add_argument("--memory-gib", type=float, default=2.0, help="resources.memory of both runs (the OOM's limit)")
    options = parser.parse_args()
    kinds = [k for k in options.faults.split(",") if k]
    if unknown := [k for k in kinds if k not in KINDS]:
        parser.error(f"unknown fault {unknown[0]!r} (known: {', '.join(KINDS)})")
    NODES[:] = [f"n{i}" for i in range(1, 4 + options.spares)]
    steps = max(options.ckpt_every, round(options.minutes * 60 / options.step_time))
    scratch = Path(tempfile.mkdtemp(prefix="ava-soak-"))
    options.hog_dir = scratch / "hog"
    options.hog_dir.mkdir()
    cap_mib = int(options.memory_gib * 1024) + 1024
    (options.hog_dir / "sitecustomize.py").write_text(HOG.format(folder=str(options.hog_dir), cap_mib=cap_mib))
    settings = [
        "--set",
        f'run.args=["--steps", "{steps}", "--ckpt-every", "{options.ckpt_every}", "--step-time", "{options.step_time}"]',
        "--set",
        f"checkpoint.dir={scratch}/ckpt/{{run}}",  # every test node shares this machine's disk
        "--set",
        "failover.backoff=0s",
        "--set",
        "failover.max_restarts=1000",
        "--set",
        f"failover.hang_timeout={options.hang_timeout:g}s",
        "--set",
        f"resources.memory={int(options.memory_gib * 1024)}MiB",
        "--set",
        f"env.PYTHONPATH={options.hog_dir}",
    ]
    print(
        f"soak: steps recipe, {steps} steps of {options.step_time}s on 3 of {len(NODES)} nodes, checkpoint every "
        f"{options.ckpt_every} steps in {scratch}/ckpt (local, shared); a fault every {options.fault_every:g} min: "
        f"{', '.join(kinds)}",
        flush=True,
    )
    try:
        with test_cluster(len(NODES)) as cluster:
            if "link" in kinds and not cluster.use_namespaces:
                kinds.remove("link")
                print("  (no link cuts: they need network namespaces, run as root)")
            home = {"AVA_HOME": str(scratch / "home")}
            print("run without faults ...", flush=True)
            clean = soak(cluster, home, settings, options, [])
            print(f"  ended {clean.exit_code} after {clean.wall:.0f}s", flush=True)
            print("run with faults ...", flush=True)
            faulty = soak(cluster, home, settings, options, kinds)
            print(f"  ended {faulty.exit_code} after {faulty.wall:.0f}s", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    if options.log:
        with options.log.open("w") as out:
            for name, o in (("unfaulted", clean), ("faulted", faulty)):
                out.writelines(f"{name} {stamp - o.lines[0][0]:8.2f} {line}\n" for stamp, line in o.lines)
    nominal = steps * options.step_time
    rows = []
    for name, o in (("no faults", clean), (f"{len(faulty.faults)} faults", faulty)):
        rows.append(
            [
                name,
                f"{o.wall:.0f}",
                f"{o.steps_done}/{steps}",
                f"{o.productive:.0f}",
                f"{o.productive / o.wall:.3f}",
                f"{nominal / o.wall:.3f}",
                str(o.exit_code),
            ]
        )
    table(
        ["run", "wall s", "steps", "productive s", "ETTR", "ETTR nominal", "exit"],
        rows,
        title=f"ETTR (productive step time counted once / wall; nominal: {steps} x {options.step_time}s / wall)",
    )
    print(f"faulted / unfaulted ETTR: {(faulty.productive / faulty.wall) / (clean.productive / clean.wall):.3f}")
    breakdown(faulty.faults)

    same = clean.sha is not None and clean.sha == faulty.sha
    print("\nchecks:")
    print(f"  final weights equal: {'yes' if same else 'NO'} ({clean.sha} / {faulty.sha})")
    print(f"  processes left after the unfaulted run: {len(clean.left)} {clean.left or ''}")
    print(f"  processes left after the faulted run:   {len(faulty.left)} {faulty.left or ''}")
    ok = same and not clean.left and not faulty.left and clean.exit_code == 0 and faulty.exit_code == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
