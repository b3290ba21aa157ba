"""ava.toml and recipe TOML -> typed objects; every mistake is one line naming file and key."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ava.config import (
    Checkpoint,
    Data,
    Failover,
    Node,
    Requirements,
    Resources,
    RunSpec,
    apply_override,
    find_inventory,
    load_inventory,
    load_recipe,
    parse_duration,
    parse_inventory,
    parse_recipe,
    parse_size,
)
from ava.errors import EXIT_USAGE, ConfigError

REPO = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parents[1] / "data"
BAD_INVENTORIES = sorted((DATA / "bad_inventories").glob("*.toml"))
BAD_RECIPES = sorted((DATA / "bad_recipes").glob("*.toml"))
GiB = 2**30


def expected_key(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name}: first line must be '# expect: KEY'"
    return first.removeprefix("# expect: ").strip()


def config_error(call, *args, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        call(*args, **kwargs)
    return info.value


# ---------------------------------------------------------------------------------------------
# Units


@pytest.mark.parametrize(
    "text, size",
    [
        (512, 512),
        ("512", 512),
        ("0", 0),
        ("512B", 512),
        ("8KiB", 8 * 1024),
        ("8MiB", 8 * 2**20),
        ("100GiB", 100 * GiB),
        ("2TiB", 2 * 2**40),
        ("200MB", 200_000_000),
        ("3KB", 3000),
        ("1GB", 10**9),
        ("1TB", 10**12),
        ("1.5GiB", 3 * GiB // 2),
        (" 8 GiB ", 8 * GiB),
    ],
)
def test_size_reads_both_unit_families(text, size):
    assert parse_size(text, source="f.toml", key="k") == size


@pytest.mark.parametrize(
    "text, problem",
    [
        ("100gib", 'did you mean "GiB"?'),
        ("100gb", 'did you mean "GB"?'),
        ("100Gi", 'unknown size unit "Gi"'),
        ("8 gigs", "use B, KB, MB, GB, TB"),
        ("lots", 'expected a size like "8GiB"'),
        ("", "expected a size"),
        (-1, "must not be negative"),
        ("-1GiB", "must not be negative"),
        (1.5, "expected a size"),
        (True, "expected a size"),
        ([1], "expected a size"),
    ],
)
def test_size_refuses_what_it_cannot_read_exactly(text, problem):
    error = config_error(parse_size, text, source="f.toml", key="a.b")
    assert str(error).startswith("f.toml: a.b: ")
    assert problem in str(error)


@pytest.mark.parametrize(
    "text, seconds",
    [
        (90, 90.0),
        (1.5, 1.5),
        (0, 0.0),
        ("90", 90.0),
        ("90s", 90.0),
        ("1.5s", 1.5),
        ("500ms", 0.5),
        ("10m", 600.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1h30m", 5400.0),
        ("1m30s", 90.0),
    ],
)
def test_duration_reads_seconds_and_units(text, seconds):
    assert parse_duration(text, source="f.toml", key="k") == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("10 parsecs", "expected a duration"),
        ("10M", "expected a duration"),  # minutes or months? refused, not guessed
        ("s", "expected a duration"),
        ("", "expected a duration"),
        ("-5s", "must not be negative"),
        (-1, "must not be negative"),
        (float("inf"), "expected a duration"),
        (float("nan"), "expected a duration"),
        (True, "expected a duration"),
    ],
)
def test_duration_refuses_what_it_cannot_read(text, problem):
    error = config_error(parse_duration, text, source="f.toml", key="a.b")
    assert str(error).startswith("f.toml: a.b: ")
    assert problem in str(error)


# ---------------------------------------------------------------------------------------------
# The inventory

DESIGN_INVENTORY = """
[defaults]
user = "ubuntu"
port = 22
identity = "~/.ssh/id_ed25519"
workdir = "~/.ava"
python = "python3"
cache_dir = "~/.ava/cache"
cache_size = "100GiB"
interface = "auto"
host_keys = "strict"
known_hosts = "~/.ssh/known_hosts"
connect_timeout = "10s"

[nodes.gpu1]
host = "10.0.0.11"
gpus = 8
labels = ["h100"]

[nodes.local]
transport = "local"
"""


def test_design_example_inventory_reads_as_typed_nodes():
    inventory = parse_inventory(DESIGN_INVENTORY, "ava.toml")
    assert list(inventory.nodes) == ["gpu1", "local"]
    assert inventory.nodes["gpu1"] == Node(
        name="gpu1",
        transport="ssh",
        host="10.0.0.11",
        user="ubuntu",
        port=22,
        identity="~/.ssh/id_ed25519",
        workdir="~/.ava",
        python="python3",
        cache_dir="~/.ava/cache",
        cache_size=100 * GiB,
        interface="auto",
        host_keys="strict",
        known_hosts="~/.ssh/known_hosts",
        connect_timeout=10.0,
        gpus=(0, 1, 2, 3, 4, 5, 6, 7),
        labels=("h100",),
    )
    assert inventory.nodes["gpu1"].address == "10.0.0.11:22"
    assert inventory.nodes["local"].address == "local"


def test_unset_keys_take_the_documented_defaults():
    node = parse_inventory('[nodes.n1]\nhost = "n1.example"\n', "ava.toml").nodes["n1"]
    assert (node.transport, node.user, node.port, node.identity) == ("ssh", None, 22, None)
    assert (node.workdir, node.python, node.cache_dir) == ("~/.ava", "python3", "~/.ava/cache")
    assert (node.cache_size, node.interface, node.host_keys) == (100 * GiB, "auto", "strict")
    assert (node.known_hosts, node.connect_timeout) == ("~/.ssh/known_hosts", 10.0)
    assert (node.gpus, node.labels, node.requirements) == ((), (), None)


def test_a_node_key_wins_over_defaults_and_errors_name_where_the_value_was_written():
    text = """
[defaults]
port = 2200
gpus = 8
connect_timeout = "5s"
[nodes.a]
host = "a"
[nodes.b]
host = "b"
port = 2222
gpus = [2, 0]
"""
    nodes = parse_inventory(text, "ava.toml").nodes
    assert (nodes["a"].port, nodes["a"].gpus) == (2200, tuple(range(8)))
    assert (nodes["b"].port, nodes["b"].gpus) == (2222, (2, 0))
    assert nodes["b"].connect_timeout == 5.0
    bad_default = text.replace('"5s"', '"5 parsecs"')
    assert config_error(parse_inventory, bad_default, "ava.toml").key == "defaults.connect_timeout"


def test_local_node_needs_no_host_and_reports_local_address():
    node = parse_inventory('[nodes.local]\ntransport = "local"\n', "ava.toml").nodes["local"]
    assert (node.host, node.address) == (None, "local")


def test_ipv6_address_is_bracketed():
    node = parse_inventory('[nodes.v6]\nhost = "fd00::1"\nport = 2222\n', "i.toml").nodes["v6"]
    assert node.address == "[fd00::1]:2222"


@pytest.mark.parametrize(
    "value, requirements",
    [
        ('["numpy>=1.26", "torch==2.3.*"]', Requirements(packages=("numpy>=1.26", "torch==2.3.*"))),
        ('"requirements.txt"', Requirements(file="requirements.txt")),
    ],
)
def test_node_requirements_are_a_list_or_a_file(value, requirements):
    text = f'[nodes.n]\nhost = "n"\nrequirements = {value}\n'
    assert parse_inventory(text, "ava.toml").nodes["n"].requirements == requirements


def test_select_keeps_the_order_asked_and_names_an_unknown_node():
    inventory = parse_inventory(DESIGN_INVENTORY, "ava.toml")
    assert [n.name for n in inventory.select(["local", "gpu1"])] == ["local", "gpu1"]
    error = config_error(inventory.select, ["gpu1", "gpu9"])
    assert str(error) == "ava.toml: nodes.gpu9: no such node (known: gpu1, local)"
    assert "named twice" in str(config_error(inventory.select, ["gpu1", "gpu1"]))


def test_dotted_node_names_are_quoted_in_keys():
    error = config_error(parse_inventory, '[nodes."gpu.1"]\nport = 1\n', "ava.toml")
    assert str(error).startswith('ava.toml: nodes."gpu.1".host: missing')


def test_shipped_inventory_has_only_the_local_node():
    inventory = load_inventory(str(REPO / "ava.toml"))
    assert list(inventory.nodes) == ["local"]
    assert inventory.nodes["local"].transport == "local"


def test_shipped_inventory_example_block_is_valid_once_uncommented():
    lines = (REPO / "ava.toml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# [defaults]"))
    example = "\n".join(line.removeprefix("#").removeprefix(" ") for line in lines[start:])
    nodes = parse_inventory(example, "example").nodes
    assert list(nodes) == ["gpu1", "gpu2"]
    assert nodes["gpu2"].gpus == (0, 1, 2, 3)
    assert nodes["gpu1"].requirements == Requirements(packages=("numpy>=1.26",))


def test_inventory_is_found_by_flag_then_environment_then_current_directory(tmp_path, monkeypatch):
    for name in ("flag.toml", "env.toml", "ava.toml"):
        (tmp_path / name).write_text('[nodes.local]\ntransport = "local"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AVA_INVENTORY", "env.toml")
    assert find_inventory("flag.toml") == Path("flag.toml")
    assert find_inventory(None) == Path("env.toml")
    monkeypatch.delenv("AVA_INVENTORY")
    assert find_inventory(None) == Path("ava.toml")
    assert load_inventory().path == Path("ava.toml")


def test_missing_inventory_says_how_to_create_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AVA_INVENTORY", raising=False)
    message = str(config_error(find_inventory, None))
    assert message.startswith("ava.toml: no inventory")
    assert '[nodes.local] transport = "local"' in message and "--inventory" in message
    assert "\n" not in message
    assert "$AVA_INVENTORY" in str(config_error(find_inventory, "nowhere.toml"))


@pytest.mark.parametrize("path", BAD_INVENTORIES, ids=lambda p: p.stem)
def test_bad_inventory_is_one_line_naming_file_and_key(path):
    error = config_error(parse_inventory, path.read_text(), path.name)
    message = str(error)
    assert "\n" not in message
    assert message.startswith(f"{path.name}: {expected_key(path)}")


def test_bad_inventory_files_are_read_with_their_path_in_the_message():
    path = DATA / "bad_inventories" / "port_not_an_integer.toml"
    assert str(config_error(load_inventory, str(path))) == (f'{path}: nodes.gpu1.port: expected an integer, got "22x"')


# ---------------------------------------------------------------------------------------------
# Recipes

DESIGN_RECIPE = """
name = "ddp-minimal"
[run]
script = "train.py"
args = ["--steps", "200"]
[resources]
nodes = 2
procs_per_node = 2
gpus_per_node = 0
memory = "8GiB"
cpus = 4
labels = []
[env]
OMP_NUM_THREADS = "1"
[data]
prefetch = ["s3://bucket/shards/train-*.tar"]
[checkpoint]
dir = "s3://bucket/ckpt/{name}"
[failover]
max_restarts = 3
on_node_loss = "replace"
hang_timeout = "10m"
"""


def test_design_example_recipe_reads_as_typed_sections():
    recipe = parse_recipe(DESIGN_RECIPE, "recipe.toml", "/recipes/ddp")
    assert (recipe.name, recipe.source, recipe.root) == (
        "ddp-minimal",
        "recipe.toml",
        "/recipes/ddp",
    )
    assert recipe.run == RunSpec(script="train.py", args=("--steps", "200"))
    assert recipe.resources == Resources(
        nodes_min=2, nodes_max=2, procs_per_node=2, gpus_per_node=0, memory=8 * GiB, cpus=4.0
    )
    assert recipe.env == {"OMP_NUM_THREADS": "1"}
    assert recipe.data == Data(prefetch=("s3://bucket/shards/train-*.tar",))
    assert recipe.checkpoint == Checkpoint(dir="s3://bucket/ckpt/{name}", keep=3)
    assert recipe.failover == Failover(
        max_restarts=3,
        on_node_loss="replace",
        hang_timeout=600.0,
        fatal_exit_codes=(2,),
        backoff=2.0,
    )
    assert recipe.procs() == 2


def test_smallest_recipe_takes_the_documented_defaults():
    recipe = parse_recipe('name = "r"\n[run]\nmodule = "pkg.train"\n', "r.toml", "/r")
    assert recipe.run == RunSpec(module="pkg.train")
    assert recipe.resources == Resources()
    assert (recipe.resources.nodes_min, recipe.resources.nodes_max) == (1, 1)
    assert recipe.failover == Failover(
        max_restarts=3,
        on_node_loss="replace",
        hang_timeout=600.0,
        fatal_exit_codes=(2,),
        backoff=2.0,
    )
    assert (recipe.checkpoint, recipe.data, recipe.env) == (Checkpoint(None, 3), Data(()), {})


@pytest.mark.parametrize(
    "resources, procs",
    [("", 1), ("gpus_per_node = 8", 8), ("gpus_per_node = 8\nprocs_per_node = 2", 2)],
)
def test_procs_per_node_falls_back_to_gpus_then_one(resources, procs):
    text = f'name = "r"\n[run]\nscript = "t.py"\n[resources]\n{resources}\n'
    assert parse_recipe(text, "r.toml", "/r").procs() == procs


def test_elastic_node_range_and_integer_env_values():
    text = 'name = "r"\n[run]\nscript = "t.py"\n[resources]\nnodes = "2:4"\n[env]\nN = 1\n'
    recipe = parse_recipe(text, "r.toml", "/r")
    assert (recipe.resources.nodes_min, recipe.resources.nodes_max) == (2, 4)
    assert recipe.env == {"N": "1"}


def test_checkpoint_dir_may_use_name_and_run():
    text = 'name = "r"\n[run]\nscript = "t.py"\n[checkpoint]\ndir = "s3://b/{name}/{run}"\n'
    assert parse_recipe(text, "r.toml", "/r").checkpoint.dir == "s3://b/{name}/{run}"


@pytest.mark.parametrize(
    "where, problem",
    [
        ("s3://b/{user}", "unknown placeholder"),
        ("s3://b/{name:>8}", "unknown placeholder"),
        ("s3://b/{run!r}", "unknown placeholder"),
        ("s3://b/{name", "bad braces"),
    ],
)
def test_checkpoint_dir_refuses_other_placeholders(where, problem):
    text = f'name = "r"\n[run]\nscript = "t.py"\n[checkpoint]\ndir = "{where}"\n'
    error = config_error(parse_recipe, text, "r.toml", "/r")
    assert str(error).startswith(f"r.toml: checkpoint.dir: {problem}")


@pytest.mark.parametrize(
    "assignment, section, field, value",
    [
        ("resources.nodes=4", "resources", "nodes_min", 4),
        ("resources.nodes=2:4", "resources", "nodes_max", 4),
        ("resources.memory=16GiB", "resources", "memory", 16 * GiB),
        ("resources.cpus=0.5", "resources", "cpus", 0.5),
        ("env.LR=3e-4", "env", "LR", "3e-4"),  # text as written, not the float 0.0003
        ('env.TAG="a b"', "env", "TAG", "a b"),
        ('run.args=["--steps","5"]', "run", "args", ("--steps", "5")),
        ("run.module=pkg.other", "run", "module", "pkg.other"),
        ("failover.hang_timeout=90s", "failover", "hang_timeout", 90.0),
        ("failover.on_node_loss=shrink", "failover", "on_node_loss", "shrink"),
        ("failover.fatal_exit_codes=[2, 3]", "failover", "fatal_exit_codes", (2, 3)),
        ("checkpoint.keep=1", "checkpoint", "keep", 1),
        ("data.prefetch=['s3://b/x']", "data", "prefetch", ("s3://b/x",)),
    ],
)
def test_set_overrides_any_key_typed_by_the_schema(assignment, section, field, value):
    overrides = [assignment]
    if assignment.startswith("run.module"):
        overrides.insert(0, 'run={module = "pkg.train"}')
    recipe = parse_recipe(DESIGN_RECIPE, "recipe.toml", "/r", overrides)
    got = getattr(recipe, section)
    assert (got[field] if isinstance(got, dict) else getattr(got, field)) == value


def test_raw_holds_the_merged_toml_and_is_not_shared_with_the_file():
    recipe = parse_recipe(DESIGN_RECIPE, "recipe.toml", "/r", ["resources.nodes=4", "env.LR=3e-4"])
    assert recipe.raw["resources"]["nodes"] == 4
    assert recipe.raw["env"] == {"OMP_NUM_THREADS": "1", "LR": "3e-4"}
    assert recipe.raw["name"] == "ddp-minimal"


@pytest.mark.parametrize(
    "assignment, message",
    [
        (
            "resources.nodez=4",
            'recipe.toml: --set resources.nodez: unknown key; did you mean "nodes"?',
        ),
        ("resourcez.nodes=4", "recipe.toml: --set resourcez: unknown key"),
        ("resources.nodes=0", "recipe.toml: --set resources.nodes: must be at least 1, got 0"),
        ("resources.memory=lots", "recipe.toml: --set resources.memory: expected a size"),
        (
            "failover.on_node_loss=retry",
            "recipe.toml: --set failover.on_node_loss: expected one of",
        ),
        ("env.LR.X=1", "recipe.toml: --set env.LR.X: env.LR is not a table"),
        ("name.x=1", "recipe.toml: --set name.x: name is not a table"),
        ("resources", "recipe.toml: --set resources: expected KEY=VALUE"),
        ("env=3", "recipe.toml: --set env: expected a table"),
        ("env={RANK = '1'}", "recipe.toml: --set env.RANK: set by torchrun"),
    ],
)
def test_bad_set_is_named_as_a_set(assignment, message):
    error = config_error(parse_recipe, DESIGN_RECIPE, "recipe.toml", "/r", [assignment])
    assert str(error).startswith(message)


def test_apply_override_edits_the_raw_table_in_place():
    raw: dict = {"name": "r"}
    apply_override(raw, "resources.gpus_per_node=8", "r.toml")
    apply_override(raw, "env.A=x y", "r.toml")
    assert raw == {"name": "r", "resources": {"gpus_per_node": 8}, "env": {"A": "x y"}}


def test_load_recipe_reads_a_directory_or_its_file(tmp_path):
    (tmp_path / "recipe.toml").write_text('name = "r"\n[run]\nscript = "train.py"\n')
    (tmp_path / "train.py").write_text("")
    by_dir = load_recipe(str(tmp_path), ["env.A=1"])
    by_file = load_recipe(str(tmp_path / "recipe.toml"))
    assert by_dir.source == by_file.source == str(tmp_path / "recipe.toml")
    assert by_dir.root == by_file.root == str(tmp_path.resolve())
    assert by_dir.env == {"A": "1"}


def test_script_that_torchrun_would_read_as_an_option_is_refused(tmp_path):
    # Even when such a file exists beside the recipe, and also through --set.
    (tmp_path / "--rdzv-endpoint=10.0.0.9:29400").write_text("")
    (tmp_path / "train.py").write_text("")
    (tmp_path / "recipe.toml").write_text('name = "r"\n[run]\nscript = "--rdzv-endpoint=10.0.0.9:29400"\n')
    assert 'run.script: must not begin with "-"' in str(config_error(load_recipe, str(tmp_path)))
    (tmp_path / "recipe.toml").write_text('name = "r"\n[run]\nscript = "train.py"\n')
    error = config_error(load_recipe, str(tmp_path), ["run.script=-m"])
    assert 'run.script: must not begin with "-"' in str(error)
    assert load_recipe(str(tmp_path), ["run.script=./--rdzv-endpoint=10.0.0.9:29400"]).run.script


def test_load_recipe_names_a_missing_script_or_file(tmp_path):
    (tmp_path / "recipe.toml").write_text('name = "r"\n[run]\nscript = "train.py"\n')
    assert str(config_error(load_recipe, str(tmp_path))).endswith('run.script: no file "train.py" beside the recipe')
    assert "x: no such file" in str(config_error(load_recipe, str(tmp_path / "x")))
    (tmp_path / "x").mkdir()
    assert "no recipe.toml in this directory" in str(config_error(load_recipe, str(tmp_path / "x")))


@pytest.mark.parametrize("path", BAD_RECIPES, ids=lambda p: p.stem)
def test_bad_recipe_is_one_line_naming_file_and_key(path):
    error = config_error(parse_recipe, path.read_text(), path.name, str(path.parent))
    message = str(error)
    assert "\n" not in message
    assert message.startswith(f"{path.name}: {expected_key(path)}")


def test_corpus_has_enough_distinct_mistakes():
    assert len(BAD_INVENTORIES) >= 20 and len(BAD_RECIPES) >= 10
    for corpus in (BAD_INVENTORIES, BAD_RECIPES):
        bodies = [p.read_text().split("\n", 1)[1] for p in corpus]
        assert len(set(bodies)) == len(bodies)


# ---------------------------------------------------------------------------------------------
# Through the CLI: exit 2, one line on stderr naming the key, never a traceback

cli_missing = pytest.mark.skipif(importlib.util.find_spec("ava.cli") is None, reason="ava.cli is not written yet")


def run_ava(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AVA_INVENTORY": str(REPO / "ava.toml"), "NO_COLOR": "1", "COLUMNS": "400"}
    return subprocess.run(
        [sys.executable, "-m", "ava", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_line_usage_error(result: subprocess.CompletedProcess[str], key: str) -> None:
    assert "Traceback" not in result.stderr + result.stdout
    assert result.returncode == EXIT_USAGE, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert key in lines[0]


@cli_missing
@pytest.mark.parametrize("path", BAD_INVENTORIES, ids=lambda p: p.stem)
def test_ava_nodes_rejects_bad_inventory_in_one_line(path):
    assert_one_line_usage_error(run_ava("--inventory", str(path), "nodes"), expected_key(path))


@cli_missing
@pytest.mark.parametrize("path", BAD_RECIPES, ids=lambda p: p.stem)
def test_ava_train_rejects_bad_recipe_in_one_line(path):
    assert_one_line_usage_error(run_ava("train", str(path), "--dry-run"), expected_key(path))
