"""The Slurm side of `ava train`, `ava nodes` and `ava stop`: the CLI calls these when the
inventory has a [slurm] table. Like ava/cli/, this is where Slurm runs are printed."""

from __future__ import annotations

import hashlib
import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ava import console, runs, sync
from ava.agent.protocol import RUNNING, STARTING, STOPPED, STOPPED_KIND
from ava.config import Inventory, Node, Recipe
from ava.errors import EXIT_INFRA, EXIT_INTERRUPTED, EXIT_OK, UsageError
from ava.launch import Launch
from ava.slurm import backend
from ava.slurm.batch import Paths, submission
from ava.slurm.inventory import SlurmSettings, compute_python, login_node
from ava.slurm.supervise import JobState, Sink, SlurmSupervisor
from ava.slurm.supervise import stop as stop_jobs


def dry_run(recipe: Recipe, inventory: Inventory, settings: SlurmSettings, run_id: str, *, json_out: bool) -> int:
    """The batch script, whole, and the agents' spec template (env values hidden), as a launch makes them."""
    login = login_node(settings, inventory)
    launch = Launch(run_id, 1, "", 0, backend.code_manifest(recipe).tree, sync.runtime_manifest()[0].tree, "")
    job = submission(
        recipe,
        settings,
        launch,
        login,
        python=compute_python(settings, inventory),
        agent=sync.agent_path(login),
    )
    template = json.loads(json.dumps(job.template))
    for role in ("master", "worker"):
        for name in recipe.env:
            template[role]["env"][name] = "<from the recipe's [env], in a 0600 file>"
    paths = Paths(settings.shared_dir, run_id)
    if json_out:
        console.print_json(
            {
                "version": 1,
                "run": run_id,
                "recipe": recipe.name,
                "backend": "slurm",
                "script": job.script,
                "template": template,
            }
        )
        return EXIT_OK
    console.write(f"# {paths.script(1)} (sbatch on {settings.login})\n{job.script}\n")
    console.write(f"# {paths.template(1)} (0600)\n{json.dumps(template, indent=1, sort_keys=True)}\n")
    return EXIT_OK


def train(
    recipe: Recipe,
    inventory: Inventory,
    settings: SlurmSettings,
    *,
    overrides: list[str],
    detach: bool,
    stop_on_interrupt: bool,
    make_sink: Callable[[list[str], Path], Sink],
) -> int:
    from dataclasses import replace

    from ava.supervisor import snapshot_code

    if not detach:
        # The SSH connection to the login node (and its SFTP session, which the submission
        # uses) is made while the run's records are written here: the start is what users wait on.
        threading.Thread(target=_connect, args=(login_node(settings, inventory),), daemon=True).start()
    run_id = runs.new_run_id(recipe.name)
    record = runs.RunRecord(
        id=run_id,
        recipe=recipe.name,
        source=recipe.source,
        recipe_hash=hashlib.sha256(json.dumps(recipe.raw, sort_keys=True, default=str).encode()).hexdigest()[:16],
        raw=runs.env_names_only(recipe.raw),
        inventory=str(Path(inventory.path).resolve()),
        nodes=[],
        overrides=runs.overrides_without_env_values(list(overrides)),
    )
    record.dir.mkdir(parents=True, exist_ok=True)
    runs.private_recipe(record, recipe.raw, dict(recipe.env))
    record.save()
    # Every attempt ships the code as launched, and a supervisor taking over (the background
    # one, `ava attach`) reads the recipe back from the record: its text, env and this copy.
    source = Path(recipe.source)
    recipe_file = (source / "recipe.toml" if source.is_dir() else source).resolve()
    root = Path(recipe.root).resolve()
    leave_out = recipe_file.relative_to(root).as_posix() if recipe_file.is_relative_to(root) else None
    recipe = replace(recipe, root=str(snapshot_code(record, root, leave_out=leave_out)))
    inventory_path = Path(inventory.path).resolve()
    if detach:
        from ava.slurm import background

        background.spawn(record, inventory_path)
        console.write(run_id + "\n")
        console.info(f"follow: ava logs {run_id} -f    wait: ava wait {run_id}    stop: ava stop {run_id}")
        return EXIT_OK
    console.info(f"ava: run {run_id} on Slurm through {settings.login}")
    sink = make_sink([], record.dir / "output.log")
    supervisor = SlurmSupervisor(record, recipe, inventory, settings, sink)
    return supervise(supervisor, inventory, settings, stop_on_interrupt=stop_on_interrupt)


def _connect(login: Node) -> None:
    from ava.errors import AvaError
    from ava.transport import connect

    try:
        transport = connect(login)
        from ava.transport.ssh import SSHTransport  # fabric's import too, while the main thread works

        if isinstance(transport, SSHTransport):
            transport.sftp_offered()
    except AvaError:
        pass  # the submission connects again and reports it


def attach(record: runs.RunRecord, inventory: Inventory, *, make_sink: Callable[[list[str], Path], Sink]) -> int:
    """`ava attach` of a Slurm run whose background supervisor has let go: supervise it here,
    from where it is (its job, its attempt, its logs from where output.log has them)."""
    from ava.slurm.inventory import load
    from ava.supervisor import recipe_of

    settings = load(inventory)
    if settings is None:
        raise UsageError(f"run {record.id} runs on Slurm, but {inventory.path} has no [slurm] table any more")
    current = record.current()
    where = f"attempt {current.number}" if current is not None else "its first attempt"
    console.info(f"ava: attached to {record.id} ({where}) on Slurm through {settings.login}")
    sink = make_sink([], record.dir / "output.log")
    supervisor = SlurmSupervisor(record, recipe_of(record), inventory, settings, sink, role="ava attach")
    return supervise(supervisor, inventory, settings, stop_on_interrupt=False)


def supervise(
    supervisor: SlurmSupervisor, inventory: Inventory, settings: SlurmSettings, *, stop_on_interrupt: bool
) -> int:
    """Supervise in the foreground, as on SSH nodes (ava/cli/train.py _supervise): Ctrl-C, SIGTERM
    or SIGHUP hand the run to a background supervisor (the job keeps running), or with
    --stop-on-interrupt cancel its job, verified; exit 130 either way."""
    from ava.cli.train import say_detached  # the same words as on SSH nodes
    from ava.slurm import background

    record = supervisor.record
    started = time.monotonic()
    received: list[int] = []

    def leave(number: int, _frame: object) -> None:
        received.append(number)
        supervisor.leave()

    previous = {sig: signal.signal(sig, leave) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        code = supervisor.run()
        if stop_on_interrupt and not record.final:
            # Signals again while stopping are ignored: half a stop would leave the job queued.
            for sig in previous:
                signal.signal(sig, signal.SIG_IGN)
            name = signal.Signals(received[0]).name if received else "interrupted"
            _say(f"\nava: {name}: stopping {record.id}: scancel, verified (--stop-on-interrupt)")
            stopped = stop(runs.load(record.id), inventory, settings, json_out=False, by="--stop-on-interrupt")
            return EXIT_INTERRUPTED if stopped == EXIT_OK else stopped
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not record.final:
        # The job goes on; a background supervisor keeps watching it and failing over for it.
        background.spawn(record, Path(inventory.path).resolve())
        say_detached(record.id)
        return EXIT_INTERRUPTED
    attempts = len(record.attempts)
    _say(
        f"ava: run {record.id} {record.state} in {time.monotonic() - started:.1f}s, "
        f"{attempts} attempt{'s' if attempts != 1 else ''}"
        + (f", nodes lost: {', '.join(record.lost_nodes)}" if record.lost_nodes else "")
    )
    return code


def _say(text: str) -> None:
    try:
        console.info(text)
    except OSError:
        pass  # after SIGHUP the terminal may be gone


def is_slurm_run(record: runs.RunRecord) -> bool:
    return JobState.load(record.dir) is not None


def stop(
    record: runs.RunRecord, inventory: Inventory, settings: SlurmSettings, *, json_out: bool, by: str = "`ava stop`"
) -> int:
    """scancel every job of the run, verified with squeue; the record says stopped."""
    left = stop_jobs(record, inventory, settings)
    state = JobState.load(record.dir)
    jobs = [str(j["job"]) for j in state.jobs] if state else []
    latest = runs.load(record.id)
    if not latest.final:
        latest.state, latest.ended, latest.exit_code = STOPPED, time.time(), 1
        current = latest.current()
        if current is not None and current.state in (STARTING, RUNNING):
            current.state, current.ended, current.kind, current.cause = (
                STOPPED,
                time.time(),
                STOPPED_KIND,
                f"stopped by {by}",
            )
        latest.save()
    if json_out:
        console.print_json({"version": 1, "run": record.id, "stopped": not left, "jobs": jobs, "still_queued": left})
    elif not left:
        console.info(f"ava: run {record.id} stopped: Slurm job {', '.join(jobs)} cancelled, squeue lists none of it")
    else:
        console.warn(f"squeue still lists job {', '.join(left)} of run {record.id}")
    return EXIT_INFRA if left else EXIT_OK


def nodes(inventory: Inventory, settings: SlurmSettings, *, json_out: bool) -> int:
    """The partition's nodes and their states, from sinfo on the login node."""
    found = backend.sinfo(login_node(settings, inventory, workdir=False), settings.partition)
    if json_out:
        console.print_json([{"version": 1, **n} for n in found])
        return EXIT_OK
    rows = [
        [
            str(n["name"]),
            _state(n),
            ",".join(n["partitions"]),
            str(n["cpus"]),
            f"{n['mem_total'] / 2**30:.1f} GiB",
            str(n["gres"] or "-"),
            str(n["reason"] or "-"),
        ]
        for n in found
    ]
    console.table(
        ["node", "state", "partitions", "cpus", "memory", "gres", "reason"], rows, title=f"Slurm via {settings.login}"
    )
    return EXIT_OK


def _state(entry: dict[str, Any]) -> str:
    state = entry.get("state")
    words = [state] if isinstance(state, str) else list(state or [])
    return "+".join(str(w).lower() for w in [*words, *entry.get("flags", [])]) or "-"


def stop_recorded(record: runs.RunRecord, inventory: Inventory, *, json_out: bool) -> int:
    """`ava stop` of a run recorded as a Slurm run, through its inventory's [slurm] table."""
    from ava.slurm.inventory import load

    settings = load(inventory)
    if settings is None:
        raise UsageError(f"run {record.id} ran on Slurm, but {inventory.path} has no [slurm] table any more")
    return stop(record, inventory, settings, json_out=json_out)


def logs(record: runs.RunRecord, *, node: str | None, rank: int | None, follow: bool) -> int:
    """`ava logs` of a Slurm run: every node's lines reached ava through the login node, and its
    supervisor keeps them, `node/rank | text`, in the run's output.log; printed from there."""
    path = record.dir / "output.log"
    offset = 0
    while True:
        final = runs.load(record.id).final
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            data = b""
        end = data.rfind(b"\n") + 1
        offset += end
        for line in data[:end].decode("utf-8", "replace").splitlines():
            prefix, bar, _ = line.partition(" | ")
            where, _, which = prefix.partition("/")
            if bar and ((node is not None and where != node) or (rank is not None and which != str(rank))):
                continue
            if not bar and (node is not None or rank is not None):
                continue  # ava's own events belong to no node
            console.write(line + "\n")
        if not follow or final:
            return EXIT_OK
        time.sleep(0.5)


def doctor(inventory: Inventory, settings: SlurmSettings, *, json_out: bool) -> int:
    """`ava doctor` on a Slurm inventory (see ava/slurm/doctor.py)."""
    from ava.slurm import doctor as checks_of

    found = checks_of.checks(inventory, settings)
    status = checks_of.worst(found)
    if json_out:
        console.print_json({"status": status, "checks": [c.to_json() for c in found], "bandwidth": None})
    else:
        console.table(["check", "status", "detail"], [[c.check, c.status, c.detail] for c in found])
        for c in found:
            if c.status != checks_of.PASS and c.fix:
                console.write(f"{c.status.upper()} {c.check}: {c.fix}\n")
    return EXIT_INFRA if status == checks_of.FAIL else EXIT_OK
