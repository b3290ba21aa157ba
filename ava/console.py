"""Terminal output: one-line errors, per-node prefixes, tables. Used by the CLI only."""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ava.errors import AvaError

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
_print_lock = threading.Lock()

NODE_COLOURS = ["cyan", "magenta", "green", "yellow", "blue", "bright_red", "bright_cyan", "bright_magenta"]


def error(failure: AvaError) -> None:
    """`ava: <one line>`, then the tail of a failed command's output, indented."""
    err.print(Text("ava: ", style="bold red") + Text(failure.message))
    if failure.tail:
        for line in failure.tail.splitlines():
            err.print(Text("     " + line, style="dim"))


def warn(message: str) -> None:
    err.print(Text("ava: warning: ", style="yellow") + Text(message))


def info(message: str) -> None:
    err.print(Text(message, style="dim"))


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


class Prefixer:
    """Writes lines from many nodes to stdout, each prefixed, coloured per node on a TTY."""

    def __init__(self, names: list[str]) -> None:
        width = max((len(n) for n in names), default=0)
        self.width = width
        self.colours = {n: NODE_COLOURS[i % len(NODE_COLOURS)] for i, n in enumerate(names)}
        self.tty = out.is_terminal

    def line(self, prefix: str, text: str, *, key: str | None = None) -> None:
        label = prefix.ljust(self.width)
        with _print_lock:
            if self.tty:
                colour = self.colours.get(key or prefix, "white")
                out.print(Text(f"{label} | ", style=colour) + Text(text))
            else:
                # Plain when piped: a literal prefix, the line byte-for-byte after it.
                sys.stdout.write(f"{label} | {text}\n")
                sys.stdout.flush()


def table(columns: list[str], rows: list[list[str]], *, title: str | None = None) -> None:
    grid = Table(title=title, show_edge=False, header_style="bold")
    for index, column in enumerate(columns):
        # The first column names the thing (a node, a run id): never cut it, others wrap.
        widest = max([len(column)] + [len(row[0]) for row in rows]) if index == 0 else None
        grid.add_column(column, no_wrap=index == 0, min_width=widest)
    for row in rows:
        grid.add_row(*(escape(cell) for cell in row))
    out.print(grid)


def size(value: int | None) -> str:
    if value is None:
        return "-"
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if amount < 1024 or unit == "TiB":
            return f"{amount:.0f}{unit}" if unit == "B" else f"{amount:.1f}{unit}"
        amount /= 1024
    return str(value)
