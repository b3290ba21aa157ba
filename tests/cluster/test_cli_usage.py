"""The command line itself (issue 16), through the real `ava` on the embedded local node:
help that teaches, bare `ava`, --version, completion, where the inventory is found, script
arguments after --, a .py given as a recipe, and a placement that can never fit (exit 2)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tests.conftest import REPO, run_ava

ECHO = REPO / "tests" / "data" / "recipes" / "echo"
COMMANDS = [
    "nodes",
    "exec",
    "provision",
    "doctor",
    "train",
    "ps",
    "logs",
    "wait",
    "stop",
    "attach",
    "cache status",
    "cache warm",
    "cache clear",
]
LOCAL = '[nodes.local]\ntransport = "local"\n'


def test_bare_ava_prints_help_and_exits_0() -> None:
    done = run_ava()
    assert done.returncode == 0 and done.stdout.startswith("Usage: ava") and done.stderr == ""
    assert "Exit codes:" in done.stdout and "AVA_HOME" in done.stdout and "AVA_INVENTORY" in done.stdout


def test_every_command_help_has_examples_exit_codes_and_environment() -> None:
    for command in COMMANDS:
        done = run_ava(*command.split(), "--help")
        assert done.returncode == 0, done.stderr
        text = done.stdout
        assert "Examples:" in text and f"ava {command}" in text.split("Examples:", 1)[1], command
        assert "Exit codes: 0 success, 1 the job failed, 2 usage" in " ".join(text.split()), command
        assert "AVA_HOME" in text and "AVA_INVENTORY" in text, command
        # No Typer artefacts: an argument reads as its metavar says.
        assert "<str>" not in text and "<list[" not in text and "{" not in text.split("\n", 1)[0], command
    assert "A run id, or a prefix of exactly one" in run_ava("logs", "--help").stdout


def test_version() -> None:
    from ava import __version__

    for flag in ("--version", "-V"):
        done = run_ava(flag)
        assert done.returncode == 0 and done.stdout == f"ava {__version__}\n"


def test_shell_completion_script_and_run_id_completion(tmp_path: Path) -> None:
    done = run_ava("--show-completion", "bash", env={"SHELL": "/bin/bash"})
    assert done.returncode == 0 and "_AVA_COMPLETE" in done.stdout.upper()
    home = tmp_path / "home"
    for run_id in ("echo-20260101-000000-aaaa", "other-20260101-000000-bbbb"):
        (home / "runs" / run_id).mkdir(parents=True)
        (home / "runs" / run_id / "record.json").write_text("{}")
    completed = run_ava(
        env={"AVA_HOME": str(home), "_AVA_COMPLETE": "complete_bash", "COMP_WORDS": "ava logs ec", "COMP_CWORD": "2"}
    )
    assert completed.returncode == 0, completed.stderr
    assert "echo-20260101-000000-aaaa" in completed.stdout and "other-" not in completed.stdout
    recipes = run_ava(env={"_AVA_COMPLETE": "complete_bash", "COMP_WORDS": "ava train recipes/", "COMP_CWORD": "2"})
    assert set(recipes.stdout.split()) >= {"recipes/charlm", "recipes/ddp-minimal"}, recipes.stdout
    nodes = run_ava(env={"_AVA_COMPLETE": "complete_bash", "COMP_WORDS": "ava logs x --node lo", "COMP_CWORD": "4"})
    assert nodes.stdout.split() == ["local"], nodes.stdout


def test_format_option_chooses_table_or_plain_rows_wherever_output_goes(tmp_path: Path) -> None:
    env = {"AVA_HOME": str(tmp_path)}
    table = run_ava("--format", "table", "ps", env=env)
    assert table.returncode == 0 and "━" in table.stdout
    plain = run_ava("ps", "--format=plain", env=env)
    assert plain.returncode == 0 and plain.stdout.split() == [
        "run",
        "state",
        "nodes",
        "attempts",
        "started",
        "took",
        "last",
        "cause",
    ]
    bad = run_ava("--format", "fancy", "ps", env=env)
    assert bad.returncode == 2 and "--format fancy" in bad.stderr


def test_script_arguments_after_a_double_dash_are_appended_to_run_args(tmp_path: Path) -> None:
    done = run_ava(
        "train",
        str(ECHO),
        "--dry-run",
        "--json",
        "--set",
        'run.args=["--steps", "5"]',
        "--",
        "--lr",
        "3e-4",
        "--name",
        "a b",
        env={"AVA_HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["version"] == 1 and plan["recipe"] == "echo" and [n["node"] for n in plan["nodes"]] == ["local"]
    argv = plan["nodes"][0]["argv"]
    assert argv[-6:] == ["--steps", "5", "--lr", "3e-4", "--name", "a b"]
    stray = run_ava("train", str(ECHO), "stray", "--dry-run")
    assert stray.returncode == 2 and "after --" in stray.stderr


def test_a_python_script_given_as_a_recipe_gets_the_three_lines_it_needs() -> None:
    done = run_ava("train", "train.py")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    first, *rest = done.stderr.splitlines()
    assert first.startswith("ava: train.py: a Python script, not a recipe")
    assert [line.strip() for line in rest] == ['name = "train"', "[run]", 'script = "train.py"']


def test_a_placement_that_can_never_fit_is_a_usage_error() -> None:
    done = run_ava("train", str(ECHO), "--set", "resources.nodes=3", "--dry-run")
    assert done.returncode == 2
    assert "needs 3 nodes, 1 eligible" in done.stderr and "ava.toml" in done.stderr


def test_the_inventory_is_found_in_a_parent_directory_then_in_the_config_directory(tmp_path: Path) -> None:
    project = tmp_path / "project"
    deep = project / "recipes" / "echo"
    shutil.copytree(ECHO, deep)
    (project / "ava.toml").write_text(LOCAL)
    (tmp_path / "user").mkdir()
    env = {"HOME": str(tmp_path / "user"), "XDG_CONFIG_HOME": "", "AVA_HOME": str(tmp_path / "runs")}
    done = run_ava("train", ".", "--dry-run", "--json", cwd=deep, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["nodes"][0]["node"] == "local"

    (project / "ava.toml").unlink()
    missing = run_ava("train", ".", "--dry-run", cwd=deep, env=env)
    assert missing.returncode == 2 and "no inventory" in missing.stderr

    config = tmp_path / "user" / ".config" / "ava"
    config.mkdir(parents=True)
    (config / "ava.toml").write_text(LOCAL)
    found = run_ava("train", ".", "--dry-run", "--json", cwd=deep, env=env)
    assert found.returncode == 0, found.stderr


def test_provision_dry_run_and_exec_print_json_with_a_version(tmp_path: Path) -> None:
    env = {"AVA_HOME": str(tmp_path)}
    done = run_ava("exec", "--json", "--", "echo", "hello", env=env)
    assert done.returncode == 0, done.stderr
    (report,) = json.loads(done.stdout)
    assert report == {
        "version": 1,
        "node": "local",
        "exit_code": 0,
        "ok": True,
        "error": None,
        "output": [{"stream": "stdout", "line": "hello"}],
    }
    failing = run_ava("exec", "--json", "--", "exit 4", env=env)
    assert failing.returncode == 1 and json.loads(failing.stdout)[0]["exit_code"] == 4
    plan = run_ava("provision", "--dry-run", "--json", env={**env, "HOME": os.environ.get("HOME", "/root")})
    assert plan.returncode == 0, plan.stderr
    (node,) = json.loads(plan.stdout)
    assert node["version"] == 1 and node["node"] == "local" and isinstance(node["steps"], list)


def test_implicit_provisioning_inside_train_prints_a_line_per_step(cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import re

    inventory = cluster.inventory(["n1"], path=tmp_path / "ava.toml")
    fresh = json.dumps(str(tmp_path / "fresh-workdir"))
    text = re.sub(r"(?m)^workdir = .*$", f"workdir = {fresh}", inventory.read_text())
    inventory.write_text(text if fresh in text else text + f"workdir = {fresh}\n")
    done = run_ava("train", str(ECHO), inventory=inventory, env={"AVA_HOME": str(tmp_path / "home")}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [line for line in done.stderr.splitlines() if line.startswith("ava: n1: ")]
    assert any(line.endswith(" …") for line in steps) and any(" done (" in line for line in steps), done.stderr
    before = done.stderr.index("ava: n1: ")
    assert before < done.stderr.index("attempt 1 starting")
    again = run_ava("train", str(ECHO), inventory=inventory, env={"AVA_HOME": str(tmp_path / "home")}, timeout=300)
    assert again.returncode == 0 and "ava: n1: " not in again.stderr  # all in place: nothing to say
