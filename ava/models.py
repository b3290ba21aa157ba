"""Committed checkpoints as models: listed across runs, named `RUN[@STEP]`, copied out, and the
start of a new run (`ava train --from RUN[@STEP]`).

A run's checkpoints are where its recipe's `[checkpoint] dir` says (`{name}` and `{run}`
expanded), in ava.ckpt's layout: `step-00000100/…` committed by `step-00000100.COMMITTED`. They
are read here with fsspec, as the nodes write them; a remote store's credentials come from this
machine's environment, else from the run's own `[env]` (AWS_*, FSSPEC_*, …). Only committed
checkpoints exist for these commands. Nothing here ever writes to a run's checkpoint directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ava.errors import AvaError, UsageError

if TYPE_CHECKING:
    from ava.config import Recipe
    from ava.runs import RunRecord

MARKER_SUFFIX = ".COMMITTED"
_MARKER = re.compile(r"^step-(\d+)\.COMMITTED$")
# The run's [env] names that configure storage clients (fsspec, s3fs/botocore, gcsfs, adlfs).
_STORAGE_ENV = ("AWS_", "FSSPEC_", "GOOGLE_", "AZURE_", "S3_")
METADATA_FILE = "ava-model.json"
INIT_ENV = "AVA_INIT_CHECKPOINT"  # what ava.ckpt.load_latest() falls back to (ava/ckpt.py)


class CheckpointsUnreadable(AvaError):
    """A run's checkpoint directory could not be read from this machine."""


@dataclass(frozen=True)
class Checkpoint:
    """One committed checkpoint of a run."""

    run: str
    step: int
    url: str  # the step directory, as the nodes name it (a local path keeps its `~`)
    size: int | None  # bytes of its files, when known
    time: float | None  # when it was committed
    format: str  # "torch" (ava.ckpt.save) or "dcp" (save_sharded)
    digest: str  # sha256 of its commit marker (which holds every file's size and CRC-32), 16 hex

    def to_json(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "step": self.step,
            "url": self.url,
            "size": self.size,
            "time": self.time,
            "format": self.format,
            "checkpoint": self.digest,
        }


def checkpoint_dir(run: RunRecord) -> str | None:
    """The run's checkpoint directory as its nodes saw it (AVA_CHECKPOINT_DIR), or None."""
    table = run.raw.get("checkpoint")
    folder = table.get("dir") if isinstance(table, dict) else None
    if not isinstance(folder, str) or not folder:
        return None
    return folder.replace("{name}", run.recipe).replace("{run}", run.id).rstrip("/") or "/"


def _here(url: str) -> str:
    """A node's path as this machine reads it: `~` is this machine's home (the local node's)."""
    return url if "://" in url else os.path.expanduser(url)


@contextlib.contextmanager
def storage_env(run: RunRecord) -> Iterator[None]:
    """This machine's environment, plus the run's storage settings it does not set itself."""
    from ava import runs

    try:
        values = runs.read_env(run) or {}
    except runs.DamagedRecord:
        values = {}
    added = {k: v for k, v in values.items() if k.startswith(_STORAGE_ENV) and k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _filesystem(url: str) -> tuple[Any, str]:
    import fsspec  # type: ignore[import-untyped,unused-ignore]  # fsspec has no stubs or py.typed

    # A fresh client each time: two runs may reach the same protocol with other endpoints or keys.
    fs, root = fsspec.core.url_to_fs(_here(url), skip_instance_cache=True)
    return fs, root.rstrip("/") or root


def committed(run: RunRecord) -> list[Checkpoint]:
    """The run's committed checkpoints, oldest first ([] without a checkpoint dir or any commit)."""
    folder = checkpoint_dir(run)
    if folder is None:
        return []
    try:
        with storage_env(run):
            fs, root = _filesystem(folder)
            try:
                names = fs.ls(root, detail=False)
            except FileNotFoundError:
                return []
            found = []
            for name in names:
                match = _MARKER.match(str(name).rstrip("/").rsplit("/", 1)[-1])
                if match:
                    found.append(_checkpoint(run, fs, root, folder, int(match.group(1))))
    except AvaError:
        raise
    except Exception as error:  # fsspec's back-ends raise their own kinds: name the directory, one line
        raise CheckpointsUnreadable(
            f"run {run.id}: cannot read its checkpoints at {folder} from this machine: {type(error).__name__}: {error}"
        ) from error
    return sorted((c for c in found if c is not None), key=lambda c: c.step)


def _checkpoint(run: RunRecord, fs: Any, root: str, folder: str, step: int) -> Checkpoint | None:
    name = f"step-{step:08d}"
    try:
        raw = fs.cat_file(f"{root}/{name}{MARKER_SUFFIX}")
        marker = json.loads(raw)
    except (OSError, ValueError):
        return None  # a damaged marker: ava.ckpt would not load it either
    if not isinstance(marker, dict):
        return None
    files = marker.get("files")
    size: int | None = None
    if isinstance(files, dict):
        size = sum(f.get("size", 0) for f in files.values() if isinstance(f, dict) and isinstance(f.get("size"), int))
    else:
        with contextlib.suppress(Exception):
            size = int(fs.du(f"{root}/{name}"))
    stamp = marker.get("time")
    return Checkpoint(
        run=run.id,
        step=step,
        url=f"{folder}/{name}",
        size=size,
        time=float(stamp) if isinstance(stamp, (int, float)) else None,
        format=str(marker.get("format", "?")),
        digest=hashlib.sha256(raw).hexdigest()[:16],
    )


def parse_ref(text: str) -> tuple[str, int | None]:
    """`RUN` or `RUN@STEP` -> (run prefix, step or None)."""
    run, at, step = text.rpartition("@")
    if not at:
        return text, None
    if not step.isdigit():
        raise UsageError(f"{text}: expected RUN or RUN@STEP with STEP a number")
    return run, int(step)


def resolve(ref: str) -> tuple[RunRecord, Checkpoint]:
    """The run and committed checkpoint that `RUN[@STEP]` names: the latest one, or that step's."""
    from ava import runs

    prefix, step = parse_ref(ref)
    run = runs.resolve(prefix)
    found = committed(run)
    if not found:
        where = checkpoint_dir(run)
        raise UsageError(
            f"run {run.id} has no committed checkpoint"
            + (f" in {where}" if where else " (its recipe has no [checkpoint] dir)")
        )
    if step is None:
        return run, found[-1]
    for checkpoint in found:
        if checkpoint.step == step:
            return run, checkpoint
    steps = ", ".join(str(c.step) for c in found)
    raise UsageError(f"run {run.id} has no committed checkpoint at step {step} (committed: {steps})")


def parent_of(checkpoint: Checkpoint) -> dict[str, Any]:
    """What a run started from a checkpoint records as its parent."""
    return {"run": checkpoint.run, "step": checkpoint.step, "checkpoint": checkpoint.digest, "url": checkpoint.url}


def refuse_shared_dir(child_dir: str | None, parent: RunRecord) -> None:
    """A run started from another's checkpoint must never write where that run keeps them."""
    parent_dir = checkpoint_dir(parent)
    if child_dir is None or parent_dir is None:
        return
    child, theirs = _here(child_dir).rstrip("/"), _here(parent_dir).rstrip("/")
    if child == theirs or child.startswith(theirs + "/") or theirs.startswith(child + "/"):
        raise UsageError(
            f"checkpoint.dir {child_dir} is where run {parent.id} keeps its checkpoints, which the new run "
            "must not write; give each run its own, e.g. --set 'checkpoint.dir=…/{name}/{run}'"
        )


def lineage(run: RunRecord) -> list[dict[str, Any]]:
    """The run's ancestors, nearest first: each parent entry (run, step, checkpoint, url)."""
    from ava import runs

    chain: list[dict[str, Any]] = []
    seen = {run.id}
    parent = run.parent
    while isinstance(parent, dict) and isinstance(parent.get("run"), str):
        chain.append(parent)
        if parent["run"] in seen:
            break
        seen.add(parent["run"])
        try:
            parent = runs.load(parent["run"]).parent
        except AvaError:
            break  # the parent's record is gone: the chain ends with what the child kept
    return chain


def export(run: RunRecord, checkpoint: Checkpoint, dest: str) -> dict[str, Any]:
    """Copy a committed checkpoint to DEST (a directory or fsspec URL) as an ava.ckpt directory of
    its own: the step's files, then `ava-model.json` (where it came from), then its commit marker,
    last, as ava.ckpt commits. Returns the metadata written."""
    from ava import metrics

    source_dir = checkpoint_dir(run)
    assert source_dir is not None  # a committed checkpoint has a directory
    refuse_shared_dir(dest, run)
    name = posixpath.basename(checkpoint.url)
    points = metrics.read(run)
    values = {n: metrics.value_at(points, n, checkpoint.step) for n in metrics.names(points)}
    meta = {
        "run": run.id,
        "recipe": run.recipe,
        "recipe_hash": run.recipe_hash,
        "overrides": run.overrides,
        "step": checkpoint.step,
        "format": checkpoint.format,
        "checkpoint": checkpoint.digest,
        "source": checkpoint.url,
        "metrics": {k: v for k, v in values.items() if v is not None},
        "parent": run.parent,
        "exported": time.time(),
    }
    try:
        with storage_env(run):
            src_fs, src_root = _filesystem(source_dir)
            dst_fs, dst_root = _filesystem(dest)
            if dst_fs.exists(f"{dst_root}/{name}{MARKER_SUFFIX}"):
                raise UsageError(f"{dest} already holds a committed {name}; export to an empty directory")
            dst_fs.makedirs(f"{dst_root}/{name}", exist_ok=True)
            for path in src_fs.find(f"{src_root}/{name}"):
                relative = str(path)[len(f"{src_root}/{name}/") :]
                target = f"{dst_root}/{name}/{relative}"
                dst_fs.makedirs(posixpath.dirname(target), exist_ok=True)
                with src_fs.open(path, "rb") as reader, dst_fs.open(target, "wb") as writer:
                    while chunk := reader.read(8 << 20):
                        writer.write(chunk)
            dst_fs.pipe_file(f"{dst_root}/{METADATA_FILE}", json.dumps(meta, indent=2).encode())
            marker = src_fs.cat_file(f"{src_root}/{name}{MARKER_SUFFIX}")
            dst_fs.pipe_file(f"{dst_root}/{name}{MARKER_SUFFIX}", marker)
    except AvaError:
        raise
    except Exception as error:
        raise CheckpointsUnreadable(
            f"export of {run.id}@{checkpoint.step} to {dest}: {type(error).__name__}: {error}"
        ) from error
    return meta


def start_from(recipe: Recipe, ref: str, run_id: str) -> tuple[Recipe, dict[str, Any]]:
    """`ava train --from RUN[@STEP]`: the recipe with AVA_INIT_CHECKPOINT in its [env] (so
    every attempt of the new run, background supervisors too, passes it to the ranks), and the
    parent entry to record. Refuses a new run whose checkpoint dir is the parent's."""
    from dataclasses import replace

    from ava.launch import checkpoint_dir as expanded

    parent, checkpoint = resolve(ref)
    refuse_shared_dir(expanded(recipe, run_id), parent)
    env = {**recipe.env, INIT_ENV: checkpoint.url}
    return replace(recipe, env=env), parent_of(checkpoint)
