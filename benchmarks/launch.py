"""Time from starting a launcher to every rank running, on 1 and 3 test-cluster nodes:
`ava train` against two hand-written launches of torchrun over plain ssh, side by side.

    python benchmarks/launch.py [--trials 3] [--sizes 1,3] [--traced 2]

"Every rank running" is the moment the launcher's output holds the first `ECHO` line of every
rank (tests/data/recipes/echo, one process per node). The launchers:

  ava            `python -m ava train echo --set resources.nodes=N` (provision check, code sync,
                 route probe, master first, the others once its store listens), as a user gets
                 it: each node keeps a spare torchrun for its next run (`keep_warm`, on by
                 default), so every trial but the first starts from the spare the last one left.
                 Run once on never-used workdirs first: that cold launch is reported apart.
  ava, no spare  the same with `keep_warm = "0s"`: torchrun imports torch in every launch.
  all-at-once    one `ssh NODE 'cd DIR && torchrun --rdzv-backend c10d ...'` per node, all
                 started together; the script was copied to every node beforehand.
  master-first   the master's ssh+torchrun, then (once its store port accepts TCP) the others.
Both hand launches run torchrun on the nodes' own interpreter (the test nodes' venv, which ava's
launch uses too), not on this benchmark's (whose torch also imports numpy).

Trials interleave the launchers (in a rotating order) so that the shared machine's noise falls
on all of them alike. After an ava trial the benchmark waits until every node's new spare has
imported torch and listens, so that its import never slows the next trial down. Prints medians, every sample, the ratios ava/master-first (issue 14's
targets: <= 1.1 to every rank running, <= 1.15 to exit) and ava/all-at-once (for reference),
and where ava's time goes: from its output (medians over
the trials) and from `--traced` extra runs that timestamp ava's own launch steps.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    REPO,
    Line,
    Stamped,
    clean_env,
    kill_processes_with,
    median,
    ratio,
    seconds,
    spread,
    table,
    test_cluster,
)
from tests.support.cluster import Cluster, TestNode

ECHO = REPO / "tests" / "data" / "recipes" / "echo"
TRACE = "AVA-TRACE"
TARGET_VS_MASTER_FIRST = 1.1
TARGET_EXIT_VS_MASTER_FIRST = 1.15
TARGET_EXIT_TAIL = 0.3  # seconds from the last agent's final status to ava's exit
RANKS_TIMEOUT = 150.0  # an all-at-once worker may back off for tens of seconds before it joins
EXIT_TIMEOUT = 60.0
METHODS = ("ava", "ava, no spare", "all-at-once", "master-first")
SPARE_TIMEOUT = 60.0  # the longest an ava trial's node spares may take to listen


@dataclass
class Trial:
    method: str
    size: int
    ranks: float | None  # every rank's first ECHO line seen
    exit: float | None  # the launcher (every ssh, or ava) exited
    marks: dict[str, float | None] = field(default_factory=dict)
    cpu: float | None = None  # CPU seconds the launcher's own processes used on this machine


def echo_rank(line: Line) -> int | None:
    if line.stream != "out" or "ECHO {" not in line.text:
        return None
    try:
        # raw_decode: a line may carry trailing text (seen: the next line's "[1]:" prefix glued on).
        payload, _ = json.JSONDecoder().raw_decode(line.text.split("ECHO ", 1)[1])
        return int(payload["rank"])
    except (ValueError, KeyError, TypeError):
        return None


def every_rank(size: int) -> Callable[[list[Line]], bool]:
    return lambda lines: {echo_rank(l) for l in lines} >= set(range(size))


def ranks_time(run: Stamped, size: int) -> float | None:
    """When the last rank's first ECHO line arrived."""
    firsts: dict[int, float] = {}
    for line in list(run.lines):
        rank = echo_rank(line)
        if rank is not None:
            firsts.setdefault(rank, line.at)
    return max(firsts.values()) if set(firsts) >= set(range(size)) else None


# -- ava ------------------------------------------------------------------------------------


@dataclass
class Bench:
    cluster: Cluster
    scratch: Path
    recipe: Path
    home: Path
    trial_ids: int = 0

    def inventory(self, size: int, *, cold: bool = False, spares: bool = True) -> Path:
        names = [n.name for n in self.cluster.nodes[:size]]
        path = self.scratch / f"ava-{size}{'-cold' if cold else ''}{'' if spares else '-nospare'}.toml"
        # keep_warm=None: ava's default, not the test cluster's "0s".
        self.cluster.inventory(names, path=path, keep_warm=None if spares else "0s")
        if cold:  # never-used workdirs: this launch provisions and syncs everything
            text = path.read_text()
            for node in self.cluster.nodes[:size]:
                text = text.replace(f'"{node.workdir}"', f'"{self.workdir(node, size, cold)}"')
                text = text.replace(f'"{node.cache_dir}"', f'"{self.scratch / f"cold-{size}" / node.name / "cache"}"')
            path.write_text(text)
        return path

    def workdir(self, node: TestNode, size: int, cold: bool) -> Path:
        return self.scratch / f"cold-{size}" / node.name / "work" if cold else node.workdir

    def spares_listen(self, size: int, cold: bool) -> None:
        """Wait until every node's spare for its next run listens (its torch imported)."""
        sockets = [self.workdir(node, size, cold) / "warm" / "spare.sock" for node in self.cluster.nodes[:size]]
        deadline = time.monotonic() + SPARE_TIMEOUT
        while not all(s.exists() for s in sockets) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)

    def end_spares(self) -> None:
        for node in self.cluster.nodes:
            kill_processes_with(str(node.workdir / "warm"))
        kill_processes_with(str(self.scratch / "cold-"))

    def ava(
        self, size: int, *, cold: bool = False, traced: bool = False, spares: bool = True, settle: bool = True
    ) -> Trial:
        inventory = self.inventory(size, cold=cold, spares=spares)
        args = ["--inventory", str(inventory), "train", str(self.recipe), "--set", f"resources.nodes={size}"]
        run = Stamped()
        if traced:
            argv = [sys.executable, str(Path(__file__).resolve()), "--ava-traced", repr(time.time()), *args]
        else:
            argv = [sys.executable, "-m", "ava", *args]
        run.spawn("ava", argv, env=clean_env(AVA_HOME=str(self.home)))
        wall_start = time.time() - run.now()  # the nodes date their statuses on this clock
        trial = self._collect("ava-traced" if traced else "ava" if spares else "ava, no spare", size, run)
        if trial.exit is None:
            run_line = next((l.text for l in run.lines if l.text.startswith("ava: run ")), "")
            if run_line:
                stamped = Stamped()
                stamped.spawn(
                    "stop",
                    [sys.executable, "-m", "ava", "--inventory", str(inventory), "stop", run_line.split()[2]],
                    env=clean_env(AVA_HOME=str(self.home)),
                )
                stamped.finish(60)
        trial.marks = {
            "run record": run.first(lambda l: l.text.startswith("ava: run ")),
            "attempt 1 starting": run.first(lambda l: "attempt 1 starting" in l.text),
            "first node output": run.first(lambda l: l.stream == "out" and " | " in l.text),
            "first ECHO": run.first(lambda l: echo_rank(l) is not None),
            "all ranks": trial.ranks,
            "agents ended": self._agents_ended(run, size, wall_start, cold=cold),
            "exit": trial.exit,
        }
        if traced:
            trial.marks.update(_trace_marks(run))
        if spares and settle and trial.exit is not None:
            self.spares_listen(size, cold)
        return trial

    def _agents_ended(self, run: Stamped, size: int, wall_start: float, *, cold: bool) -> float | None:
        """When the last node's agent wrote the attempt's final status (its job gone, its fence
        verified empty and removed): from there on, what ava takes to exit is its own tail."""
        run_line = next((l.text for l in run.lines if l.text.startswith("ava: run ")), "")
        if not run_line or cold:
            return None
        ended = []
        for node in self.cluster.nodes[:size]:
            path = node.workdir / "runs" / run_line.split()[2] / "attempt-1" / "status.json"
            try:
                ended.append(float(json.loads(path.read_text())["ended"]) - wall_start)
            except (OSError, ValueError, KeyError, TypeError):
                return None
        return max(ended)

    # -- torchrun over ssh, by hand ---------------------------------------------------------

    def ssh(self, node: TestNode) -> list[str]:
        return [
            "ssh",
            "-i",
            str(self.cluster.key),
            "-o",
            f"UserKnownHostsFile={self.cluster.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "-p",
            str(node.port),
            f"{_user()}@{node.address}",
        ]

    def script_dir(self, node: TestNode) -> Path:
        return node.dir / "bench"

    def copy_script(self) -> None:
        """Put echo.py in every node's directory over ssh, before (and outside) any timing."""
        script = (self.recipe / "echo.py").read_bytes()
        for node in self.cluster.nodes:
            target = self.script_dir(node)
            command = f"mkdir -p {shlex.quote(str(target))} && cat > {shlex.quote(str(target / 'echo.py'))}"
            done = _run([*self.ssh(node), command], stdin=script)
            if done.returncode != 0:
                raise SystemExit(f"copying echo.py to {node.name} failed: {done.stderr}")

    def torchrun(self, node: TestNode, master: TestNode, size: int, port: int, rdzv_id: str) -> list[str]:
        argv = [
            self.cluster.python,  # the nodes' interpreter, which ava's launch runs too (not this one)
            "-m",
            "torch.distributed.run",
            "--nnodes",
            str(size),
            "--nproc-per-node",
            "1",
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"{master.address}:{port}",
            "--rdzv-id",
            rdzv_id,
        ]
        if node is master:
            argv += ["--rdzv-conf", "is_host=1"]
        argv += ["--local-addr", node.address, "echo.py"]
        interface = "eth0" if node.namespace else "lo"
        remote = (
            f"cd {shlex.quote(str(self.script_dir(node)))} && GLOO_SOCKET_IFNAME={interface} exec {shlex.join(argv)}"
        )
        return [*self.ssh(node), remote]

    def by_hand(self, size: int, *, master_first: bool) -> Trial:
        nodes = self.cluster.nodes[:size]
        master = nodes[0]
        self.trial_ids += 1
        port = 29400 + self.trial_ids  # a fresh port each trial: no TIME_WAIT from the last one
        rdzv_id = f"avabench-{uuid.uuid4().hex[:8]}"
        run = Stamped()
        store_up: float | None = None
        if master_first:
            run.spawn(master.name, self.torchrun(master, master, size, port, rdzv_id))
            if size > 1:
                store_up = _wait_listening(master.address, port, run, timeout=RANKS_TIMEOUT)
            for node in nodes[1:]:
                run.spawn(node.name, self.torchrun(node, master, size, port, rdzv_id))
        else:
            for node in nodes:
                run.spawn(node.name, self.torchrun(node, master, size, port, rdzv_id))
        trial = self._collect("master-first" if master_first else "all-at-once", size, run)
        if trial.exit is None:
            kill_processes_with(rdzv_id)
        trial.marks = {
            "store up": store_up,
            "first ECHO": run.first(lambda l: echo_rank(l) is not None),
            "all ranks": trial.ranks,
            "exit": trial.exit,
        }
        return trial

    def _collect(self, method: str, size: int, run: Stamped) -> Trial:
        run.wait_for(every_rank(size), RANKS_TIMEOUT)
        ranks = ranks_time(run, size)
        clean = run.finish(EXIT_TIMEOUT)
        ended = max(run.ended.values()) if clean and run.ended else None
        failed = any(p.returncode != 0 for p in run.processes.values())
        if ranks is None or failed:
            print(
                f"  {method} on {size} node(s): no clean run (ranks={seconds(ranks)}); its output:\n"
                + _indent(run.text()[-3000:]),
                flush=True,
            )
        return Trial(method, size, ranks, ended if not failed else None, cpu=run.cpu)


def _run(argv: list[str], stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=60)


def _wait_listening(address: str, port: int, run: Stamped, timeout: float) -> float | None:
    """Poll until the master's store accepts a TCP connection; the time it did, or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((address, port), timeout=0.5).close()
            return run.now()
        except OSError:
            if all(p.poll() is not None for p in run.processes.values()):
                return None
            time.sleep(0.02)
    return None


def _user() -> str:
    import getpass

    return getpass.getuser()


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


# -- a traced ava: the same CLI, with its launch steps timestamped ----------------------------


TRACED_STEPS = [
    ("ava.provision", "ensure", "provision check"),
    ("ava.attempt", "probe", "route probe"),
    ("ava.sync", "ship_tree", "code sync"),
    ("ava.attempt", "start_one", "agent start"),
    ("ava.supervisor", "judge", "judge"),
    ("ava.attempt", "stop", "teardown"),
]


def traced_ava(started: float, argv: list[str]) -> None:
    """Run the ava CLI in this process with each launch step wrapped to print when it began and
    ended (seconds since `started`, the parent's clock at spawn) on stderr."""
    import importlib

    def mark(event: str, label: str, who: str) -> None:
        sys.stderr.write(f"{TRACE} {time.time() - started:.3f} {event} {label}|{who}\n")
        sys.stderr.flush()

    for module_name, function, label in TRACED_STEPS:
        module = importlib.import_module(module_name)
        original = getattr(module, function)

        @functools.wraps(original)
        def wrapper(*args: Any, __original: Any = original, __label: str = label, **kwargs: Any) -> Any:
            first = args[0] if args else None
            who = getattr(getattr(first, "node", first), "name", "") if first is not None else ""
            who = who if isinstance(who, str) else ""
            mark("begin", __label, who)
            try:
                return __original(*args, **kwargs)
            finally:
                mark("end", __label, who)

        setattr(module, function, wrapper)
    sys.argv = ["ava", *argv]
    from ava.cli import main

    main()


def _trace_marks(run: Stamped) -> dict[str, float | None]:
    """Phase boundaries out of a traced run's AVA-TRACE lines."""
    events: list[tuple[float, str, str, str]] = []
    for line in run.lines:
        if line.text.startswith(TRACE + " "):
            _, at_text, event, rest = line.text.split(" ", 3)
            label, who = rest.rsplit("|", 1)
            events.append((float(at_text), event, label, who))

    def at(event: str, label: str, pick: Callable[[list[float]], float] = min, who: str | None = None) -> float | None:
        found = [t for t, e, l, w in events if e == event and l == label and (who is None or w == who)]
        return pick(found) if found else None

    starts = [(t, w) for t, e, l, w in events if e == "begin" and l == "agent start"]
    master = starts[0][1] if starts else ""
    return {
        "provision begin": at("begin", "provision check"),
        "provision end": at("end", "provision check"),
        "routes end": at("end", "route probe"),
        "sync end": at("end", "code sync", max),  # only where the code was missing
        # The master's start answers once its rendezvous store listens.
        "master started": at("end", "agent start", who=master),
        "others started": at("end", "agent start", max) if len(starts) > 1 else None,
        "verdict": at("end", "judge", max),  # the last judgement: the attempt is over
        "teardown begin": at("begin", "teardown", max),
        "teardown end": at("end", "teardown", max),
    }


# -- the report -----------------------------------------------------------------------------


def report_back_to_back(runs: list[Trial], sizes: list[int]) -> None:
    """ava started again the moment the last ava exited: the spare the last run left is still
    importing torch, and the next run waits for it rather than import torch itself."""
    rows = []
    for size in sizes:
        chosen = [t for t in runs if t.size == size]
        ranks = [t.ranks for t in chosen if t.ranks is not None]
        exits = [t.exit for t in chosen if t.exit is not None]
        rows.append(
            [str(size), seconds(median(ranks)), f"{len(ranks)}/{len(chosen)}", spread(ranks), seconds(median(exits))]
        )
    table(
        ["nodes", "all ranks (median)", "ok", "samples", "exit (median)"],
        rows,
        title="ava back to back (each started as the one before exited; compare with the rows above)",
    )


def report(trials: list[Trial], cold: list[Trial], traced: list[Trial], sizes: list[int]) -> None:
    def pick(method: str, size: int, key: str = "ranks") -> list[float]:
        chosen = [t for t in trials if t.method == method and t.size == size]
        values = [t.ranks if key == "ranks" else t.marks.get(key) for t in chosen]
        return [v for v in values if v is not None]

    rows = []
    for size in sizes:
        for method in METHODS:
            ranks = pick(method, size)
            exits = pick(method, size, "exit")
            cpu = [t.cpu for t in trials if t.method == method and t.size == size and t.cpu is not None]
            runs = len([t for t in trials if t.method == method and t.size == size])
            rows.append(
                [
                    str(size),
                    method,
                    seconds(median(ranks)),
                    f"{len(ranks)}/{runs}",
                    spread(ranks),
                    seconds(median(exits)),
                    seconds(median(cpu)),
                ]
            )
    for trial in cold:
        rows.append(
            [
                str(trial.size),
                "ava, cold (first)",
                seconds(trial.ranks),
                f"{int(trial.ranks is not None)}/1",
                spread([trial.ranks] if trial.ranks else []),
                seconds(trial.exit),
                seconds(trial.cpu),
            ]
        )
    table(
        ["nodes", "launcher", "all ranks (median)", "ok", "samples", "exit (median)", "launcher CPU"],
        rows,
        title="Start to every rank running (first ECHO line of each rank in the launcher's output)",
    )

    rows = []
    for size in sizes:
        ava = median(pick("ava", size))
        tails = []
        for trial in trials:
            exited, ended = trial.marks.get("exit"), trial.marks.get("agents ended")
            if trial.method == "ava" and trial.size == size and exited is not None and ended is not None:
                tails.append(exited - ended)
        rows.append(
            [
                str(size),
                ratio(ava, median(pick("master-first", size))),
                f"<= {TARGET_VS_MASTER_FIRST}",
                ratio(ava, median(pick("all-at-once", size))),
                ratio(median(pick("ava", size, "exit")), median(pick("master-first", size, "exit"))),
                f"<= {TARGET_EXIT_VS_MASTER_FIRST}",
                seconds(median(tails)),
                f"<= {TARGET_EXIT_TAIL:g} s",
                ratio(median(pick("ava, no spare", size)), median(pick("master-first", size))),
                ratio(median(pick("ava, no spare", size, "exit")), median(pick("master-first", size, "exit"))),
            ]
        )
    table(
        [
            "nodes",
            "ava/master-first",
            "target",
            "ava/all-at-once",
            "exit: ava/master-first",
            "target",
            "ava's exit tail",
            "target",
            "no spare: ranks",
            "no spare: exit",
        ],
        rows,
        title="Ratios of the medians (exit tail: from the last agent's final status to ava's exit)",
    )

    marks = [
        "run record",
        "attempt 1 starting",
        "store up",
        "first node output",
        "first ECHO",
        "all ranks",
        "agents ended",
        "exit",
    ]
    rows = []
    for size in sizes:
        for method in ("ava", "ava, no spare", "master-first"):
            rows.append([str(size), method] + [seconds(median(pick(method, size, m))) for m in marks])
    table(
        ["nodes", "launcher"] + marks,
        rows,
        title="Over time (medians, seconds since the launcher started; '-': not in that launcher's output)",
    )

    for size in sizes:
        runs = [t for t in traced if t.size == size and t.ranks is not None]
        if not runs:
            continue
        steps: dict[str, list[tuple[float, float]]] = {}
        for trial in runs:
            for label, begin, end in traced_steps(trial):
                steps.setdefault(label, []).append((begin, end))
        rows = [
            [
                label,
                f"{median([b for b, _ in spans]):.3f}",
                f"{median([e for _, e in spans]):.3f}",
                f"{median([e - b for b, e in spans]):.3f}",
            ]
            for label, spans in steps.items()
        ]
        table(
            ["step", "from", "to", "took (s)"],
            rows,
            title=f"Where ava's time goes on {size} node(s), warm: medians of {len(runs)} traced `ava train`",
        )


def traced_steps(trial: Trial) -> list[tuple[str, float, float]]:
    """A traced run's steps in order, each from where the one before it ended (or its own begin)."""
    m = trial.marks
    steps = [
        ("CLI start, recipe, run record, code snapshot", None, m.get("attempt 1 starting")),
        ("provision check (ensure, all nodes)", m.get("provision begin"), m.get("provision end")),
        ("route probe + free port + code check (all nodes)", m.get("provision end"), m.get("routes end")),
        ("code sync (nodes missing it)", m.get("routes end"), m.get("sync end")),
        (
            "agent start on the master, until its store listens",
            m.get("sync end") or m.get("routes end"),
            m.get("master started"),
        ),
        ("agent start on the others (parallel)", m.get("master started"), m.get("others started")),
        (
            "torchrun up, rendezvous, ranks print (log follow)",
            m.get("others started") or m.get("master started"),
            trial.ranks,
        ),
        ("torchrun exits, the agent's final status (verified)", None, m.get("agents ended")),
        ("the supervisor's verdict (long poll answers)", None, m.get("verdict")),
        ("teardown calls (nodes not verified clean)", m.get("teardown begin"), m.get("teardown end")),
        ("log followers end, records, CLI exit", None, trial.exit),
    ]
    found = []
    previous = 0.0
    for label, begin, end in steps:
        if end is None:
            continue
        begin = previous if begin is None else begin
        found.append((label, begin, end))
        previous = end
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--sizes", default="1,3", help="comma-separated node counts")
    parser.add_argument("--traced", type=int, default=2, help="traced ava runs per size, for the step breakdown")
    parser.add_argument(
        "--back-to-back",
        type=int,
        default=4,
        help="ava runs per size started as the last exits (first one not counted)",
    )
    options = parser.parse_args()
    sizes = [int(s) for s in options.sizes.split(",")]
    began = time.monotonic()
    trials: list[Trial] = []
    cold: list[Trial] = []
    back_to_back: list[Trial] = []
    traced: list[Trial] = []
    with test_cluster(max(sizes)) as cluster, tempfile.TemporaryDirectory(prefix="ava-bench-launch-") as scratch:
        recipe = Path(scratch) / "echo"
        shutil.copytree(ECHO, recipe)
        bench = Bench(cluster, Path(scratch), recipe, Path(scratch) / "home")
        bench.copy_script()
        print(
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores;"
            f" cluster of {len(cluster.nodes)} nodes up ({'namespaces' if cluster.use_namespaces else 'loopback'});"
            f" {options.trials} trials x {len(sizes)} sizes x {len(METHODS)} launchers",
            flush=True,
        )
        # Cold: the largest on the new cluster's workdirs (which it leaves warm for every later
        # launch), each smaller one on workdirs of its own that nothing used yet.
        for size in sorted(sizes, reverse=True):
            cold.append(bench.ava(size, cold=size != max(sizes)))
        runners: dict[str, Callable[[int], Trial]] = {
            "ava": lambda n: bench.ava(n),
            "ava, no spare": lambda n: bench.ava(n, spares=False),
            "all-at-once": lambda n: bench.by_hand(n, master_first=False),
            "master-first": lambda n: bench.by_hand(n, master_first=True),
        }
        for number in range(options.trials):
            order = METHODS[number % len(METHODS) :] + METHODS[: number % len(METHODS)]
            for size in sizes:
                for method in order:
                    trial = runners[method](size)
                    trials.append(trial)
                    print(
                        f"  trial {number + 1} {method:13} {size} node(s): all ranks {seconds(trial.ranks)},"
                        f" exit {seconds(trial.exit)}  (load average {os.getloadavg()[0]:.1f})",
                        flush=True,
                    )
        for size in sizes:
            for _ in range(options.traced):
                traced.append(bench.ava(size, traced=True))
        for size in sizes:
            for number in range(options.back_to_back + 1):
                trial = bench.ava(size, settle=False)
                if number:  # the first follows a settled trial: its spare was ready
                    back_to_back.append(trial)
        bench.end_spares()
    report(trials, cold, traced, sizes)
    if back_to_back:
        report_back_to_back(back_to_back, sizes)
    print(f"\n(wall time of this benchmark: {time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--ava-traced":
        traced_ava(float(sys.argv[2]), sys.argv[3:])
    else:
        try:
            sys.exit(main())
        except KeyboardInterrupt:
            print("\ninterrupted: launchers ended, test cluster removed", file=sys.stderr)
            sys.exit(130)
