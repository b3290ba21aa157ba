"""What `ava.env.progress(step, **metrics)` costs a training step.

    python benchmarks/metrics_call.py [--calls 200000] [--repeats 7]

Times, per call, the fastest of --repeats rounds of --calls calls each (timeit's rule: the
round least disturbed by other load), side by side:
  1. progress(step) outside ava (no AVA_PROGRESS_FILE, no AVA_METRICS_FILE): the floor;
  2. progress(step) under ava (both files set): a heartbeat every 0.5 s, a step-rate line with it;
  3. progress(step, loss=, lr=, grad_norm=, tokens_per_s=) under ava: one metrics line per call.
Target: 3. at most 20 µs per call (issue 17). The files go to a temporary directory. A last
line times `repr(2.5)` alone, to tell a slow machine from a slow call.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import timeit
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ava import env

TARGET_US = 20.0


def per_call_us(calls: int, with_metrics: bool) -> float:
    progress = env.progress
    started = time.perf_counter()
    if with_metrics:
        for step in range(calls):
            progress(step, loss=2.5 - step * 1e-6, lr=3e-4, grad_norm=0.75, tokens_per_s=123456.0)
    else:
        for step in range(calls):
            progress(step)
    return (time.perf_counter() - started) / calls * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cases: dict[str, tuple[dict[str, str], bool]] = {
            "progress(step), outside ava": ({}, False),
            "progress(step), under ava": (
                {"AVA_PROGRESS_FILE": f"{tmp}/progress", "AVA_METRICS_FILE": f"{tmp}/metrics.jsonl"},
                False,
            ),
            "progress(step, 4 metrics), under ava": (
                {"AVA_PROGRESS_FILE": f"{tmp}/progress", "AVA_METRICS_FILE": f"{tmp}/metrics4.jsonl"},
                True,
            ),
        }
        results: dict[str, float] = {}
        for name, (variables, with_metrics) in cases.items():
            for key in ("AVA_PROGRESS_FILE", "AVA_METRICS_FILE"):
                os.environ.pop(key, None)
            os.environ.update(variables)
            per_call_us(1000, with_metrics)  # warm: the file opened, names cached
            results[name] = min(per_call_us(args.calls, with_metrics) for _ in range(args.repeats))
        lines = sum(1 for _ in open(f"{tmp}/metrics4.jsonl", encoding="utf-8"))
    floor = results["progress(step), outside ava"]
    print(f"{'case':40} {'µs/call':>8} {'x floor':>8}")
    for name, value in results.items():
        print(f"{name:40} {value:8.2f} {value / floor:8.1f}")
    metered = results["progress(step, 4 metrics), under ava"]
    floor_repr = min(timeit.repeat("repr(2.5)", number=args.calls, repeat=args.repeats)) / args.calls * 1e6
    print(f"{'repr(2.5), for scale':40} {floor_repr:8.2f}")
    verdict = "ok" if metered <= TARGET_US else "TOO SLOW"
    print(f"4 metrics: {metered:.2f} µs per call (target <= {TARGET_US:.0f} µs): {verdict}; {lines} lines written")
    return 0 if metered <= TARGET_US else 1


if __name__ == "__main__":
    sys.exit(main())
