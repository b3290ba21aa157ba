"""The agent's command line: parse, act, print one JSON object (raw bytes for `logs`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import layout, leases, procs, status
from .isolation import attach
from .layout import LayoutError
from .protocol import (
    AGENT_DIED,
    BAD_SPEC,
    BUSY,
    FAILED,
    NOT_FOUND,
    PROTOCOL_MISMATCH,
    RUN_DIRECTORY,
    RUNNING,
    STALE,
    STARTING,
    STOPPED,
    STOPPED_REASON,
    STORE_READY,
    STORE_WAITING,
    SUCCEEDED,
    ExitCode,
    ProtocolMismatch,
    SpecError,
)
from .teardown import end_fence, ended_clean, settle, teardown

if TYPE_CHECKING:
    from .spec import Spec

EXIT_OK = ExitCode.OK
EXIT_FAILED = ExitCode.FAILED
EXIT_USAGE = ExitCode.USAGE
EXIT_BUSY = ExitCode.BUSY
START_TIMEOUT = 60.0
STATUS_TICK = 0.02  # how often a long poll looks at the status
STOP_SLACK = 20.0  # beyond the grace, how long `stop` waits for the monitor's own teardown
LOGS_TICK = 0.05  # how often `logs --follow` looks for more output: the CLI's exit waits for its end


def _emit(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


def cmd_start(args: argparse.Namespace) -> int:
    # Only here: every other command (a status long poll, a log follow) starts without them.
    from . import monitor, rundir
    from .spec import Spec

    if args.spec == "-":  # from stdin, as ava sends it (a file: how Slurm's nodes start)
        raw = sys.stdin.buffer.read()
        spec = Spec.loads(raw, "spec (stdin)")
    else:
        raw = None
        spec = Spec.load(args.spec)
    adir = layout.attempt_dir(spec.workdir, spec.run, spec.attempt)
    if (existing := settle(spec.workdir, adir)) is not None:
        # The same start again (a retried SSH command): report, do not start twice.
        _emit(existing)
        return EXIT_FAILED if existing["state"] in (FAILED, STOPPED) else EXIT_OK
    if (stale := _stale(spec, args)) is not None:
        # What the launch took for granted is not so here: say what, start nothing.
        _emit(stale)
        return EXIT_FAILED
    try:
        rundir.prepare(spec)  # the run's own copy of its code, kept across its attempts here
    except rundir.RunDirError as exc:
        _emit({"error": RUN_DIRECTORY, "problem": str(exc)})
        return EXIT_FAILED
    want = leases.Want(
        run=spec.run,
        node=spec.node,
        gpus=spec.gpus_want,
        allowed=spec.gpus_allowed,
        cpu_slots=spec.cpu_want,
        cpu_total=spec.cpu_total,
    )
    if spec.ledger:
        leases.use_shared(spec.workdir, spec.ledger)
    with leases.locked(spec.workdir) as ledger:
        try:
            gpus, slots = leases.pick(ledger.entries, want)
        except leases.Busy as busy:
            _emit({"error": BUSY, "holders": [h.public() for h in busy.holders]})
            return EXIT_BUSY
        adir.mkdir(parents=True, exist_ok=True)
        # runs/ holds specs (the run's environment, secrets included) and logs: owner only,
        # also where an older agent or the spec's upload made it with the login's umask.
        os.chmod(spec.workdir / "runs", 0o700)
        _write_private(Path(args.spec).read_bytes() if raw is None else raw, adir / layout.SPEC)
        pid = monitor.spawn(spec, adir, gpus, slots, ledger.fd)
        ledger.grant(want, spec.attempt, spec.user, pid, gpus, slots, spec.workdir)
    st = _wait_started(spec.workdir, adir, pid)
    if args.wait_store and st.get("state") == RUNNING:
        # The master: answer once its rendezvous store listens, so the others can start at once.
        address, port = args.wait_store
        # Said at once: the port is checked and torchrun started, so the others can start now,
        # their torchrun imports beside the master's (they wait for its store themselves).
        _emit({**st, "store": STORE_WAITING})
        st = {**st, "store": _wait_store(adir, address, int(port), args.store_timeout)}
        _emit(st)
        return EXIT_OK if st["store"] == STORE_READY else EXIT_FAILED
    _emit(st)
    return EXIT_OK if st.get("state") in (RUNNING, SUCCEEDED) else EXIT_FAILED


def _stale(spec: Spec, args: argparse.Namespace) -> dict[str, Any] | None:
    """Check what a one-trip start took for granted (its --expect-* options: code trees complete
    here, this node's route to the master, the rendezvous port free on the master); None when all
    holds, else the answer naming what does not, with the facts for a second try."""
    trees = spec.workdir / "trees"
    missing = [tree for tree in args.expect_tree if not (trees / f"{tree}.complete").is_file()]
    answer: dict[str, Any] = {"error": STALE, "trees_missing": missing}
    stale = bool(missing)
    if args.expect_route:
        from .facts import route

        master, interface, address, ifname, home, cpus = args.expect_route
        found = route(master, interface, False)
        answer["route"] = found
        stale = stale or (found["address"], found["interface"], found["home"], str(found["cpus"])) != (
            address,
            ifname,
            home,
            cpus,
        )
    if args.expect_port is not None and not _port_free(args.expect_port):
        answer["port"] = _free_port()
        stale = True
    return answer if stale else None


def _port_free(port: int) -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET) as sock:
            sock.bind(("", port))
        return True
    except OSError:
        return False


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def _write_private(data: bytes, target: Path) -> None:
    """Write the spec as 0600 whatever the umask: it holds the run's environment values."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an older copy may exist with wider bits
        layout.write_all(fd, data)
    finally:
        os.close(fd)


def _wait_started(work: Path, adir: Path, pid: int) -> dict[str, Any]:
    end = time.monotonic() + START_TIMEOUT
    while time.monotonic() < end:
        st = status.read(adir)
        if st and st.get("state") != STARTING:
            return st
        if not procs.alive(pid) and (st is None or st.get("state") == STARTING):
            return settle(work, adir) or {"state": FAILED, "reason": AGENT_DIED, "pid": pid}
        time.sleep(STATUS_TICK)  # a worker node's start answers as its job runs
    return status.read(adir) or {"state": STARTING, "pid": pid}


def _attempt(work: Path, run: str, attempt: int | None) -> int | None:
    found = layout.attempts(work, run)
    if attempt is None:
        return found[-1] if found else None
    return attempt if attempt in found else None


def cmd_status(args: argparse.Namespace) -> int:
    work = layout.workdir(args.workdir)
    n = _attempt(work, args.run, args.attempt)
    adir = layout.attempt_dir(work, args.run, n) if n is not None else None
    st = settle(work, adir) if adir is not None else None
    if adir is not None and args.since is not None:
        # A long poll: answer as soon as what the supervisor judges by changes (a rank failed,
        # the attempt ended), else after --wait seconds with a fresh heartbeat.
        # A final status changes no more: it is answered at once.
        end = time.monotonic() + args.wait
        while st is not None and not status.is_final(st) and status.digest(st) == args.since and time.monotonic() < end:
            time.sleep(STATUS_TICK)
            st = settle(work, adir)
    if st is None:
        _emit({"error": NOT_FOUND, "run": args.run, "attempt": args.attempt})
        return EXIT_FAILED
    answer = {**st, "digest": status.digest(st)}
    if status.is_final(st):
        # Verified here, so that a supervisor ending the run needs no `stop` trip to this node.
        answer["ended_clean"] = ended_clean(st)  # see protocol.Status
    if adir is not None and args.metrics_from is not None:
        answer["metrics"], answer["metrics_end"] = status.read_metrics(adir, args.metrics_from)
    _emit(answer)
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    work = layout.workdir(args.workdir)
    remaining: list[int] = []
    removed = True
    nodes: set[str | None] = set()
    for n in layout.attempts(work, args.run):
        adir = layout.attempt_dir(work, args.run, n)
        st = status.read(adir)
        if st is None:
            continue
        nodes.add(st["node"])
        if not status.is_final(st):
            layout.write_json_atomic(adir / layout.STOP, {"grace": args.grace, "requested": time.time()})
            end = time.monotonic() + args.grace + STOP_SLACK
            while not status.is_final(st) and not status.monitor_gone(st) and time.monotonic() < end:
                time.sleep(0.1)
                st = status.read(adir) or st
            if not status.is_final(st):
                # The monitor is gone or stuck: end the attempt from here.
                st = teardown(work, adir, st, STOPPED, STOPPED_REASON).status
        # Verify even a final attempt: a monitor killed mid-teardown leaves its fence behind.
        left, gone = end_fence(st)
        fence = attach(st.get("cgroup"))
        remaining += left
        removed = removed and gone and not (fence and fence.exists())
    for node in nodes or {None}:  # no attempt recorded here: release by run alone
        # Processes left behind keep the run's leases, marked draining, until they are gone.
        leases.release_or_drain(work, args.run, node, None, remaining)
        if node is not None and not args.keep_spares:
            # No attempt comes after this stop: the run's spare interpreters go too (warm.py).
            from . import warm

            warm.end_spares(args.run, node, layout.run_dir(work, args.run))
    ok = not remaining and removed
    _emit({"run": args.run, "stopped": ok, "remaining_pids": sorted(set(remaining)), "cgroup_removed": removed})
    return EXIT_OK if ok else EXIT_FAILED


def cmd_logs(args: argparse.Namespace) -> int:
    work = layout.workdir(args.workdir)
    adir = layout.attempt_dir(work, args.run, args.attempt)
    path = adir / layout.OUTPUT
    out = sys.stdout.buffer
    offset = args.offset
    stamps = OutputTimes(adir) if args.timestamps else None
    f = None
    try:
        while True:
            if f is None and path.exists():
                f = open(path, "rb")
            data = b""
            if f is not None:
                f.seek(offset)
                data = f.read(1 << 20)
            if data and stamps is not None:
                # Whole lines only, each after the time output.log reached its end.
                end = data.rfind(b"\n") + 1 if args.follow or len(data) == 1 << 20 else len(data)
                if end == 0:
                    data = b""
                else:
                    out.write(stamps.stamp(data[:end], offset))
                    out.flush()
                    offset += end
                    continue
            elif data:
                out.write(data)
                out.flush()
                offset += len(data)
                continue
            if not args.follow:
                return EXIT_OK
            st = settle(work, adir)
            if st is None and not adir.exists():
                return EXIT_FAILED
            if status.is_final(st):
                # Drained after the final state: nothing more can come.
                if f is None or not f.read(1):
                    return EXIT_OK
                if stamps is not None:
                    f.seek(offset)
                    rest = f.read()
                    if b"\n" not in rest:  # a last line without its newline: nothing more comes
                        out.write(stamps.stamp(rest, offset))
                        out.flush()
                        return EXIT_OK
                continue
            time.sleep(LOGS_TICK)
    except BrokenPipeError:
        return EXIT_OK
    finally:
        if f is not None:
            f.close()


class OutputTimes:
    """Dates lines of output.log from output.times (see the monitor's _note_output)."""

    def __init__(self, adir: Path) -> None:
        self.path = adir / layout.OUTPUT_TIMES
        self.notes: list[tuple[int, float]] = []

    def _when(self, end: int) -> float:
        for _ in range(2):
            for size, when in self.notes:
                if size >= end:
                    return when
            self._reload()
        return time.time()  # written since the monitor's last note (a tick ago at most)

    def _reload(self) -> None:
        try:
            text = self.path.read_text(encoding="ascii")
        except OSError:
            return
        notes = []
        for line in text.splitlines():
            size, _, when = line.partition(" ")
            try:
                notes.append((int(size), float(when)))
            except ValueError:
                continue
        self.notes = notes

    def stamp(self, data: bytes, offset: int) -> bytes:
        """Each line of DATA (read at OFFSET) as `<unix time> <line>`."""
        out = []
        for line in data.splitlines(keepends=True):
            offset += len(line)
            out.append(f"{self._when(offset):.3f} ".encode() + line)
        return b"".join(out)


def cmd_leases(args: argparse.Namespace) -> int:
    work = layout.workdir(args.workdir)
    _emit({"holders": [h.public() for h in leases.holders(work)]})
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    work = layout.workdir(args.workdir)
    found = []
    for run in layout.runs(work):
        n = _attempt(work, run, None)
        st = settle(work, layout.attempt_dir(work, run, n)) if n is not None else None
        if st is not None:
            found.append(st)
    _emit({"runs": found})
    return EXIT_OK


def cmd_route(args: argparse.Namespace) -> int:
    from .facts import route

    found = route(args.master, args.interface, args.port)
    if args.tree:
        # Which code trees are here already: a launch ships only those missing, in the same trip.
        trees = layout.workdir(args.workdir) / "trees"
        found["trees_ready"] = {tree: (trees / f"{tree}.complete").is_file() for tree in args.tree}
    _emit(found)
    return EXIT_OK


def _wait_store(adir: Path, address: str, port: int, timeout: float) -> str:
    """Wait until the master's rendezvous store accepts connections ("ready"), or the attempt
    ended here (its state), or TIMEOUT seconds passed ("timeout")."""
    import socket

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection((address, port), timeout=1).close()
            return STORE_READY
        except OSError:
            pass
        st = status.read(adir)
        if status.is_final(st):
            assert st is not None
            return str(st["state"])
        time.sleep(0.02)
    return "timeout"


def cmd_cache(args: argparse.Namespace) -> int:
    from . import cachecli  # only for `ava cache` and a prefetch

    return cachecli.run(args.runtime, args.env_file, args.args, umask=layout.JOB_UMASK)


def cmd_slurm(args: argparse.Namespace) -> int:
    # One agent per node of a Slurm allocation, and the supervisor's look from the login node.
    if args.command == "slurm-node":
        from . import slurmnode

        return slurmnode.main(args.args)
    from . import slurmwatch

    return slurmwatch.main(args.args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ava-agent", description="ava's node agent (see the package doc)")
    sub = p.add_subparsers(dest="command", required=True)
    from . import programs  # tree, bench-allreduce, free-port, node-site: ava's node programs

    programs.add_parsers(sub)
    s = sub.add_parser("start", help="lease, fence and start one attempt")
    s.add_argument("spec", help="the spec's path, or - to read it from standard input")
    s.add_argument("--wait-store", nargs=2, metavar=("ADDRESS", "PORT"), help="then wait for the rendezvous store")
    s.add_argument("--store-timeout", type=float, default=120.0)
    # A one-trip start: what the launch took for granted, checked here before anything starts.
    s.add_argument("--expect-tree", action="append", default=[], help="this code tree must be complete here")
    s.add_argument(
        "--expect-route",
        nargs=6,
        metavar=("MASTER", "INTERFACE", "ADDRESS", "IFNAME", "HOME", "CPUS"),
        help="this node's route to MASTER (with the inventory's INTERFACE) must be this one",
    )
    s.add_argument("--expect-port", type=int, help="this port must be free here (the master's rendezvous)")
    s.set_defaults(func=cmd_start)
    s = sub.add_parser("status", help="status of an attempt (default: the latest)")
    s.add_argument("workdir")
    s.add_argument("run")
    s.add_argument("--attempt", type=int)
    s.add_argument("--since", help="a digest from an earlier answer: wait until the status differs from it")
    s.add_argument("--wait", type=float, default=1.0, help="with --since, the longest wait in seconds")
    s.add_argument("--metrics-from", type=int, help="also answer the metric lines past this byte offset")
    s.set_defaults(func=cmd_status)
    s = sub.add_parser("stop", help="verified teardown of every attempt of a run")
    s.add_argument("workdir")
    s.add_argument("run")
    s.add_argument("--grace", type=float, default=layout.DEFAULT_GRACE)
    s.add_argument("--keep-spares", action="store_true", help="a failover's teardown: the next attempt claims them")
    s.set_defaults(func=cmd_stop)
    s = sub.add_parser("logs", help="raw output.log bytes from an offset")
    s.add_argument("workdir")
    s.add_argument("run")
    s.add_argument("--attempt", type=int, required=True)
    s.add_argument("--offset", type=int, default=0)
    s.add_argument("--follow", action="store_true")
    s.add_argument("--timestamps", action="store_true", help="prefix each line with the unix time it was written")
    s.set_defaults(func=cmd_logs)
    s = sub.add_parser("leases", help="the GPU/CPU ledger, dead holders reclaimed")
    s.add_argument("workdir")
    s.set_defaults(func=cmd_leases)
    s = sub.add_parser("list", help="runs on this node with their latest status")
    s.add_argument("workdir")
    s.set_defaults(func=cmd_list)
    s = sub.add_parser("route", help="this node's address and interface toward the master (and a free port)")
    s.add_argument("master")
    s.add_argument("interface")
    s.add_argument("--port", action="store_true", help="also pick a free port for the rendezvous")
    s.add_argument("--workdir", default="~/.ava", help="where --tree looks")
    s.add_argument("--tree", action="append", default=[], help="also say whether this code tree is here")
    s.set_defaults(func=cmd_route)
    s = sub.add_parser("cache", help="the cache's command line (status | warm | clear) from the runtime tree")
    s.add_argument("runtime", help="ava's runtime tree on this node (WORKDIR/trees/HASH)")
    s.add_argument("env_file", help='a JSON file of environment variables, deleted once read; "-" for none')
    s.add_argument("args", nargs=argparse.REMAINDER, help="the cache command and its options")
    s.set_defaults(func=cmd_cache)
    for name, what in (
        ("slurm-node", "run one attempt on this node of a Slurm job"),
        ("slurm-watch", "look at a Slurm attempt"),
    ):
        s = sub.add_parser(name, help=what)
        s.add_argument("args", nargs=argparse.REMAINDER)
        s.set_defaults(func=cmd_slurm)
    return p


def main(argv: list[str] | None = None) -> int:
    # Everything the agent writes (specs, status, logs, ledger) is the owner's alone; the job
    # gets back the umask the agent was started with (see layout.JOB_UMASK).
    layout.JOB_UMASK = os.umask(0o077)
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ProtocolMismatch as exc:
        _emit({"error": PROTOCOL_MISMATCH, "problem": str(exc)})
        return int(ExitCode.PROTOCOL)
    except (SpecError, LayoutError) as exc:
        _emit({"error": BAD_SPEC, "problem": str(exc)})
        return EXIT_USAGE
