"""Metrics through a real run, and a run started from another's checkpoint (issue 17).

charlm, shortened, on two test nodes, checkpoints on the moto S3 server every node reaches:
a rank that crashes mid-run leaves the metrics with every step once (the redone ones marked
repeated), `ava show` charts both attempts, `ava plot` draws a line; `ava train --from A` starts
B at A's last step with A's weights, bitwise, and never writes to A's checkpoints.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.test_failover import s3_settings
from tests.conftest import REPO, processes_of, run_ava
from tests.support.cluster import Cluster

CHARLM = REPO / "recipes" / "charlm"
NODES = ["n1", "n2"]
SHORT = ["--ckpt-every", "20", "--log-every", "10", "--sample", "0"]
# The line of matplotlib's first colour (C0, #1f77b4) in `ava plot`'s picture.
LINE_RGB = (0x1F / 255, 0x77 / 255, 0xB4 / 255)


@pytest.fixture()
def home(tmp_path: Path) -> dict[str, str]:
    return {"AVA_HOME": str(tmp_path / "home")}


@pytest.fixture(scope="module")
def s3(cluster: Cluster) -> Iterator[str]:
    """moto's S3 server on the address the nodes see this machine at, with a `ckpt` bucket.

    Its own, not test_failover's, whose fixture makes the bucket anew: moto keeps its buckets in
    this process across servers, so after test_failover the bucket is there already."""
    import logging

    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address=cluster.gateway, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=url, skip_instance_cache=True)
    fs.makedirs("ckpt", exist_ok=True)
    try:
        yield url
    finally:
        server.stop()


def train(cluster: Cluster, s3: str, home: dict[str, str], steps: int, *extra: str, more: tuple[str, ...] = ()) -> str:
    """`ava train recipes/charlm` shortened, on n1 and n2 with one rank each; its output."""
    args = ["--steps", str(steps), *SHORT, *extra]
    done = run_ava(
        "train",
        str(CHARLM),
        *s3_settings(s3, "metrics"),
        "--set",
        "resources.nodes=2",
        "--set",
        "resources.procs_per_node=1",
        "--set",
        f"run.args={json.dumps(args)}",
        *more,
        inventory=cluster.inventory(NODES, s3fs=True),
        env=home,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def last_run(home: dict[str, str]) -> dict:
    runs = json.loads(run_ava("ps", "--json", env=home).stdout)
    return runs[-1]


def recorded(home: dict[str, str], run_id: str) -> list[dict]:
    folder = Path(home["AVA_HOME"]) / "runs" / run_id / "metrics"
    points = []
    for path in sorted(folder.glob("attempt-*.jsonl"), key=lambda p: int(p.stem.split("-")[1])):
        points += [json.loads(line) for line in path.read_text().splitlines()]
    return points


def line_pixels(png: Path) -> tuple[int, int]:
    """(pixels of the line's colour, image columns they span)."""
    from matplotlib import image

    pixels = image.imread(str(png))
    hits = [
        (y, x)
        for y in range(pixels.shape[0])
        for x in range(pixels.shape[1])
        if all(abs(float(pixels[y, x, c]) - LINE_RGB[c]) < 0.08 for c in range(3))
    ]
    return len(hits), len({x for _, x in hits})


def test_a_rank_crash_leaves_every_step_once_and_the_chart_spans_both_attempts(
    cluster: Cluster, s3: str, home: dict[str, str], tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    # Rank 1 (on n2) crashes after step 30 of attempt 1; attempt 2 resumes from step 20.
    train(cluster, s3, home, 60, "--exit-at-step", "30", "--exit-attempt", "1", "--exit-rank", "1")
    run = last_run(home)
    assert [a["state"] for a in run["attempts"]] == ["failed", "succeeded"], run["attempts"]
    points = [p for p in recorded(home, run["id"]) if "loss" in p["metrics"]]
    fresh = [p["step"] for p in points if not p["repeated"]]
    assert sorted(fresh) == list(range(1, 61)), "a step missing or recorded twice as new"
    repeated = [p for p in points if p["repeated"]]
    assert repeated, "no step redone after the resume was marked repeated"
    assert all(p["attempt"] == 2 and 21 <= p["step"] <= 30 for p in repeated), repeated
    assert {p["attempt"] for p in points} == {1, 2} and all(p["rank"] == 0 for p in points)

    shown = run_ava("show", run["id"], env={**home, "COLUMNS": "100"})
    assert shown.returncode == 0, shown.stderr
    assert "attempts start at 1: step 1, 2: step 21" in shown.stdout
    chart = shown.stdout.split("\nloss: final", 1)[1].splitlines()
    axis = next(line for line in chart if line.lstrip().startswith("+1"))
    assert "2" in axis and all(len(line) <= 100 for line in chart)

    picture = tmp_path / "x.png"
    drawn = run_ava("plot", run["id"], "-o", str(picture), env=home)
    assert drawn.returncode == 0, drawn.stderr
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 10_000
    pixels, columns = line_pixels(picture)
    assert pixels > 500 and columns > 400, f"no line drawn: {pixels} pixels over {columns} columns"
    assert processes_of(run["id"]) == []


def s3_objects(url: str, prefix: str) -> dict[str, tuple[int, str]]:
    import s3fs

    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=url, skip_instance_cache=True)
    return {name: (info["size"], info.get("ETag", "")) for name, info in fs.find(prefix, detail=True).items()}


def test_a_run_from_another_starts_after_its_step_with_its_weights_and_leaves_it_alone(
    cluster: Cluster, s3: str, home: dict[str, str]
) -> None:
    first = train(cluster, s3, home, 40)
    parent = last_run(home)
    weights = re.search(r"final step 40 sha256 ([0-9a-f]{64})", first)
    assert weights, first[-3000:]
    before = s3_objects(s3, f"ckpt/metrics/{parent['id']}")
    assert any(name.endswith("step-00000040.COMMITTED") for name in before), sorted(before)

    second = train(cluster, s3, home, 60, more=("--from", parent["id"]))
    child = last_run(home)
    assert f"resumed from step 40 weights sha256 {weights.group(1)}" in second, second[-3000:]
    steps = [p["step"] for p in recorded(home, child["id"]) if "loss" in p["metrics"]]
    assert min(steps) == 41 and sorted(steps) == list(range(41, 61))
    assert s3_objects(s3, f"ckpt/metrics/{parent['id']}") == before, "the child wrote to its parent's checkpoints"
    assert s3_objects(s3, f"ckpt/metrics/{child['id']}"), "the child saved no checkpoint of its own"

    shown = run_ava("show", child["id"], env=home)
    assert f"{parent['id']}@40" in shown.stdout, shown.stdout
    compared = json.loads(run_ava("compare", parent["id"], child["id"], "--json", env=home).stdout)
    assert set(compared["differing"]) == {"run.args"}, compared["differing"]
    refused = run_ava(
        "train",
        str(CHARLM),
        "--from",
        parent["id"],
        "--set",
        f"checkpoint.dir=s3://ckpt/metrics/{parent['id']}",
        inventory=cluster.inventory(NODES, s3fs=True),
        env=home,
    )
    assert refused.returncode == 2 and "must not write" in refused.stderr, refused.stderr
