"""`ava doctor` on a Slurm inventory: the login node, Slurm's answers, the shared directory, the
interpreter, accounting, and whose isolation applies (Slurm's: ava makes no cgroup there)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from ava.config import Inventory
from ava.errors import AvaError
from ava.slurm.inventory import SlurmSettings, compute_python, login_node
from ava.transport import connect, shell_path

PASS, WARN, FAIL = "pass", "warn", "fail"


@dataclass(frozen=True)
class Check:
    check: str
    status: str
    detail: str
    fix: str = ""

    def to_json(self) -> dict[str, str]:
        return {"check": self.check, "node": "", "status": self.status, "detail": self.detail, "fix": self.fix}


def config_values(text: str, *keys: str) -> dict[str, str]:
    """Values of `scontrol show config` lines (`Key = value`)."""
    found = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() in keys:
            found[key.strip()] = value.strip()
    return found


def isolation(config: dict[str, str]) -> Check:
    task, proctrack = config.get("TaskPlugin", "?"), config.get("ProctrackType", "?")
    detail = f"Slurm's (TaskPlugin={task}, ProctrackType={proctrack}); ava makes no cgroup of its own here"
    if "task/cgroup" in task:
        return Check("isolation", PASS, detail)
    fix = "set TaskPlugin=task/cgroup in slurm.conf: without it Slurm does not hold a job to its CPUs and memory"
    return Check("isolation", WARN, detail, fix)


def checks(inventory: Inventory, settings: SlurmSettings) -> list[Check]:
    login = login_node(settings, inventory, workdir=False)
    try:
        transport = connect(login)
        transport.run("true", timeout=30).check("ssh")
    except AvaError as exc:
        return [Check("login", FAIL, exc.message, f"check [nodes.{settings.login}] in {inventory.path}")]
    found = [Check("login", PASS, f"{settings.login} ({login.address}) answers over SSH")]
    partitions = transport.run("sinfo -h -o %P", timeout=60)
    names = [p.rstrip("*") for p in partitions.stdout.split()]
    if not partitions.ok:
        found.append(
            Check("slurm", FAIL, f"sinfo failed (exit {partitions.exited})", "is Slurm installed on the login node?")
        )
    elif settings.partition and settings.partition not in names:
        found.append(
            Check(
                "slurm", FAIL, f"no partition {settings.partition} (known: {', '.join(names)})", "fix slurm.partition"
            )
        )
    else:
        found.append(Check("slurm", PASS, f"partitions: {', '.join(names)}"))
    shared = shell_path(settings.shared_dir)
    writable = transport.run(f"mkdir -p {shared} && test -w {shared}", timeout=30)
    found.append(
        Check("shared_dir", PASS, f"{settings.shared_dir} is writable")
        if writable.ok
        else Check("shared_dir", FAIL, f"{settings.shared_dir} is not writable", "fix slurm.shared_dir")
    )
    python = compute_python(settings, inventory)
    version = transport.run(f"{shell_path(python)} -c {shlex.quote('import sys; print(sys.version.split()[0])')}")
    found.append(
        Check("python", PASS, f"{python}: Python {version.stdout.strip()}")
        if version.ok
        else Check("python", FAIL, f"{python} does not run on {settings.login}", "set slurm.python")
    )
    config = config_values(transport.run("scontrol show config", timeout=60).stdout, "TaskPlugin", "ProctrackType")
    found.append(isolation(config))
    accounting = transport.run("sacct -n -X -S now", timeout=60)
    found.append(
        Check("accounting", PASS, "sacct answers")
        if accounting.ok
        else Check("accounting", WARN, "sacct does not answer: runs are followed through squeue and scontrol only")
    )
    return found


def worst(found: list[Check]) -> str:
    for status in (FAIL, WARN):
        if any(c.status == status for c in found):
            return status
    return PASS
