"""`ava logs`: a run's output as it reaches the nodes' logs, each line prefixed by node/rank."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping

from ava import console
from ava.attempt import follow_logs
from ava.config import Node
from ava.console import Prefixer
from ava.errors import AvaError
from ava.runs import Attempt
from ava.supervisor import RANK_LINE
from ava.transport import run_all


class LogPrinter:
    """Prints one attempt's output from its nodes, read in parallel: every line, or with `tail`
    the last lines of each node (then, while the attempt runs, what follows them)."""

    def __init__(
        self, run_id: str, prefixer: Prefixer, *, rank: int | None, tail: int | None, timestamps: bool
    ) -> None:
        self.run_id, self.prefixer = run_id, prefixer
        self.rank, self.tail, self.timestamps = rank, tail, timestamps
        self.failures = 0  # nodes whose logs could not be read

    def attempt(self, past: Attempt, chosen: list[Node], *, live: bool) -> None:
        if self.tail is None:
            self._report(run_all(chosen, lambda n: self._read(n, past.number, self._emitter(n.name), follow=live)))
            return
        kept: dict[str, deque[str]] = {n.name: deque(maxlen=self.tail) for n in chosen}
        offsets = run_all(chosen, lambda n: self._read(n, past.number, self._keeper(kept[n.name]), follow=False))
        self._report(offsets)
        for n in chosen:
            for text in kept[n.name]:
                self.emit(n.name, text)
        if live:
            ready = {name: offset for name, offset in offsets.items() if isinstance(offset, int)}
            followed = [n for n in chosen if n.name in ready]
            self._report(
                run_all(
                    followed,
                    lambda n: self._read(n, past.number, self._emitter(n.name), offset=ready[n.name], follow=True),
                )
            )

    def emit(self, name: str, text: str) -> None:
        stamp, text = _stamped(text) if self.timestamps else ("", text)
        match = RANK_LINE.match(text)
        line_rank, body = (match.group(1), match.group(2)) if match else ("-", text)
        if self.rank is None or line_rank == str(self.rank):
            self.prefixer.line(f"{name}/{line_rank}", stamp + body, key=name)

    def _emitter(self, name: str) -> Callable[[str], None]:
        return lambda text: self.emit(name, text)

    def _keeper(self, kept: deque[str]) -> Callable[[str], None]:
        """Keeps the node's lines of the chosen rank (all with no --rank), the last `tail` of them."""

        def keep(text: str) -> None:
            match = RANK_LINE.match(_stamped(text)[1] if self.timestamps else text)
            if self.rank is None or (match is not None and match.group(1) == str(self.rank)):
                kept.append(text)

        return keep

    def _read(self, node: Node, attempt: int, on_line: Callable[[str], None], *, follow: bool, offset: int = 0) -> int:
        return follow_logs(
            node, self.run_id, attempt, on_line, offset=offset, follow=follow, timestamps=self.timestamps
        )

    def _report(self, outcomes: Mapping[str, object]) -> None:
        for name, outcome in outcomes.items():
            if isinstance(outcome, AvaError):
                self.failures += 1
                console.warn(f"logs of {name} unavailable: {outcome.message}")


def _stamped(text: str) -> tuple[str, str]:
    """`<unix time> <line>` (agent logs --timestamps) as an RFC 3339 UTC prefix and the line."""
    when, _, line = text.partition(" ")
    try:
        seconds = float(when)
    except ValueError:
        return "", text
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1000):03d}Z ", line
