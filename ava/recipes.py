"""Where a recipe comes from: a local path, or any fsspec URL whose code sits beside it."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ava.errors import UsageError


def fetch(source: str) -> Path:
    """A local directory (or recipe.toml) holding the recipe and its code.

    A URL is copied whole into a temporary directory: a directory URL (`s3://b/recipes/x/`)
    brings everything under it; a file URL (`https://…/recipe.toml`) brings the recipe, and
    then its script (named relative to it) from the same place.
    """
    if "://" not in source:
        return Path(source)
    import fsspec

    target = Path(tempfile.mkdtemp(prefix="ava-recipe-"))
    try:
        fs, path = fsspec.core.url_to_fs(source)
        if path.endswith(".toml"):
            fs.get(path, str(target / "recipe.toml"))
            _fetch_script(fs, path.rsplit("/", 1)[0], target)
        else:
            fs.get(path.rstrip("/") + "/", str(target), recursive=True)
    except (OSError, ValueError) as error:
        raise UsageError(f"{source}: cannot fetch the recipe: {error}") from error
    return target


def _fetch_script(fs, base: str, target: Path) -> None:  # type: ignore[no-untyped-def]
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    try:
        script = tomllib.loads((target / "recipe.toml").read_text(encoding="utf-8")).get("run", {}).get("script")
    except (tomllib.TOMLDecodeError, AttributeError):
        return  # the config parser reports what is wrong with it, naming the key
    if isinstance(script, str) and script and not script.startswith("/") and ".." not in script.split("/"):
        (target / script).parent.mkdir(parents=True, exist_ok=True)
        fs.get(f"{base}/{script}", str(target / script))
