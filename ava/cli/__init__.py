"""The `ava` command: parse, call the core, render. The only place that prints or exits."""

from __future__ import annotations

import sys
import traceback
from typing import List, Optional

import click
import typer

from ava.errors import EXIT_INFRA, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, AvaError

app = typer.Typer(
    name="ava",
    help="Turn a handful of GPU nodes you can SSH into into one training cluster.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
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
        None, "--inventory", "-i", help="Inventory file (default: $AVA_INVENTORY, else ./ava.toml)."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
) -> None:
    state.inventory = inventory
    state.debug = debug


def load_inventory():  # type: ignore[no-untyped-def]
    """The inventory named by --inventory, $AVA_INVENTORY or ./ava.toml."""
    from ava.config import load_inventory as load

    return load(state.inventory)


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point: the one error boundary. Every AvaError becomes one line and its exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
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
    except click.exceptions.Exit as done:
        code = done.exit_code
    except click.exceptions.Abort:
        code = EXIT_INTERRUPTED
    except click.ClickException as failure:
        command = f"ava {args[0]}" if args and not args[0].startswith("-") else "ava"
        sys.stderr.write(f"ava: {failure.format_message()} (see `{command} --help`)\n")
        code = EXIT_USAGE
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except Exception as bug:  # a defect in ava: still one line, the traceback behind --debug
        if state.debug:
            traceback.print_exc()
        sys.stderr.write(f"ava: internal error: {type(bug).__name__}: {bug} (rerun with --debug)\n")
        code = EXIT_INFRA
    finally:
        from ava.transport import close_all

        close_all()
    sys.exit(code)


# Each command group registers itself on `app`; they import heavy libraries only when run.
from ava.cli import nodes as _nodes  # noqa: E402,F401
