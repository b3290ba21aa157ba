"""The Slurm cluster, through its login node: ship, submit (sbatch), look (squeue/scontrol/
sacct and the agents' files on the shared filesystem), cancel (scancel, verified), sinfo.

Every command runs on the login node over SSH; every value in it is quoted.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ava import sync
from ava.config import Node, Recipe
from ava.errors import CommandError
from ava.slurm.batch import Paths, Submission, template_text
from ava.transport import connect, shell_path

CANCEL_TIMEOUT = 60.0


@dataclass(frozen=True)
class Shipped:
    code_tree: str
    runtime_tree: str
    agent: str  # its path on the shared filesystem (its slurm-node and slurm-watch commands)
    sent_bytes: int


def code_manifest(recipe: Recipe) -> sync.Manifest:
    """The recipe's code without the recipe file itself: its [env] may hold secrets, which
    travel only in the attempt's 0600 template (as on SSH nodes, see supervisor.snapshot_code)."""
    root = Path(recipe.root).resolve()
    manifest = sync.manifest_of(root)
    source = Path(recipe.source)
    recipe_file = source / "recipe.toml" if source.is_dir() else source
    try:
        leave_out = recipe_file.resolve().relative_to(root).as_posix()
    except ValueError:
        return manifest
    return sync.Manifest(tuple(f for f in manifest.files if f.path != leave_out))


def planned(login: Node, recipe: Recipe) -> Shipped:
    """What `ship` leaves on the shared filesystem, known here (content-addressed): a launch
    takes it for granted and `submit` checks it in its one command."""
    manifest, runtime_manifest = code_manifest(recipe), sync.runtime_manifest()[0]
    return Shipped(manifest.tree, runtime_manifest.tree, sync.agent_path(login), 0)


def _wanted(login: Node, shipped: Shipped) -> list[str]:
    return [shipped.agent, *(sync.tree_path(login, t) + ".complete" for t in (shipped.code_tree, shipped.runtime_tree))]


def ship(login: Node, recipe: Recipe, run_dir: str) -> Shipped:
    """The agent (its slurm-node command runs on each allocated node), ava's runtime and the
    recipe's code on the shared filesystem, once (content-addressed: what is there already is
    not sent again), and the run's own folder there. `login.workdir` is shared_dir. All there
    already: one command on the login node."""
    transport = connect(login)
    manifest = code_manifest(recipe)
    wanted = _wanted(login, planned(login, recipe))
    check = " && ".join([f"mkdir -p -m 700 {shell_path(run_dir)}", *(f"test -f {shell_path(p)}" for p in wanted)])
    if transport.run(check).ok:
        return planned(login, recipe)
    transport.run(f"mkdir -p -m 700 {shell_path(run_dir)}").check("making the run's folder")
    agent = sync.agent_path(login)
    sync.ship_agent(login)
    runtime = sync.ship_runtime(login)
    code = sync.ship_tree(login, manifest, Path(recipe.root).resolve())
    return Shipped(code.tree, runtime.tree, agent, code.sent_bytes + runtime.sent_bytes)


NOT_SHIPPED = 97  # the exit of submit's command when what it takes for granted is not there


def submit(login: Node, paths: Paths, attempt: int, job: Submission, *, shipped: Shipped | None = None) -> str | None:
    """Put the attempt's template (0600) and script on the shared filesystem, sbatch it; the job
    id. Two trips to the login node: the template's put (it holds the recipe's env, so it never
    goes on a command line), then one command that writes the script and runs sbatch. With
    SHIPPED, that command first checks that its agent and trees are there: None when not
    (nothing submitted; `ship`, then submit again)."""
    transport = connect(login)
    transport.put(template_text(job.template).encode(), paths.template(attempt), mode=0o600)
    script = paths.script(attempt)
    temp = f"{script}.part"
    steps = [f"chmod 700 {shell_path(paths.run_dir)}"]  # the put may have made it
    if shipped is not None:
        present = " && ".join(f"test -f {shell_path(p)}" for p in _wanted(login, shipped))
        steps.append(f"{{ {present} || exit {NOT_SHIPPED}; }}")
    # The script holds no value of the recipe's env (batch.py): it may go on a command line.
    steps += [
        f"(umask 077 && printf %s {shlex.quote(job.script)} > {shell_path(temp)})",
        f"mv -f {shell_path(temp)} {shell_path(script)}",
        f"sbatch --parsable {shell_path(script)}",
    ]
    result = transport.run(" && ".join(steps), timeout=60)
    if shipped is not None and result.exited == NOT_SHIPPED:
        return None
    if not result.ok:
        raise CommandError(f"{login.name}: sbatch refused attempt {attempt} (exit {result.exited})", tail=result.tail())
    words = result.stdout.strip().splitlines()[-1].split(";") if result.stdout.strip() else [""]
    if not words[0].isdigit():
        raise CommandError(f"{login.name}: sbatch printed no job id", tail=result.tail())
    return words[0]


def restart_in(login: Node, paths: Paths, attempt: int, job_files: Submission, job: str) -> None:
    """The next attempt in the same allocation: its template, naming the job, which the job's
    agents (agent/slurmnode.py) wait for after a failed attempt."""
    template = {**job_files.template, "job": job}
    connect(login).put(template_text(template).encode(), paths.template(attempt), mode=0o600)


def look(
    login: Node,
    paths: Paths,
    attempt: int,
    job: str,
    offsets: dict[str, int],
    *,
    wait: float = 0.0,
    known: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One look at the attempt (the agent's slurm-watch): job state, agents' status, new log text.
    With WAIT, a long poll: it answers once there is news (a new log line, an agent state other
    than in KNOWN), else after WAIT seconds."""
    words = [paths.shared, paths.run, str(attempt), job, json.dumps(offsets)]
    if wait > 0:
        words += [f"{wait:g}", json.dumps(known or {})]
    command = sync.agent_command(login, "slurm-watch", *words)
    result = connect(login).run(command, timeout=60)
    lines = result.stdout.strip().splitlines()
    if not result.ok or not lines:
        raise CommandError(f"{login.name}: could not look at job {job} (exit {result.exited})", tail=result.tail())
    data = json.loads(lines[-1])
    assert isinstance(data, dict)
    return data


def watch(
    login: Node,
    paths: Paths,
    attempt: int,
    job: str,
    offsets: dict[str, int],
    known: dict[str, str],
    on_look: Callable[[dict[str, Any]], None],
    *,
    wait: float,
    nnodes: int,
    gap: float,
    starting: float,
    life: float = 30.0,
) -> None:
    """Looks at the attempt as a stream (the agent's slurm-watch with a stream's options): each
    answer, from where the one before it left off, to ON_LOOK as it arrives. Returns when the
    stream ends (after LIFE seconds, or once the job has left the queue); a lost connection, or
    no end within LIFE and a margin, raises."""

    def line(stream: str, text: str) -> None:
        if stream == "out" and text.startswith("{"):
            try:
                data = json.loads(text)
            except ValueError:
                return  # not an answer (a line the login's shell printed)
            if isinstance(data, dict):
                on_look(data)

    options = {"life": life, "nnodes": nnodes, "gap": gap, "starting": starting}
    words = [paths.shared, paths.run, str(attempt), job, json.dumps(offsets), f"{wait:g}", json.dumps(known)]
    command = sync.agent_command(login, "slurm-watch", *words, json.dumps(options))
    result = connect(login).run(command, timeout=life + 30, on_line=line)
    if not result.ok:
        raise CommandError(f"{login.name}: could not look at job {job} (exit {result.exited})", tail=result.tail())


def output_tail(login: Node, paths: Paths, job: str, lines: int = 15) -> str:
    """The last lines of the job's own output (srun's and the batch shell's messages)."""
    path = paths.output.replace("%j", job)
    result = connect(login).run(f"tail -n {int(lines)} {shell_path(path)}", timeout=30)
    return result.stdout.rstrip() if result.ok else ""


def queued(login: Node, job: str) -> bool:
    """Whether squeue still lists the job (pending, running or completing)."""
    result = connect(login).run(f"squeue -h -j {shlex.quote(job)} -o %T", timeout=30)
    return bool(result.ok and result.stdout.strip())


def cancel(login: Node, jobs: list[str], *, timeout: float = CANCEL_TIMEOUT) -> list[str]:
    """scancel the jobs and wait until squeue lists none of them; the ones still listed."""
    if not jobs:
        return []
    transport = connect(login)
    transport.run("scancel " + " ".join(shlex.quote(j) for j in jobs), timeout=30)
    end = time.monotonic() + timeout
    left = list(jobs)
    while left and time.monotonic() < end:
        left = [j for j in left if queued(login, j)]
        if left:
            time.sleep(0.5)
    return left


def stop_agents(login: Node, paths: Paths, nodes: list[str], python: str) -> dict[str, Any]:
    """The agents' own verified stop for the run on these nodes' workdirs, run from the login
    node: for processes an scancel cut short mid-teardown (Slurm SIGKILLs after KillWait)."""
    out: dict[str, Any] = {}
    transport = connect(login)
    for name in nodes:
        command = " ".join(
            [
                shell_path(python),
                shell_path(sync.agent_path(login)),
                "stop",
                shell_path(paths.node_workdir(name)),
                shlex.quote(paths.run),
                "--grace",
                "2",
            ]
        )
        result = transport.run(command, timeout=60)
        out[name] = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.tail()
    return out


def sinfo(login: Node, partition: str | None) -> list[dict[str, Any]]:
    """The partition's nodes and their states, from `sinfo --json`."""
    command = "sinfo --json" + (f" --partition={shlex.quote(partition)}" if partition else "")
    result = connect(login).run(command, timeout=60)
    if not result.ok:
        raise CommandError(f"{login.name}: sinfo failed (exit {result.exited})", tail=result.tail())
    start = result.stdout.find("{")
    data = json.loads(result.stdout[start:]) if start >= 0 else {}
    found = []
    for entry in data.get("nodes", []):
        found.append(
            {
                "name": entry.get("name"),
                "state": entry.get("state"),
                "flags": entry.get("state_flags", []),
                "partitions": entry.get("partitions", []),
                "cpus": entry.get("cpus"),
                "mem_total": (entry.get("real_memory") or 0) * 2**20,
                "gres": entry.get("gres") or "",
                "address": entry.get("address"),
                "reason": entry.get("reason") or "",
            }
        )
    return found
