"""Recipe × placement → what runs on each node: the agent spec and the torchrun argv. Pure.

`ava train --dry-run` prints exactly these objects, built by the same functions a real launch
uses, so what a user reviews is what runs.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ava.agent.cgroups import PARENT as CGROUP_PARENT
from ava.agent.protocol import SpecLimits, StartSpec
from ava.config import Node, Recipe

if TYPE_CHECKING:
    from ava.provision import ReadyCheck

# torchrun prefixes every worker line with its global rank; ava's log streams rely on it.
RANK_PREFIX_TEMPLATE = "[${rank}]:"
# Hidden, for tests on a node that offers several back-ends (systemd and plain v2 on one
# systemd + cgroup v2 node): forces that isolation back-end in every spec; unset = the agent probes.
FORCE_ISOLATION_ENV = "AVA_ISOLATION"


@dataclass(frozen=True)
class Route:
    """How one node reaches the master (its own address on that path, the interface), and
    the node facts a launch needs: its home directory and CPU count."""

    address: str
    interface: str
    home: str = "/root"
    cpus: int = 1

    def expand(self, path: str) -> str:
        """A node path made absolute: PYTHONPATH and the like do not expand `~`."""
        if path == "~" or path.startswith("~/"):
            return self.home.rstrip("/") + path[1:]
        return path


@dataclass(frozen=True)
class Launch:
    """Everything an attempt needs that is not in the recipe."""

    run_id: str
    attempt: int
    master_address: str
    master_port: int
    code_tree: str  # content hashes of the synced trees (see ava.sync)
    runtime_tree: str
    user: str


@dataclass(frozen=True)
class Expect:
    """What a launch took for granted on a node without asking it first (a warm launch, from
    ava.launchcache): its agent checks each at start and, where one is not so, answers what
    instead of starting (see attempt.start)."""

    master: str
    interface: str  # the inventory's setting for the node: "auto" or a name
    route: Route
    trees: tuple[str, ...]  # code and runtime trees that must be complete there
    port: int | None = None  # on the master: the rendezvous port must be free
    ready: ReadyCheck | None = None  # the provision facts must read as when last found ready


@dataclass(frozen=True)
class NodeLaunch:
    node: Node
    argv: list[str]
    spec: StartSpec
    wait_store: tuple[str, int] | None = None  # the master: its start waits for the rendezvous store
    expect: Expect | None = None  # a one-trip start: what its agent checks before starting


def checkpoint_dir(recipe: Recipe, run_id: str) -> str | None:
    if recipe.checkpoint.dir is None:
        return None
    return recipe.checkpoint.dir.replace("{name}", recipe.name).replace("{run}", run_id)


def torchrun_argv(
    recipe: Recipe, launch: Launch, *, nnodes: int, route: Route, is_master: bool, python: str
) -> list[str]:
    argv = [
        python,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(nnodes),
        "--nproc-per-node",
        str(recipe.procs()),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"{_bracket(launch.master_address)}:{launch.master_port}",
        "--rdzv-id",
        launch.run_id,
    ]
    if is_master:
        # torch's own "am I the host?" check fails when hostnames resolve to 127.0.0.1.
        argv += ["--rdzv-conf", "is_host=true"]
    argv += [
        "--local-addr",
        route.address,
        # ava supervises and restarts; torchrun must not retry on its own.
        "--max-restarts",
        "0",
        "--monitor-interval",
        # torchrun looks at its workers this often: a crashed rank ends the attempt within it.
        "0.1",
        "--tee",
        "3",
    ]
    if recipe.run.module:
        argv += ["--module", recipe.run.module]
    else:
        assert recipe.run.script is not None
        argv.append(recipe.run.script)
    argv += list(recipe.run.args)
    return argv


def environment(recipe: Recipe, launch: Launch, node: Node, route: Route) -> dict[str, str]:
    # Imported here: the cache package pulls in fsspec, which commands that never launch skip.
    from ava.cache.settings import job_env

    _, runtime_dir = tree_dirs(node, launch, route)
    env = dict(recipe.env)
    # The node's cache as WORKDIR/cache.json describes it, for ava.data and `avacache::` URLs.
    env.update(job_env(route.expand(node.cache_dir), node.cache_size))
    env.update(
        {
            "AVA_RUN_ID": launch.run_id,
            "AVA_ATTEMPT": str(launch.attempt),
            "AVA_NODE": node.name,
            # Gloo and NCCL bind the interface that reaches the master; left alone, Gloo may pick
            # 127.0.0.1 from the hostname and the job hangs.
            "GLOO_SOCKET_IFNAME": route.interface,
            "NCCL_SOCKET_IFNAME": route.interface,
            "PYTHONUNBUFFERED": "1",
            "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": RANK_PREFIX_TEMPLATE,
        }
    )
    ckpt = checkpoint_dir(recipe, launch.run_id)
    if ckpt is not None:
        env["AVA_CHECKPOINT_DIR"] = ckpt if "://" in ckpt else route.expand(ckpt)
        env["AVA_CHECKPOINT_KEEP"] = str(recipe.checkpoint.keep)
        # Async saves to a remote store go to the node's own disk first (ava.ckpt), in its workdir.
        env["AVA_CHECKPOINT_STAGING"] = route.expand(posixpath.join(node.workdir.rstrip("/"), "ckpt-staging"))
    if recipe.checkpoint.every is not None:
        env["AVA_CHECKPOINT_EVERY"] = recipe.checkpoint.every
    # The run's code (its own copy, in its run directory) first, then ava's user-side modules
    # (ava.ckpt, ava.env, ava.data).
    paths = [run_dir(node, launch, route), runtime_dir]
    if recipe.env.get("PYTHONPATH"):
        paths.append(recipe.env["PYTHONPATH"])
    env["PYTHONPATH"] = ":".join(paths)
    return env


def plan(
    recipe: Recipe,
    nodes: list[Node],
    launch: Launch,
    routes: dict[str, Route],
    *,
    pythons: dict[str, str] | None = None,
) -> list[NodeLaunch]:
    """One NodeLaunch per node; the first node is the master."""
    launches = []
    for index, node in enumerate(nodes):
        route = routes[node.name]
        python = route.expand((pythons or {}).get(node.name, node.python))
        argv = torchrun_argv(recipe, launch, nnodes=len(nodes), route=route, is_master=index == 0, python=python)
        resources = recipe.resources
        spec = StartSpec(
            run=launch.run_id,
            attempt=launch.attempt,
            node=node.name,
            workdir=node.workdir,
            # Ranks run in the run's own directory, which the agent copies from the immutable tree.
            cwd=run_dir(node, launch, route),
            tree=tree_dirs(node, launch, route)[0],
            argv=tuple(argv),
            env=environment(recipe, launch, node, route),
            limits=SpecLimits(resources.memory, resources.cpus, resources.pids),
            gpus_want=resources.gpus_per_node,
            gpus_allowed=tuple(node.gpus),
            cpu_slots_want=None if resources.gpus_per_node else recipe.procs(),
            cpu_total=None if resources.gpus_per_node else route.cpus,
            cgroup_parent=CGROUP_PARENT,
            user=launch.user,
            ledger=node.ledger or "",
            isolation=os.environ.get(FORCE_ISOLATION_ENV) or "",
            keep_warm=node.keep_warm,
        )
        launches.append(NodeLaunch(node, argv, spec))
    return launches


def tree_dirs(node: Node, launch: Launch, route: Route) -> tuple[str, str]:
    """Absolute paths of the run's code tree and of ava's runtime tree on this node."""
    trees = route.expand(posixpath.join(node.workdir.rstrip("/"), "trees"))
    return posixpath.join(trees, launch.code_tree), posixpath.join(trees, launch.runtime_tree)


def run_dir(node: Node, launch: Launch, route: Route) -> str:
    """Absolute path of the run's directory on this node: its ranks' cwd (see agent/rundir.py)."""
    return route.expand(posixpath.join(node.workdir.rstrip("/"), "runs", launch.run_id, "work"))


def _bracket(address: str) -> str:
    return f"[{address}]" if ":" in address else address
