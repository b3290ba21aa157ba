"""ava at 32 nodes: `ava nodes --json` and the supervisor's observation of idle nodes, each on
the test cluster's 32 nodes against 1 (sshd only: nothing on the nodes imports torch).

    python benchmarks/scale.py [--nodes 32] [--runs 3] [--window 20]

1. `ava nodes --json` on an inventory of 1 node and of all `--nodes`, medians of `--runs` in
   rotating order after one untimed run each that checks every node answered. Target: the
   32-node/1-node ratio <= 1.5x (the fan-out is parallel).
2. Supervision: `ava train` of a tiny recipe on 1 node, then on all of them, run in foreground
   as users run it. So that no node imports torch, this process runs the ava CLI itself with
   `ava.launch.torchrun_argv` replaced by a stdlib job (`python -c`: the master listens on the
   rendezvous port, so ava's wait for the store returns, then every node prints one line and
   sleeps). Everything else is ava's own launch and supervision: provision, code sync, the
   agents, the status polls and log follows of its observation loop. Once every node's line has
   arrived, it reads the `ava` process's CPU time from /proc/PID/stat over `--window` seconds:
   CPU seconds per wall second of supervision, and the same for the nodes' side (sshd and
   agents: every process in the nodes' network namespaces, with their reaped children). Then
   `ava stop RUN` ends the run.

Prints one table with the ratios. The test cluster (namespaces, sshd, every process) is removed
at the end, on an error, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, Stamped, clean_env, median, ratio, seconds, spread, table, test_cluster
from tests.support.cluster import Cluster

TARGET_NODES_RATIO = 1.5
MARK = "AVA-SCALE-UP"
STARTED_TIMEOUT = 420.0  # a cold start provisions and syncs every node on 2 shared cores
STOP_TIMEOUT = 120.0
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The job each node runs instead of torchrun: stdlib only. The master listens on the rendezvous
# port (ava waits for the master's store before it starts the others); every node says it is up
# and sleeps until `ava stop` (or, should everything else fail, for at most 30 minutes).
IDLE_JOB = """
import os, socket, sys, time
port = int(sys.argv[1])
if port:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("", port))
    listener.listen(64)
print("[0]:%s %s" % (sys.argv[2], os.environ.get("AVA_NODE", "?")), flush=True)
time.sleep(1800)
"""

RECIPE = """# benchmarks/scale.py: one idle process per node (the job itself is swapped in by scale.py)
name = "scale-idle"
[run]
script = "idle.py"
[resources]
nodes = 1
procs_per_node = 1
[failover]
max_restarts = 0
"""


# -- the ava CLI with a stdlib job in place of torchrun (runs in a child process) ----------------


def idle_ava(argv: list[str]) -> None:
    """Run the ava CLI in this process, every node's torchrun replaced by IDLE_JOB."""
    import ava.launch

    def idle_argv(recipe: object, launch: Any, *, is_master: bool, python: str, **_: object) -> list[str]:
        return [python, "-c", IDLE_JOB, str(launch.master_port if is_master else 0), MARK]

    ava.launch.torchrun_argv = idle_argv
    from ava.cli import main

    main(argv)


# -- CPU time ------------------------------------------------------------------------------------


def process_cpu(pid: int, *, children: bool = False) -> float | None:
    """CPU seconds (user + system) of PID from /proc/PID/stat; with its reaped children's too."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the command's ")": state is field 3, utime 14, stime 15, cutime 16, cstime 17.
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def namespace_cpu(cluster: Cluster, nodes: int) -> dict[int, float]:
    """CPU seconds of every process in the first NODES nodes' namespaces, by pid, with the
    children each has reaped (an agent status call is a child of its node's sshd session)."""
    found: dict[int, float] = {}
    for node in cluster.nodes[:nodes]:
        for pid in cluster.namespace_pids(node.name):
            cpu = process_cpu(pid, children=True)
            if cpu is not None:
                found[pid] = cpu
    return found


def namespace_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU the nodes' processes used between two readings: a process alive at the second began
    after the first if it was not there then; a short call that started and ended in between is
    counted in the process that reaped it (its node's sshd)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


# -- the benchmark ---------------------------------------------------------------------------------


@dataclass
class Supervision:
    nodes: int
    started: float | None = None  # every node's line arrived, seconds after `ava train` began
    window: float = 0.0
    cli_cpu: float | None = None  # CPU seconds of the ava process during the window
    node_cpu: float | None = None  # CPU seconds of the nodes' processes during the window
    threads: int | None = None
    rss: int | None = None  # bytes
    stopped: float | None = None  # `ava stop` took
    exited: float | None = None  # from the start of `ava stop` until `ava train` exited
    problems: list[str] = field(default_factory=list)


@dataclass
class Bench:
    cluster: Cluster
    scratch: Path

    @property
    def home(self) -> Path:
        return self.scratch / "home"

    def inventory(self, size: int) -> Path:
        path = self.scratch / f"ava-{size}.toml"
        if not path.exists():
            self.cluster.inventory([n.name for n in self.cluster.nodes[:size]], path=path)
        return path

    def env(self) -> dict[str, str]:
        return clean_env(AVA_HOME=str(self.home))

    def ava(self, size: int, *args: str) -> list[str]:
        return [sys.executable, "-m", "ava", "--inventory", str(self.inventory(size)), *args]

    # -- ava nodes ------------------------------------------------------------------------------

    def nodes_once(self, size: int) -> tuple[float, float, float]:
        """Wall and CPU seconds of one `ava nodes --json` (CPU: the only child reaped meanwhile),
        and the CPU seconds its commands took on the nodes (on this machine's same cores)."""
        nodes_before = namespace_cpu(self.cluster, size)
        cpu_before, started = children_cpu(), time.perf_counter()
        done = subprocess.run(
            self.ava(size, "nodes", "--json"), capture_output=True, text=True, env=self.env(), cwd=REPO, timeout=180
        )
        elapsed, cpu = time.perf_counter() - started, children_cpu() - cpu_before
        nodes = namespace_delta(nodes_before, namespace_cpu(self.cluster, size))
        if done.returncode != 0:
            raise SystemExit(f"ava nodes on {size} nodes exited {done.returncode}: {done.stderr.strip()[-500:]}")
        return elapsed, cpu, nodes

    def check_nodes(self, size: int) -> None:
        done = subprocess.run(
            self.ava(size, "nodes", "--json"), capture_output=True, text=True, env=self.env(), cwd=REPO, timeout=180
        )
        reached = [n for n in json.loads(done.stdout or "[]") if n.get("reachable")]
        if done.returncode != 0 or len(reached) != size:
            raise SystemExit(
                f"ava nodes on {size} nodes: exit {done.returncode}, {len(reached)} reachable: {done.stderr[-500:]}"
            )

    # -- supervision ------------------------------------------------------------------------------

    def supervise(self, size: int, window: float, recipe: Path) -> Supervision:
        result = Supervision(size)
        args = ["--inventory", str(self.inventory(size)), "train", str(recipe), "--set", f"resources.nodes={size}"]
        run = Stamped()
        run.spawn("ava", [sys.executable, str(Path(__file__).resolve()), "--idle-ava", *args], env=self.env())
        names = {n.name for n in self.cluster.nodes[:size]}

        def up(lines: Sequence[Any]) -> bool:
            return {l.text.rsplit(MARK + " ", 1)[1].strip() for l in lines if MARK + " " in l.text} >= names

        run_id = ""
        try:
            if not run.wait_for(up, STARTED_TIMEOUT):
                result.problems.append(f"not every node started within {STARTED_TIMEOUT:.0f} s")
                return result
            firsts: dict[str, float] = {}
            for line in list(run.lines):
                if MARK + " " in line.text:
                    firsts.setdefault(line.text.rsplit(MARK + " ", 1)[1].strip(), line.at)
            result.started = max(firsts[name] for name in names)
            run_id = _run_id(run)
            time.sleep(2.0)  # the first polls after the start settle
            pid = run.processes["ava"].pid
            nodes_before, cli_before, wall_before = namespace_cpu(self.cluster, size), process_cpu(pid), time.time()
            time.sleep(window)
            cli_after, wall_after = process_cpu(pid), time.time()
            nodes_after = namespace_cpu(self.cluster, size)
            result.window = wall_after - wall_before
            if cli_before is not None and cli_after is not None:
                result.cli_cpu = cli_after - cli_before
            result.node_cpu = namespace_delta(nodes_before, nodes_after)
            result.threads, result.rss = _threads_rss(pid)
            if run.processes["ava"].poll() is not None:
                result.problems.append(f"ava train exited ({run.processes['ava'].returncode}) during the window")
        finally:
            run_id = run_id or _run_id(run)
            began = time.perf_counter()
            exits: list[float] = []
            process = run.processes["ava"]
            watcher = threading.Thread(target=_note_exit, args=(process, exits), daemon=True)
            watcher.start()
            if run_id:
                stop = subprocess.run(
                    self.ava(size, "stop", run_id),
                    capture_output=True,
                    text=True,
                    env=self.env(),
                    cwd=REPO,
                    timeout=STOP_TIMEOUT,
                )
                result.stopped = time.perf_counter() - began
                if stop.returncode != 0:
                    result.problems.append(f"ava stop exited {stop.returncode}: {stop.stderr.strip()[-300:]}")
            clean = run.finish(60)
            watcher.join(timeout=5)
            if clean and exits:
                result.exited = exits[0] - began
            elif not exits:
                result.problems.append("ava train did not exit within 60 s of the stop (killed)")
            if result.problems:
                print(
                    f"  {size} node(s): {'; '.join(result.problems)}; ava's output:\n{run.text()[-2500:]}", flush=True
                )
        return result


def _note_exit(process: subprocess.Popen[str], into: list[float]) -> None:
    process.wait()
    into.append(time.perf_counter())


def _run_id(run: Stamped) -> str:
    line = next((l.text for l in run.lines if l.text.startswith("ava: run ")), "")
    return line.split()[2] if line else ""


def _threads_rss(pid: int) -> tuple[int | None, int | None]:
    try:
        status = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
        )
        return int(status["Threads"]), int(status["VmRSS"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None, None


def per_second(cpu: float | None, wall: float) -> str:
    return f"{cpu / wall:.3f}" if cpu is not None and wall > 0 else "-"


def report(
    size: int,
    nodes_times: dict[int, list[float]],
    nodes_cpu: dict[int, list[float]],
    nodes_remote: dict[int, list[float]],
    supervised: dict[int, Supervision],
    up: float,
) -> None:
    one, many = nodes_times[1], nodes_times[size]
    cpu_one, cpu_many = median(nodes_cpu[1]), median(nodes_cpu[size])
    remote_one, remote_many = median(nodes_remote[1]), median(nodes_remote[size])
    rows = [
        [
            "ava nodes --json (s)",
            seconds(median(one)),
            seconds(median(many)),
            ratio(median(many), median(one)),
            f"<= {TARGET_NODES_RATIO}x",
            f"1: {spread(one)}; {size}: {spread(many)}",
        ],
        [
            "ava nodes --json CPU (s)",
            seconds(cpu_one),
            seconds(cpu_many),
            ratio(cpu_many, cpu_one),
            "",
            "user + system of the ava process (medians)",
        ],
        [
            "ava nodes --json: nodes' CPU (s)",
            seconds(remote_one),
            seconds(remote_many),
            ratio(remote_many, remote_one),
            "",
            "its commands on the nodes (sshd, facts), on this machine's same cores",
        ],
    ]
    small, big = supervised.get(1), supervised.get(size)

    def pair(label: str, value: Any, fmt: Any, note: str = "") -> None:
        a = value(small) if small else None
        b = value(big) if big else None
        rows.append(
            [
                label,
                fmt(a) if a is not None else "-",
                fmt(b) if b is not None else "-",
                ratio(b, a) if a is not None and b is not None else "-",
                "",
                note,
            ]
        )

    window = big.window if big else 0.0
    pair(
        "train: every node up (s)",
        lambda s: s.started,
        seconds,
        f"first launch on each node (provision, sync); n1 warm at {size}",
    )
    pair(
        "supervision: ava CPU s per s",
        lambda s: s.cli_cpu / s.window if s.cli_cpu is not None and s.window else None,
        lambda v: f"{v:.3f}",
        f"/proc/PID/stat of the ava process over {window:.0f} s",
    )
    pair(
        "supervision: nodes' CPU s per s",
        lambda s: s.node_cpu / s.window if s.node_cpu is not None and s.window else None,
        lambda v: f"{v:.3f}",
        "sshd + agents in the nodes' namespaces (approx.)",
    )
    pair("ava process threads", lambda s: s.threads, str)
    pair("ava process RSS (MiB)", lambda s: s.rss / 2**20 if s.rss else None, lambda v: f"{v:.0f}")
    pair("ava stop (s)", lambda s: s.stopped, seconds)
    pair("ava stop until ava train exited (s)", lambda s: s.exited, seconds)
    table(
        ["measure", "1 node", f"{size} nodes", f"{size}/1", "target", "notes"],
        rows,
        title=f"ava on {size} test nodes vs 1 (cluster of {size} up in {up:.0f} s)",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=32, help="test nodes (default 32)")
    parser.add_argument("--runs", type=int, default=3, help="timed `ava nodes` runs per inventory")
    parser.add_argument("--window", type=float, default=20.0, help="seconds of supervision measured")
    parser.add_argument("--skip-supervision", action="store_true", help="only `ava nodes`")
    options = parser.parse_args()
    size = options.nodes
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ava-bench-scale-") as scratch:
        up_began = time.monotonic()
        with test_cluster(size) as cluster:
            up = time.monotonic() - up_began
            print(
                f"cluster of {size} nodes up in {up:.1f} s ({'namespaces' if cluster.use_namespaces else 'loopback'});"
                f" load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
                flush=True,
            )
            bench = Bench(cluster, Path(scratch))
            sizes = [1, size]
            for n in sizes:
                bench.check_nodes(n)  # untimed: first connections, known hosts, facts cache
            nodes_times: dict[int, list[float]] = {n: [] for n in sizes}
            nodes_cpu: dict[int, list[float]] = {n: [] for n in sizes}
            nodes_remote: dict[int, list[float]] = {n: [] for n in sizes}
            for number in range(options.runs):
                for n in sizes if number % 2 == 0 else reversed(sizes):
                    wall, cpu, remote = bench.nodes_once(n)
                    nodes_times[n].append(wall)
                    nodes_cpu[n].append(cpu)
                    nodes_remote[n].append(remote)
            print(
                f"  ava nodes --json: 1 node {spread(nodes_times[1])} s; {size} nodes {spread(nodes_times[size])} s",
                flush=True,
            )
            supervised: dict[int, Supervision] = {}
            if not options.skip_supervision:
                recipe = Path(scratch) / "recipe"
                recipe.mkdir()
                (recipe / "recipe.toml").write_text(RECIPE)
                (recipe / "idle.py").write_text("# replaced by scale.py's idle job\n")
                for n in sizes:
                    supervised[n] = bench.supervise(n, options.window, recipe)
                    s = supervised[n]
                    print(
                        f"  supervision on {n} node(s): every node up at {seconds(s.started)},"
                        f" ava CPU {per_second(s.cli_cpu, s.window)} s/s, nodes {per_second(s.node_cpu, s.window)} s/s"
                        f" (load average {os.getloadavg()[0]:.1f})",
                        flush=True,
                    )
    report(size, nodes_times, nodes_cpu, nodes_remote, supervised, up)
    print(f"\n(wall time of this benchmark: {time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--idle-ava":
        idle_ava(sys.argv[2:])
    else:
        try:
            sys.exit(main())
        except KeyboardInterrupt:
            print("\ninterrupted: runs stopped, test cluster removed", file=sys.stderr)
            sys.exit(130)
