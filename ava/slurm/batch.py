"""Recipe -> what one Slurm attempt submits: the batch script and the agents' spec template. Pure.

The script asks for the recipe's nodes with one task per node, that task's CPUs, memory and GPUs,
and runs one ava agent per node with `srun`; each agent (the agent's slurm-node command) fills the template with what
only the allocation knows (its node name, the first node's address and port, its own address and
interface) and starts torchrun through the node agent. The template holds the recipe's `[env]`
and travels as a 0600 file: no value of it appears in the script or on a command line.
`ava train --dry-run` prints exactly these texts.
"""

from __future__ import annotations

import json
import math
import posixpath
import shlex
from dataclasses import dataclass
from typing import Any

from ava.agent.cgroups import PARENT as CGROUP_PARENT
from ava.agent.protocol import SpecLimits, StartSpec
from ava.config import Node, Recipe
from ava.launch import Launch, Route, environment, torchrun_argv
from ava.slurm.inventory import SlurmSettings

# Filled in by agent/slurmnode.py on each allocated node (see there).
NODE = "@AVA_NODE@"
MASTER_ADDR = "@AVA_MASTER_ADDR@"
MASTER_PORT = "@AVA_MASTER_PORT@"
ADDR = "@AVA_ADDR@"
IFACE = "@AVA_IFACE@"
TOKENS = (NODE, MASTER_ADDR, MASTER_PORT, ADDR, IFACE)


@dataclass(frozen=True)
class Paths:
    """Where one run's files are on the shared filesystem (see SlurmSettings.shared_dir)."""

    shared: str
    run: str

    @property
    def run_dir(self) -> str:
        return posixpath.join(self.shared, "slurm", self.run)

    def script(self, attempt: int) -> str:
        return posixpath.join(self.run_dir, f"attempt-{attempt}.sbatch")

    def template(self, attempt: int) -> str:
        return posixpath.join(self.run_dir, f"attempt-{attempt}.json")

    @property
    def output(self) -> str:
        return posixpath.join(self.run_dir, "slurm-%j.out")

    def node_workdir(self, node: str) -> str:
        """A node's agent workdir (its status, logs, run directory): one per node, shared so
        the login node reads every node's status and logs."""
        return posixpath.join(self.shared, "nodes", node)

    def tree(self, tree: str) -> str:
        return posixpath.join(self.shared, "trees", tree)


@dataclass(frozen=True)
class Submission:
    """One attempt's job: the batch script and the template it names."""

    script: str
    template: dict[str, Any]
    exclude: tuple[str, ...] = ()


def sbatch_options(recipe: Recipe, settings: SlurmSettings, paths: Paths, exclude: tuple[str, ...]) -> list[str]:
    resources = recipe.resources
    cpus = math.ceil(resources.cpus) if resources.cpus else recipe.procs()
    options = [
        f"--job-name={paths.run}",
        f"--nodes={resources.nodes_min}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={cpus}",
    ]
    if resources.memory:
        options.append(f"--mem={max(1, resources.memory // 2**20)}M")
    if resources.gpus_per_node:
        options.append(f"--gpus-per-node={resources.gpus_per_node}")
    options += [f"--{key}={value}" for key, value in settings.sbatch_options()]
    if exclude:
        options.append(f"--exclude={','.join(exclude)}")
    # ava fails over itself, with the lost node excluded: Slurm must not requeue the job.
    options += ["--no-requeue", f"--output={paths.output}", "--open-mode=append"]
    return options


def batch_script(
    recipe: Recipe,
    settings: SlurmSettings,
    paths: Paths,
    attempt: int,
    *,
    python: str,
    agent: str,
    exclude: tuple[str, ...] = (),
) -> str:
    lines = ["#!/bin/bash", f"# ava run {paths.run}, attempt {attempt} (recipe {recipe.name})"]
    lines += [f"#SBATCH {option}" for option in sbatch_options(recipe, settings, paths, exclude)]
    # One agent per node; a task that ends early must not take the others down: each agent
    # reports its own end, and ava decides.
    srun = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=0", "--unbuffered"]
    lines += [
        "set -u",
        "exec " + shlex.join([*srun, python, agent, "slurm-node", agent, paths.template(attempt)]),
    ]
    return "\n".join(lines) + "\n"


def template(
    recipe: Recipe, settings: SlurmSettings, paths: Paths, launch: Launch, login: Node, python: str
) -> dict[str, Any]:
    """The spec of every node's agent, with the allocation's facts left as tokens."""
    workdir = paths.node_workdir(NODE)
    node = Node(
        name=NODE,
        workdir=workdir,
        python=python,
        cache_dir=settings.cache_dir or posixpath.join(workdir, "cache"),
        cache_size=login.cache_size,
    )
    route = Route(address=ADDR, interface=IFACE, home="/")
    bound = Launch(
        run_id=launch.run_id,
        attempt=launch.attempt,
        master_address=MASTER_ADDR,
        master_port=0,
        code_tree=launch.code_tree,
        runtime_tree=launch.runtime_tree,
        user=launch.user,
    )
    nnodes = recipe.resources.nodes_min
    env = environment(recipe, bound, node, route)
    # The trees are shared by every node: one copy on the shared filesystem.
    code, runtime = paths.tree(launch.code_tree), paths.tree(launch.runtime_tree)
    run_dir = posixpath.join(workdir, "runs", launch.run_id, "work")
    env["PYTHONPATH"] = ":".join(
        [run_dir, runtime, *([recipe.env["PYTHONPATH"]] if recipe.env.get("PYTHONPATH") else [])]
    )
    specs = {}
    for role in ("master", "worker"):
        argv = torchrun_argv(recipe, bound, nnodes=nnodes, route=route, is_master=role == "master", python=python)
        endpoint = argv.index("--rdzv-endpoint") + 1
        argv[endpoint] = f"{MASTER_ADDR}:{MASTER_PORT}"
        spec = StartSpec(
            run=launch.run_id,
            attempt=launch.attempt,
            node=NODE,
            workdir=workdir,
            cwd=run_dir,
            tree=code,
            argv=tuple(argv),
            env=env,
            limits=SpecLimits(recipe.resources.memory, recipe.resources.cpus, recipe.resources.pids),
            gpus_want=recipe.resources.gpus_per_node,
            cgroup_parent=CGROUP_PARENT,
            user=launch.user,
            # Slurm fences the job (its task plugin, GRES): the agent makes no cgroup of its own.
            isolation="none",
        )
        specs[role] = spec.to_json()
    # `[data] prefetch`: each node warms its own cache (slurm-node, through the agent's `cache`
    # command) before its attempt starts, with the run's environment (S3 keys) from its spec.
    prefetch = {
        "urls": list(recipe.data.prefetch),
        "runtime": runtime,
        "args": [
            "--dir",
            env["AVA_CACHE_DIR"],
            "--size-limit",
            env["AVA_CACHE_SIZE"],
            "--block-size",
            env["AVA_CACHE_BLOCK_SIZE"],
        ],
    }
    return {
        "run": launch.run_id,
        "attempt": launch.attempt,
        "nnodes": nnodes,
        "python": python,
        **({"prefetch": prefetch} if recipe.data.prefetch else {}),
        **specs,
    }


def submission(
    recipe: Recipe,
    settings: SlurmSettings,
    launch: Launch,
    login: Node,
    *,
    python: str,
    agent: str,
    exclude: tuple[str, ...] = (),
) -> Submission:
    paths = Paths(settings.shared_dir, launch.run_id)
    script = batch_script(recipe, settings, paths, launch.attempt, python=python, agent=agent, exclude=exclude)
    return Submission(script, template(recipe, settings, paths, launch, login, python), exclude)


def template_text(template_: dict[str, Any]) -> str:
    return json.dumps(template_, indent=1, sort_keys=True) + "\n"
