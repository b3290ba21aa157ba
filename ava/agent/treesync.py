"""Node side of code sync: a content-addressed object store and trees built from it.

Standard library only; ava sends this file's source as `python3 -c SOURCE VERB ...`.
  missing WORKDIR MANIFEST          print the object hashes the node lacks, one per line
  build WORKDIR MANIFEST TREE [TAR] unpack TAR (objects) if given, then build the tree by hard links
A tree is visible only once complete: it is built under a temporary name, renamed, and its
`<tree>.complete` marker is written last.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tarfile


def object_path(workdir: str, digest: str) -> str:
    return os.path.join(workdir, "objects", digest[:2], digest)


def load_manifest(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return list(json.load(handle)["files"])


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
                temp = os.path.join(staging, digest)
                with open(temp, "wb") as out:
                    shutil.copyfileobj(source, out)
                if not _verified(temp, digest):
                    raise SystemExit(f"object {digest} arrived corrupted")
                target = object_path(workdir, digest)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.replace(temp, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        os.unlink(archive)


def build(workdir: str, manifest: str, tree: str) -> None:
    final = os.path.join(workdir, "trees", tree)
    marker = final + ".complete"
    if os.path.exists(marker):
        return
    temp = f"{final}.building-{os.getpid()}"
    for entry in load_manifest(manifest):
        target = os.path.join(temp, entry["path"])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        source = object_path(workdir, entry["sha256"])
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
        if entry.get("exec"):
            os.chmod(target, 0o755)
    os.makedirs(temp, exist_ok=True)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(temp, final)
    with open(marker, "w", encoding="utf-8") as handle:
        handle.write(tree + "\n")


def main(argv: list[str]) -> None:
    verb, workdir = argv[0], os.path.expanduser(argv[1])
    if verb == "missing":
        missing(workdir, argv[2])
    elif verb == "build":
        if len(argv) > 4:
            unpack(workdir, argv[4])
        build(workdir, argv[2], argv[3])
        os.unlink(argv[2])
    else:
        raise SystemExit(f"unknown verb {verb}")


if __name__ == "__main__":
    main(sys.argv[1:])
