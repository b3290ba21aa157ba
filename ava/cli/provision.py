"""`ava provision`: gather facts, show the plan per node, apply it with live progress."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import typer

from ava.cli import app, epilog, load_inventory
from ava.cli.complete import complete_nodes
from ava.errors import EXIT_INFRA, EXIT_OK, AvaError

if TYPE_CHECKING:
    from ava.config import Node
    from ava.provision import Plan, PlanResult


@app.command(
    epilog=epilog(
        "ava provision",
        "ava provision gpu1 gpu2 --dry-run",
        "ava provision --dry-run --json | jq '.[] | {node, steps: (.steps | length)}'",
    )
)
def provision(
    names: list[str] = typer.Argument(
        None, metavar="[NODE…]", autocompletion=complete_nodes, help="Nodes to set up (default: all)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan per node; change nothing."),
    json_out: bool = typer.Option(False, "--json", help="With --dry-run: the plan per node as a JSON list."),
) -> int:
    """Set nodes up: workdir, agent, runtime, cache configuration, cgroup parent, Python environment.

    Idempotent: a second run finds everything in place and says "nothing to do".
    """
    from ava import console
    from ava.provision import Plan, plan_all

    inventory = load_inventory()
    chosen = inventory.select(names) if names else list(inventory.nodes.values())
    outcomes = plan_all(chosen, base=inventory.path.parent)
    plans = {name: o for name, o in outcomes.items() if isinstance(o, Plan)}
    failed = {name: o for name, o in outcomes.items() if isinstance(o, AvaError)}
    width = max(len(n.name) for n in chosen)
    if json_out:
        if not dry_run:
            from ava.errors import UsageError

            raise UsageError("ava provision --json needs --dry-run (it reports the plan)")
        console.print_json(
            [
                {"node": n.name, "error": failed[n.name].message}
                if n.name in failed
                else {
                    "node": n.name,
                    "error": None,
                    "steps": [{"kind": s.kind, "description": s.description} for s in plans[n.name].steps],
                    "notes": list(plans[n.name].notes),
                }
                for n in chosen
            ]
        )
        return EXIT_INFRA if failed else EXIT_OK

    _print_plans(chosen, plans, failed, width)
    if dry_run:
        return EXIT_INFRA if failed else EXIT_OK

    busy = {name: plan for name, plan in plans.items() if not plan.empty}
    results = _apply(chosen, busy, width) if busy else {}
    for name, outcome in results.items():
        if isinstance(outcome, AvaError):
            failed[name] = outcome
            console.error(outcome)
    done = [name for name, outcome in results.items() if not isinstance(outcome, AvaError)]
    console.info(
        f"{len(done)} node{'s' if len(done) != 1 else ''} set up, {len(plans) - len(busy)} already in place"
        + (f", {len(failed)} failed" if failed else "")
    )
    return EXIT_INFRA if failed else EXIT_OK


def _print_plans(chosen: list[Node], plans: dict[str, Plan], failed: dict[str, AvaError], width: int) -> None:
    """Each node's steps still needed ("nothing to do" when none) and notes; then its errors."""
    from ava import console

    for node in chosen:
        if node.name in failed:
            continue
        plan = plans[node.name]
        label = node.name.ljust(width)
        if plan.empty:
            console.out.print(f"{label}  nothing to do", markup=False)
        for step in plan.steps:
            console.out.print(f"{label}  {step.kind:<8} {step.description}", markup=False)
        for note in plan.notes:
            console.out.print(f"{label}  note     {note}", markup=False)
    for error in failed.values():
        console.error(error)


def _apply(chosen: list[Node], busy: dict[str, Plan], width: int) -> dict[str, PlanResult | AvaError]:
    """Apply the plans with a bar per node on a terminal, one line per step off one."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from ava import console
    from ava.provision import Step, apply_all

    lock = threading.Lock()
    live = console.err.is_terminal
    with Progress(
        TextColumn("{task.fields[node]}", style="bold"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        console=console.err,
        transient=False,
        disable=not live,
    ) as progress:
        tasks = {
            name: progress.add_task("waiting", total=len(p.steps), node=name.ljust(width)) for name, p in busy.items()
        }

        def on_step(name: str, step: Step, state: str) -> None:
            with lock:
                if state == "start":
                    progress.update(tasks[name], description=step.description)
                elif state == "done":
                    progress.advance(tasks[name])
                else:
                    progress.update(tasks[name], description=f"FAILED: {step.kind}")
                if not live and state != "start":
                    console.info(f"{name}: {step.kind} {state}")

        results = apply_all([n for n in chosen if n.name in busy], busy, on_step)
        for name, outcome in results.items():
            if not isinstance(outcome, AvaError):
                progress.update(tasks[name], description="done")
    return results
