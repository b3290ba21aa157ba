"""The `ava` command: parse, call the core, render. The only place that prints or exits."""

from __future__ import annotations

import sys
import traceback
from typing import List, Optional

import click
import typer

from ava.errors import EXIT_INFRA, EXIT_INTERRUPTED, EXIT_JOB_FAILED, EXIT_OK, EXIT_USAGE, AvaError, UsageError

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


def _inventory():  # type: ignore[no-untyped-def]
    from ava.config import load_inventory

    return load_inventory(state.inventory)


@app.command()
def nodes(
    json_out: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
    accept_new: bool = typer.Option(
        False, "--accept-new", help="Record host keys never seen before (a changed key is still refused)."
    ),
) -> int:
    """The inventory's nodes with live facts: reachable, GPUs, CPUs, memory, disk, cgroups."""
    from ava import console
    from ava.nodes import probe

    inventory = _inventory()
    reports = probe(list(inventory.nodes.values()), host_keys="accept-new" if accept_new else None)
    if json_out:
        console.print_json([r.to_json() for r in reports])
    else:
        rows = []
        for r in reports:
            if not r.reachable:
                rows.append([r.name, r.host, "no", "-", "-", "-", "-", "-", "-", r.error or ""])
                continue
            gpus = ", ".join(f"{g['index']}:{g['name']}" for g in r.gpus) or "none"
            held = ", ".join(
                f"{h.get('run')}({','.join(map(str, h.get('gpus') or [])) or str(h.get('cpu_slots', '')) + ' cpu'})"
                for h in r.leases
            )
            rows.append([
                r.name, r.host, "yes", str(r.cpus), f"{console.size(r.mem_free)}/{console.size(r.mem_total)}",
                console.size(r.disk_free), r.torch or "-", gpus, r.isolation or "-", held,
            ])
        console.table(
            ["node", "host", "up", "cpus", "mem free/total", "disk free", "torch", "gpus", "isolation", "held by"],
            rows,
        )
        for r in reports:
            if r.reachable and r.isolation == "none":
                console.warn(f"{r.name}: no cgroups available; runs there are fenced by process group only")
    return EXIT_OK if all(r.reachable for r in reports) else EXIT_INFRA


@app.command(
    "exec",
    context_settings={"allow_interspersed_args": False},
)
def exec_(
    words: List[str] = typer.Argument(..., metavar="[NODE…] -- CMD…", help="Nodes (default: all), then -- and the command."),
) -> int:
    """Run one command on nodes in parallel; each output line prefixed by its node."""
    from ava import console
    from ava.errors import AvaError as Failure
    from ava.transport import connect, run_all

    if "--" not in state.argv:
        raise UsageError("usage: ava exec [NODE…] -- CMD…  (the command goes after --)")
    command_words = state.argv[state.argv.index("--") + 1 :]
    names = [w for w in words[: len(words) - len(command_words)] if w != "--"]
    if not command_words:
        raise UsageError("ava exec: no command given after --")
    # The words reach the node's shell once, joined by spaces exactly as `ssh node CMD…` does.
    command = " ".join(command_words)
    inventory = _inventory()
    chosen = inventory.select(names) if names else list(inventory.nodes.values())
    prefixer = console.Prefixer([n.name for n in chosen])

    def one(node):  # type: ignore[no-untyped-def]
        return connect(node).run(command, on_line=lambda _stream, line: prefixer.line(node.name, line))

    outcomes = run_all(chosen, one)
    rows, unreachable, failed = [], False, False
    for node in chosen:
        outcome = outcomes[node.name]
        if isinstance(outcome, Failure):
            unreachable = True
            rows.append([node.name, "-", outcome.message])
        else:
            failed = failed or not outcome.ok
            rows.append([node.name, str(outcome.exited), "ok" if outcome.ok else "failed"])
    console.err.print()
    for name, code, words_ in rows:
        console.err.print(f"{name}: exit {code} {words_}" if code != "-" else f"{name}: {words_}")
    if unreachable:
        return EXIT_INFRA
    return EXIT_JOB_FAILED if failed else EXIT_OK


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


if __name__ == "__main__":
    main()
