"""`ava train`, `ava ps`, `ava logs`, `ava attach`, `ava stop`: runs and their supervision."""

from __future__ import annotations

import json
import os
import shlex
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ava.cli import app, epilog, load_inventory, state
from ava.cli.complete import complete_nodes, complete_recipes, complete_runs
from ava.errors import EXIT_INFRA, EXIT_INTERRUPTED, EXIT_OK, AvaError, UsageError
from ava.units import format_duration

if TYPE_CHECKING:
    from ava.config import Inventory, Node, Recipe
    from ava.placement import Placement
    from ava.provision import PlanResult, Step
    from ava.runs import RunRecord
    from ava.supervisor import Outcome, Supervisor

RUN_HELP = "A run id, or a prefix of exactly one (see `ava ps`)."


class TerminalSink:
    """Prints the run's lines as `node/rank | text` and keeps a copy in the run's records."""

    def __init__(self, names: list[str], log_path: Path, order: list[str] | None = None) -> None:
        from ava import console

        self.console = console
        # A closed stdout (`ava train … | head`) must not stop supervising: lines go to the copy only.
        self.prefixer = console.Prefixer([f"{n}/00" for n in names], order=order, quiet_on_close=True)
        self.copy = open(log_path, "a", encoding="utf-8", buffering=1)

    def line(self, node: str, rank: str | None, text: str) -> None:
        prefix = f"{node}/{rank if rank is not None else '-'}"
        self.prefixer.line(prefix, text, key=node)
        self.copy.write(f"{prefix} | {text}\n")

    def event(self, text: str) -> None:
        try:
            self.console.info(f"ava: {text}")
        except OSError:
            pass  # stderr gone (terminal closed): the copy below still has it
        self.copy.write(f"{time.strftime('%H:%M:%S')} ava: {text}\n")


def _recipe(source: str, overrides: list[str]) -> tuple[Recipe, str]:
    """The recipe (local path or URL) with the text it was parsed from, kept in the run's record."""
    from dataclasses import replace

    from ava.config import load_recipe
    from ava.recipes import fetch

    local = fetch(source)
    recipe = load_recipe(str(local), overrides)
    text = (local / "recipe.toml" if local.is_dir() else local).read_text(encoding="utf-8")
    if "://" in source:
        recipe = replace(recipe, source=source)
    return recipe, text


@app.command(
    context_settings={"allow_extra_args": True},
    epilog=epilog(
        "ava train recipes/ddp-minimal",
        "ava train recipe.toml --set resources.nodes=2 -- --lr 3e-4 --steps 500",
        "RUN=$(ava train recipe.toml --detach) && ava wait $RUN",
        "ava train recipe.toml --stop-on-interrupt   (CI: a cancelled job stops the run)",
    ),
)
def train(
    ctx: typer.Context,
    recipe_path: str = typer.Argument(
        ...,
        metavar="RECIPE",
        autocompletion=complete_recipes,
        help="recipe.toml, its directory, or an fsspec URL. Words after -- are appended to the recipe's run.args.",
    ),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a recipe key (repeatable)."),
    detach: bool = typer.Option(
        False, "--detach", "-d", help="Print the run id and return; supervise in the background."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would run on each node, start nothing."),
    json_out: bool = typer.Option(False, "--json", help="With --dry-run: the plan as one JSON object."),
    nodes: str | None = typer.Option(
        None,
        "--nodes",
        metavar="A,B",
        autocompletion=complete_nodes,
        help="Only these nodes, in this order (the first is the master).",
    ),
    wait: bool = typer.Option(False, "--wait", help="When nodes are busy with other runs, wait for them."),
    stop_on_interrupt: bool = typer.Option(
        False,
        "--stop-on-interrupt",
        help="On Ctrl-C, SIGTERM or SIGHUP stop the run on every node (default: detach; it keeps running).",
    ),
    start_from: str | None = typer.Option(
        None,
        "--from",
        metavar="RUN[@STEP]",
        autocompletion=complete_runs,
        help="Start from RUN's committed checkpoint (its latest, or the one at STEP): ranks get "
        "AVA_INIT_CHECKPOINT, which ava.ckpt.load_latest() loads while the new run has none of its own.",
    ),
) -> int:
    """Run a recipe on the inventory's nodes with torchrun; stream logs; fail over on faults."""
    from ava import runs

    if detach and stop_on_interrupt:
        raise UsageError(
            "--stop-on-interrupt needs a run in the foreground; with --detach use `ava wait` and `ava stop`"
        )
    if json_out and not dry_run:
        raise UsageError("ava train --json needs --dry-run (a run's state as JSON: `ava ps RUN --json`)")
    script_args = _script_args(ctx)
    _refuse_script(recipe_path)
    recipe, _text = _recipe(recipe_path, overrides)
    if script_args:
        overrides = list(overrides) + [f"run.args={runs.toml_value(list(recipe.run.args) + script_args)}"]
        recipe, _text = _recipe(recipe_path, overrides)
    inventory = load_inventory()
    from ava.slurm.inventory import load as load_slurm  # a [slurm] table: the Slurm back-end

    if (slurm := load_slurm(inventory)) is not None:
        from ava.slurm import cli as slurm_cli

        if dry_run:
            return slurm_cli.dry_run(recipe, inventory, slurm, runs.new_run_id(recipe.name), json_out=json_out)
        # node/rank lines as on SSH nodes
        return slurm_cli.train(
            recipe,
            inventory,
            slurm,
            overrides=list(overrides),
            detach=detach,
            stop_on_interrupt=stop_on_interrupt,
            make_sink=TerminalSink,
        )
    only = [n.strip() for n in nodes.split(",") if n.strip()] if nodes else []
    placement = _place(recipe, inventory, only, check_venvs=not dry_run)
    run_id = runs.new_run_id(recipe.name)
    parent = None
    if start_from is not None:
        from ava.models import start_from as from_checkpoint

        recipe, parent = from_checkpoint(recipe, start_from, run_id)
    if dry_run:
        return _dry_run(recipe, placement, run_id, inventory.path.resolve().parent, json_out=json_out)
    if not detach:  # (a detached run is supervised by another process, which connects itself)
        from ava.transport import open_early

        # The nodes' SSH handshakes run while this process imports the rest and records the run.
        open_early(list(placement.nodes))
    from ava.supervisor import Supervisor, snapshot_code, spawn_background

    provisioned: list[str] = []
    base = inventory.path.resolve().parent
    if not detach and not _one_trip(list(placement.nodes), recipe, base):
        # Before the run exists: Ctrl-C during a long venv build leaves no run behind.
        outcomes = provision_visibly(list(placement.nodes), recipe, base)
        provisioned = [name for name, outcome in outcomes.items() if not isinstance(outcome, AvaError)]
    record = runs.create(run_id, recipe, inventory.path, placement.names, list(overrides), pool=only)
    snapshot_code(record, Path(recipe.root), leave_out=_recipe_file(recipe))
    record.parent = parent
    record.save()

    from ava import console

    if detach:
        spawn_background(record, inventory.path.resolve())
        console.write(run_id + "\n")
        console.info(f"follow: ava logs {run_id} -f    wait: ava wait {run_id}    stop: ava stop {run_id}")
        return EXIT_OK
    console.info(f"ava: run {run_id} on {', '.join(placement.names)}")
    sink = TerminalSink(
        placement.names + [s.name for s in placement.spares], record.dir / "output.log", order=list(inventory.nodes)
    )
    supervisor = Supervisor(
        record, _recipe_for(record, recipe), inventory, sink, wait_for_leases=wait, provisioned=provisioned
    )
    return _supervise(supervisor, record, inventory.path.resolve(), stop_on_interrupt=stop_on_interrupt)


def _place(recipe: Recipe, inventory: Inventory, only: list[str], *, check_venvs: bool) -> Placement:
    """The run's nodes, or a usage error saying why there are not enough; warns where a later
    attempt may not see the checkpoints; with CHECK_VENVS, a requirement the recipe may not name
    is a usage error too, found before any run exists."""
    from ava.placement import NotEnoughNodes, checkpoint_reach_warning, place

    try:
        placement = place(recipe, inventory, only=only)
    except NotEnoughNodes as never:
        # Placement reads the inventory only: waiting or retrying will not change the answer.
        raise UsageError(
            f"{never.message}; change the recipe's resources or the inventory ({inventory.path})"
        ) from None
    if (reach := checkpoint_reach_warning(recipe, placement)) is not None:
        from ava import console

        console.warn(reach)
    if check_venvs:
        from ava import provision

        for node in placement.nodes:
            provision.venv_python(node, recipe=recipe, root=inventory.path.resolve().parent)
    return placement


def _one_trip(nodes: list[Node], recipe: Recipe, base: Path) -> bool:
    """Every node was found ready by a check the launch cache remembers: its start checks the
    facts again itself, and provisions there only where they changed (one trip, not two)."""
    from ava.attempt import one_trip
    from ava.supervisor import master_address

    return one_trip(nodes, master_address(nodes[0]), recipe=recipe, base=base)


def provision_visibly(nodes: list[Node], recipe: Recipe | None, base: Path) -> dict[str, PlanResult | AvaError]:
    """Set the nodes up before the supervisor does, one line per step on stderr, so that a venv
    build (minutes) is never silent; the supervisor's own check then finds all in place. Errors
    are left for the supervisor to report as it always does."""
    from ava import console, provision

    began: dict[tuple[str, str], float] = {}

    def on_step(name: str, step: Step, state: str) -> None:
        key = (name, step.kind)
        try:
            if state == "start":
                began[key] = time.monotonic()
                console.info(f"ava: {name}: {step.kind}: {step.description} …")
            else:
                took = format_duration(time.monotonic() - began.get(key, time.monotonic()))
                console.info(f"ava: {name}: {step.kind} {state} ({took})")
        except OSError:
            pass

    return provision.ensure(nodes, recipe=recipe, base=base, on_step=on_step)


def _script_args(ctx: typer.Context) -> list[str]:
    """The words after `--`: appended to run.args. Extra words before `--` are a usage error."""
    after = state.argv[state.argv.index("--") + 1 :] if "--" in state.argv else []
    extra = list(ctx.args)
    if extra != after[len(after) - len(extra) :] or len(extra) > len(after):
        raise UsageError(
            f"unexpected argument {extra[0]!r}; script arguments go after --: ava train RECIPE -- --lr 3e-4"
        )
    return after


def _refuse_script(source: str) -> None:
    """`ava train train.py`: say what a recipe is instead of "invalid TOML"."""
    if not source.endswith(".py"):
        return
    stem = Path(source).stem.replace("_", "-") or "my-run"
    raise UsageError(
        f"{source}: a Python script, not a recipe; write recipe.toml beside it (these three lines), "
        "then `ava train recipe.toml -- ARGS…`",
        tail=f'name = "{stem}"\n[run]\nscript = "{Path(source).name}"',
    )


def _recipe_file(recipe: Recipe) -> str:
    """The recipe file's path inside its root: left out of the code snapshot, as its [env] may hold secrets."""
    if "://" in recipe.source:
        name = recipe.source.rstrip("/").rsplit("/", 1)[-1]
        return name if name.endswith(".toml") else "recipe.toml"
    return Path(recipe.source).resolve().relative_to(Path(recipe.root).resolve()).as_posix()


def _recipe_for(record: RunRecord, recipe: Recipe) -> Recipe:
    from dataclasses import replace

    # Every attempt runs the code snapshot taken at launch, not whatever the directory holds later.
    return replace(recipe, root=str(record.dir / "code"))


def _supervise(
    supervisor: Supervisor, record: RunRecord, inventory_path: Path, *, stop_on_interrupt: bool = False
) -> int:
    from ava import runs
    from ava.supervisor import spawn_background

    started = time.time()
    # Ctrl-C, SIGTERM or SIGHUP (the terminal closed, the SSH session to a login node dropped):
    # stop supervising and hand the run to a background supervisor, or with --stop-on-interrupt
    # (a cancelled CI job) stop the run, so that it does not keep its GPUs.
    received: list[int] = []

    def leave(number: int, _frame: object) -> None:
        received.append(number)
        supervisor.leave()

    previous = {sig: signal.signal(sig, leave) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        outcome = supervisor.run()
        if stop_on_interrupt and not record.final:
            # Signals again while stopping are ignored: half a stop would leave processes behind.
            for sig in previous:
                signal.signal(sig, signal.SIG_IGN)
            _say(
                f"\nava: {signal.Signals(received[0]).name if received else 'interrupted'}: "
                f"stopping {record.id} on every node (--stop-on-interrupt)"
            )
            code = _stop_run(runs.load(record.id), by="--stop-on-interrupt")
            return EXIT_INTERRUPTED if code == EXIT_OK else code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not record.final:
        # Ctrl-C: the run goes on; a background supervisor keeps failing over for it.
        spawn_background(record, inventory_path)
        say_detached(record.id)
        return EXIT_INTERRUPTED
    _summary(outcome, time.time() - started)
    return outcome.exit_code


def say_detached(run_id: str) -> None:
    """What an interrupted foreground supervisor says (SSH nodes and Slurm alike)."""
    from ava import console

    try:
        console.info(f"\nava: detached from {run_id}; it keeps running under a background supervisor.")
        console.info(f"     reattach: ava attach {run_id}    logs: ava logs {run_id} -f    stop: ava stop {run_id}")
    except OSError:
        pass  # after SIGHUP the terminal may be gone; the run is in good hands either way


def _say(text: str) -> None:
    from ava import console

    try:
        console.info(text)
    except OSError:
        pass  # after SIGHUP the terminal may be gone


def _summary(outcome: Outcome, elapsed: float) -> None:
    from ava import console
    from ava.agent.protocol import FAILED

    record = outcome.record
    attempt = record.current()
    console.err.print()
    console.err.print(
        f"run {record.id}: {record.state} after {format_duration(elapsed)} on {', '.join(record.nodes)}"
        f" ({len(record.attempts)} attempt{'s' if len(record.attempts) != 1 else ''})"
    )
    for past in record.attempts:
        console.err.print(
            f"  attempt {past.number} on {', '.join(past.nodes)}: {past.state}"
            + (f" - {past.cause}" if past.cause else "")
        )
    if record.state == FAILED and attempt is not None and attempt.failed_node:
        where = (
            f"{attempt.failed_node} rank {attempt.failed_rank}"
            if attempt.failed_rank is not None
            else attempt.failed_node
        )
        code = f" (exit {attempt.exit_code})" if attempt.exit_code is not None else ""
        console.err.print(f"ava: run {record.id} failed on {where}{code}:")
        for line in outcome.failing_lines()[-10:]:
            console.err.print(f"     {line}", markup=False, highlight=False)
        console.err.print(f"     (full log: ava logs {record.id} --node {attempt.failed_node})")


def _dry_run(recipe: Recipe, placement: Placement, run_id: str, inventory_dir: Path, *, json_out: bool = False) -> int:
    from ava import console, provision, sync
    from ava.supervisor import plan_attempt

    nodes = list(placement.nodes)
    manifest = sync.manifest_of(Path(recipe.root))
    # The tree a launch ships: the code snapshot leaves the recipe file out (snapshot_code).
    manifest = sync.Manifest(tuple(f for f in manifest.files if f.path != _recipe_file(recipe)))
    pythons = {n.name: provision.venv_python(n, recipe=recipe, root=inventory_dir) for n in nodes}
    launches, _, _ = plan_attempt(recipe, nodes, run_id, 1, manifest.tree, sync.runtime_manifest()[0].tree, pythons)
    if json_out:
        console.print_json(
            {
                "run": run_id,
                "recipe": recipe.name,
                "code_tree": manifest.tree,
                "files": len(manifest.files),
                "bytes": manifest.size,
                "spares": [s.name for s in placement.spares],
                "nodes": [
                    {"node": i.node.name, "address": i.node.address, "argv": list(i.argv), "spec": i.spec.to_json()}
                    for i in launches
                ],
            }
        )
        return EXIT_OK
    for item in launches:
        console.out.print(f"# node {item.node.name} ({item.node.address})", highlight=False, markup=False)
        console.out.print("argv: " + shlex.join(item.argv), highlight=False, markup=False)
        console.out.print(
            "spec: " + json.dumps(item.spec.to_json(), indent=2, sort_keys=True), highlight=False, markup=False
        )
    console.info(
        f"dry run: nothing started; code tree {manifest.tree} ({len(manifest.files)} files, {manifest.size} bytes)"
    )
    return EXIT_OK


@app.command(
    epilog=epilog(
        "ava ps",
        "ava ps ddp-minimal-2026   (one run: its id or a unique prefix)",
        'ava ps "$RUN" --json | jq -r .state',
    )
)
def ps(
    run: str | None = typer.Argument(
        None, metavar="[RUN]", autocompletion=complete_runs, help=RUN_HELP + " Default: every run."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print JSON: a list of runs, or one run's object."),
) -> int:
    """Runs, their state, nodes and attempts; or one run in full."""
    from ava import console, runs
    from ava.agent.protocol import RUNNING

    if run is not None:
        record = runs.resolve(run)
        if json_out:
            console.print_json(record.summary())
        else:
            _show_run(record)
        return EXIT_OK
    records, damaged = runs.scan()
    for bad in damaged:
        # One damaged record must not hide every other run; `ava stop` still works on it.
        console.warn(f"skipped {bad.message}")
    from ava.cli.show import progress_cells, progress_json

    if json_out:
        console.print_json([{**r.summary(), "progress": progress_json(r)} for r in records])
        return EXIT_OK
    # Step, steps/s and the first metric's latest value: columns only while a run is running.
    running = any(r.state == RUNNING for r in records)
    rows = []
    for r in records:
        last = r.current()
        why = last.cause if last and last.cause else ""
        took = (r.ended or time.time()) - r.started
        rows.append(
            [
                r.id,
                r.state,
                ",".join(r.nodes),
                str(len(r.attempts)),
                time.strftime("%m-%d %H:%M", time.localtime(r.started)),
                format_duration(took),
                *(progress_cells(r) if running else []),
                why,
            ]
        )
    progress = ["step", "steps/s", "metric"] if running else []
    console.table(["run", "state", "nodes", "attempts", "started", "took", *progress, "last cause"], rows)
    return EXIT_OK


def _show_run(record: RunRecord) -> None:
    """`key  value` lines for one run, then one line per attempt: whole values, any width."""
    from ava import console

    took = (record.ended or time.time()) - record.started
    rows = [
        ["run", record.id],
        ["recipe", record.recipe],
        ["state", record.state],
        ["exit code", "-" if record.exit_code is None else str(record.exit_code)],
        ["nodes", ",".join(record.nodes)],
        ["started", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.started))],
        ["took", format_duration(took)],
    ]
    console.plain(["key", "value"], rows)
    attempts = [
        [
            str(a.number),
            a.state,
            ",".join(a.nodes),
            format_duration((a.ended or time.time()) - a.started),
            a.cause or "",
        ]
        for a in record.attempts
    ]
    if attempts:
        console.write("\n")
        console.table(["attempt", "state", "nodes", "took", "cause"], attempts)


@app.command(
    epilog=epilog(
        'ava logs "$RUN" -f',
        'ava logs "$RUN" --node gpu1 --rank 3 --tail 100',
        'ava logs "$RUN" --since 10m | grep -i error',
    )
)
def logs(
    run: str = typer.Argument(..., metavar="RUN", autocompletion=complete_runs, help=RUN_HELP),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep following until the run ends."),
    node: str | None = typer.Option(
        None, "--node", metavar="NODE", autocompletion=complete_nodes, help="Only this node's lines."
    ),
    rank: int | None = typer.Option(None, "--rank", metavar="R", help="Only this global rank's lines."),
    tail: int | None = typer.Option(
        None, "--tail", metavar="N", help="Only the last N lines of each node, of the latest attempt."
    ),
    since: str | None = typer.Option(
        None, "--since", metavar="DURATION", help="Only attempts running within this long (e.g. 10m, 2h)."
    ),
    timestamps: bool = typer.Option(
        False, "--timestamps", "-t", help="Each line with the time (UTC) the node's log got it."
    ),
) -> int:
    """The run's output, each line prefixed by node/rank; every attempt, in order."""
    from ava import console, runs
    from ava.agent.protocol import RUNNING, STARTING
    from ava.cli.logs import LogPrinter
    from ava.units import parse_duration

    record = runs.resolve(run)
    from ava.slurm import cli as slurm_cli

    if slurm_cli.is_slurm_run(record):  # its lines came through the login node: the run's copy
        return slurm_cli.logs(record, node=node, rank=rank, follow=follow)
    names = sorted({n for a in record.attempts for n in a.nodes} | set(record.nodes))
    if node is not None and node not in names:
        raise UsageError(f"run {record.id} ran on {', '.join(names)}; no node {node} there (see `ava ps {record.id}`)")
    if rank is not None and not 0 <= rank < record.widest_world():
        raise UsageError(f"run {record.id} has ranks 0 to {record.widest_world() - 1}; no rank {rank}")
    if tail is not None and tail < 0:
        raise UsageError(f"--tail {tail}: expected a number of lines, 0 or more")
    horizon = time.time() - parse_duration(since, source="--since", key="") if since else None
    inventory = load_inventory_for(record)
    printer = LogPrinter(
        record.id,
        console.Prefixer([f"{n}/00" for n in names], order=list(inventory.nodes)),
        rank=rank,
        tail=tail,
        timestamps=timestamps,
    )
    printed: set[int] = set()
    while True:
        record = runs.load(record.id)
        latest = record.attempts[-1].number if record.attempts else 0
        for past in record.attempts:
            if past.number in printed:
                continue
            skipped = (tail is not None and past.number != latest) or (
                horizon is not None and past.ended is not None and past.ended < horizon
            )
            if skipped:
                printed.add(past.number)
                continue
            live = follow and past.state in (STARTING, RUNNING) and not record.final
            chosen = [inventory.nodes[n] for n in past.nodes if (node is None or n == node) and n in inventory.nodes]
            if len(record.attempts) > 1 and tail is None:
                console.info(f"── attempt {past.number} on {', '.join(past.nodes)}")
            printer.attempt(past, chosen, live=live)
            if past.cause:
                console.info(f"── attempt {past.number} ended: {past.cause}")
            if past.state in (STARTING, RUNNING) and not live:
                continue
            printed.add(past.number)
        if not follow or record.final:
            break
        if all(a.number in printed for a in record.attempts) and not _alive(record.supervisor_pid or 0):
            # Nothing supervises the run (its `ava train` was killed): nothing more will start.
            console.info(f"ava: {record.id} has no supervisor; `ava attach {record.id}` takes it over")
            break
        time.sleep(1.0)
    return EXIT_INFRA if printer.failures else EXIT_OK


def load_inventory_for(record: RunRecord) -> Inventory:
    """The inventory given now, else the one the run was launched with."""
    from ava.cli import inventory_path
    from ava.config import load_inventory as load

    if inventory_path() is not None:
        inventory = load_inventory()
        if all(n in inventory.nodes for a in record.attempts for n in a.nodes):
            return inventory
    return load(record.inventory)


@app.command(epilog=epilog('ava stop "$RUN"', "ava stop ddp-minimal-2026 --json"))
def stop(
    run: str = typer.Argument(..., metavar="RUN", autocompletion=complete_runs, help=RUN_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the outcome as one JSON object."),
) -> int:
    """Stop every process of the run on every node; returns once none is left."""
    from ava import runs
    from ava.supervisor import STOP_FILE

    run_id = runs.resolve_id(run)
    asked = time.time()
    (runs.runs_dir() / run_id / STOP_FILE).touch()
    try:
        record = runs.load(run_id)
    except runs.DamagedRecord as damaged:
        # Stopping must work from the nodes' side even when the local record is lost: the
        # agent stops the run by its id on every inventory node (a node without it has nothing to do).
        from ava import console

        console.warn(f"{damaged.message}; stopping {run_id} on every node of the inventory")
        return _stop_on(run_id, list(load_inventory().nodes.values()), json_out=json_out)
    from ava.slurm import cli as slurm_cli

    if slurm_cli.is_slurm_run(record):  # scancel, verified with squeue
        return slurm_cli.stop_recorded(record, load_inventory_for(record), json_out=json_out)
    return _stop_run(record, by="`ava stop`", json_out=json_out, asked=asked)


def _stop_run(record: RunRecord, *, by: str, json_out: bool = False, asked: float | None = None) -> int:
    """Stop the run on every node it used, wait for its supervisor to go, record it stopped."""
    from ava import runs

    inventory = load_inventory_for(record)
    names = sorted({n for a in record.attempts for n in a.nodes} | set(record.nodes))
    chosen = [inventory.nodes[n] for n in names if n in inventory.nodes]

    since = time.time() if asked is None else asked

    def settle() -> None:
        if record.supervisor_pid != os.getpid():
            _wait_supervisor_gone(record.id)
        runs.record_stopped(record.id, by=by, asked=since)

    return _stop_on(record.id, chosen, json_out=json_out, settle=settle)


def _stop_on(run_id: str, chosen: list[Node], *, json_out: bool, settle: Callable[[], None] | None = None) -> int:
    from ava import attempt as ops
    from ava import console

    outcomes = ops.stop(chosen, run_id)
    unreachable = {name: o.message for name, o in outcomes.items() if isinstance(o, AvaError)}
    for name, message in unreachable.items():
        console.warn(f"could not stop on {name}: {message}")
    if settle is not None:
        settle()
    stopped = [n.name for n in chosen if n.name not in unreachable]
    if json_out:
        console.print_json({"run": run_id, "stopped": not unreachable, "nodes": stopped, "unreachable": unreachable})
    elif not unreachable:
        console.info(f"ava: run {run_id} stopped on {', '.join(stopped)}; no process of it is left")
    return EXIT_INFRA if unreachable else EXIT_OK


def _wait_supervisor_gone(run_id: str, timeout: float = 20.0) -> None:
    from ava import runs

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            pid = runs.load(run_id).supervisor_pid
        except runs.DamagedRecord:
            return
        if not pid or not _alive(pid):
            return
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    from ava.agent.procs import alive  # stdlib only: the agent's own check (a zombie is not alive)

    return alive(pid)


@app.command(epilog=epilog('ava attach "$RUN"'))
def attach(
    run: str = typer.Argument(..., metavar="RUN", autocompletion=complete_runs, help=RUN_HELP),
    wait: bool = typer.Option(False, "--wait", help="When nodes are busy, wait for them."),
) -> int:
    """Follow a run and take over its supervision (failover) from a background supervisor."""
    from ava import runs
    from ava.supervisor import Supervisor, recipe_of

    record = runs.resolve(run)
    if record.final:
        from ava.supervisor import Outcome

        _summary(Outcome(record, record.exit_code or 0), (record.ended or time.time()) - record.started)
        return record.exit_code or 0
    pid = record.supervisor_pid
    if pid and _alive(pid) and pid != os.getpid():
        os.kill(pid, signal.SIGTERM)  # it leaves the run alone and exits
        deadline = time.time() + 15
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.1)
        record = runs.load(record.id)
    from ava.slurm import cli as slurm_cli

    if slurm_cli.is_slurm_run(record):  # its job, through the login node
        return slurm_cli.attach(record, load_inventory_for(record), make_sink=TerminalSink)
    inventory = load_inventory_for(record)
    sink = TerminalSink(list(inventory.nodes), record.dir / "output.log", order=list(inventory.nodes))
    supervisor = Supervisor(record, recipe_of(record), inventory, sink, wait_for_leases=wait, role="ava attach")
    return _supervise(supervisor, record, Path(record.inventory))
