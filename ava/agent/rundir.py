"""A run's own directory on this node: WORKDIR/runs/RUN/work, its ranks' working directory.

The agent makes it at the run's first `start` on this node as a copy of the run's code tree
(treesync.populate: real copies, each checked against its hash), and keeps it for the run's
later attempts here, so a script that saves `snapshot.pt` next to itself resumes after a
restart. No other run sees it, and writing to a shipped file changes this copy only.

Retention: at every `start`, the run directories of other runs on this node whose latest
attempt ended (succeeded, failed or stopped) more than KEEP_DAYS ago are removed; a run still
running, or whose state cannot be read, keeps its directory. The attempt records beside it
(status, logs) are not touched. Cheap: one status read per run directory present.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import layout, status, treesync

if TYPE_CHECKING:
    from .spec import Spec

WORK = "work"
KEEP_DAYS = 7.0


class RunDirError(RuntimeError):
    """The run directory could not be made: names it and why."""


def path(work: Path, run: str) -> Path:
    return layout.run_dir(work, run) / WORK


def prepare(spec: Spec) -> bool:
    """The run's directory ready for this attempt (copied on the first one); then old run
    directories pruned. True when it was copied now."""
    if not spec.tree:
        return False
    target = path(spec.workdir, spec.run)
    try:
        copied = treesync.populate(spec.tree, str(target))
    except (OSError, treesync.TreeError) as exc:
        raise RunDirError(f"run directory {target}: {exc}") from exc
    prune(spec.workdir, spare=spec.run)
    return copied


def ended(work: Path, run: str) -> float | None:
    """When RUN last ended on this node, or None while it may still be running."""
    found = layout.attempts(work, run)
    if not found:
        # Started no attempt here (its start failed before one existed): date it by its folder.
        try:
            return layout.run_dir(work, run).stat().st_mtime
        except OSError:
            return None
    adir = layout.attempt_dir(work, run, found[-1])
    if not status.is_final(status.read(adir)):
        return None
    try:
        return (adir / layout.STATUS).stat().st_mtime
    except OSError:
        return None


def prune(work: Path, *, spare: str = "", keep_days: float = KEEP_DAYS, now: float | None = None) -> list[str]:
    """Remove the run directories of runs that ended more than KEEP_DAYS ago; their run ids."""
    cutoff = (time.time() if now is None else now) - keep_days * 86400
    removed = []
    for run in layout.runs(work):
        target = path(work, run)
        # The directory, and any copy a crashed start left half made beside it (work.copying-PID).
        try:
            found = [n for n in os.listdir(target.parent) if n == WORK or n.startswith(WORK + ".copying-")]
        except OSError:
            continue
        if run == spare or not found:
            continue
        when = ended(work, run)
        if when is None or when > cutoff:
            continue
        for name in found:
            shutil.rmtree(target.parent / name, ignore_errors=True)
        if not os.path.exists(target):
            removed.append(run)
    return removed
