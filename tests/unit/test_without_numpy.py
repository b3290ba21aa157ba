"""User-side code on a node whose Python has torch but no numpy (torch's wheel does not bring it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

# numpy made unimportable before torch loads: torch then runs as it does in a fresh venv.
SCRIPT = r"""
import sys
sys.modules["numpy"] = None
import os, torch, torch.distributed as dist
from ava import ckpt
dist.init_process_group("gloo")
rank = dist.get_rank()
directory = sys.argv[1]
assert ckpt.load_latest(dir=directory) is None
ckpt.save({"w": torch.full((3,), float(rank)), "tag": "x" * 5000}, 7, dir=directory)
state, step = ckpt.load_latest(dir=directory)
assert step == 7 and state["tag"] == "x" * 5000 and state["w"].tolist() == [0.0, 0.0, 0.0], state
print(f"rank {rank} ok", flush=True)
dist.destroy_process_group()
"""


def test_checkpoints_save_and_resume_in_a_job_without_numpy(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(script),
            str(tmp_path / "ckpt"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "rank 0 ok" in done.stdout and "rank 1 ok" in done.stdout


def test_charlm_gathers_rng_states_without_numpy(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    runner = tmp_path / "run.py"
    # Same trick: numpy blocked, then charlm's own main() with a short run and a checkpoint.
    runner.write_text(
        "import sys, runpy\nsys.modules['numpy'] = None\n"
        f"sys.argv = [{str(REPO / 'recipes/charlm/train.py')!r}] + sys.argv[1:]\n"
        f"runpy.run_path({str(REPO / 'recipes/charlm/train.py')!r}, run_name='__main__')\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(runner),
            "--steps",
            "4",
            "--ckpt-every",
            "2",
            "--ckpt-dir",
            str(tmp_path / "ckpt"),
            "--layers",
            "1",
            "--dim",
            "32",
            "--heads",
            "2",
            "--block",
            "16",
            "--batch",
            "4",
            "--sample",
            "0",
            "--log-every",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "final step 4 sha256" in done.stdout + done.stderr
