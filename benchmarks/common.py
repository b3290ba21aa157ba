"""What every benchmark shares: timing a command, medians, a plain table, a test cluster that is
always torn down, and processes whose output lines are timestamped as they arrive.

Benchmarks only print: the machine they run on is small and shared, so no figure is asserted.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support.cluster import Cluster, clean_stale  # noqa: E402


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def seconds(value: float | None) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return f"{value:.3f} s"


def ratio(numerator: float, denominator: float) -> str:
    if not denominator or numerator != numerator or denominator != denominator:
        return "-"
    return f"{numerator / denominator:.2f}x"


def spread(values: Sequence[float]) -> str:
    """Every sample, sorted: a median hides how noisy a shared machine was."""
    return " ".join(f"{v:.2f}" for v in sorted(values))


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, title: str | None = None) -> None:
    """A plain, aligned text table (pastes into issues and notes as it is)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    if title:
        print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    sys.stdout.flush()


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without an inherited inventory, with a wide terminal for the CLI."""
    env = dict(os.environ)
    env.pop("AVA_INVENTORY", None)
    env["COLUMNS"] = "200"
    env.update(extra)
    return env


def timed(argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 120, check: bool = True) -> float:
    """Wall time of one whole command, start to exit."""
    started = time.perf_counter()
    done = subprocess.run(list(argv), capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    elapsed = time.perf_counter() - started
    if check and done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return elapsed


# -- a cluster that is always removed -----------------------------------------------------------


@contextlib.contextmanager
def test_cluster(size: int) -> Iterator[Cluster]:
    """A real test cluster, torn down on return, on an error, on Ctrl-C and on SIGTERM."""
    clean_stale()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    cluster = Cluster(size)
    try:
        cluster.up()
        yield cluster
    finally:
        for run in list(_live):  # a launcher still going (Ctrl-C mid-trial) goes before its nodes
            run.kill()
        cluster.down()
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


# -- processes whose lines are timestamped --------------------------------------------------------


@dataclass
class Line:
    at: float  # seconds since the process was started
    stream: str  # "out" | "err"
    text: str
    source: str = ""  # which of several processes printed it


@dataclass(eq=False)
class Stamped:
    """One or more processes started together; every output line keeps the time it arrived."""

    started: float = field(default_factory=time.perf_counter)
    lines: list[Line] = field(default_factory=list)
    processes: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    ended: dict[str, float] = field(default_factory=dict)
    cpu: float | None = None  # CPU seconds (user + system) its processes used on this machine
    _cpu_before: float = field(default_factory=lambda: _children_cpu())
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _readers: list[threading.Thread] = field(default_factory=list)
    _changed: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self._changed = threading.Condition(self._lock)
        _live.add(self)

    def now(self) -> float:
        return time.perf_counter() - self.started

    def spawn(self, source: str, argv: Sequence[str], *, env: dict[str, str] | None = None) -> None:
        # A session of its own, so that a stuck trial is ended as one group.
        process = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=REPO,
            start_new_session=True,
            bufsize=1,
        )
        self.processes[source] = process
        for stream, pipe in (("out", process.stdout), ("err", process.stderr)):
            reader = threading.Thread(target=self._read, args=(source, stream, pipe), daemon=True)
            reader.start()
            self._readers.append(reader)

    def _read(self, source: str, stream: str, pipe: object) -> None:
        for text in pipe:  # type: ignore[attr-defined]
            with self._changed:
                self.lines.append(Line(self.now(), stream, text.rstrip("\n"), source))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[list[Line]], bool], timeout: float) -> bool:
        """Block until the lines so far satisfy the predicate, or every process ended, or timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self.lines):
                left = deadline - time.monotonic()
                if left <= 0 or (
                    all(p.poll() is not None for p in self.processes.values())
                    and not any(r.is_alive() for r in self._readers)
                ):
                    return predicate(self.lines)
                self._changed.wait(min(left, 0.2))
            return True

    def finish(self, timeout: float) -> bool:
        """Wait for every process to exit (True), else end them all (False)."""
        deadline = time.monotonic() + timeout
        clean = True
        for source, process in self.processes.items():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                clean = False
                self.kill()
                process.wait()
            self.ended.setdefault(source, self.now())
        for reader in self._readers:
            reader.join(timeout=5)
        # Only this trial's processes are reaped meanwhile: the delta is theirs.
        self.cpu = _children_cpu() - self._cpu_before
        _live.discard(self)
        return clean

    def kill(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)

    def first(self, predicate: Callable[[Line], bool]) -> float | None:
        with self._lock:
            return next((line.at for line in self.lines if predicate(line)), None)

    def text(self) -> str:
        with self._lock:
            return "\n".join(f"{l.at:7.3f} {l.source}:{l.stream} {l.text}" for l in self.lines)


_live: set[Stamped] = set()  # started and not yet finished: ended on the way out


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def kill_processes_with(token: str) -> list[int]:
    """SIGKILL every process on this machine whose command line holds the token (a unique id
    this benchmark put there): the remote side of a trial that did not end by itself."""
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if token.encode() in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
    return killed
