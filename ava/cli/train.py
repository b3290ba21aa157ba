"""`ava train`, `ava ps`, `ava logs`, `ava attach`, `ava stop`: runs and their supervision."""

from __future__ import annotations

import json
import os
import shlex
import signal
import time
from pathlib import Path
from typing import List, Optional

import typer

from ava.cli import app, load_inventory, state
from ava.errors import EXIT_INFRA, EXIT_INTERRUPTED, EXIT_OK, AvaError


class TerminalSink:
    """Prints the run's lines as `node/rank | text` and keeps a copy in the run's records."""

    def __init__(self, names: list[str], log_path: Path) -> None:
        from ava import console

        self.console = console
        self.prefixer = console.Prefixer([f"{n}/00" for n in names])
        self.copy = open(log_path, "a", encoding="utf-8", buffering=1)

    def line(self, node: str, rank: str | None, text: str) -> None:
        prefix = f"{node}/{rank if rank is not None else '-'}"
        self.prefixer.line(prefix, text, key=node)
        self.copy.write(f"{prefix} | {text}\n")

    def event(self, text: str) -> None:
        self.console.info(f"ava: {text}")
        self.copy.write(f"{time.strftime('%H:%M:%S')} ava: {text}\n")


def _recipe(source: str, overrides: List[str]):  # type: ignore[no-untyped-def]
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


@app.command()
def train(
    recipe_path: str = typer.Argument(..., metavar="RECIPE", help="recipe.toml, its directory, or an fsspec URL."),
    overrides: List[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a recipe key (repeatable)."),
    detach: bool = typer.Option(False, "--detach", "-d", help="Return at once with the run id; supervise in the background."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would run on each node, start nothing."),
    nodes: Optional[str] = typer.Option(None, "--nodes", metavar="A,B", help="Only these nodes, in this order (the first is the master)."),
    wait: bool = typer.Option(False, "--wait", help="When nodes are busy with other runs, wait for them."),
) -> int:
    """Run a recipe on the inventory's nodes with torchrun; stream logs; fail over on faults."""
    from ava import runs
    from ava.placement import checkpoint_reach_warning, place
    from ava.supervisor import Supervisor, snapshot_code, spawn_background

    recipe, _text = _recipe(recipe_path, overrides)
    inventory = load_inventory()
    only = [n.strip() for n in nodes.split(",") if n.strip()] if nodes else []
    placement = place(recipe, inventory, only=only)
    if (reach := checkpoint_reach_warning(recipe, placement)) is not None:
        from ava import console

        console.warn(reach)
    if not dry_run:
        from ava import provision

        # A requirement the recipe may not name is a usage error, found before any run exists.
        for node in placement.nodes:
            provision.venv_python(node, recipe=recipe, root=inventory.path.resolve().parent)
    run_id = runs.new_run_id(recipe.name)
    if dry_run:
        return _dry_run(recipe, placement, run_id, inventory.path.resolve().parent)

    # Environment values (secrets) stay out of record.json and recipe.toml: see runs.private_recipe.
    record = runs.RunRecord(
        id=run_id, recipe=recipe.name, source=recipe.source, recipe_hash="", raw=runs.env_names_only(recipe.raw),
        inventory=str(inventory.path.resolve()), nodes=placement.names,
        overrides=runs.overrides_without_env_values(list(overrides)),
    )
    record.dir.mkdir(parents=True, exist_ok=True)
    runs.private_recipe(record, recipe.raw, dict(recipe.env))
    import hashlib

    record.recipe_hash = hashlib.sha256(json.dumps(recipe.raw, sort_keys=True, default=str).encode()).hexdigest()[:16]
    snapshot_code(record, Path(recipe.root), leave_out=_recipe_file(recipe))
    record.save()

    from ava import console

    if detach:
        spawn_background(record, inventory.path.resolve())
        console.out.print(run_id, highlight=False)
        console.info(f"follow: ava logs {run_id} -f    stop: ava stop {run_id}")
        return EXIT_OK
    console.info(f"ava: run {run_id} on {', '.join(placement.names)}")
    sink = TerminalSink(placement.names + [s.name for s in placement.spares], record.dir / "output.log")
    supervisor = Supervisor(record, _recipe_for(record, recipe), inventory, sink, wait_for_leases=wait)
    return _supervise(supervisor, record, inventory.path.resolve())


def _recipe_file(recipe) -> str:  # type: ignore[no-untyped-def]
    """The recipe file's path inside its root: left out of the code snapshot, as its [env] may hold secrets."""
    if "://" in recipe.source:
        name = recipe.source.rstrip("/").rsplit("/", 1)[-1]
        return name if name.endswith(".toml") else "recipe.toml"
    return Path(recipe.source).resolve().relative_to(Path(recipe.root).resolve()).as_posix()


def _recipe_for(record, recipe):  # type: ignore[no-untyped-def]
    from dataclasses import replace

    # Every attempt runs the code snapshot taken at launch, not whatever the directory holds later.
    return replace(recipe, root=str(record.dir / "code"))


def _supervise(supervisor, record, inventory_path: Path) -> int:  # type: ignore[no-untyped-def]
    from ava import console
    from ava.supervisor import spawn_background

    started = time.time()
    # Ctrl-C, SIGTERM or SIGHUP (the terminal closed, the SSH session to a login node dropped):
    # stop supervising and hand the run to a background supervisor.
    previous = {sig: signal.signal(sig, lambda *_: supervisor.leave())
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        outcome = supervisor.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not record.final:
        # Ctrl-C: the run goes on; a background supervisor keeps failing over for it.
        spawn_background(record, inventory_path)
        try:
            console.info(f"\nava: detached from {record.id}; it keeps running under a background supervisor.")
            console.info(f"     reattach: ava attach {record.id}    logs: ava logs {record.id} -f    stop: ava stop {record.id}")
        except OSError:
            pass  # after SIGHUP the terminal may be gone; the run is in good hands either way
        return EXIT_INTERRUPTED
    _summary(outcome, time.time() - started)
    return outcome.exit_code


def _summary(outcome, elapsed: float) -> None:  # type: ignore[no-untyped-def]
    from ava import console

    record = outcome.record
    attempt = record.current()
    console.err.print()
    console.err.print(f"run {record.id}: {record.state} after {elapsed:.1f}s on {', '.join(record.nodes)}"
                      f" ({len(record.attempts)} attempt{'s' if len(record.attempts) != 1 else ''})")
    for past in record.attempts:
        console.err.print(f"  attempt {past.number} on {', '.join(past.nodes)}: {past.state}"
                          + (f" - {past.cause}" if past.cause else ""))
    if record.state == "failed" and attempt is not None and attempt.failed_node:
        where = f"{attempt.failed_node} rank {attempt.failed_rank}" if attempt.failed_rank is not None else attempt.failed_node
        code = f" (exit {attempt.exit_code})" if attempt.exit_code is not None else ""
        console.err.print(f"ava: run {record.id} failed on {where}{code}:")
        for line in outcome.failing_lines()[-10:]:
            console.err.print(f"     {line}", markup=False, highlight=False)
        console.err.print(f"     (full log: ava logs {record.id} --node {attempt.failed_node})")


def _dry_run(recipe, placement, run_id: str, inventory_dir: Path) -> int:  # type: ignore[no-untyped-def]
    from ava import console, provision, sync
    from ava.supervisor import plan_attempt

    nodes = list(placement.nodes)
    manifest = sync.manifest_of(Path(recipe.root))
    # The tree a launch ships: the code snapshot leaves the recipe file out (snapshot_code).
    manifest = sync.Manifest(tuple(f for f in manifest.files if f.path != _recipe_file(recipe)))
    pythons = {n.name: provision.venv_python(n, recipe=recipe, root=inventory_dir) for n in nodes}
    launches, _, _ = plan_attempt(recipe, nodes, run_id, 1, manifest.tree, sync.runtime_manifest()[0].tree, pythons)
    for item in launches:
        console.out.print(f"# node {item.node.name} ({item.node.address})", highlight=False, markup=False)
        console.out.print("argv: " + shlex.join(item.argv), highlight=False, markup=False)
        console.out.print("spec: " + json.dumps(item.spec, indent=2, sort_keys=True), highlight=False, markup=False)
    console.info(f"dry run: nothing started; code tree {manifest.tree} ({len(manifest.files)} files, {manifest.size} bytes)")
    return EXIT_OK


@app.command()
def ps(json_out: bool = typer.Option(False, "--json", help="Print JSON objects.")) -> int:
    """Runs, their state, nodes and attempts."""
    from ava import console, runs

    records, damaged = runs.scan()
    for bad in damaged:
        # One damaged record must not hide every other run; `ava stop` still works on it.
        console.warn(f"skipped {bad.message}")
    if json_out:
        console.print_json([r.summary() for r in records])
        return EXIT_OK
    rows = []
    for r in records:
        last = r.current()
        why = last.cause if last and last.cause else ""
        took = (r.ended or time.time()) - r.started
        rows.append([r.id, r.state, ",".join(r.nodes), str(len(r.attempts)), time.strftime("%m-%d %H:%M", time.localtime(r.started)),
                     f"{took:.0f}s", why])
    console.table(["run", "state", "nodes", "attempts", "started", "took", "last cause"], rows)
    return EXIT_OK


@app.command()
def logs(
    run: str = typer.Argument(..., metavar="RUN"),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep following until the run ends."),
    node: Optional[str] = typer.Option(None, "--node", help="Only this node's lines."),
) -> int:
    """The run's output, each line prefixed by node/rank; every attempt, in order."""
    from ava import attempt as ops
    from ava import console, runs
    from ava.supervisor import RANK_LINE

    record = runs.resolve(run)
    inventory = load_inventory_for(record)
    names = sorted({n for a in record.attempts for n in a.nodes} | set(record.nodes))
    prefixer = console.Prefixer([f"{n}/00" for n in names])
    printed: set[int] = set()
    failures = 0

    def emit(name: str, text: str) -> None:
        match = RANK_LINE.match(text)
        rank, body = (match.group(1), match.group(2)) if match else ("-", text)
        prefixer.line(f"{name}/{rank}", body, key=name)

    while True:
        record = runs.load(record.id)
        for past in record.attempts:
            if past.number in printed:
                continue
            live = follow and past.state in ("starting", "running") and not record.final
            chosen = [inventory.nodes[n] for n in past.nodes if (node is None or n == node) and n in inventory.nodes]
            if len(record.attempts) > 1:
                console.info(f"── attempt {past.number} on {', '.join(past.nodes)}")

            def read(n):  # type: ignore[no-untyped-def]
                return ops.follow_logs(n, record.id, past.number, lambda text: emit(n.name, text), follow=live)

            from ava.transport import run_all

            for name, outcome in run_all(chosen, read).items():
                if isinstance(outcome, AvaError):
                    failures += 1
                    console.warn(f"logs of {name} unavailable: {outcome.message}")
            if past.cause:
                console.info(f"── attempt {past.number} ended: {past.cause}")
            if past.state in ("starting", "running") and not live:
                continue
            printed.add(past.number)
        if not follow or record.final:
            break
        if all(a.number in printed for a in record.attempts) and not _alive(record.supervisor_pid or 0):
            # Nothing supervises the run (its `ava train` was killed): nothing more will start.
            console.info(f"ava: {record.id} has no supervisor; `ava attach {record.id}` takes it over")
            break
        time.sleep(1.0)
    return EXIT_INFRA if failures else EXIT_OK


def load_inventory_for(record):  # type: ignore[no-untyped-def]
    """The inventory given now, else the one the run was launched with."""
    from ava.config import load_inventory as load

    if state.inventory or os.environ.get("AVA_INVENTORY") or Path("ava.toml").exists():
        inventory = load_inventory()
        if all(n in inventory.nodes for a in record.attempts for n in a.nodes):
            return inventory
    return load(record.inventory)


@app.command()
def stop(run: str = typer.Argument(..., metavar="RUN")) -> int:
    """Stop every process of the run on every node; returns once none is left."""
    from ava import attempt as ops
    from ava import console, runs
    from ava.supervisor import STOP_FILE

    run_id = runs.resolve_id(run)
    (runs.runs_dir() / run_id / STOP_FILE).touch()
    try:
        record = runs.load(run_id)
    except runs.DamagedRecord as damaged:
        # Stopping must work from the nodes' side even when the local record is lost: the
        # agent stops the run by its id on every inventory node (a node without it has nothing to do).
        console.warn(f"{damaged.message}; stopping {run_id} on every node of the inventory")
        return _stop_by_id(run_id)
    inventory = load_inventory_for(record)
    names = sorted({n for a in record.attempts for n in a.nodes} | set(record.nodes))
    chosen = [inventory.nodes[n] for n in names if n in inventory.nodes]
    outcomes = ops.stop(chosen, record.id)
    unreachable = [name for name, o in outcomes.items() if isinstance(o, AvaError)]
    for name in unreachable:
        failure = outcomes[name]
        assert isinstance(failure, AvaError)
        console.warn(f"could not stop on {name}: {failure.message}")
    _wait_supervisor_gone(record.id)
    record = runs.load(record.id)
    if not record.final:
        current = record.current()
        if current is not None and current.state in ("starting", "running"):
            current.state, current.ended, current.kind, current.cause = "stopped", time.time(), "stopped", "stopped by `ava stop`"
        record.state, record.ended, record.exit_code = "stopped", time.time(), 1
        record.save()
    if unreachable:
        return EXIT_INFRA
    console.info(f"ava: run {record.id} stopped on {', '.join(n.name for n in chosen)}; no process of it is left")
    return EXIT_OK


def _stop_by_id(run_id: str) -> int:
    from ava import attempt as ops
    from ava import console

    chosen = list(load_inventory().nodes.values())
    outcomes = ops.stop(chosen, run_id)
    unreachable = [name for name, o in outcomes.items() if isinstance(o, AvaError)]
    for name in unreachable:
        failure = outcomes[name]
        assert isinstance(failure, AvaError)
        console.warn(f"could not stop on {name}: {failure.message}")
    if unreachable:
        return EXIT_INFRA
    console.info(f"ava: run {run_id} stopped on {', '.join(n.name for n in chosen)}; no process of it is left")
    return EXIT_OK


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
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@app.command()
def attach(run: str = typer.Argument(..., metavar="RUN"),
           wait: bool = typer.Option(False, "--wait", help="When nodes are busy, wait for them.")) -> int:
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
    inventory = load_inventory_for(record)
    sink = TerminalSink(list(inventory.nodes), record.dir / "output.log")
    supervisor = Supervisor(record, recipe_of(record), inventory, sink, wait_for_leases=wait, role="ava attach")
    return _supervise(supervisor, record, Path(record.inventory))
