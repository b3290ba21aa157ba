"""A recipe sends only its own files: local paths and symlinks that resolve outside its folder
are refused, naming them; the inventory (the user's own file) may name any local path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ava import provision, sync
from ava.config import Node, Requirements
from ava.errors import ConfigError
from ava.provision import Source, environment
from tests.conftest import run_ava
from tests.support.cluster import Cluster

NODE = Node(name="a", host="h", workdir="~/.ava")
SECRET = "aws_secret_access_key = do-not-ship\n"


@pytest.fixture()
def layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(a recipe folder, a home directory outside it holding credentials and keys)."""
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text(SECRET)
    (home / ".ssh").mkdir()
    (home / ".ssh" / "id_ed25519").write_text("PRIVATE KEY\n")
    monkeypatch.setenv("HOME", str(home))
    recipe = tmp_path / "recipe"
    recipe.mkdir()
    (recipe / "recipe.toml").write_text('name = "leak"\n[run]\nscript = "train.py"\n')
    (recipe / "train.py").write_text("print('hello')\n")
    return recipe, home


def recipe_env(recipe: Path, requirements: Requirements) -> provision.Environment | None:
    return environment(NODE, [Source(requirements, recipe, str(recipe / "recipe.toml"))])


def refused(recipe: Path, requirements: Requirements, named: str) -> str:
    with pytest.raises(ConfigError) as caught:
        recipe_env(recipe, requirements)
    message = caught.value.message
    assert "run.requirements" in message and named in message and "\n" not in message
    return message


def test_a_recipe_requirement_naming_a_home_file_is_refused(layout: tuple[Path, Path]) -> None:
    recipe, home = layout
    refused(recipe, Requirements(packages=("~/.aws/credentials",)), "~/.aws/credentials")
    refused(recipe, Requirements(packages=(str(home / ".aws" / "credentials"),)), "credentials")
    refused(recipe, Requirements(packages=("../home/.aws/credentials",)), "../home/.aws/credentials")


def test_a_recipe_requirements_file_outside_the_recipe_is_refused(layout: tuple[Path, Path]) -> None:
    recipe, home = layout
    (home / "reqs.txt").write_text("rich\n")
    refused(recipe, Requirements(file="../home/reqs.txt"), "../home/reqs.txt")


def test_find_links_to_a_folder_outside_the_recipe_is_refused(layout: tuple[Path, Path]) -> None:
    recipe, _ = layout
    (recipe / "requirements.txt").write_text("--no-index\n--find-links ~/.ssh\nrich\n")
    refused(recipe, Requirements(file="requirements.txt"), "~/.ssh")
    (recipe / "requirements.txt").write_text("-f ../home/.ssh\nrich\n")
    refused(recipe, Requirements(file="requirements.txt"), "../home/.ssh")


def test_a_wheel_or_find_links_file_symlinked_from_outside_the_recipe_is_refused(layout: tuple[Path, Path]) -> None:
    recipe, home = layout
    (recipe / "wheels").mkdir()
    (recipe / "wheels" / "pkg-1.0-py3-none-any.whl").symlink_to(home / ".aws" / "credentials")
    refused(recipe, Requirements(packages=("./wheels/pkg-1.0-py3-none-any.whl",)), "pkg-1.0-py3-none-any.whl")
    refused(recipe, Requirements(packages=("--find-links ./wheels", "pkg")), "pkg-1.0-py3-none-any.whl")


def test_a_recipe_wheel_inside_its_folder_is_still_pushed(layout: tuple[Path, Path]) -> None:
    recipe, _ = layout
    (recipe / "wheels").mkdir()
    wheel = recipe / "wheels" / "pkg-1.0-py3-none-any.whl"
    wheel.write_bytes(b"wheel")
    env = recipe_env(recipe, Requirements(packages=("./wheels/pkg-1.0-py3-none-any.whl",)))
    assert env is not None and [u.local for u in env.uploads] == [wheel.resolve()]


def test_the_inventory_may_name_a_local_path_anywhere(layout: tuple[Path, Path], tmp_path: Path) -> None:
    _, home = layout
    wheels = home / "wheels"
    wheels.mkdir()
    (wheels / "pkg-1.0-py3-none-any.whl").write_bytes(b"wheel")
    inventory_dir = tmp_path / "inventory"
    inventory_dir.mkdir()
    # Relative to the inventory file's folder, as ava.toml's requirements are.
    env = environment(NODE, [Source(Requirements(packages=("--find-links ../home/wheels", "pkg")), inventory_dir)])
    assert env is not None and [u.local.name for u in env.uploads] == ["pkg-1.0-py3-none-any.whl"]


def test_a_symlink_in_a_recipe_to_a_file_outside_it_is_refused_naming_the_link(layout: tuple[Path, Path]) -> None:
    recipe, home = layout
    (recipe / "notes.txt").symlink_to(home / ".aws" / "credentials")
    with pytest.raises(ConfigError) as caught:
        sync.manifest_of(recipe)
    assert str(recipe / "notes.txt") in caught.value.message and "\n" not in caught.value.message


def test_a_symlink_in_a_recipe_to_a_folder_outside_it_is_refused(layout: tuple[Path, Path]) -> None:
    recipe, home = layout
    (recipe / "keys").symlink_to(home / ".ssh")
    with pytest.raises(ConfigError, match="keys"):
        sync.manifest_of(recipe)


def test_a_symlink_inside_the_recipe_ships_its_target_and_an_ignored_one_is_left_alone(
    layout: tuple[Path, Path],
) -> None:
    recipe, home = layout
    (recipe / "alias.py").symlink_to(recipe / "train.py")
    (recipe / "secret.txt").symlink_to(home / ".aws" / "credentials")
    (recipe / ".avaignore").write_text("secret.txt\n")
    files = {f.path: f for f in sync.manifest_of(recipe).files}
    assert files["alias.py"].sha256 == files["train.py"].sha256
    assert "secret.txt" not in files


def test_train_refuses_a_recipe_whose_symlink_leaves_it_and_records_nothing_of_it(
    cluster: Cluster, layout: tuple[Path, Path], tmp_path: Path
) -> None:
    recipe, home = layout
    (recipe / "notes.txt").symlink_to(home / ".aws" / "credentials")
    ava_home = tmp_path / "avahome"
    done = run_ava("train", str(recipe), inventory=cluster.inventory(["n1"]), env={"AVA_HOME": str(ava_home)})
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "notes.txt" in line and "symlink" in line
    copies = [p for p in ava_home.rglob("*") if p.is_file() and "do-not-ship" in p.read_text(errors="replace")]
    assert copies == []


def test_train_refuses_a_recipe_requirement_naming_a_home_file_and_uploads_nothing(
    cluster: Cluster, layout: tuple[Path, Path], tmp_path: Path
) -> None:
    recipe, _ = layout
    (recipe / "recipe.toml").write_text(
        'name = "leak"\n[run]\nscript = "train.py"\nrequirements = ["~/.aws/credentials"]\n'
    )
    done = run_ava(
        "train",
        str(recipe),
        inventory=cluster.inventory(["n1"]),
        env={"AVA_HOME": str(tmp_path / "avahome"), "HOME": os.environ["HOME"]},
        timeout=180,
    )
    # Refused when the run's first attempt provisions its nodes (exit 2 would need the check
    # before the run is recorded, in the CLI); either way nothing leaves this computer.
    assert done.returncode == 2, done.stdout + done.stderr
    assert "run.requirements" in done.stderr and "~/.aws/credentials" in done.stderr
    wheels = cluster.node("n1").workdir / "wheels"
    leaked = [p for p in wheels.rglob("*") if p.is_file() and "do-not-ship" in p.read_text(errors="replace")]
    assert leaked == [], json.dumps([str(p) for p in leaked])
