"""The `ava` command: parse, call the core, render. The only place that prints or exits."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from ava.errors import EXIT_INFRA, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, AvaError

if TYPE_CHECKING:
    from ava.config import Inventory

EXIT_CODES = (
    "Exit codes: 0 success, 1 the job failed, 2 usage or configuration error, "
    "3 nodes unreachable or infrastructure failure, 130 interrupted."
)
ENV_VARS = (
    "Environment: AVA_INVENTORY (inventory file), AVA_HOME (run records and logs, default ~/.ava), "
    "NO_COLOR / FORCE_COLOR (colour off / on)."
)


def epilog(*examples: str) -> str:
    """A command's help footer: its examples (kept as written), exit codes, environment."""
    lines = "\n".join(f"  {e}" for e in examples)
    return f"\b\nExamples:\n{lines}\n\n{EXIT_CODES}\n\n{ENV_VARS}"


app = typer.Typer(
    name="ava",
    help="Turn a handful of GPU nodes you can SSH into into one training cluster.",
    epilog=epilog(
        "ava nodes",
        "ava train recipes/ddp-minimal --set resources.nodes=2",
        "RUN=$(ava train recipe.toml --detach) && ava wait $RUN; ava logs $RUN --tail 50",
    ),
    no_args_is_help=False,
    add_completion=True,
    pretty_exceptions_enable=False,
    # Plain help: rich-formatted help costs ~80 ms of imports on every `ava --help`.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _plain_argument_help() -> None:
    """Typer's usage line shows a required argument as `{RECIPE}`: show it as its metavar says."""
    import typer.core as core

    argument = getattr(core, "TyperArgument", None)
    original = getattr(argument, "make_metavar", None)
    if argument is None or original is None:
        return

    def make_metavar(self: Any, ctx: Any, *, usage: bool = False) -> str:
        found = str(original(self, ctx, usage=usage))
        return found[1:-1] if usage and found.startswith("{") and found.endswith("}") else found

    argument.make_metavar = make_metavar


_plain_argument_help()


class State:
    """What the global options set, for the command that runs (one per process)."""

    def __init__(self) -> None:
        self.inventory: str | None = None
        self.debug = False
        self.argv: list[str] = []
        self.output_format = "auto"


state = State()


def _version(value: bool) -> None:
    if value:
        from ava import __version__

        sys.stdout.write(f"ava {__version__}{_build_note()}\n")
        raise typer.Exit(EXIT_OK)


def _build_note() -> str:
    """Which build the one-file ava is (ava/_build.py is written into that file only, by ava.build)."""
    try:
        from ava._build import BUILD  # type: ignore[import-not-found]
    except ImportError:
        return ""
    return (
        f" (one file, commit {BUILD['commit']}, built {BUILD['date']}, CPython {BUILD['pythons']}, {BUILD['platform']})"
    )


@app.callback(invoke_without_command=True)
def _options(
    ctx: typer.Context,
    inventory: str | None = typer.Option(
        None,
        "--inventory",
        "-i",
        metavar="PATH",
        envvar="AVA_INVENTORY",
        show_envvar=True,
        help="Inventory file (default: ./ava.toml in this directory or a parent, else ~/.config/ava/ava.toml).",
    ),
    home: str | None = typer.Option(
        None,
        "--home",
        metavar="DIR",
        envvar="AVA_HOME",
        show_envvar=True,
        help="Where run records and logs are kept (default: ~/.ava).",
    ),
    output_format: str = typer.Option(
        "auto",
        "--format",
        metavar="auto|table|plain",
        help="Tables on a terminal, plain aligned rows elsewhere (auto); or always one of them.",
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    version: bool = typer.Option(
        False, "--version", "-V", callback=_version, is_eager=True, help="Print ava's version and exit."
    ),
) -> None:
    from ava.errors import UsageError

    # From $AVA_INVENTORY, the inventory keeps its own wording in errors ("named by $AVA_INVENTORY").
    source = ctx.get_parameter_source("inventory")
    given = getattr(source, "name", "") == "COMMANDLINE"
    state.inventory = inventory if given else None
    state.debug = debug
    if home:
        os.environ["AVA_HOME"] = home
    if output_format not in ("auto", "table", "plain"):
        raise UsageError(f"--format {output_format}: expected auto, table or plain")
    state.output_format = output_format
    if ctx.invoked_subcommand is None and not ctx.resilient_parsing:
        sys.stdout.write(ctx.get_help() + "\n")
        raise typer.Exit(EXIT_OK)


def inventory_path() -> str | None:
    """--inventory, else $AVA_INVENTORY, else ava.toml here or in a parent directory, else
    ~/.config/ava/ava.toml ($XDG_CONFIG_HOME honoured); None when there is none anywhere."""
    if state.inventory:
        return state.inventory
    if os.environ.get("AVA_INVENTORY"):
        return os.environ["AVA_INVENTORY"]
    here = Path.cwd()
    for directory in (here, *here.parents):
        if (directory / "ava.toml").is_file():
            return str(directory / "ava.toml") if directory != here else "ava.toml"
    config = Path(os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")) / "ava" / "ava.toml"
    return str(config) if config.is_file() else None


def load_inventory() -> Inventory:
    """The inventory named by --inventory or $AVA_INVENTORY, else found (see inventory_path)."""
    from ava.config import load_inventory as load

    return load(inventory_path())


GLOBAL_FLAGS = ("--debug",)
GLOBAL_VALUED = ("--inventory", "-i", "--home", "--format")


def hoist_global_options(args: list[str]) -> list[str]:
    """Accept `ava nodes --inventory F` as well as `ava --inventory F nodes` (never past `--`)."""
    front: list[str] = []
    rest: list[str] = []
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
        elif word.startswith(("--inventory=", "--home=", "--format=")):
            front.append(word)
        else:
            rest.append(word)
        index += 1
    return front + rest


def app_commands() -> list[str]:
    return [c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands] + [
        g.name or "" for g in app.registered_groups
    ]


def main(argv: list[str] | None = None) -> None:
    """Entry point: the one error boundary. Every AvaError becomes one line and its exit code."""
    # Run records, logs and env.json may hold secrets: whatever ava creates is the user's alone.
    os.umask(0o077)
    args = hoist_global_options(list(sys.argv[1:] if argv is None else argv))
    state.argv = args
    _apply_format(args)
    code = EXIT_OK
    try:
        result = app(args=args, prog_name="ava", standalone_mode=False)
        code = result if isinstance(result, int) else EXIT_OK
    except BrokenPipeError:
        # `ava logs RUN | head`: the reader has what it wanted. Quietly, as `git log | head`.
        _stdout_gone()
        code = EXIT_OK
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
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout_gone()
    sys.exit(code)


def _apply_format(args: list[str]) -> None:
    """--format reaches console before any command renders (console is imported lazily)."""
    chosen = None
    for index, word in enumerate(args):
        if word == "--":
            break
        if word == "--format" and index + 1 < len(args):
            chosen = args[index + 1]
        elif word.startswith("--format="):
            chosen = word.split("=", 1)[1]
    state.output_format = chosen or "auto"


def _stdout_gone() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


# Each command group registers itself on `app`; they import heavy libraries only when run.
from ava.cli import cache as _cache  # noqa: E402,F401
from ava.cli import doctor as _doctor  # noqa: E402,F401
from ava.cli import models as _models  # noqa: E402,F401
from ava.cli import nodes as _nodes  # noqa: E402,F401
from ava.cli import plot as _plot  # noqa: E402,F401
from ava.cli import provision as _provision  # noqa: E402,F401
from ava.cli import show as _show  # noqa: E402,F401
from ava.cli import train as _train  # noqa: E402,F401
from ava.cli import wait as _wait  # noqa: E402,F401
