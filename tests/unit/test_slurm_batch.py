"""The Slurm batch script and agents' spec template (ava/slurm/batch.py), and the [slurm] table."""

from __future__ import annotations

import json

import pytest

from ava.config import Node, parse_recipe
from ava.errors import ConfigError
from ava.launch import Launch
from ava.slurm.batch import ADDR, IFACE, MASTER_ADDR, MASTER_PORT, NODE, Paths, submission
from ava.slurm.inventory import SlurmSettings, parse

RECIPE = """
name = "ddp"
[run]
script = "train.py"
args = ["--steps", "3"]
[resources]
nodes = 2
procs_per_node = 2
memory = "4GiB"
cpus = 3
[env]
SECRET_TOKEN = "hunter2"
"""

SETTINGS = SlurmSettings(
    login="login", shared_dir="/shared/ava", partition="gpu", account="lab", qos="normal", time="1:00:00"
)
LAUNCH = Launch("ddp-20261201-120000-abcd", 1, "", 0, "c0de", "a1b2", "alice")
LOGIN = Node(name="login", host="login.example.org")


def job(exclude: tuple[str, ...] = (), text: str = RECIPE):  # type: ignore[no-untyped-def]
    recipe = parse_recipe(text, "recipe.toml", "/home/alice/ddp")
    return submission(
        recipe,
        SETTINGS,
        LAUNCH,
        LOGIN,
        python="/opt/venv/bin/python3",
        agent="/shared/ava/agent/agent-1234.pyz",
        exclude=exclude,
    )


def test_batch_script_asks_for_the_recipes_nodes_cpus_and_memory_and_runs_one_agent_per_node() -> None:
    assert job(exclude=("n2", "n5")).script == (
        "#!/bin/bash\n"
        "# ava run ddp-20261201-120000-abcd, attempt 1 (recipe ddp)\n"
        "#SBATCH --job-name=ddp-20261201-120000-abcd\n"
        "#SBATCH --nodes=2\n"
        "#SBATCH --ntasks-per-node=1\n"
        "#SBATCH --cpus-per-task=3\n"
        "#SBATCH --mem=4096M\n"
        "#SBATCH --partition=gpu\n"
        "#SBATCH --account=lab\n"
        "#SBATCH --qos=normal\n"
        "#SBATCH --time=1:00:00\n"
        "#SBATCH --exclude=n2,n5\n"
        "#SBATCH --no-requeue\n"
        "#SBATCH --output=/shared/ava/slurm/ddp-20261201-120000-abcd/slurm-%j.out\n"
        "#SBATCH --open-mode=append\n"
        "set -u\n"
        "exec srun --ntasks-per-node=1 --kill-on-bad-exit=0 --unbuffered /opt/venv/bin/python3 "
        "/shared/ava/agent/agent-1234.pyz slurm-node /shared/ava/agent/agent-1234.pyz "
        "/shared/ava/slurm/ddp-20261201-120000-abcd/attempt-1.json\n"
    )


def test_gpus_per_node_becomes_gpus_per_node_and_cpus_default_to_the_procs() -> None:
    text = RECIPE.replace('memory = "4GiB"\ncpus = 3\n', "gpus_per_node = 2\n")
    script = job(text=text).script
    assert "#SBATCH --gpus-per-node=2\n" in script
    assert "#SBATCH --cpus-per-task=2\n" in script
    assert "--mem" not in script


def test_env_values_travel_in_the_template_never_in_the_script() -> None:
    submitted = job()
    assert "hunter2" not in submitted.script
    assert submitted.template["master"]["env"]["SECRET_TOKEN"] == "hunter2"


def test_template_leaves_the_allocations_facts_as_tokens_and_only_the_master_hosts_the_rendezvous() -> None:
    template = job().template
    master, worker = template["master"], template["worker"]
    for spec in (master, worker):
        argv = spec["argv"]
        assert argv[argv.index("--rdzv-endpoint") + 1] == f"{MASTER_ADDR}:{MASTER_PORT}"
        assert argv[argv.index("--local-addr") + 1] == ADDR
        assert argv[argv.index("--nnodes") + 1] == "2"
        assert spec["env"]["GLOO_SOCKET_IFNAME"] == IFACE
        assert spec["workdir"] == f"/shared/ava/nodes/{NODE}"
        assert spec["tree"] == "/shared/ava/trees/c0de"
        assert spec["isolation"] == "none"  # Slurm fences the job
        assert spec["env"]["PYTHONPATH"].split(":")[1] == "/shared/ava/trees/a1b2"
    assert "is_host=true" in master["argv"] and "is_host=true" not in worker["argv"]
    json.dumps(template)  # it travels as JSON


def test_paths_keep_each_nodes_agent_files_apart_on_the_shared_filesystem() -> None:
    paths = Paths("/shared/ava", "r1")
    assert paths.node_workdir("n1") != paths.node_workdir("n2")
    assert paths.template(2) == "/shared/ava/slurm/r1/attempt-2.json"


NODES = {"login": LOGIN}


def test_slurm_table_parses_and_checks_its_keys() -> None:
    settings = parse({"slurm": {"login": "login", "shared_dir": "/s", "partition": "p"}}, "ava.toml", NODES)
    assert settings is not None and settings.sbatch_options() == [("partition", "p")]
    assert parse({}, "ava.toml", NODES) is None
    cases = [
        ({"login": "login"}, "ava.toml: slurm.shared_dir: missing"),
        ({"login": "nope", "shared_dir": "/s"}, "ava.toml: slurm.login: no [nodes.nope] table"),
        ({"login": "login", "shared_dir": "s"}, "ava.toml: slurm.shared_dir: expected an absolute path"),
        ({"login": "login", "shared_dir": "/s", "partition": "a b"}, "ava.toml: slurm.partition: expected one word"),
        ({"login": "login", "shared_dir": "/s", "nodes": "x"}, "ava.toml: slurm.nodes: unknown key"),
        ({"login": "login", "shared_dir": "/s", "time": "soon"}, "ava.toml: slurm.time: expected Slurm's time"),
    ]
    for table, message in cases:
        with pytest.raises(ConfigError) as caught:
            parse({"slurm": table}, "ava.toml", NODES)
        assert caught.value.message.startswith(message), caught.value.message
