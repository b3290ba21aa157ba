"""Driving the real node agent in tests: its CLI, tiny jobs, and a scan for leftovers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
IN_TREE = [sys.executable, "-m", "ava.agent"]

# Tiny jobs. Each reads its knobs from argv so a test says what it wants in one line.
JOBS = {
    "ranks.py": """
import os, sys, time
rank = int(os.environ.get("RANK", "0"))
print(f"hello from rank {rank}", flush=True)
time.sleep(float(os.environ.get("JOB_SLEEP", "0")))
fail_rank, code = (int(x) for x in os.environ.get("JOB_FAIL", "-1:0").split(":"))
sys.exit(code if rank == fail_rank else 0)
""",
    "spin.py": """
import multiprocessing as mp, sys, time
def spin(seconds):
    end = time.time() + seconds
    while time.time() < end:
        pass
if __name__ == "__main__":
    seconds = float(sys.argv[1])
    ps = [mp.Process(target=spin, args=(seconds,)) for _ in range(int(sys.argv[2]))]
    [p.start() for p in ps]
    [p.join() for p in ps]
""",
    "hog.py": """
import sys, time
size = int(sys.argv[1])
buf = bytearray(size)
for i in range(0, size, 4096):
    buf[i] = 1
print("allocated", flush=True)
time.sleep(30)
""",
    "escape.py": """
import os, sys, time
# A job that hides a process: double fork + setsid, so no parent or session leads to it.
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        with open(sys.argv[1], "w") as f:
            f.write(str(os.getpid()))
        time.sleep(120)
    os._exit(0)
print("escaped", flush=True)
time.sleep(120)
""",
    "envdump.py": """
import json, os, sys
keys = sys.argv[2:]
with open(sys.argv[1], "w") as f:
    json.dump({k: os.environb.get(k.encode(), b"").hex() for k in keys}, f)
""",
}


def can_fence() -> bool:
    """Root on a node with a cgroup tree the agent can write (this test machine: v1)."""
    from ava.agent.isolation import probe

    return os.geteuid() == 0 and probe() in ("v1", "v2")


needs_cgroups = pytest.mark.skipif(not can_fence(), reason="needs root and a writable cgroup tree")


def marker_pids(run: str) -> list[int]:
    """Every live process whose environment says it belongs to RUN."""
    from ava.agent.procs import pids_with_env

    return pids_with_env(f"AVA_RUN_ID={run}")


def cgroup_dirs(parent: str) -> list[Path]:
    """Existing cgroup directories under PARENT in every mounted hierarchy, deepest first."""
    from ava.agent.isolation import mounts

    found: list[Path] = []
    for point, _, _ in mounts():
        top = Path(point) / parent
        if top.is_dir():
            found += [Path(root) for root, _, _ in os.walk(top)]
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def wait_for(predicate: Any, timeout: float = 20.0, step: float = 0.1) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > end:
            return value
        time.sleep(step)


class Agent:
    """The agent CLI, against one workdir and one cgroup parent private to the test."""

    def __init__(self, work: Path, jobs: Path, parent: str, prefix: list[str] | None = None) -> None:
        self.work = work
        self.jobs = jobs
        self.parent = parent
        self.prefix = prefix or IN_TREE
        self.runs: list[str] = []

    def new_run(self, tag: str) -> str:
        run = f"t{tag}-{uuid.uuid4().hex[:8]}"
        self.runs.append(run)
        return run

    def cli(self, *args: str, timeout: float = 90.0, stdin: bytes | None = None) -> tuple[int, Any]:
        proc = subprocess.run(
            [*self.prefix, *args], cwd=REPO, capture_output=True, timeout=timeout, check=False, input=stdin
        )
        try:
            return proc.returncode, json.loads(proc.stdout)
        except ValueError:
            raise AssertionError(f"agent {args[0]}: not JSON: {proc.stdout!r} {proc.stderr[-2000:]!r}")

    def spec(self, run: str, argv: list[str], attempt: int = 1, **extra: Any) -> dict[str, Any]:
        spec = {
            "run": run,
            "attempt": attempt,
            "node": "n1",
            "workdir": str(self.work),
            "cwd": str(self.jobs),
            "argv": argv,
            "env": {},
            "limits": {"memory": None, "cpus": None, "pids": None},
            "gpus": {"want": 0, "allowed": []},
            "cpu_slots": None,
            "cgroup_parent": self.parent,
            "user": "tester",
        }
        spec.update(extra)
        return spec

    def start(self, spec: dict[str, Any]) -> tuple[int, Any]:
        if spec["run"] not in self.runs:
            self.runs.append(spec["run"])
        path = self.jobs / f"spec-{spec['run']}-{spec['attempt']}.json"
        path.write_text(json.dumps(spec))
        return self.cli("start", str(path))

    def status(self, run: str, attempt: int | None = None) -> dict[str, Any]:
        extra = ["--attempt", str(attempt)] if attempt is not None else []
        return self.cli("status", str(self.work), run, *extra)[1]

    def wait_final(self, run: str, timeout: float = 45.0) -> dict[str, Any]:
        st = wait_for(
            lambda: (s := self.status(run)).get("state") in ("succeeded", "failed", "stopped") and s,
            timeout,
            0.25,
        )
        assert st, f"{run} not final after {timeout}s: {self.status(run)}"
        return st

    def stop(self, run: str, grace: float = 2.0) -> tuple[int, Any]:
        return self.cli("stop", str(self.work), run, "--grace", str(grace))

    def stop_clean(self, run: str, grace: float = 2.0) -> None:
        """Stop RUN and require what the agent promises: stopped, no pid left, cgroup removed.
        (The fixture's SIGKILL sweep afterwards would hide a stop that left anything.)"""
        rc, out = self.stop(run, grace)
        assert (rc, out) == (0, {"run": run, "stopped": True, "remaining_pids": [], "cgroup_removed": True}), out
        assert marker_pids(run) == [], f"{run}: processes left after a clean stop: {marker_pids(run)}"

    def leases(self) -> list[dict[str, Any]]:
        return self.cli("leases", str(self.work))[1]["holders"]

    def cleanup(self) -> None:
        """Stop every run the test made, then sweep whatever still lingers."""
        for run in self.runs:
            try:
                self.stop(run, grace=0.5)
            except Exception:
                pass
            for pid in marker_pids(run):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for d in cgroup_dirs(self.parent):
            frozen = d / "freezer.state"
            if frozen.exists():
                frozen.write_text("THAWED")
            for pid in (d / "cgroup.procs").read_text().split() if (d / "cgroup.procs").exists() else []:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            wait_for(lambda: _rmdir(d), timeout=5.0, step=0.05)


def _rmdir(d: Path) -> bool:
    try:
        d.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def make_agent(tmp_path: Path, prefix: list[str] | None = None) -> Iterator[Agent]:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    for name, text in JOBS.items():
        (jobs / name).write_text(text)
    agent = Agent(tmp_path / "work", jobs, f"ava-test-{uuid.uuid4().hex[:8]}", prefix)
    try:
        yield agent
    finally:
        agent.cleanup()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    yield from make_agent(tmp_path)


def torchrun(script: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), script]
