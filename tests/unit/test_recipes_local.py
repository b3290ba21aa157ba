"""The shipped recipes run as plain torchrun scripts, without ava: ddp-minimal and charlm."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("AVA_CHECKPOINT_DIR", "AVA_PROGRESS_FILE", "AVA_CHECKPOINT_KEEP"):
        env.pop(name, None)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(nproc),
            str(script),
            *args,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def final_hash(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = re.findall(r"^final step \d+ sha256 ([0-9a-f]{64})$", proc.stdout, re.M)
    assert len(found) == 1, proc.stdout[-3000:]  # printed by rank 0 only
    return found[0]


@pytest.mark.parametrize("name", ["ddp-minimal", "charlm"])
def test_recipe_file_names_a_script_beside_it(name: str) -> None:
    recipe = tomllib.loads((RECIPES / name / "recipe.toml").read_text())
    assert recipe["name"] == name
    assert (RECIPES / name / recipe["run"]["script"]).is_file()
    assert recipe["resources"]["gpus_per_node"] == 0 and recipe["env"]["OMP_NUM_THREADS"] == "1"


def test_ddp_minimal_reports_world_size_2_from_both_ranks() -> None:
    proc = torchrun(RECIPES / "ddp-minimal" / "train.py", "--steps", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank 0 world_size 2" in proc.stdout.splitlines()
    assert "rank 1 world_size 2" in proc.stdout.splitlines()


def test_ddp_minimal_fail_rank_makes_the_job_fail() -> None:
    proc = torchrun(RECIPES / "ddp-minimal" / "train.py", "--fail-rank", "1")
    assert proc.returncode != 0
    assert "rank 1 failing on purpose" in proc.stdout.splitlines()


def launch(script: Path, *args: str, nproc: int) -> subprocess.Popen[str]:
    """torchrun with `nproc` ranks, or for one rank plain `python3 train.py`, as a user would."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVA_")}
    env["OMP_NUM_THREADS"] = "1"
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    argv = [sys.executable, *(launcher if nproc > 1 else []), str(script), *args]
    return subprocess.Popen(argv, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("nproc", [2, 1])
def test_charlm_resumed_after_a_crash_ends_with_the_same_weights(tmp_path: Path, nproc: int) -> None:
    script = RECIPES / "charlm" / "train.py"
    common = ["--steps", "12", "--ckpt-every", "4", "--log-every", "4", "--sample", "0"]
    # The uninterrupted run and the one that crashes are independent: run them side by side.
    straight = launch(script, *common, "--ckpt-dir", str(tmp_path / "a"), nproc=nproc)
    crashing = launch(script, *common, "--ckpt-dir", str(tmp_path / "b"), "--exit-at-step", "10", nproc=nproc)
    crashed, straight_done = finish(crashing), finish(straight)
    assert crashed.returncode != 0 and "exiting at step 10 on purpose" in crashed.stdout
    resumed = finish(launch(script, *common, "--ckpt-dir", str(tmp_path / "b"), nproc=nproc))
    assert "resumed from step 8" in resumed.stdout
    assert final_hash(resumed) == final_hash(straight_done)
