"""What every transport offers, the result of one command, and the fan-out over nodes."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from ava.errors import AvaError, CommandError

if TYPE_CHECKING:
    from ava.config import Node

# Called with ("out" | "err", line without its newline) as output arrives.
LineCallback = Callable[[str, str], None]
T = TypeVar("T")


@dataclass(frozen=True)
class Result:
    """The outcome of one command on one node (the shape of invoke's Result)."""

    node: str
    command: str
    exited: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exited == 0

    def tail(self, lines: int = 10) -> str:
        text = (self.stderr.strip() or self.stdout.strip()).splitlines()
        return "\n".join(text[-lines:])

    def check(self, what: str = "") -> Result:
        """Raise a CommandError naming the node unless the command succeeded."""
        if not self.ok:
            label = what or self.command.split()[0] if self.command else "command"
            raise CommandError(f"{self.node}: {label} exited {self.exited}", tail=self.tail())
        return self


class Transport(Protocol):
    """Runs commands on one node and moves files to and from it.

    Commands are shell text for the node's shell: callers quote every value (shlex.join).
    Remote paths may start with `~/`, meaning the node user's home.
    """

    node: Node

    def run(
        self,
        command: str,
        *,
        timeout: float | None = None,
        on_line: LineCallback | None = None,
        stdin: bytes | None = None,
    ) -> Result: ...

    def open(self) -> None:
        """Connect ahead of the first command; a failure is that command's to raise."""

    def put(self, local: Path | bytes, remote: str, *, mode: int | None = None) -> None: ...

    def get(self, remote: str, local: Path) -> None: ...

    def close(self) -> None: ...


class LineSplitter:
    """Turns chunks of text into whole lines for a callback; keeps the text for the Result."""

    def __init__(self, stream: str, callback: LineCallback | None) -> None:
        self.stream, self.callback = stream, callback
        self.parts: list[str] = []
        self._pending = ""
        self._lock = threading.Lock()

    def write(self, chunk: str) -> int:
        with self._lock:
            self.parts.append(chunk)
            if self.callback is not None:
                self._pending += chunk
                *lines, self._pending = self._pending.split("\n")
                for line in lines:
                    self.callback(self.stream, line)
        return len(chunk)

    def flush(self) -> None:
        """Nothing: invoke flushes after every chunk it reads, mid-line as often as not; a line
        is delivered when its newline comes (or at `end`), never cut at a chunk's edge."""

    def end(self) -> None:
        """Deliver a last line that had no newline."""
        with self._lock:
            if self.callback is not None and self._pending:
                self.callback(self.stream, self._pending)
                self._pending = ""

    def text(self) -> str:
        return "".join(self.parts)


def run_all(
    nodes: list[Node],
    action: Callable[[Node], T],
    *,
    max_workers: int = 32,
) -> dict[str, T | AvaError]:
    """Run `action` for every node in parallel; a result or an AvaError for each, in node order.

    One bad node never hides the others: errors are collected, not raised. Errors that are
    not AvaErrors are programming errors and propagate.
    """
    outcomes: dict[str, T | AvaError] = {}
    if not nodes:
        return outcomes

    def one(node: Node) -> T | AvaError:
        try:
            return action(node)
        except AvaError as error:
            return error

    with ThreadPoolExecutor(max_workers=min(max_workers, len(nodes))) as pool:
        futures = [(node.name, pool.submit(one, node)) for node in nodes]
        for name, future in futures:
            outcomes[name] = future.result()
    return outcomes


def shell_path(path: str) -> str:
    """Quote a node path for the node's shell, keeping a leading `~/` meaning home."""
    import shlex

    if path == "~":
        return "~"
    if path.startswith("~/"):
        return "~/" + shlex.quote(path[2:])
    return shlex.quote(path)
