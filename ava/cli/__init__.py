"""The `ava` command: parse, call the core, render. The only place that prints or exits."""

from __future__ import annotations

import os
import sys
import traceback
from typing import List, Optional

import typer

from ava.errors import EXIT_INFRA, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, AvaError

app = typer.Typer(
    name="ava",
    help="Turn a handful of GPU nodes you can SSH into into one training cluster.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help: rich-formatted help costs ~80 ms of imports on every `ava --help`.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class State:
    inventory: Optional[str] = None
    debug: bool = False
    argv: List[str] = []


state = State()


@app.callback()
def _options(
    inventory: Optional[str] = typer.Option(
        None, "--inventory", "-i", metavar="PATH", help="Inventory file (default: $AVA_INVENTORY, else ./ava.toml)."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
) -> None:
    state.inventory = inventory
    state.debug = debug


def load_inventory():  # type: ignore[no-untyped-def]
    """The inventory named by --inventory, $AVA_INVENTORY or ./ava.toml."""
    from ava.config import load_inventory as load

    return load(state.inventory)


GLOBAL_FLAGS = ("--debug",)
GLOBAL_VALUED = ("--inventory", "-i")


def hoist_global_options(args: List[str]) -> List[str]:
    """Accept `ava nodes --inventory F` as well as `ava --inventory F nodes` (never past `--`)."""
    front: List[str] = []
    rest: List[str] = []
    index = 0
    while index < len(args):
        word = args[index]
        if word == "--":
            rest += args[index:]
            break
        if word in GLOBAL_FLAGS:
            front.append(word)
        elif word in GLOBAL_VALUED and index + 1 < len(args):
            front += [word, args[index + 1]]
            index += 1
        elif word.startswith("--inventory="):
            front.append(word)
        else:
            rest.append(word)
        index += 1
    return front + rest


def app_commands() -> List[str]:
    return [c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands] + [
        g.name or "" for g in app.registered_groups
    ]


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point: the one error boundary. Every AvaError becomes one line and its exit code."""
    # Run records, logs and env.json may hold secrets: whatever ava creates is the user's alone.
    os.umask(0o077)
    args = hoist_global_options(list(sys.argv[1:] if argv is None else argv))
    state.argv = args
    code = EXIT_OK
    try:
        result = app(args=args, prog_name="ava", standalone_mode=False)
        code = result if isinstance(result, int) else EXIT_OK
    except AvaError as failure:
        from ava import console

        if state.debug:
            traceback.print_exc()
        console.error(failure)
        code = failure.exit_code
    except typer.Exit as done:
        code = done.exit_code
    except (typer.Abort, KeyboardInterrupt):
        code = EXIT_INTERRUPTED
    except Exception as failure:
        if hasattr(failure, "format_message") and hasattr(failure, "exit_code"):
            # A usage error from the argument parser (typer's own copy of click's exceptions).
            command = next((a for a in args if not a.startswith("-")), None)
            where = f"ava {command}" if command in app_commands() else "ava"
            sys.stderr.write(f"ava: {failure.format_message()} (see `{where} --help`)\n")
            code = EXIT_USAGE
        else:  # a defect in ava: still one line, the traceback behind --debug
            if state.debug:
                traceback.print_exc()
            sys.stderr.write(f"ava: internal error: {type(failure).__name__}: {failure} (rerun with --debug)\n")
            code = EXIT_INFRA
    finally:
        from ava.transport import close_all

        close_all()
    sys.exit(code)


# Each command group registers itself on `app`; they import heavy libraries only when run.
from ava.cli import nodes as _nodes  # noqa: E402,F401
from ava.cli import doctor as _doctor  # noqa: E402,F401
from ava.cli import provision as _provision  # noqa: E402,F401
from ava.cli import train as _train  # noqa: E402,F401
from ava.cli import cache as _cache  # noqa: E402,F401
