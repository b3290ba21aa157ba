"""Every shipped recipe, trained N times through ava on a real test cluster: how many attempts failed.

    python benchmarks/stress_recipes.py [--runs 30] [--recipes ddp-minimal,charlm] [--nodes 1]
                                        [--charlm-steps 30]

Not in CI (30 runs of each take a while). A shipped recipe must end every run in one attempt:
a failed attempt is a flaky exit, e.g. a rank that printed its last line and then aborted
(SIGABRT, "terminate called without an active exception"), which ava answers by restarting the
whole job. Each run is `ava train recipes/NAME` with the recipe's own settings, except
`--nodes` and charlm's step count (`--charlm-steps 0`: its 1500 steps as shipped); the run's
attempts are read from `ava ps RUN --json`. Prints one line per failed attempt (its cause) and
a table: runs, runs that failed, attempts that failed, median seconds a run took.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import clean_env, median, table, test_cluster
from tests.conftest import run_ava

SHIPPED = ("ddp-minimal", "charlm")


def settings(recipe: str, nodes: int, charlm_steps: int) -> list[str]:
    out = ["--set", f"resources.nodes={nodes}"]
    if recipe == "charlm" and charlm_steps:
        out += ["--set", f'run.args=["--steps", "{charlm_steps}", "--ckpt-every", "{max(1, charlm_steps // 2)}"]']
    return out


def one_run(recipe: str, inventory: Path, home: dict[str, str], extra: list[str]) -> tuple[dict, float]:
    started = time.monotonic()
    done = run_ava("train", f"recipes/{recipe}", *extra, inventory=inventory, env=home, timeout=1800)
    took = time.monotonic() - started
    found = re.search(r"ava: run (\S+) on ", done.stdout + done.stderr)
    if found is None:
        raise SystemExit(f"{recipe}: no run started (exit {done.returncode}):\n{done.stderr[-2000:]}")
    record = run_ava("ps", found.group(1), "--json", env=home)
    if record.returncode != 0:
        raise SystemExit(f"ava ps {found.group(1)}: {record.stderr[-2000:]}")
    return json.loads(record.stdout), took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="runs of each recipe")
    parser.add_argument("--recipes", default=",".join(SHIPPED), help="comma-separated recipe names")
    parser.add_argument("--nodes", type=int, default=1, help="resources.nodes of every run")
    parser.add_argument("--charlm-steps", type=int, default=30, help="charlm's --steps (0: as shipped)")
    args = parser.parse_args()
    recipes = [r for r in args.recipes.split(",") if r]
    rows, total_failed = [], 0
    with test_cluster(args.nodes) as cluster, tempfile.TemporaryDirectory(prefix="ava-stress-") as home_dir:
        inventory = cluster.inventory()
        home = clean_env(AVA_HOME=home_dir)
        for recipe in recipes:
            failed_runs = failed_attempts = 0
            took: list[float] = []
            for number in range(1, args.runs + 1):
                record, seconds = one_run(recipe, inventory, home, settings(recipe, args.nodes, args.charlm_steps))
                took.append(seconds)
                bad = [a for a in record["attempts"] if a["state"] != "succeeded"]
                failed_attempts += len(bad)
                failed_runs += record["state"] != "succeeded"
                for attempt in bad:
                    print(
                        f"{recipe} run {number} ({record['id']}) attempt {attempt['number']}: "
                        f"{attempt['state']}: {attempt.get('cause')}",
                        flush=True,
                    )
                print(f"{recipe}: {number}/{args.runs} done, {failed_attempts} failed attempts", flush=True)
            total_failed += failed_attempts
            rows.append([recipe, str(args.runs), str(failed_runs), str(failed_attempts), f"{median(took):.1f}"])
    table(
        ["recipe", "runs", "failed runs", "failed attempts", "median s/run"],
        rows,
        title=f"shipped recipes through ava on {args.nodes} test node(s)",
    )
    return 1 if total_failed else 0


if __name__ == "__main__":
    sys.exit(main())
