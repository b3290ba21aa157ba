"""`ava doctor`: the preflight table, and with --bandwidth the all-reduce benchmark."""

from __future__ import annotations

import typer

from ava.cli import app, epilog, load_inventory
from ava.cli.complete import complete_nodes
from ava.errors import EXIT_INFRA, EXIT_OK
from ava.units import format_size


@app.command(epilog=epilog("ava doctor", "ava doctor gpu1 gpu2 --bandwidth", "ava doctor --json | jq -r .status"))
def doctor(
    names: list[str] = typer.Argument(
        None,
        metavar="[NODE…]",
        autocompletion=complete_nodes,
        help="Nodes to check (default: all); the first is the master.",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the checks as JSON instead of a table."),
    bandwidth: bool = typer.Option(False, "--bandwidth", help="Also run an all-reduce benchmark across the nodes."),
) -> int:
    """Preflight: SSH, versions alike, GPUs and their health, disk, clocks, network, name lookups."""
    from ava import console
    from ava.doctor import FAIL, PASS, WARN, measure_bandwidth, observe, verdicts, worst

    inventory = load_inventory()
    from ava.slurm.inventory import load as load_slurm  # a [slurm] table: Slurm's own checks

    if (slurm := load_slurm(inventory)) is not None:
        from ava.slurm.cli import doctor as slurm_doctor

        return slurm_doctor(inventory, slurm, json_out=json_out)
    chosen = inventory.select(names) if names else list(inventory.nodes.values())
    observations = observe(chosen)
    checks = verdicts(observations)
    measured = None
    if bandwidth:
        measured, judged = measure_bandwidth([o for o in observations if o.error is None])
        checks += judged
    status = worst(checks)
    if json_out:
        console.print_json(
            {
                "status": status,
                "checks": [c.to_json() for c in checks],
                "bandwidth": measured.to_json() if measured else None,
            }
        )
    else:
        marks = {PASS: "pass", WARN: "WARN", FAIL: "FAIL"}
        rows = [[c.check, c.node or "all", marks[c.status], c.detail] for c in checks]
        console.table(["check", "node", "status", "detail"], rows)
        problems = [c for c in checks if c.status != PASS and c.fix]
        if problems:
            console.out.print()
            for c in problems:
                where = f"{c.node}: " if c.node else ""
                console.out.print(f"{marks[c.status]} {c.check}: {where}{c.fix}", markup=False)
        if measured:
            console.out.print()
            console.table(
                ["size", "count", "time (us)", "algbw (GB/s)", "busbw (GB/s)"],
                [
                    [
                        format_size(r.size),
                        str(r.count),
                        f"{r.seconds * 1e6:.1f}",
                        f"{r.algbw / 1e9:.3f}",
                        f"{r.busbw / 1e9:.3f}",
                    ]
                    for r in measured.rows
                ],
                title=f"all-reduce, {measured.backend}, {len(measured.nodes)} nodes",
            )
            console.table(
                ["node", f"link to {measured.nodes[0]} (GB/s)", "verdict"],
                [[l.node, f"{l.bandwidth / 1e9:.3f}", "slow" if l.slow else "ok"] for l in measured.links],
            )
        counts = {s: sum(c.status == s for c in checks) for s in (PASS, WARN, FAIL)}
        console.info(f"{counts[PASS]} passed, {counts[WARN]} warnings, {counts[FAIL]} failed")
    return EXIT_INFRA if status == FAIL else EXIT_OK
