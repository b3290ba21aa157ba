"""Training scripts written the way people write them (tests/data/recipes/userstyle), each run
on the test cluster through a rank killed mid-run: the run resumes from what the script saved
in its own working directory and ends well. No script knows of ava.

The DDP tutorial saves a snapshot on every node (its local rank 0), so it runs on two nodes; the
other two save from rank 0 alone, to a relative path, as single-node scripts do, so they run on
one node: across nodes their checkpoints would need storage every node reads (ava warns).
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest

from tests.cluster.test_failover import LiveRun, run_id_of
from tests.conftest import REPO, run_ava
from tests.support.cluster import Cluster

USERSTYLE = REPO / "tests" / "data" / "recipes" / "userstyle"
NODES = ["n1", "n2"]


def _environ(pid: int | str) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(e.split("=", 1) for e in raw.decode(errors="replace").split("\0") if "=" in e)


def rank_pid(run_id: str, rank: int) -> int | None:
    """The rank's own process (not one of its DataLoader workers, which carry RANK too)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        env = _environ(entry.name)
        if env.get("AVA_RUN_ID") != run_id or env.get("RANK") != str(rank):
            continue
        try:
            parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
        except (OSError, IndexError):
            continue
        if "RANK" not in _environ(parent):
            return int(entry.name)
    return None


def crash_a_rank_mid_run(
    cluster: Cluster, tmp_path: Path, script: str, args: list[str], saved: str, *, nodes: int = 2
) -> LiveRun:
    """`ava train` of the script on NODES nodes (two ranks in all); once the line SAVED
    appears, SIGKILL rank 1; then wait for the run to end."""
    home = {"AVA_HOME": str(tmp_path / "home")}
    shape = ["--set", f"resources.nodes={nodes}", "--set", f"resources.procs_per_node={2 // nodes}"]
    run = LiveRun(
        ["train", str(USERSTYLE), "--set", f"run.script={script}", "--set", f"run.args={json.dumps(args)}", *shape],
        cluster.inventory(NODES[:nodes]),
        home,
    )
    try:
        run_id = run_id_of(run)
        run.wait_line(saved, timeout=180)
        pid = rank_pid(run_id, 1)
        assert pid is not None, "rank 1 not found"
        os.kill(pid, signal.SIGKILL)
        assert run.finish(timeout=300) == 0, run.text()[-4000:]
    finally:
        run.kill()
    records = json.loads(run_ava("ps", "--json", env=home).stdout)
    assert [a["state"] for a in records[0]["attempts"]] == ["failed", "succeeded"], run.text()[-3000:]
    return run


def test_the_ddp_tutorial_resumes_from_the_snapshot_it_saved_next_to_itself(cluster: Cluster, tmp_path: Path) -> None:
    run = crash_a_rank_mid_run(
        cluster,
        tmp_path,
        "ddp_tutorial.py",
        ["8", "1", "--batch_size", "32"],
        r"Epoch [1-9] \| Training snapshot saved at snapshot.pt",
    )
    text = run.text()
    first, second = text.split("attempt 2 starting", 1)
    assert "Loading snapshot" not in first  # a new run starts from scratch
    resumed = [int(m) for m in re.findall(r"Resuming training from snapshot at Epoch (\d+)", second)]
    assert len(resumed) == 2 and min(resumed) >= 1, second[-3000:]  # one per node
    assert "Epoch 7 | Training snapshot saved" in second


def test_a_dataloader_with_workers_and_a_sampler_resumes_from_relative_checkpoints(
    cluster: Cluster, tmp_path: Path
) -> None:
    run = crash_a_rank_mid_run(
        cluster,
        tmp_path,
        "workers.py",
        ["--epochs", "6", "--workers", "2"],
        r"epoch [1-4] loss \S+ saved checkpoint",
        nodes=1,
    )
    second = run.text().split("attempt 2 starting", 1)[1]
    assert re.search(r"rank 0: resumed at epoch [2-5]", second), second[-3000:]
    assert "rank 0: done" in second and "rank 1: done" in second


def test_a_script_reading_data_by_relative_paths_resumes_and_keeps_its_outputs(
    cluster: Cluster, tmp_path: Path
) -> None:
    run = crash_a_rank_mid_run(
        cluster, tmp_path, "relative_data.py", ["60"], r"step (1[05]|2[05]) weight \S+ saved", nodes=1
    )
    second = run.text().split("attempt 2 starting", 1)[1]
    assert re.search(r"rank 0: resumed at step [1-5][05]", second), second[-3000:]
    assert "rank 0: done at step 60" in second
