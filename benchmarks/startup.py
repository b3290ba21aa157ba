"""How fast ava answers: `ava --help`, what its imports cost, and `ava nodes` on 1, 3 and 6 nodes.

    python benchmarks/startup.py [--runs 7] [--node-runs 5] [--onefile dist/ava]

1. `ava --help` wall time, median of --runs runs, as `python -m ava --help` and as the `ava`
   console script (the one on PATH, and the installed script itself when PATH holds a shim
   such as pyenv's), and as the one file (dist/ava, `python -m ava.build`) run by the system's
   python3; `python -c pass` beside them is the interpreter's own floor. Target <= 0.25 s
   (<= 0.3 s for the file). Then the file's first start, which unpacks it once.
2. `python -X importtime -m ava --help`: the 8 imports with the largest cumulative time (median
   of 3 runs), so we know what to make lazy.
3. `ava nodes --json` against inventories of 1, 3 and 6 nodes of one 6-node test cluster,
   median of --node-runs each, in rotating order; ratio 6-node/1-node, target <= 1.5.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, clean_env, median, ratio, seconds, spread, table, test_cluster, timed

HELP_TARGET = 0.25
ONEFILE = REPO / "dist" / "ava"
ONEFILE_TARGET = 0.3
SYSTEM_PATH = "/usr/bin:/bin"
NODES_TARGET = 1.5
NODE_COUNTS = (1, 3, 6)
FOLD = 0.9
IMPORT_LINE = re.compile(r"^import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)\s*$")


def onefile_argv(onefile: Path, *args: str) -> list[str]:
    """The one file as its users run it: found python3 on the system's PATH only."""
    return ["env", f"PATH={SYSTEM_PATH}", str(onefile), *args]


def help_commands(onefile: Path | None = None) -> dict[str, list[str]]:
    commands = {
        "python -c pass (floor)": [sys.executable, "-c", "pass"],
        "python -m ava --help": [sys.executable, "-m", "ava", "--help"],
    }
    if onefile is not None:
        commands[f"{onefile.name} --help (one file, {SYSTEM_PATH} python3)"] = onefile_argv(onefile, "--help")
    on_path = shutil.which("ava")
    if on_path:
        commands[f"ava --help ({on_path})"] = [on_path, "--help"]
    installed = Path(sys.executable).parent / "ava"
    if installed.exists() and (not on_path or Path(on_path).resolve() != installed.resolve()):
        commands[f"ava --help ({installed})"] = [str(installed), "--help"]
    return commands


def bench_help(runs: int, onefile: Path | None = None) -> None:
    commands = help_commands(onefile)
    samples: dict[str, list[float]] = {name: [] for name in commands}
    env = clean_env()
    for name, argv in commands.items():  # once untimed: disk caches warm for all alike
        timed(argv, env=env)
    for round_ in range(runs):
        names = list(commands)
        names = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in names:
            samples[name].append(timed(commands[name], env=env))

    def target(name: str) -> str:
        return "" if "floor" in name else f"<= {ONEFILE_TARGET if 'one file' in name else HELP_TARGET} s"

    rows = [[name, seconds(median(values)), spread(values), target(name)] for name, values in samples.items()]
    table(["command", f"median of {runs}", "samples (s)", "target"], rows, title="ava --help, wall time")


def bench_onefile_first_start(onefile: Path, runs: int = 3) -> None:
    """The one start that unpacks the file (into a fresh $SHIV_ROOT each time); later starts only
    find the unpacked tree by the build's hash."""
    samples = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="ava-bench-shiv-") as root:
            samples.append(timed(onefile_argv(onefile, "--help"), env=clean_env(SHIV_ROOT=root)))
    size = onefile.stat().st_size / 2**20
    table(
        ["command", f"median of {runs}", "samples (s)"],
        [[f"{onefile.name} --help, first start", seconds(median(samples)), spread(samples)]],
        title=f"the one file ({onefile}, {size:.1f} MiB): its first start unpacks it once",
    )


def bench_imports(runs: int = 3, top: int = 8) -> None:
    cumulative: dict[str, list[int]] = defaultdict(list)
    own: dict[str, list[int]] = defaultdict(list)
    depth: dict[str, int] = {}
    parent: dict[str, str] = {}
    for _ in range(runs):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "ava", "--help"],
            capture_output=True,
            text=True,
            env=clean_env(),
            cwd=REPO,
            timeout=60,
        )
        waiting: list[str] = []  # importtime prints children before the module that imported them
        for line in done.stderr.splitlines():
            match = IMPORT_LINE.match(line)
            if match:
                name = match.group(4)
                own[name].append(int(match.group(1)))
                cumulative[name].append(int(match.group(2)))
                depth[name] = len(match.group(3)) // 2
                for child in [c for c in waiting if depth[c] == depth[name] + 1]:
                    parent[child] = name
                waiting = [c for c in waiting if depth[c] <= depth[name]] + [name]

    def folded(name: str) -> bool:
        # A module that is nearly all of its importer's time says nothing new: one row for both.
        above = parent.get(name)
        return above is not None and median(cumulative[name]) >= FOLD * median(cumulative[above])

    slowest = [n for n in sorted(cumulative, key=lambda n: median(cumulative[n]), reverse=True) if not folded(n)][:top]
    rows = [
        [
            name,
            parent.get(name, "(interpreter)"),
            f"{median(cumulative[name]) / 1000:.1f}",
            f"{median(own[name]) / 1000:.1f}",
        ]
        for name in slowest
    ]
    table(
        ["module", "imported by", "cumulative ms", "self ms"],
        rows,
        title=f"python -X importtime -m ava --help: the {top} slowest cumulative imports (median of {runs};"
        f" one that is >= {FOLD:.0%} of its importer's time is folded into it)",
    )


def bench_nodes(runs: int) -> None:
    with test_cluster(max(NODE_COUNTS)) as cluster, tempfile.TemporaryDirectory(prefix="ava-bench-startup-") as scratch:
        names = [n.name for n in cluster.nodes]
        inventories = {
            count: cluster.inventory(names[:count], path=Path(scratch) / f"ava-{count}.toml") for count in NODE_COUNTS
        }
        env = clean_env(AVA_HOME=str(Path(scratch) / "home"))

        def argv(count: int) -> list[str]:
            return [sys.executable, "-m", "ava", "--inventory", str(inventories[count]), "nodes", "--json"]

        for count in NODE_COUNTS:  # once untimed, and check that every node answered
            done = subprocess.run(argv(count), capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
            reached = [n for n in json.loads(done.stdout or "[]") if n.get("reachable")]
            if done.returncode != 0 or len(reached) != count:
                raise SystemExit(
                    f"ava nodes on {count} nodes: exit {done.returncode}, {len(reached)} reachable\n"
                    f"{done.stdout[-1500:]}{done.stderr[-1500:]}"
                )
        samples: dict[int, list[float]] = {count: [] for count in NODE_COUNTS}
        for round_ in range(runs):
            order = NODE_COUNTS[round_ % 3 :] + NODE_COUNTS[: round_ % 3]
            for count in order:
                samples[count].append(timed(argv(count), env=env))
    base = median(samples[1])
    rows = [
        [str(count), seconds(median(values)), spread(values), ratio(median(values), base)]
        for count, values in samples.items()
    ]
    table(
        ["nodes", f"median of {runs}", "samples (s)", "vs 1 node"],
        rows,
        title=f"ava nodes --json on one {max(NODE_COUNTS)}-node test cluster"
        f" ({'network namespaces' if cluster.use_namespaces else 'loopback addresses'})",
    )
    print(f"ratio 6-node/1-node: {ratio(median(samples[6]), base)}  (target <= {NODES_TARGET})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="runs of each --help command")
    parser.add_argument("--node-runs", type=int, default=5, help="runs of ava nodes per inventory")
    parser.add_argument(
        "--onefile",
        type=Path,
        default=ONEFILE,
        help="the one-file ava to time beside the others (python -m ava.build; default dist/ava)",
    )
    options = parser.parse_args()
    onefile = options.onefile.resolve() if options.onefile.exists() else None
    began = time.monotonic()
    bench_help(options.runs, onefile)
    if onefile is not None:
        bench_onefile_first_start(onefile)
    else:
        print(f"\n(no one file at {options.onefile}: python -m ava.build makes it)")
    bench_imports()
    bench_nodes(options.node_runs)
    print(f"\n(wall time of this benchmark: {time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: test cluster removed", file=sys.stderr)
        sys.exit(130)
