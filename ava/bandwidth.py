"""`ava doctor --bandwidth`: an all-reduce benchmark across nodes, reported like nccl-tests.

The node side is ava/agent/bench_allreduce.py, run by the agent (`bench-allreduce`), one process
per node with torch.distributed (Gloo on CPU, NCCL where every node has a GPU). This side puts the
agent on each node unless it is there, picks a free port on the master, starts every rank at once,
and turns rank 0's timings into rows and a slow-link verdict.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from typing import Any

from ava import sync
from ava.config import Node
from ava.errors import AvaError, CommandError
from ava.transport import connect, run_all

CPU_SIZES = tuple(4 << (2 * i) << 10 for i in range(6))  # 4 KiB .. 4 MiB, x4
GPU_SIZES = tuple(4 << (2 * i) << 10 for i in range(10))  # 4 KiB .. 1 GiB, x4
PAIR_BYTES = 16 << 20
SLOW_FACTOR = 0.5  # a link under half the others' median is flagged


@dataclass(frozen=True)
class Row:
    size: int  # bytes
    count: int  # float32 elements
    seconds: float  # mean per all-reduce, slowest rank
    algbw: float  # bytes/s
    busbw: float  # bytes/s


@dataclass(frozen=True)
class Link:
    node: str
    bandwidth: float  # bytes/s, rank 0 <-> this node, both directions
    slow: bool


@dataclass(frozen=True)
class BandwidthReport:
    backend: str
    nodes: tuple[str, ...]
    rows: tuple[Row, ...]
    links: tuple[Link, ...]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def bus_bandwidth(algbw: float, ranks: int) -> float:
    """nccl-tests' all-reduce bus bandwidth: what each link carried, comparable across sizes."""
    return algbw * 2 * (ranks - 1) / ranks if ranks > 1 else algbw


def slow_links(bandwidths: dict[str, float], factor: float = SLOW_FACTOR) -> set[str]:
    """Nodes whose link is under `factor` times the median of the others'."""
    slow = set()
    for name, value in bandwidths.items():
        others = [v for n, v in bandwidths.items() if n != name]
        if others and value < factor * statistics.median(others):
            slow.add(name)
    return slow


def report(result: dict[str, Any], nodes: list[Node]) -> BandwidthReport:
    """Rank 0's JSON -> rows and links (pure)."""
    world = int(result["world"])
    rows = []
    for raw in result["rows"]:
        seconds = max(float(raw["seconds"]), 1e-9)
        algbw = raw["size"] / seconds
        rows.append(Row(int(raw["size"]), int(raw["count"]), seconds, algbw, bus_bandwidth(algbw, world)))
    speeds = {nodes[int(rank)].name: float(bw) for rank, bw in result.get("links", {}).items()}
    slow = slow_links(speeds)
    links = tuple(Link(name, bw, name in slow) for name, bw in speeds.items())
    return BandwidthReport(str(result["backend"]), tuple(n.name for n in nodes), tuple(rows), links)


def measure(
    nodes: list[Node],
    *,
    gpu: bool = False,
    interfaces: dict[str, str | None] | None = None,
    master_address: str | None = None,
    sizes: tuple[int, ...] | None = None,
    timeout: float = 120,
) -> BandwidthReport:
    """Run the benchmark on all nodes at once (the first is rank 0); raises if any rank fails."""
    if len(nodes) < 2:
        raise CommandError("the bandwidth benchmark needs at least two nodes")
    master = nodes[0]
    address = master_address or (master.host if master.transport != "local" and master.host else "127.0.0.1")
    # `ava doctor` may run before any launch or provision: the agent goes first, as they send it.
    sync.ship_agent(master)
    found = connect(master).run(sync.agent_command(master, "free-port"), timeout=30)
    port = int(_last_json(found.check("finding a free port on the master").stdout)["port"])
    backend = "nccl" if gpu else "gloo"
    ranks = {node.name: rank for rank, node in enumerate(nodes)}

    def one(node: Node) -> dict[str, Any]:
        args = {
            "rank": ranks[node.name],
            "world": len(nodes),
            "master": address,
            "port": port,
            "backend": backend,
            "sizes": list(sizes or (GPU_SIZES if gpu else CPU_SIZES)),
            "pair_bytes": PAIR_BYTES,
            "timeout": timeout / 2,
            "interface": (interfaces or {}).get(node.name),
        }
        sync.ship_agent(node)
        result = connect(node).run(sync.agent_command(node, "bench-allreduce", json.dumps(args)), timeout=timeout)
        if not result.ok:
            raise CommandError(
                f"{node.name}: the all-reduce benchmark failed (exit {result.exited})", tail=result.tail()
            )
        return _last_json(result.stdout)

    outcomes = run_all(nodes, one)
    failures = [o for o in outcomes.values() if isinstance(o, AvaError)]
    if failures:
        # One rank's failure makes the others time out waiting for it: report the cause.
        causes = [f for f in failures if "timed out" not in f.message and "Timeout" not in f.tail]
        first = (causes or failures)[0]
        raise CommandError(first.message, tail=first.tail)
    rank0 = outcomes[master.name]
    assert not isinstance(rank0, AvaError)  # failures were raised above
    return report(rank0, nodes)


def _last_json(stdout: str) -> dict[str, Any]:
    # The last line: a node's shell start-up files may print before the agent does.
    return dict(json.loads(stdout.strip().splitlines()[-1]))
