"""Shell completion for run ids, node names and recipe directories (`ava --install-completion`).

Completers run on every TAB press: they read only local files (run records, the inventory) and
never reach a node; a failure completes nothing rather than printing an error into the shell.
"""

from __future__ import annotations

from pathlib import Path


def complete_runs(incomplete: str) -> list[str]:
    """Run ids that start with what was typed, oldest first (as `ava ps` lists them)."""
    try:
        from ava import runs

        return [run_id for run_id in runs.run_ids() if run_id.startswith(incomplete)]
    except Exception:
        return []


def complete_nodes(incomplete: str) -> list[str]:
    """The inventory's node names; after a comma (`--nodes a,b`), the next name of the list."""
    try:
        from ava.cli import load_inventory

        names = list(load_inventory().nodes)
    except Exception:
        return []
    done, _, last = incomplete.rpartition(",")
    head = f"{done}," if done else ""
    return [head + name for name in names if name.startswith(last) and name not in done.split(",")]


def complete_recipes(incomplete: str) -> list[str]:
    """Directories holding a recipe.toml, other directories (to descend) and .toml files."""
    try:
        typed = Path(incomplete) if incomplete else Path(".")
        base = typed if (not incomplete or incomplete.endswith("/")) else typed.parent
        found: list[str] = []
        for entry in sorted(base.iterdir()):
            shown = entry.name if str(base) == "." and not incomplete.startswith("./") else str(entry)
            if entry.name.startswith(".") or not shown.startswith(incomplete):
                continue
            if entry.is_dir():
                found.append(shown if (entry / "recipe.toml").is_file() else shown + "/")
            elif entry.suffix == ".toml" and entry.name != "ava.toml":
                found.append(shown)
        return found
    except OSError:
        return []
