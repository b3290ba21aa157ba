"""Node side of code sync: a content-addressed object store, trees built from it, and the
run directories copied from those trees.

Standard library only; ava runs these verbs through the agent (`tree VERB ...`, see programs.py),
the agent imports it for `populate`, and it runs as a script too (`python3 treesync.py VERB ...`).
  missing WORKDIR MANIFEST          print the object hashes the node lacks, one per line
  build WORKDIR MANIFEST TREE [TAR] unpack TAR (objects) if given, then build the tree by hard links
  locked LOCK DONE COMMAND          unless DONE exists, run the shell COMMAND holding an exclusive
                                    lock on LOCK (how provision builds a venv only once)

The store stays true to its hashes because nothing ever writes it in place:
- an object is written once, under a temporary name, verified against its hash, made read-only
  (0444) and renamed into place; an object already there is never replaced;
- a tree is hard links to those objects (an executable file is a 0555 copy, so that one
  object's mode never depends on which tree links it); it is visible only once complete, its
  `<tree>.complete` marker written last, and a finished tree is never removed or rebuilt;
- ranks never run in a tree: each run gets its own directory (WORKDIR/runs/RUN/work) holding real
  copies, never links (root writes through read-only bits), and each file is checked against its
  hash as it is copied, so damage done to the store by hand is found, not handed on.
The read-only modes are a guard against stray writes by a non-root user, not the design's
guarantee: the copies are.

Concurrent builds of one tree (several launches of the same code) take `<tree>.lock` (flock)
around check-and-build: one builds, the others find the marker and return.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from typing import Any

OBJECT_MODE = 0o444
EXEC_MODE = 0o555


class TreeError(RuntimeError):
    """A tree that cannot be used: damaged on disk or never finished."""


def object_path(workdir: str, digest: str) -> str:
    return os.path.join(workdir, "objects", digest[:2], digest)


def load_manifest(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return list(json.load(handle)["files"])


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    """An exclusive flock on PATH (created if absent), released on exit or process death."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def missing(workdir: str, manifest: str) -> None:
    wanted = {entry["sha256"] for entry in load_manifest(manifest)}
    for digest in sorted(wanted):
        if not os.path.exists(object_path(workdir, digest)):
            print(digest)


def _verified(path: str, digest: str) -> bool:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest() == digest


def unpack(workdir: str, archive: str) -> None:
    staging = os.path.join(workdir, "objects", f".incoming-{os.getpid()}")
    os.makedirs(staging, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                digest = os.path.basename(member.name)
                source = tar.extractfile(member)
                if not member.isfile() or source is None or len(digest) != 64:
                    continue
                target = object_path(workdir, digest)
                if os.path.exists(target):
                    continue  # another sync brought it: same bytes, and trees may link it
                temp = os.path.join(staging, digest)
                with open(temp, "wb") as out:
                    shutil.copyfileobj(source, out)
                if not _verified(temp, digest):
                    raise SystemExit(f"object {digest} arrived corrupted")
                os.chmod(temp, OBJECT_MODE)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.replace(temp, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        os.unlink(archive)


def _write_once(path: str, data: bytes) -> None:
    temp = f"{path}.{os.getpid()}.tmp"
    with open(temp, "wb") as handle:
        handle.write(data)
    os.replace(temp, path)


def build(workdir: str, manifest: str, tree: str) -> None:
    final = os.path.join(workdir, "trees", tree)
    marker = final + ".complete"
    if os.path.exists(marker):
        return
    os.makedirs(os.path.dirname(final), exist_ok=True)
    with locked(final + ".lock"):
        if os.path.exists(marker):
            return  # built by a concurrent launch while this one waited for the lock
        # Under the lock nobody else builds this tree: what is here without a marker was left
        # by a builder that died, and no run can be using it (runs start only from finished trees).
        parent = os.path.dirname(final)
        for name in os.listdir(parent):
            if name.startswith(tree + ".building-"):
                _remove(os.path.join(parent, name))
        if os.path.lexists(final):
            _remove(final)
        temp = f"{final}.building-{os.getpid()}"
        with open(manifest, "rb") as handle:
            listing = handle.read()
        for entry in json.loads(listing)["files"]:
            target = os.path.join(temp, entry["path"])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            source = object_path(workdir, entry["sha256"])
            if entry.get("exec"):
                shutil.copyfile(source, target)
                os.chmod(target, EXEC_MODE)
                continue
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
                os.chmod(target, OBJECT_MODE)
        os.makedirs(temp, exist_ok=True)
        try:
            os.rename(temp, final)
        except OSError:
            # Only without working locks (some network file systems) can another builder win
            # the rename; its tree is as good as ours once its marker is there.
            _remove(temp)
            if not os.path.exists(marker):
                raise
            return
        # The manifest beside the tree lets a run directory be checked file by file.
        _write_once(final + ".json", listing)
        _write_once(marker, (tree + "\n").encode())


def _remove(path: str) -> None:
    # Read-only files in writable directories go with rmtree; only directories need write bits.
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _copy_checked(source: str, target: str, digest: str | None, workdir: str) -> None:
    sha = hashlib.sha256()
    with open(source, "rb") as src, open(target, "wb") as out:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            sha.update(chunk)
            out.write(chunk)
    if digest is not None and sha.hexdigest() != digest:
        raise TreeError(
            f"{source}: does not match its hash {digest[:16]}: the node's code store was changed in "
            f"place; remove {os.path.join(workdir, 'trees')} and {os.path.join(workdir, 'objects')}, "
            "then launch again"
        )


def populate(tree_dir: str, dest: str) -> bool:
    """Make DEST the run's own copy of the finished tree TREE_DIR, unless it is there already
    (a later attempt of the run keeps what earlier ones wrote). True when it copied."""
    if os.path.isdir(dest):
        return False
    if not os.path.exists(tree_dir + ".complete"):
        raise TreeError(f"{tree_dir}: the code tree is not complete on this node (sync it again)")
    try:
        files = load_manifest(tree_dir + ".json")
    except FileNotFoundError:
        # A tree built before manifests were kept: copy what is there, unchecked.
        files = [
            {
                "path": os.path.relpath(os.path.join(d, f), tree_dir),
                "sha256": None,
                "exec": os.access(os.path.join(d, f), os.X_OK),
            }
            for d, _, names in os.walk(tree_dir)
            for f in names
        ]
    temp = f"{dest}.copying-{os.getpid()}"
    _remove(temp)
    os.makedirs(temp)
    for entry in files:
        target = os.path.join(temp, entry["path"])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        _copy_checked(
            os.path.join(tree_dir, entry["path"]),
            target,
            entry.get("sha256"),
            os.path.dirname(os.path.dirname(tree_dir.rstrip("/"))),
        )
        os.chmod(target, 0o755 if entry.get("exec") else 0o644)
    try:
        os.rename(temp, dest)
    except OSError:
        _remove(temp)
        if not os.path.isdir(dest):
            raise
        return False
    return True


def run_locked(lock: str, done: str, command: str) -> int:
    """Run COMMAND (a shell line) under LOCK unless DONE exists; its exit status, or 0."""
    os.makedirs(os.path.dirname(lock) or ".", exist_ok=True)
    with locked(lock):
        if os.path.exists(done):
            return 0
        return subprocess.call(command, shell=True)


def main(argv: list[str]) -> None:
    verb, workdir = argv[0], os.path.expanduser(argv[1])
    if verb == "missing":
        missing(workdir, argv[2])
    elif verb == "build":
        if len(argv) > 4:
            unpack(workdir, argv[4])
        build(workdir, argv[2], argv[3])
        os.unlink(argv[2])
    elif verb == "locked":
        raise SystemExit(run_locked(workdir, os.path.expanduser(argv[2]), argv[3]))
    else:
        raise SystemExit(f"unknown verb {verb}")


if __name__ == "__main__":
    main(sys.argv[1:])
