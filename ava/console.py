"""Terminal output: one-line errors, per-node prefixes, tables. Used by the CLI only.

Where output goes decides its form: on a terminal, rich tables and coloured node prefixes; off
one (a pipe, a file, CI), whole rows with no box characters and no colour, so nothing a script
reads is cut or wrapped. Colour follows no-color.org: NO_COLOR turns it off, FORCE_COLOR on.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import zlib
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ava.errors import AvaError

# The version of every JSON shape ava prints (README, "JSON output"): raised when a key changes meaning.
JSON_VERSION = 1

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
_print_lock = threading.Lock()

NODE_COLOURS = ["cyan", "magenta", "green", "yellow", "blue", "bright_red", "bright_cyan", "bright_magenta"]
_ANSI = {
    "cyan": "36",
    "magenta": "35",
    "green": "32",
    "yellow": "33",
    "blue": "34",
    "bright_red": "91",
    "bright_cyan": "96",
    "bright_magenta": "95",
}


class PipeClosed(BrokenPipeError):
    """stdout's reader went away (`ava logs RUN | head`): the command ends quietly, exit 0."""


def colour_on(stream: Any = None) -> bool:
    """Colour on this stream: never with NO_COLOR, always with FORCE_COLOR, else on a terminal."""
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    stream = stream if stream is not None else sys.stdout
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def tabular() -> bool:
    """Rich tables only on a terminal (or with --format table); plain rows elsewhere."""
    from ava.cli import state

    if state.output_format != "auto":  # --format table|plain
        return state.output_format == "table"
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def stdout_gone() -> None:
    """The reader of stdout left: point fd 1 at /dev/null so no later flush raises again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def write(text: str) -> None:
    """One chunk of text to stdout; a closed pipe raises PipeClosed."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        stdout_gone()
        raise PipeClosed() from None


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
    """JSON on stdout; every object at the top (or in a top-level list) carries "version"."""
    if isinstance(data, dict):
        data = {"version": JSON_VERSION, **data}
    elif isinstance(data, list):
        data = [{"version": JSON_VERSION, **item} if isinstance(item, dict) else item for item in data]
    write(json.dumps(data, indent=2, default=str) + "\n")


def node_colour(name: str, order: list[str] | None = None) -> str:
    """A node's colour: its place in `order` (the inventory) when given, else a hash of its name.
    The same node gets the same colour in `ava train`, `ava logs` and `ava exec`."""
    if order and name in order:
        return NODE_COLOURS[order.index(name) % len(NODE_COLOURS)]
    return NODE_COLOURS[zlib.crc32(name.encode()) % len(NODE_COLOURS)]


class Prefixer:
    """Writes lines from many nodes to stdout as `node/rank | text`, the prefix coloured per node.

    `names` are the prefixes' node names (for the width); `order` the inventory's node names, so
    that colours do not change between commands. When stdout's reader goes away (`| head`), lines
    come from reader threads that no exception would stop cleanly, so the command ends there,
    exit 0; with `quiet_on_close` later lines are dropped instead (`ava train` keeps supervising).
    """

    def __init__(self, names: list[str], *, order: list[str] | None = None, quiet_on_close: bool = False) -> None:
        self.width = max((len(n) for n in names), default=0)
        self.order = list(order) if order else list(names)
        self.colour = colour_on(sys.stdout)
        self.quiet_on_close = quiet_on_close
        self.closed = False

    def line(self, prefix: str, text: str, *, key: str | None = None) -> None:
        if self.closed:
            if self.quiet_on_close:
                return
            raise PipeClosed()
        label = prefix.ljust(self.width)
        if self.colour:
            code = _ANSI[node_colour(key or prefix.split("/", 1)[0], self.order)]
            rendered = f"\x1b[{code}m{label} |\x1b[0m {text}\n"
        else:
            # Plain: a literal prefix, the line byte-for-byte after it.
            rendered = f"{label} | {text}\n"
        with _print_lock:
            try:
                write(rendered)
            except PipeClosed:
                self.closed = True
                if not self.quiet_on_close:
                    try:
                        sys.stderr.flush()
                    finally:
                        os._exit(0)


def table(columns: list[str], rows: list[list[str]], *, title: str | None = None) -> None:
    """A rich table on a terminal; off one, aligned plain rows, one record a line, values whole."""
    if not tabular():
        plain(columns, rows, title=title)
        return
    grid = Table(title=title, show_edge=False, header_style="bold")
    for index, column in enumerate(columns):
        # The first column names the thing (a node, a run id): never cut it, others wrap.
        widest = max([len(column)] + [len(row[0]) for row in rows]) if index == 0 else None
        grid.add_column(column, no_wrap=index == 0, min_width=widest)
    for row in rows:
        grid.add_row(*(escape(cell) for cell in row))
    out.print(grid)


def plain(columns: list[str], rows: list[list[str]], *, title: str | None = None) -> None:
    """Columns aligned with spaces under the table's own header; an empty cell is `-` and a line
    break a space, so each record stays on one line and every column keeps its place."""
    cells = [[" ".join(str(c).split()) or "-" for c in row] for row in rows]
    header = list(columns)
    widths = [max([len(header[i])] + [len(r[i]) for r in cells if i < len(r)]) for i in range(len(columns))]
    lines = [f"# {title}"] if title else []
    for row in [header] + cells:
        padded = [cell.ljust(widths[i]) if i < len(row) - 1 else cell for i, cell in enumerate(row)]
        lines.append("  ".join(padded))
    write("\n".join(lines) + "\n")
