"""`ava train` and friends on the real test cluster: real sshd, agents, torchrun with Gloo."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, processes_of, run_ava
from tests.support.cluster import Cluster

ECHO = REPO / "tests" / "data" / "recipes" / "echo"
THREE = ["n1", "n2", "n3"]


@pytest.fixture()
def ava_home(tmp_path: Path) -> dict[str, str]:
    return {"AVA_HOME": str(tmp_path / "home")}


def ps(home: dict[str, str]) -> list[dict]:
    done = run_ava("ps", "--json", env=home)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def wait_for(predicate, timeout: float = 60.0, every: float = 0.5):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not met in time")


def echo_recipe(tmp_path: Path) -> Path:
    target = tmp_path / "echo"
    shutil.copytree(ECHO, target)
    return target


def test_ddp_minimal_runs_six_ranks_on_three_nodes(cluster: Cluster, ava_home: dict[str, str]) -> None:
    done = run_ava(
        "train",
        "recipes/ddp-minimal",
        "--set",
        "resources.nodes=3",
        "--set",
        "resources.procs_per_node=2",
        inventory=cluster.inventory(THREE),
        env=ava_home,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = [l for l in done.stdout.splitlines() if "world_size" in l]
    ranks = sorted(int(l.split("| ", 1)[1].split()[1]) for l in lines)
    assert ranks == list(range(6))
    assert all(l.split("| ", 1)[1].endswith("world_size 6") for l in lines)
    # Each line is prefixed by the node that printed it and its global rank.
    assert all(l.split("|")[0].strip().split("/")[0] in THREE for l in lines)
    (run,) = ps(ava_home)
    assert run["state"] == "succeeded" and run["exit_code"] == 0 and run["nodes"] == THREE


def test_a_failing_rank_fails_the_run_naming_node_and_rank(
    cluster: Cluster, ava_home: dict[str, str], tmp_path: Path
) -> None:
    recipe = echo_recipe(tmp_path)
    done = run_ava(
        "train",
        str(recipe),
        "--set",
        "resources.nodes=3",
        "--set",
        "resources.procs_per_node=2",
        "--set",
        "env.ECHO_FAIL_RANK=3",
        "--set",
        "env.ECHO_COLLECTIVE=1",
        inventory=cluster.inventory(THREE),
        env=ava_home,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    # Ranks 2 and 3 live on the second node in rendezvous order; find which node had rank 3.
    node = next(l.split("/")[0] for l in done.stdout.splitlines() if "/3 " in l.split("|")[0] + " ")
    assert f"failed on {node} rank 3 (exit 1)" in done.stderr
    assert "rank 3 failing on purpose" in done.stderr
    (run,) = ps(ava_home)
    assert run["state"] == "failed" and run["exit_code"] == 1
    assert run["attempts"][-1]["cause"] == f"rank 3 on {node} exited 1"


def test_stop_leaves_no_process_of_the_run_on_any_node(
    cluster: Cluster, ava_home: dict[str, str], tmp_path: Path
) -> None:
    recipe = echo_recipe(tmp_path)
    done = run_ava(
        "train",
        str(recipe),
        "--detach",
        "--set",
        "resources.nodes=3",
        "--set",
        "env.ECHO_SLEEP=120",
        inventory=cluster.inventory(THREE),
        env=ava_home,
    )
    assert done.returncode == 0, done.stderr
    run_id = done.stdout.strip().splitlines()[-1]
    wait_for(lambda: ps(ava_home)[0]["state"] == "running")
    wait_for(lambda: len(processes_of(run_id)) >= 3 * 2)  # torchrun and a worker on each node
    stopped = run_ava("stop", run_id, env=ava_home, inventory=cluster.inventory(THREE))
    assert stopped.returncode == 0, stopped.stderr
    assert processes_of(run_id) == []
    wait_for(lambda: ps(ava_home)[0]["state"] == "stopped", timeout=30)


def test_killing_the_attached_cli_leaves_the_run_going_and_logs_follow_it(
    cluster: Cluster, ava_home: dict[str, str], tmp_path: Path
) -> None:
    recipe = echo_recipe(tmp_path)
    inventory = cluster.inventory(["n1", "n2"])
    env = {**os.environ, **ava_home, "COLUMNS": "200"}
    attached = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ava",
            "--inventory",
            str(inventory),
            "train",
            str(recipe),
            "--set",
            "resources.nodes=2",
            "--set",
            "env.ECHO_SLEEP=8",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert attached.stdout is not None
        for line in attached.stdout:
            if "tick" in line:
                break
        attached.send_signal(signal.SIGKILL)
        attached.wait()
    finally:
        if attached.poll() is None:
            attached.kill()
    (run,) = ps(ava_home)
    assert run["state"] == "running"
    followed = run_ava("logs", run["id"], "-f", env=ava_home, inventory=inventory, timeout=120)
    assert followed.returncode == 0, followed.stderr
    assert "done 0" in followed.stdout and "done 1" in followed.stdout
    assert processes_of(run["id"]) == []


def test_relaunching_unchanged_code_moves_no_code(cluster: Cluster, ava_home: dict[str, str], tmp_path: Path) -> None:
    recipe = echo_recipe(tmp_path)
    (recipe / "data.bin").write_bytes(os.urandom(300_000))
    inventory = cluster.inventory(["n2", "n3"])
    args = ["train", str(recipe), "--set", "resources.nodes=2"]
    for _ in range(2):
        assert run_ava(*args, inventory=inventory, env=ava_home).returncode == 0
    (recipe / "echo.py").write_text((recipe / "echo.py").read_text() + "\n# one change\n")
    assert run_ava(*args, inventory=inventory, env=ava_home).returncode == 0
    first, second, third = (r["attempts"][0]["code_sent_bytes"] for r in ps(ava_home))
    assert first >= 2 * 300_000  # everything, to both nodes
    assert second == 0
    echo_size = (recipe / "echo.py").stat().st_size
    assert third == 2 * echo_size  # the one changed file, once per node


def hostile_values(pwned: Path) -> tuple[list[str], dict[str, str]]:
    """Arguments and env values that would create PWNED if a shell ever evaluated them."""
    args = ["it's", 'say "hi"', f"$(touch {pwned})", "a;b", "x\ny", "snow ☃ 日本", "--", "`id`", "*"]
    env = {
        "AVA_T_QUOTE": 'it\'s "q"',
        "AVA_T_SUB": f"$(touch {pwned}); `id`",
        "AVA_T_NL": "one\ntwo",
        "AVA_T_UNI": "héllo ☃",
        "AVA_T_GLOB": "*",
    }
    return args, env


def test_hostile_recipe_values_reach_the_script_byte_exact(
    cluster: Cluster, ava_home: dict[str, str], tmp_path: Path
) -> None:
    pwned = tmp_path / "pwned"  # the nodes share this machine's filesystem
    hostile_args, hostile_env = hostile_values(pwned)
    recipe = echo_recipe(tmp_path)
    env_lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in hostile_env.items())
    text = (recipe / "recipe.toml").read_text().replace("args = []", f"args = {json.dumps(hostile_args)}")
    (recipe / "recipe.toml").write_text(text + f"\n[env]\n{env_lines}\n")
    done = run_ava(
        "train", str(recipe), "--set", "resources.nodes=2", inventory=cluster.inventory(["n1", "n3"]), env=ava_home
    )
    assert done.returncode == 0, done.stderr
    payloads = [json.loads(l.split("ECHO ", 1)[1]) for l in done.stdout.splitlines() if "| ECHO " in l]
    assert len(payloads) == 2
    for payload in payloads:
        assert payload["argv"] == hostile_args
        assert payload["env"] == hostile_env
    assert not pwned.exists()


def test_hostile_recipe_name_is_refused(tmp_path: Path) -> None:
    recipe = echo_recipe(tmp_path)
    text = (recipe / "recipe.toml").read_text().replace('name = "echo"', 'name = "x; $(id)"')
    (recipe / "recipe.toml").write_text(text)
    done = run_ava("train", str(recipe), "--dry-run", inventory=REPO / "ava.toml")
    assert done.returncode == 2
    assert "name" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_dry_run_prints_each_nodes_torchrun_argv_and_starts_nothing(cluster: Cluster, ava_home: dict[str, str]) -> None:
    done = run_ava(
        "train",
        "recipes/ddp-minimal",
        "--dry-run",
        "--set",
        "resources.nodes=2",
        inventory=cluster.inventory(["n1", "n2"]),
        env=ava_home,
    )
    assert done.returncode == 0, done.stderr
    argvs = [l for l in done.stdout.splitlines() if l.startswith("argv: ")]
    assert len(argvs) == 2
    master = cluster.node("n1").address
    assert f"--rdzv-endpoint {master}:" in argvs[0] and "--rdzv-conf is_host=true" in argvs[0]
    assert "is_host" not in argvs[1] and f"--local-addr {cluster.node('n2').address}" in argvs[1]
    assert ps(ava_home) == []


@pytest.mark.parametrize("form", ["directory", "file"])
def test_a_recipe_from_an_s3_url_brings_its_code(cluster: Cluster, ava_home: dict[str, str], form: str) -> None:
    from tests.support.s3server import moto_server

    with moto_server() as s3:
        import s3fs

        fs = s3fs.S3FileSystem(**s3.s3fs_kwargs())
        bucket = f"recipes-{form}"  # moto keeps buckets across servers in one process
        fs.mkdir(bucket)
        fs.put(str(ECHO) + "/", f"{bucket}/echo/", recursive=True)
        url = f"s3://{bucket}/echo/" if form == "directory" else f"s3://{bucket}/echo/recipe.toml"
        done = run_ava(
            "train", url, "--set", "env.AVA_T_FROM=s3", inventory=cluster.inventory(["n2"]), env={**ava_home, **s3.env}
        )
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout.split("ECHO ", 1)[1].splitlines()[0])
    assert payload["env"] == {"AVA_T_FROM": "s3"}
    (run,) = ps(ava_home)
    assert run["state"] == "succeeded"
