"""The Slurm side of `ava train`, `ava nodes` and `ava stop`: the CLI calls these when the
inventory has a [slurm] table. Like ava/cli/, this is where Slurm runs are printed."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ava import console, runs, sync
from ava.agent.protocol import RUNNING, STARTING, STOPPED, STOPPED_KIND
from ava.config import Inventory, Recipe
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
    make_sink: Callable[[list[str], Path], Sink],
) -> int:
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
    if detach:
        from ava.slurm import background
        from ava.supervisor import snapshot_code

        # The detached supervisor reads the recipe back from the record: its text, env and code.
        source = Path(recipe.source)
        recipe_file = (source / "recipe.toml" if source.is_dir() else source).resolve()
        root = Path(recipe.root).resolve()
        leave_out = recipe_file.relative_to(root).as_posix() if recipe_file.is_relative_to(root) else None
        snapshot_code(record, root, leave_out=leave_out)
        background.spawn(record, Path(inventory.path).resolve())
        console.write(run_id + "\n")
        console.info(f"wait: ava wait {run_id}    stop: ava stop {run_id}")
        return EXIT_OK
    console.info(f"ava: run {run_id} on Slurm through {settings.login}")
    sink = make_sink([], record.dir / "output.log")
    supervisor = SlurmSupervisor(record, recipe, inventory, settings, sink)
    started = time.monotonic()
    try:
        code = supervisor.run()
    except KeyboardInterrupt:
        # No background supervisor on Slurm yet: an interrupted `ava train` cancels its job.
        left = stop_jobs(record, inventory, settings)
        record.state, record.ended, record.exit_code = STOPPED, time.time(), 1
        record.save()
        console.warn(f"interrupted: run {run_id} stopped" + (f"; squeue still lists {', '.join(left)}" if left else ""))
        return EXIT_INTERRUPTED
    attempts = len(record.attempts)
    console.info(
        f"ava: run {run_id} {record.state} in {time.monotonic() - started:.1f}s, "
        f"{attempts} attempt{'s' if attempts != 1 else ''}"
        + (f", nodes lost: {', '.join(record.lost_nodes)}" if record.lost_nodes else "")
    )
    return code


def is_slurm_run(record: runs.RunRecord) -> bool:
    return JobState.load(record.dir) is not None


def stop(record: runs.RunRecord, inventory: Inventory, settings: SlurmSettings, *, json_out: bool) -> int:
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
                "stopped by `ava stop`",
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
