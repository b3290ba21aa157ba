"""Where a recipe comes from: a local path, or any fsspec URL whose code sits beside it.

A URL brings the recipe's whole directory: a directory URL (`s3://b/recipes/x/`) and a URL
naming the recipe file (`s3://b/recipes/x/recipe.toml`) fetch the same files. The copy lives in a
temporary directory that is removed when the caller is done with it, also when fetching fails.

The store's key names are not trusted: a recipe shared by URL is someone else's. Keys are
listed and checked one by one (no absolute path, no `.` or `..` segment, no symlink), and each
file is written by ava itself under the temporary directory, never by a recursive `get`.
"""

from __future__ import annotations

import atexit
import contextlib
import posixpath
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ava.errors import UsageError

# fetch() keeps each copy until the process ends: the CLI snapshots the code from it after parsing.
_kept = contextlib.ExitStack()
atexit.register(_kept.close)


def fetch(source: str) -> Path:
    """A local directory (or .toml file) holding the recipe and its code, kept until exit."""
    return _kept.enter_context(fetched(source))


@contextlib.contextmanager
def fetched(source: str) -> Iterator[Path]:
    """The recipe at `source` as a local path, for the duration of the `with` block.

    A local path is given back as it is; a URL is copied into a temporary directory that is
    removed on leaving the block, whether the fetch or the caller failed or not.
    """
    if "://" not in source:
        yield Path(source)
        return
    with tempfile.TemporaryDirectory(prefix="ava-recipe-") as folder:
        yield _fetch_url(source, Path(folder))


def _fetch_url(source: str, target: Path) -> Path:
    import fsspec  # type: ignore[import-untyped]  # fsspec ships no type information

    try:
        fs, path = fsspec.core.url_to_fs(source)
        name: str
        if path.endswith(".toml"):
            base, name = posixpath.split(path)
            files = _listing(fs, base)
            if files is None or name not in files:
                # A store that cannot list (plain https): the recipe, then the script it names.
                _copy(fs, path, target, name)
                _fetch_script(fs, base, target / name, target)
                return target / name
            _copy_all(fs, files, target)
            return target / name
        files = _listing(fs, path.rstrip("/"))
        if not files:
            raise UsageError(f"{source}: no recipe there (the URL lists no files)")
        _copy_all(fs, files, target)
        return target
    except (OSError, ValueError) as error:
        raise UsageError(f"{source}: cannot fetch the recipe: {error}") from error


def _listing(fs: Any, base: str) -> dict[str, str] | None:
    """{relative name: key} of every file under `base`; None where the store cannot list.

    Raises UsageError naming the key for any entry that could land outside the copy.
    """
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & {"http", "https"}:
        return None  # an HTML index page is no listing: its links may point anywhere
    try:
        found = fs.find(base, withdirs=True, detail=True)
    except (OSError, ValueError, NotImplementedError):
        return None
    files: dict[str, str] = {}
    root = fs._strip_protocol(base).rstrip("/")
    for key, info in found.items():
        key = fs._strip_protocol(key)
        if info.get("islink") or info.get("type") == "link":
            raise UsageError(f"{key}: the recipe holds a symlink; refusing to fetch it")
        if info.get("type") == "directory":
            continue
        if not key.startswith(root + "/"):
            raise UsageError(f"{key}: a key outside the recipe's directory {root}; refusing to fetch it")
        files[_safe_name(key[len(root) + 1 :], key)] = key
    return files


def _safe_name(name: str, key: str) -> str:
    """`name` as a relative path that stays inside the copy, or a UsageError naming the key."""
    parts = name.split("/")
    if (
        not name
        or name.startswith("/")
        or any(p in ("", ".", "..") for p in parts)
        or "\0" in name
        or posixpath.normpath(name) != name
    ):
        raise UsageError(f"{key}: the key is not a plain relative path under the recipe; refusing to fetch it")
    return name


def _copy_all(fs: Any, files: dict[str, str], target: Path) -> None:
    for name, key in sorted(files.items()):
        _copy(fs, key, target, name)


def _copy(fs: Any, key: str, target: Path, name: str) -> None:
    destination = target / _safe_name(name, key)
    destination.parent.mkdir(parents=True, exist_ok=True)
    # Belt and braces: resolved, the file's folder must still be inside the copy.
    if not destination.parent.resolve().is_relative_to(target.resolve()):
        raise UsageError(f"{key}: would be written outside the recipe's copy; refusing to fetch it")
    # "xb": never write through anything already there (a symlink, another key's file).
    with fs.open(key, "rb") as source, open(destination, "xb") as sink:
        shutil.copyfileobj(source, sink, 1 << 20)


def _fetch_script(fs: Any, base: str, recipe: Path, target: Path) -> None:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        import tomli as tomllib

    try:
        script = tomllib.loads(recipe.read_text(encoding="utf-8")).get("run", {}).get("script")
    except (tomllib.TOMLDecodeError, AttributeError, OSError):
        return  # the config parser reports what is wrong with it, naming the key
    if isinstance(script, str) and script:
        name = _safe_name(script, f"{base}/{script}")
        _copy(fs, f"{base}/{name}", target, name)
