"""A second `ava provision` against one `ava nodes`, on three fresh test-cluster nodes.

    python benchmarks/provision.py [REPEATS]      (root: the cluster uses network namespaces)

Provisions the fresh nodes once, then times `ava provision` (nothing to do) and `ava nodes`
alternately, each a whole CLI run as a user types it. Prints both medians and their ratio; the
target is a ratio of at most 1.5. Exits 1 when it is over.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import run_ava
from tests.support.cluster import running_cluster

TARGET = 1.5


def timed(*args: str, inventory: Path) -> float:
    started = time.perf_counter()
    done = run_ava(*args, inventory=inventory, timeout=300)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"ava {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return elapsed


def main(repeats: int) -> int:
    with running_cluster(3) as cluster, tempfile.TemporaryDirectory(prefix="ava-bench-") as scratch:
        inventory = cluster.inventory(path=Path(scratch) / "ava.toml", cache_size="1GiB")
        text = inventory.read_text()
        for node in cluster.nodes:  # never-used workdirs: the first provision does everything
            text = text.replace(f'"{node.workdir}"', f'"{scratch}/{node.name}/work"')
            text = text.replace(f'"{node.cache_dir}"', f'"{scratch}/{node.name}/cache"')
        inventory.write_text(text)
        first = timed("provision", inventory=inventory)
        again: list[float] = []
        nodes: list[float] = []
        for _ in range(repeats):
            again.append(timed("provision", inventory=inventory))
            nodes.append(timed("nodes", inventory=inventory))
    ratio = statistics.median(again) / statistics.median(nodes)
    print(f"first provision (3 fresh nodes):  {first:6.3f} s")
    print(
        f"second provision, median of {repeats}:  {statistics.median(again):6.3f} s  {sorted(round(t, 3) for t in again)}"
    )
    print(
        f"ava nodes, median of {repeats}:         {statistics.median(nodes):6.3f} s  {sorted(round(t, 3) for t in nodes)}"
    )
    print(f"ratio provision/nodes:            {ratio:6.2f}  (target <= {TARGET})")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 7))
