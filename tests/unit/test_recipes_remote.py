"""Recipes from URLs: the whole directory comes, hostile key names are refused, nothing is left behind.

`memory://` is fsspec's in-memory store; it takes the same listing and copying path as `s3://`
and, like S3, allows `..` inside key names. `file://` URLs reach the real local disk (symlinks).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from ava.errors import UsageError
from ava.recipes import fetched
from tests.conftest import REPO, run_ava

ECHO = REPO / "tests" / "data" / "recipes" / "echo"


@pytest.fixture()
def temp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty directory every temporary directory of this test goes into."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


@pytest.fixture()
def store() -> Iterator[tuple[fsspec.AbstractFileSystem, str]]:
    fs = fsspec.filesystem("memory")
    base = f"/recipes-{uuid.uuid4().hex[:8]}/deep/er/echo"
    fs.put(str(ECHO) + "/", base + "/", recursive=True)
    fs.pipe(f"{base}/data/corpus.txt", b"to be or not to be\n")
    try:
        yield fs, base
    finally:
        fs.rm(base.split("/")[1], recursive=True)


@pytest.mark.parametrize("form", ["directory", "file"])
def test_a_url_naming_recipe_toml_fetches_its_whole_directory(
    store: tuple[fsspec.AbstractFileSystem, str], temp_root: Path, form: str
) -> None:
    _fs, base = store
    url = f"memory://{base}/" if form == "directory" else f"memory://{base}/recipe.toml"
    with fetched(url) as local:
        folder = local if form == "directory" else local.parent
        assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
            "data/corpus.txt",
            "echo.py",
            "recipe.toml",
        ]
        assert (folder / "data" / "corpus.txt").read_bytes() == b"to be or not to be\n"
    assert list(temp_root.iterdir()) == []


@pytest.mark.parametrize(
    "key", ["../../escaped.txt", "sub/../../../../escaped.txt", "./escaped.txt", "sub//escaped.txt", "sub/.."]
)
@pytest.mark.parametrize("form", ["directory", "file"])
def test_hostile_keys_are_refused_naming_the_key_and_nothing_lands_outside(
    store: tuple[fsspec.AbstractFileSystem, str], temp_root: Path, key: str, form: str
) -> None:
    fs, base = store
    fs.pipe(f"{base}/{key}", b"escaped")
    url = f"memory://{base}/" if form == "directory" else f"memory://{base}/recipe.toml"
    with pytest.raises(UsageError) as raised:
        with fetched(url):
            pass
    assert f"{base}/{key}" in raised.value.message
    assert list(temp_root.iterdir()) == []  # the partial copy is gone too
    assert not [p for p in temp_root.parent.rglob("escaped.txt")]


def test_a_symlink_in_a_recipe_directory_is_refused_naming_it(tmp_path: Path, temp_root: Path) -> None:
    recipe = tmp_path / "echo"
    shutil.copytree(ECHO, recipe)
    secret = tmp_path / "credentials"
    secret.write_text("aws_secret_access_key = hunter2\n")
    (recipe / "notes.txt").symlink_to(secret)
    for url in (f"file://{recipe}/", f"file://{recipe}/recipe.toml"):
        with pytest.raises(UsageError) as raised:
            with fetched(url):
                pass
        assert "notes.txt" in raised.value.message and "symlink" in raised.value.message
    assert list(temp_root.iterdir()) == []


def test_a_missing_recipe_url_is_a_usage_error(temp_root: Path) -> None:
    with pytest.raises(UsageError):
        with fetched(f"memory:///no-such-{uuid.uuid4().hex}/recipe.toml"):
            pass
    with pytest.raises(UsageError):
        with fetched(f"memory:///no-such-{uuid.uuid4().hex}/"):
            pass
    assert list(temp_root.iterdir()) == []


def test_ava_train_from_a_url_leaves_no_temporary_directory_also_on_errors(tmp_path: Path) -> None:
    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    recipe = tmp_path / "echo"
    shutil.copytree(ECHO, recipe)
    (recipe / "data").mkdir()
    (recipe / "data" / "corpus.txt").write_text("corpus\n")
    env = {"TMPDIR": str(temp_root), "AVA_HOME": str(tmp_path / "home")}
    done = run_ava("train", f"file://{recipe}/recipe.toml", "--dry-run", env=env, inventory=REPO / "ava.toml")
    assert done.returncode == 0, done.stderr
    # The same code tree as the local directory gives: the corpus came with the recipe.
    local = run_ava("train", str(recipe), "--dry-run", env=env, inventory=REPO / "ava.toml")
    tree = re.search(r"code tree (\w+) \((\d+) files", local.stderr)
    assert tree and int(tree.group(2)) >= 2, local.stderr
    assert f"code tree {tree.group(1)} " in done.stderr
    assert list(temp_root.iterdir()) == []
    for bad in (f"file://{tmp_path}/missing/recipe.toml", f"file://{recipe}/recipe.toml"):
        args = ["--set", "resources.no_such_key=1"] if bad.startswith(f"file://{recipe}") else []
        done = run_ava("train", bad, *args, env=env, inventory=REPO / "ava.toml")
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert list(temp_root.iterdir()) == []


def test_a_hostile_key_in_an_s3_recipe_is_refused_by_ava_train(tmp_path: Path) -> None:
    import s3fs

    from tests.support.s3server import moto_server

    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    with moto_server() as s3:
        fs = s3fs.S3FileSystem(**s3.s3fs_kwargs())
        bucket = f"hostile-{uuid.uuid4().hex[:8]}"
        fs.mkdir(bucket)
        fs.put(str(ECHO) + "/", f"{bucket}/echo/", recursive=True)
        fs.pipe(f"{bucket}/echo/../../escaped.txt", b"escaped")  # legal in S3
        env = {**s3.env, "TMPDIR": str(temp_root), "AVA_HOME": str(tmp_path / "home")}
        done = run_ava("train", f"s3://{bucket}/echo/recipe.toml", "--dry-run", env=env, inventory=REPO / "ava.toml")
    assert done.returncode == 2, done.stderr
    assert f"{bucket}/echo/../../escaped.txt" in done.stderr and "Traceback" not in done.stderr
    assert list(temp_root.iterdir()) == []
    assert not list(tmp_path.rglob("escaped.txt"))
