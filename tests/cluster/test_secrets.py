"""A recipe's [env] values (secrets) reach the ranks, and no file that others can read."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
import uuid
from pathlib import Path

from tests.conftest import run_ava
from tests.support.cluster import Cluster

SHOW = """\
import hashlib, os
for name in ("AVA_SECRET_A", "AVA_SECRET_B"):
    os.write(1, f"{name} {hashlib.sha256(os.environ[name].encode()).hexdigest()}\\n".encode())
"""


def files_under(root: Path) -> list[Path]:
    found = []
    for directory, _dirs, names in os.walk(root):
        # Files that hold bytes: not links, and not the sockets a run's spare interpreters listen on.
        found += [
            Path(directory) / n
            for n in names
            if (Path(directory) / n).is_file() and not (Path(directory) / n).is_symlink()
        ]
    return found


def holding(paths: list[Path], secrets: list[bytes]) -> list[Path]:
    return [p for p in paths if any(s in p.read_bytes() for s in secrets)]


def private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


def readable_by_others(path: Path) -> bool:
    """Whether a group member or any other user can read PATH: its mode, and every directory
    on the way to it searchable by them."""
    for read, search in ((0o040, 0o010), (0o004, 0o001)):
        if stat.S_IMODE(path.stat().st_mode) & read and all(
            stat.S_IMODE(d.stat().st_mode) & search for d in path.parents
        ):
            return True
    return False


def test_env_values_are_only_in_the_0600_spec_and_env_json(cluster: Cluster, tmp_path: Path) -> None:
    secret_a, secret_b = f"from-recipe-{uuid.uuid4().hex}", f"from-set-{uuid.uuid4().hex}"
    recipe = tmp_path / "secret"
    recipe.mkdir()
    (recipe / "show.py").write_text(SHOW)
    (recipe / "recipe.toml").write_text(
        'name = "secret"\n[run]\nscript = "show.py"\n[resources]\nnodes = 1\nprocs_per_node = 1\n'
        f'[env]\nAVA_SECRET_A = "{secret_a}"\nOMP_NUM_THREADS = "1"\n[failover]\nmax_restarts = 0\n'
    )
    home = tmp_path / "home"
    env = {"AVA_HOME": str(home)}
    # Detached: the background supervisor rebuilds the recipe from the run's records.
    done = run_ava(
        "train",
        str(recipe),
        "--set",
        f"env.AVA_SECRET_B={secret_b}",
        "--detach",
        inventory=cluster.inventory(["n1"]),
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    run_id = done.stdout.strip().splitlines()[-1]
    deadline = time.monotonic() + 120
    while True:
        (run,) = json.loads(run_ava("ps", "--json", env=env).stdout)
        if run["state"] in ("succeeded", "failed", "stopped") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert run["state"] == "succeeded", run
    record_dir = home / "runs" / run_id
    output = (record_dir / "output.log").read_text()
    for name, value in (("AVA_SECRET_A", secret_a), ("AVA_SECRET_B", secret_b)):
        assert f"{name} {hashlib.sha256(value.encode()).hexdigest()}" in output  # the ranks got it

    secrets = [secret_a.encode(), secret_b.encode()]
    # Locally: every file of the run is the user's alone; only env.json holds the values.
    assert stat.S_IMODE((home / "runs").stat().st_mode) == 0o700
    local = files_under(record_dir)
    assert {p.name for p in local} >= {"record.json", "recipe.toml", "env.json", "output.log"}
    assert [p for p in local if not private(p)] == []
    assert [p for p in files_under(home) if readable_by_others(p)] == []
    assert holding(files_under(home), secrets) == [record_dir / "env.json"]
    assert json.loads((record_dir / "record.json").read_text())["overrides"] == ["env.AVA_SECRET_B"]

    # On the node: runs/ is 0700, the run's files and the ledger are 0600, only the spec holds them.
    work = cluster.node("n1").workdir
    assert stat.S_IMODE((work / "runs").stat().st_mode) == 0o700
    # The agent's own files; the run directory (runs/RUN/work) is a copy of the code tree.
    node_files = [p for p in files_under(work / "runs" / run_id) if "work" not in p.relative_to(work / "runs").parts]
    node_files += list(work.glob("leases.*"))
    assert {p.name for p in node_files} >= {"spec.json", "status.json", "output.log", "agent.log"}
    assert [p for p in node_files if not private(p)] == []
    assert [p for p in files_under(work / "runs") if readable_by_others(p)] == []
    held = holding(files_under(work), secrets)
    assert held and all(p.name.startswith("spec") and p.suffix == ".json" for p in held), held


def test_the_recipe_kept_in_a_record_rebuilds_with_its_env_and_holds_no_value(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from ava import runs
    from ava.config import parse_recipe
    from ava.supervisor import recipe_of

    monkeypatch.setenv("AVA_HOME", str(tmp_path / "home"))
    text = (
        'name = "r"\ndescription = "quote \\" and \\u00e9"\n[run]\nscript = "t.py"\nargs = ["--lr", "3e-4"]\n'
        '[resources]\nnodes = "1:2"\nmemory = "1GiB"\n[env]\nTOKEN = "s3cr3t-value"\n'
        '[failover]\nhang_timeout = "5m"\n'
    )
    overrides = ["env.OTHER=an0ther-value", "resources.cpus=2"]
    recipe = parse_recipe(text, "recipe.toml", str(tmp_path), overrides)
    record = runs.RunRecord(
        id="r-1",
        recipe="r",
        source="recipe.toml",
        recipe_hash="",
        raw=runs.env_names_only(recipe.raw),
        inventory="ava.toml",
        nodes=["n1"],
        overrides=runs.overrides_without_env_values(overrides),
    )
    record.dir.mkdir(parents=True)
    runs.private_recipe(record, recipe.raw, dict(recipe.env))
    record.save()
    rebuilt = recipe_of(record)
    assert rebuilt.env == recipe.env == {"TOKEN": "s3cr3t-value", "OTHER": "an0ther-value"}
    assert (rebuilt.run, rebuilt.resources, rebuilt.failover) == (recipe.run, recipe.resources, recipe.failover)
    assert rebuilt.description == recipe.description
    for name in ("record.json", "recipe.toml"):
        assert b"-value" not in (record.dir / name).read_bytes()
    assert stat.S_IMODE((record.dir / "env.json").stat().st_mode) == 0o600
