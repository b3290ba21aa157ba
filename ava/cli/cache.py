"""`ava cache status|warm|clear`: the node caches, one line or row per node."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping
from typing import Any

import typer

from ava.cli import app, epilog, load_inventory
from ava.units import format_size

cache_app = typer.Typer(
    name="cache",
    help="The node-local block cache: what it holds, warm it, clear it.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(cache_app, name="cache")

NODES_HELP = "Comma-separated nodes (default: all in the inventory)."


def _prepared(names: str | None) -> tuple[list[str], list[Any], dict[str, Any], dict[str, str]]:
    """(the chosen nodes' names, those ready to run the cache module, errors of the others,
    each ready node's interpreter). Provisions what is missing, as `ava train` does."""
    from ava import provision
    from ava.errors import AvaError

    inventory = load_inventory()
    chosen = (
        inventory.select([n.strip() for n in names.split(",") if n.strip()])
        if names
        else list(inventory.nodes.values())
    )
    base = inventory.path.resolve().parent
    from ava.cli.train import provision_visibly

    outcomes = provision_visibly(chosen, None, base)  # never silent: one line per step it takes
    failed = {name: o for name, o in outcomes.items() if isinstance(o, AvaError)}
    ready = [node for node in chosen if node.name not in failed]
    pythons = {node.name: provision.venv_python(node, root=base) for node in ready}
    return [n.name for n in chosen], ready, failed, pythons


def _in_order(names: list[str], *parts: Mapping[str, Any]) -> dict[str, Any]:
    merged = {k: v for part in parts for k, v in part.items()}
    return {name: merged[name] for name in names if name in merged}


def _json_rows(outcomes: Mapping[str, Any]) -> list[dict[str, Any]]:
    from ava.errors import AvaError

    rows = []
    for name, outcome in outcomes.items():
        if isinstance(outcome, AvaError):
            rows.append({"node": name, "ok": False, "error": outcome.message})
        else:
            rows.append({"ok": True, **outcome.to_json()})
    return rows


def _report_errors(outcomes: Mapping[str, Any]) -> None:
    from ava import console
    from ava.errors import AvaError

    for outcome in outcomes.values():
        if isinstance(outcome, AvaError):
            console.error(outcome)


def _forwarded(patterns: list[str]) -> dict[str, str]:
    """Variables of this environment named by --env (globs allowed), for the nodes."""
    from ava.errors import UsageError

    env: dict[str, str] = {}
    for pattern in patterns:
        found = {k: v for k, v in os.environ.items() if fnmatch.fnmatchcase(k, pattern)}
        if not found:
            raise UsageError(f"--env {pattern}: no such variable in your environment (see `ava cache warm --help`)")
        env.update(found)
    return env


@cache_app.command("status", epilog=epilog("ava cache status", "ava cache status --nodes gpu1,gpu2 --json"))
def status(
    nodes: str | None = typer.Option(None, "--nodes", metavar="A,B", help=NODES_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
) -> int:
    """Per node: bytes used of the cache size, blocks, hits, misses, bytes fetched."""
    from ava import cachenodes, console

    names, ready, failed, pythons = _prepared(nodes)
    outcomes = _in_order(names, failed, cachenodes.status(ready, pythons=pythons))
    if json_out:
        console.print_json(_json_rows(outcomes))
    else:
        rows = []
        for name, s in outcomes.items():
            if isinstance(s, cachenodes.CacheStatus):
                reads = s.hits + s.misses
                ratio = f"{100 * s.hits / reads:.1f}%" if reads else "-"
                rows.append(
                    [
                        name,
                        f"{format_size(s.bytes)}/{format_size(s.size_limit)}",
                        str(s.blocks),
                        str(s.hits),
                        str(s.misses),
                        ratio,
                        format_size(s.fetched_bytes),
                        s.dir,
                    ]
                )
            else:
                rows.append([name, "-", "-", "-", "-", "-", "-", "(see below)"])
        console.table(["node", "used/size", "blocks", "hits", "misses", "hit rate", "fetched", "dir"], rows)
        _report_errors(outcomes)
    return cachenodes.exit_code(outcomes)


@cache_app.command(
    "warm",
    epilog=epilog(
        "ava cache warm 's3://bucket/shards/train-*.tar'",
        "ava cache warm s3://bucket/data.bin --env 'AWS_*' --nodes gpu1",
    ),
)
def warm(
    urls: list[str] = typer.Argument(
        ..., metavar="URL|GLOB…", help="Objects to fetch, e.g. 's3://bucket/shards/*.tar'."
    ),
    nodes: str | None = typer.Option(None, "--nodes", metavar="A,B", help=NODES_HELP),
    env: list[str] = typer.Option(
        [],
        "--env",
        metavar="NAME",
        help="Forward this variable (or glob, e.g. 'AWS_*') from your environment to the nodes, in a "
        "0600 file, never on a command line. By default the nodes' own environment (~/.aws) is used.",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON list of per-node results."),
) -> int:
    """Fetch every block of the matching objects into every node's cache, all nodes at once."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from ava import cachenodes, console

    forwarded = _forwarded(env)
    names, ready, failed, pythons = _prepared(nodes)
    width = max(len(name) for name in names)
    with Progress(
        TextColumn("{task.fields[node]}", style="bold"),
        BarColumn(bar_width=30),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        console=console.err,
        transient=False,
        disable=json_out or not console.err.is_terminal,
    ) as progress:
        tasks = {n.name: progress.add_task("warm", total=None, node=n.name.ljust(width)) for n in ready}

        def on_progress(name: str, done: int, total: int) -> None:
            progress.update(tasks[name], completed=done, total=total or None)

        warmed = cachenodes.warm(ready, list(urls), env=forwarded, pythons=pythons, on_progress=on_progress)
    outcomes = _in_order(names, failed, warmed)
    if json_out:
        console.print_json(_json_rows(outcomes))
    else:
        prefixer = console.Prefixer(list(outcomes))
        for name, w in outcomes.items():
            if isinstance(w, cachenodes.Warmed):
                prefixer.line(
                    name,
                    f"warmed {w.objects} object{'s' if w.objects != 1 else ''} "
                    f"({format_size(w.total_bytes)}); cache holds {format_size(w.bytes)} in {w.blocks} blocks",
                )
        _report_errors(outcomes)
        if any(isinstance(w, cachenodes.WarmFailed) and "credentials" in w.message.lower() for w in outcomes.values()):
            console.info(
                "the nodes read with their own credentials (~/.aws, instance roles); "
                "to use yours, forward them: --env 'AWS_*'"
            )
    return cachenodes.exit_code(outcomes)


@cache_app.command("clear", epilog=epilog("ava cache clear", "ava cache clear --nodes gpu2 --json"))
def clear(
    nodes: str | None = typer.Option(None, "--nodes", metavar="A,B", help=NODES_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON list of per-node results."),
) -> int:
    """Remove every block, object record and counter from the nodes' caches."""
    from ava import cachenodes, console

    names, ready, failed, pythons = _prepared(nodes)
    outcomes = _in_order(names, failed, cachenodes.clear(ready, pythons=pythons))
    if json_out:
        console.print_json(_json_rows(outcomes))
    else:
        prefixer = console.Prefixer(list(outcomes))
        for name, c in outcomes.items():
            if isinstance(c, cachenodes.Cleared):
                prefixer.line(name, f"freed {format_size(c.freed_bytes)} ({c.blocks} blocks) in {c.dir}")
        _report_errors(outcomes)
    return cachenodes.exit_code(outcomes)
