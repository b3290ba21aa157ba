"""`ava nodes` and `ava exec`: look at the nodes, run one command on them."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import typer

from ava.agent.protocol import FAILED
from ava.cli import app, epilog, load_inventory, state
from ava.cli.complete import complete_nodes
from ava.errors import EXIT_INFRA, EXIT_JOB_FAILED, EXIT_OK, UsageError
from ava.units import format_size

if TYPE_CHECKING:
    from ava.config import Node
    from ava.transport import Result


@app.command(
    epilog=epilog(
        "ava nodes",
        "ava nodes --json | jq -r '.[] | select(.reachable) | .name'",
        "ava nodes --accept-new   (first contact with new nodes)",
    )
)
def nodes(
    json_out: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
    accept_new: bool = typer.Option(
        False, "--accept-new", help="Record host keys never seen before (a changed key is still refused)."
    ),
) -> int:
    """The inventory's nodes with live facts: reachable, GPUs, CPUs, memory, disk, cgroups."""
    from ava import console
    from ava.nodes import probe

    inventory = load_inventory()
    from ava.slurm.inventory import load as load_slurm  # a [slurm] table: sinfo's nodes

    if (slurm := load_slurm(inventory)) is not None:
        from ava.slurm.cli import nodes as slurm_nodes

        return slurm_nodes(inventory, slurm, json_out=json_out)
    reports = probe(list(inventory.nodes.values()), host_keys="accept-new" if accept_new else None)
    if json_out:
        console.print_json([r.to_json() for r in reports])
    else:
        rows = []
        for r in reports:
            if not r.reachable:
                rows.append([r.name, r.host, "no", "-", "-", "-", "-", "-", "-", "-", "-", r.error or ""])
                continue
            gpus = ", ".join(f"{g['index']}:{g['name']}" for g in r.gpus) or "none"
            held = f"{len(r.leases)} run{'s' if len(r.leases) != 1 else ''}" if r.leases else ""
            if any(h.get("draining") for h in r.leases):
                held += " (draining)"  # a teardown left processes: their GPUs stay leased
            rows.append(
                [
                    r.name,
                    r.host,
                    "yes",
                    str(r.cpus),
                    f"{format_size(r.mem_free)}/{format_size(r.mem_total)}",
                    format_size(r.disk_free),
                    _run_dirs(r.run_dirs),
                    r.torch or "-",
                    r.agent or "-",
                    gpus,
                    r.isolation or "-",
                    held,
                ]
            )
        console.table(
            [
                "node",
                "host",
                "up",
                "cpus",
                "mem free/total",
                "disk free",
                "run dirs",
                "torch",
                "agent",
                "gpus",
                "isolation",
                "held by",
            ],
            rows,
        )
        # Who holds what, one line per holder: run ids are what `ava stop` takes, so they are
        # printed whole, never cut to fit a table cell.
        for r in reports:
            for holder in r.leases:
                console.out.print(f"{r.name}: {_holding(holder)}", highlight=False, markup=False)
        for r in reports:
            if r.reachable and r.isolation == "none":
                console.warn(f"{r.name}: no cgroups available; runs there are fenced by process group only")
    return EXIT_OK if all(r.reachable for r in reports) else EXIT_INFRA


def _run_dirs(found: dict[str, int] | None) -> str:
    """`3 (1.2GiB)`: the run directories kept on the node (see README, Run directories)."""
    if not found:
        return "-"

    return f"{found.get('count', 0)} ({format_size(found.get('bytes', 0))})"


def _holding(holder: dict[str, Any]) -> str:
    """`run R of USER holds GPUs 0,1 (since 12:48:19)`, or its CPU slots when it holds no GPU."""
    what = []
    if holder.get("gpus"):
        what.append("GPUs " + ",".join(str(g) for g in holder["gpus"]))
    if holder.get("cpu_slots"):
        slots = int(holder["cpu_slots"])
        what.append(f"{slots} CPU slot{'s' if slots != 1 else ''}")
    since = f" (since {time.strftime('%H:%M:%S', time.localtime(holder['started']))})" if holder.get("started") else ""
    draining = f"; draining: {holder['draining']}" if holder.get("draining") else ""
    return f"run {holder.get('run')} of {holder.get('user')} holds {' and '.join(what) or 'no GPU'}{since}{draining}"


@app.command(
    "exec",
    context_settings={"allow_interspersed_args": False},
    epilog=epilog(
        "ava exec -- nvidia-smi -L",
        "ava exec gpu1 gpu2 -- df -h /data",
        "ava exec --json -- uptime | jq '.[] | {node, exit_code}'",
    ),
)
def exec_(
    words: list[str] = typer.Argument(
        ...,
        metavar="[NODE…] -- CMD…",
        autocompletion=complete_nodes,
        help="Nodes (default: all), then -- and the command.",
    ),
    json_out: bool = typer.Option(
        False, "--json", help="Print one JSON list (each node's exit code and output) instead of streaming lines."
    ),
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
    inventory = load_inventory()
    chosen = inventory.select(names) if names else list(inventory.nodes.values())
    prefixer = console.Prefixer([n.name for n in chosen], order=list(inventory.nodes))
    captured: dict[str, list[dict[str, str]]] = {n.name: [] for n in chosen}

    def one(node: Node) -> Result:
        if json_out:

            def keep(stream: str, line: str) -> None:
                captured[node.name].append({"stream": "stderr" if stream == "err" else "stdout", "line": line})

            return connect(node).run(command, on_line=keep)
        return connect(node).run(command, on_line=lambda _stream, line: prefixer.line(node.name, line))

    outcomes = run_all(chosen, one)
    if json_out:
        report = []
        for node in chosen:
            outcome = outcomes[node.name]
            report.append(
                {
                    "node": node.name,
                    "exit_code": None if isinstance(outcome, Failure) else outcome.exited,
                    "ok": not isinstance(outcome, Failure) and outcome.ok,
                    "error": outcome.message if isinstance(outcome, Failure) else None,
                    "output": captured[node.name],
                }
            )
        console.print_json(report)
        if any(r["error"] for r in report):
            return EXIT_INFRA
        return EXIT_OK if all(r["ok"] for r in report) else EXIT_JOB_FAILED
    rows, unreachable, failed = [], False, False
    for node in chosen:
        outcome = outcomes[node.name]
        if isinstance(outcome, Failure):
            unreachable = True
            rows.append([node.name, "-", outcome.message])
        else:
            failed = failed or not outcome.ok
            rows.append([node.name, str(outcome.exited), "ok" if outcome.ok else FAILED])
    console.err.print()
    for name, code, words_ in rows:
        console.err.print(f"{name}: exit {code} {words_}" if code != "-" else f"{name}: {words_}")
    if unreachable:
        return EXIT_INFRA
    return EXIT_JOB_FAILED if failed else EXIT_OK
