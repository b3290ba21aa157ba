"""Ship what a run needs to its nodes, content-addressed: the agent, the runtime, the code.

Everything is named by the hash of its content, so relaunching unchanged code moves nothing
(one existence check per node), and a one-file change moves about that one file.

Node layout under `workdir` (agent/treesync.py says why the store stays true to its hashes):
  agent/agent-<hash16>.pyz        the agent zipapp
  agent/python-<hash8>            the path of the interpreter the inventory's `python` resolves to
  objects/<aa>/<sha256>           file contents, shared by every tree, read-only
  trees/<hash16>/ + .complete     one directory per code or runtime tree, hard-linked objects;
  trees/<hash16>.json, .lock      its manifest, and the lock its builders take
  runs/<run>/work/                the run's directory: its ranks' cwd, a copy of its code tree
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import secrets
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath

from ava.config import Node
from ava.errors import CommandError, ConfigError
from ava.transport import connect, shell_path

# The node side of the store. ava runs it through the agent (`tree VERB ...`); it also runs as a
# script, which is how tests race builders against each other.
TREESYNC_SOURCE = Path(__file__).with_name("agent") / "treesync.py"
# Always left out of a code tree: version control, caches, bulky local state.
ALWAYS_IGNORED = (".git/", ".hg/", "__pycache__/", "*.pyc", ".pytest_cache/", ".venv/", ".ava/")
# The modules a training script may import from ava on a node (stdlib, torch and fsspec only).
RUNTIME_FILES = ("__init__.py", "ckpt.py", "env.py", "data.py")
RUNTIME_PACKAGES = ("cache",)
RUNTIME_METADATA = {
    "ava_runtime-0.dist-info/METADATA": "Metadata-Version: 2.1\nName: ava-runtime\nVersion: 0\n",
    "ava_runtime-0.dist-info/entry_points.txt": "[fsspec.specs]\navacache = ava.cache:AvaCacheFileSystem\n",
}


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    size: int
    exec: bool


@dataclass(frozen=True)
class Manifest:
    files: tuple[FileEntry, ...]

    @property
    def tree(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps({"files": [vars(f) for f in self.files]}, sort_keys=True)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class SyncStats:
    tree: str
    files: int
    sent_files: int
    sent_bytes: int


# -- ignore rules (the common subset of gitignore: globs, dir/, /anchored, !negation) ---------


def ignore_patterns(root: Path) -> list[str]:
    """Patterns from `.avaignore`, else `.gitignore`, plus the ones always applied."""
    patterns = list(ALWAYS_IGNORED)
    for name in (".avaignore", ".gitignore"):
        path = root / name
        if path.is_file():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    patterns.append(line)
            break
    return patterns


def is_ignored(relpath: str, is_dir: bool, patterns: list[str]) -> bool:
    ignored = False
    name = PurePosixPath(relpath).name
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern[1:] if negate else pattern
        dir_only = pattern.endswith("/")
        pattern = pattern.rstrip("/")
        if dir_only and not is_dir:
            continue
        if pattern.startswith("/") or "/" in pattern:
            matched = fnmatch.fnmatchcase(relpath, pattern.lstrip("/"))
        else:
            matched = fnmatch.fnmatchcase(name, pattern)
        if matched:
            ignored = not negate
    return ignored


def manifest_of(root: Path, *, patterns: list[str] | None = None) -> Manifest:
    """The files under ROOT that ship, by content. A symlink is shipped as the file it points
    to only when that resolves inside ROOT: a recipe is shared, and a link such as
    `notes.txt -> ~/.aws/credentials` must not carry its reader's files to every node."""
    root = root.resolve()
    rules = ignore_patterns(root) if patterns is None else patterns
    files: list[FileEntry] = []
    for directory, dirnames, filenames in os.walk(root):
        rel_dir = Path(directory).relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = sorted(d for d in dirnames if not is_ignored(rel_dir + d, True, rules))
        for name in dirnames:
            _check_link(root, Path(directory) / name)  # walked or not, a link out is refused
        for filename in sorted(filenames):
            rel = rel_dir + filename
            path = Path(directory) / filename
            if is_ignored(rel, False, rules):
                continue
            _check_link(root, path)
            if not path.is_file():
                continue
            data = path.read_bytes()
            files.append(FileEntry(rel, hashlib.sha256(data).hexdigest(), len(data), os.access(path, os.X_OK)))
    return Manifest(tuple(sorted(files, key=lambda f: f.path)))


def _check_link(root: Path, path: Path) -> None:
    if not path.is_symlink():
        return
    target = path.resolve()
    if target != root and root not in target.parents:
        raise ConfigError(
            str(path),
            "",
            f"a symlink to {target}, outside {root}; ava does not ship files from "
            "outside a recipe's folder (copy the file in, or list the link in .avaignore)",
        )


@lru_cache(maxsize=1)
def runtime_manifest() -> tuple[Manifest, dict[str, bytes]]:
    """The user-side ava modules, laid out as a package `ava/` inside the runtime tree.

    The bytes are read once, with their hashes, so what ships always matches its manifest.
    """
    package = Path(__file__).resolve().parent
    files, contents = [], {}
    for entry in manifest_of(package).files:
        top = entry.path.split("/", 1)[0]
        if entry.path in RUNTIME_FILES or top in RUNTIME_PACKAGES:
            data = (package / entry.path).read_bytes()
            path = "ava/" + entry.path
            files.append(FileEntry(path, hashlib.sha256(data).hexdigest(), len(data), False))
            contents[path] = data
    # The rank hook (see ava/rankhook.py) at the top, where Python's `site` finds it.
    data = (package / "rankhook.py").read_bytes()
    files.append(FileEntry("sitecustomize.py", hashlib.sha256(data).hexdigest(), len(data), False))
    contents["sitecustomize.py"] = data
    # Package metadata beside it, so `fsspec.open("avacache::…")` finds the protocol through its
    # entry point on a node where ava is not installed (PYTHONPATH holds this tree).
    for path, text in RUNTIME_METADATA.items():
        data = text.encode()
        files.append(FileEntry(path, hashlib.sha256(data).hexdigest(), len(data), False))
        contents[path] = data
    return Manifest(tuple(sorted(files, key=lambda f: f.path))), contents


# -- node paths -------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def agent_bundle() -> tuple[bytes, str]:
    from ava.agent import build_zipapp

    return build_zipapp()


def agent_path(node: Node) -> str:
    return f"{node.workdir.rstrip('/')}/agent/agent-{agent_bundle()[1][:16]}.pyz"


def interpreter_path(node: Node) -> str:
    """The file where `ship_agent` notes the interpreter that NODE's `python` resolves to, named
    after that setting (another `python` in the inventory is another file)."""
    key = hashlib.sha256(node.python.encode()).hexdigest()[:8]
    return f"{node.workdir.rstrip('/')}/agent/python-{key}"


def agent_command(node: Node, *args: str) -> str:
    """The shell text that runs this ava's agent on NODE (put there by `ship_agent`) with ARGS.

    The agent runs on the interpreter `python` resolved to when it was shipped, not through
    `python` itself: where that is a version manager's shim (pyenv's costs ~70 ms of bash per
    call), every status poll and every start would pay for it again. The path is read by the
    shell's own `read` (no process), and is a path, not a link: a venv's python started through a
    link to it would not know its venv. Without it (a workdir an older ava provisioned, an
    interpreter since removed) the agent runs on `python`. shell_path keeps a leading `~/` for the
    node's shell to expand; everything else is quoted."""
    noted = shell_path(interpreter_path(node))
    run = " ".join(['"$ava_py"', shell_path(agent_path(node)), *map(shell_path, args)])
    pick = f'{{ read -r ava_py < {noted} && [ -x "$ava_py" ]; }} 2>/dev/null || ava_py={shell_path(node.python)}'
    return f"{{ {pick}; {run}; }}"


def tree_path(node: Node, tree: str) -> str:
    return f"{node.workdir.rstrip('/')}/trees/{tree}"


def runtime_path(node: Node) -> str:
    return tree_path(node, runtime_manifest()[0].tree)


# -- shipping ---------------------------------------------------------------------------------


def ship_agent(node: Node) -> bool:
    """Put the agent on the node unless this very version is there, and note the interpreter it
    runs on (see agent_command); True if bytes moved."""
    transport = connect(node)
    path = agent_path(node)
    moved = not transport.run(f"test -f {shell_path(path)}").ok
    if moved:
        transport.put(agent_shipped(), path, mode=0o755)
    python = shell_path(node.python)
    # The interpreter behind a shim (a venv's python names itself, not its base), else `python`.
    resolve = f"{python} -c 'import sys; print(sys.executable)' 2>/dev/null"
    note = (
        f'target="$({resolve})"; [ -x "$target" ] || target="$(command -v {python})"; '
        f'[ -n "$target" ] && printf "%s\\n" "$target" > {shell_path(interpreter_path(node))}'
    )
    result = transport.run(note, timeout=60)
    if not result.ok:
        raise CommandError(
            f"{node.name}: noting the agent's interpreter failed (exit {result.exited})", tail=result.tail()
        )
    return moved


@lru_cache(maxsize=1)
def agent_shipped() -> bytes:
    """What goes to the nodes: the zipapp with its bytecode (compiled here, once per process that
    ships it; a launch whose nodes have this agent never compiles)."""
    from ava.agent import with_bytecode

    return with_bytecode(agent_bundle()[0])


def ship_runtime(node: Node) -> SyncStats:
    manifest, contents = runtime_manifest()
    return ship_tree(node, manifest, contents)


def ship_tree(node: Node, manifest: Manifest, root: Path | dict[str, bytes]) -> SyncStats:
    """Make `trees/<hash>` on the node hold exactly `manifest`, sending only missing objects.

    `root` is the directory the manifest's paths are read from, or those paths' bytes.
    """
    transport = connect(node)
    tree = manifest.tree
    final = tree_path(node, tree)
    if transport.run(f"test -f {shell_path(final + '.complete')}").ok:
        return SyncStats(tree, len(manifest.files), 0, 0)
    workdir = node.workdir.rstrip("/")
    # Names of one's own: concurrent launches (and nodes sharing a workdir) each have theirs.
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    listing = f"{workdir}/trees/.manifest-{tree}-{token}.json"
    transport.put(manifest.to_json().encode(), listing)
    # The agent is there already: provision ships it before the runtime, and a launch provisions first.
    result = transport.run(agent_command(node, "tree", "missing", workdir, listing))
    result.check("code sync (listing objects)")
    wanted = set(result.stdout.split())
    build = ["tree", "build", workdir, listing, tree]
    sent_files = sent_bytes = 0
    if wanted:
        archive, sent_files, sent_bytes = _archive(manifest, root, wanted)
        remote_tar = f"{workdir}/objects/.incoming-{tree}-{token}.tar"
        transport.put(archive, remote_tar)
        build.append(remote_tar)
    built = transport.run(agent_command(node, *build))
    if not built.ok:
        raise CommandError(f"{node.name}: code sync failed while building tree {tree}", tail=built.tail())
    return SyncStats(tree, len(manifest.files), sent_files, sent_bytes)


def _archive(manifest: Manifest, root: Path | dict[str, bytes], wanted: set[str]) -> tuple[bytes, int, int]:
    buffer = io.BytesIO()
    files = sent = 0
    done: set[str] = set()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for entry in manifest.files:
            if entry.sha256 not in wanted or entry.sha256 in done:
                continue
            done.add(entry.sha256)
            data = root[entry.path] if isinstance(root, dict) else (root / entry.path).read_bytes()
            info = tarfile.TarInfo(entry.sha256)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            files += 1
            sent += len(data)
    return buffer.getvalue(), files, sent
