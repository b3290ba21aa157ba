"""What `ava train` does before it touches a node, for a recipe of 100 files: read the recipe,
make the run's record (recipe hash included), snapshot its code, save the record.

    python benchmarks/run_record.py [--files 100] [--runs 7]

Prints the median of each step over RUNS, in one process (the interpreter's start and ava's
imports are `benchmarks/startup.py`'s to measure). Target (issue 14): the whole <= 0.1 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "recipe"
        root.mkdir()
        for i in range(args.files - 1):
            (root / f"module_{i}.py").write_text(f"# module {i}\n" + "x = 1\n" * 60)
        (root / "recipe.toml").write_text('name = "hundred"\n[run]\nscript = "module_0.py"\n')
        os.environ["AVA_HOME"] = str(Path(scratch) / "home")
        inventory = Path(scratch) / "ava.toml"
        inventory.write_text('[nodes.local]\ntransport = "local"\n')

        from ava import runs
        from ava.config import load_recipe
        from ava.supervisor import snapshot_code

        steps: dict[str, list[float]] = {"recipe": [], "record + hash": [], "code snapshot": [], "save": []}
        totals = []
        for _ in range(args.runs):
            began = time.perf_counter()
            recipe = load_recipe(str(root))
            read = time.perf_counter()
            record = runs.create(runs.new_run_id(recipe.name), recipe, inventory, ["local"], [])
            made = time.perf_counter()
            snapshot_code(record, Path(recipe.root), leave_out="recipe.toml")
            copied = time.perf_counter()
            record.save()
            saved = time.perf_counter()
            for name, seconds in zip(steps, (read - began, made - read, copied - made, saved - copied)):
                steps[name].append(seconds)
            totals.append(saved - began)
    print(f"a recipe of {args.files} files, median of {args.runs} runs:")
    for name, samples in steps.items():
        print(f"  {name:<14} {statistics.median(samples) * 1000:7.1f} ms")
    total = statistics.median(totals)
    print(f"  {'total':<14} {total * 1000:7.1f} ms   (target <= 100 ms: {total / 0.1:.2f}x of it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
