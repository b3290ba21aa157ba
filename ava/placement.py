"""Which nodes a run gets: eligibility by labels and GPUs, the master, and the spares."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ava.config import Inventory, Node, Recipe
from ava.errors import AvaError, UsageError


class NotEnoughNodes(AvaError):
    pass


@dataclass(frozen=True)
class Placement:
    nodes: tuple[Node, ...]  # the first is the master
    spares: tuple[Node, ...]  # eligible nodes left over, for replacing a lost one

    @property
    def master(self) -> Node:
        return self.nodes[0]

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.nodes]


def why_ineligible(node: Node, recipe: Recipe) -> str | None:
    wanted = set(recipe.resources.labels)
    if not wanted <= set(node.labels):
        return f"lacks labels {', '.join(sorted(wanted - set(node.labels)))}"
    if recipe.resources.gpus_per_node > len(node.gpus):
        return f"has {len(node.gpus)} GPUs, the recipe asks for {recipe.resources.gpus_per_node}"
    return None


def place(
    recipe: Recipe,
    inventory: Inventory,
    *,
    only: Sequence[str] = (),
    exclude: Sequence[str] = (),
    count: int | None = None,
) -> Placement:
    """Pick the run's nodes (pure). `only` keeps the order the user gave; `exclude` are lost nodes."""
    eligible, reasons = _eligible(recipe, inventory, only, exclude)
    low, high = recipe.resources.nodes_min, recipe.resources.nodes_max
    want = min(high, len(eligible)) if count is None else count
    if want < low or len(eligible) < want:
        detail = f" ({'; '.join(reasons)})" if reasons else ""
        asked = f"{low}" if low == high else f"{low} to {high}"
        raise NotEnoughNodes(f"recipe {recipe.name} needs {asked} nodes, {len(eligible)} eligible{detail}")
    chosen = eligible[:want]
    local = [n for n in chosen if n.transport == "local"]
    if local and len(chosen) > 1:
        raise UsageError(f"node {local[0].name} is the embedded local node and cannot share a run with other nodes")
    return Placement(tuple(chosen), tuple(eligible[want:]))


def spares(
    recipe: Recipe, inventory: Inventory, *, only: Sequence[str] = (), exclude: Sequence[str] = ()
) -> list[Node]:
    """The nodes a lost one may be replaced with: eligible, within ONLY (the run's `--nodes`)
    when given, none of EXCLUDE (the run's nodes and those it lost), never the local node."""
    # A node of ONLY since taken out of the inventory is no spare (nor an error mid-run).
    known = [name for name in only if name in inventory.nodes]
    if only and not known:
        return []
    eligible, _ = _eligible(recipe, inventory, known, exclude)
    return [n for n in eligible if n.transport != "local"]


def _eligible(
    recipe: Recipe, inventory: Inventory, only: Sequence[str], exclude: Sequence[str]
) -> tuple[list[Node], list[str]]:
    """The eligible nodes among ONLY (else the whole inventory), and why each other one is not."""
    candidates = inventory.select(only) if only else list(inventory.nodes.values())
    reasons: list[str] = []
    eligible: list[Node] = []
    for node in candidates:
        reason = "lost earlier in this run" if node.name in exclude else why_ineligible(node, recipe)
        if reason:
            reasons.append(f"{node.name} {reason}")
        else:
            eligible.append(node)
    return eligible, reasons


def checkpoint_reach_warning(recipe: Recipe, placement: Placement) -> str | None:
    """Why a resumed attempt may not find its checkpoints, or None.

    On several nodes, rank 0 (the only writer) may be on another node after a failover, and a
    spare brought in has nothing on its disk: checkpoints must live where every node reads.
    """
    if len(placement.nodes) < 2 and not placement.spares:
        return None
    where = recipe.checkpoint.dir
    if where is not None and "://" in where and not where.startswith("file://"):
        return None
    what = "checkpoint.dir is not set" if where is None else f"checkpoint.dir {where} is a path on each node's own disk"
    return (
        f"{what}: a node brought in after a failure will not see checkpoints written on another node's "
        "disk; set it to an fsspec URL every node reaches (s3://…) or a shared mount"
    )
