"""`ava provision`: idempotent node set-up. Facts -> plan (pure) -> apply, per node in parallel.

Like a pyinfra operation, each step reads the node's facts and is planned only when something
is missing, so a second provision plans nothing. The facts are one shell command per node that
tests, by name, what the steps would make: every path below is content-addressed (the agent by
its hash, the runtime by its tree, a venv by the hash of its requirements), so "is it there?" is
the whole check, and `ensure()` before a launch costs one round trip per node.

Steps, in order: the workdir layout; the agent; the runtime (the user-side ava modules); the
cache configuration; the cgroup parent, where the node allows it; the run's Python environment.

    WORKDIR/runs/                       run records (the agent writes them)
    WORKDIR/cache.json                  {"dir", "size", "block_size"} for the node's cache
    WORKDIR/venvs/<hash16>/             a venv over the node's python (system site-packages on,
                                        and the node venv's when python is one, so its torch is
                                        used), ready when `.ava-ready` exists
    WORKDIR/wheels/<hash16>/            wheels or sdists pushed from this computer
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from ava import launchcache, sync
from ava.agent.cgroups import PARENT as CGROUP_PARENT
from ava.agent.cgroups import ROOT as CGROUP_ROOT
from ava.agent.cgroups import V1_CONTROLLERS, V2_CONTROLLERS
from ava.agent.protocol import FAILED
from ava.cache.settings import DEFAULT_BLOCK_SIZE
from ava.config import Node, Requirements
from ava.errors import AvaError, CommandError, ConfigError
from ava.transport import connect, run_all, shell_path

if TYPE_CHECKING:
    from ava.config import Recipe

BLOCK_SIZE = DEFAULT_BLOCK_SIZE  # the node caches' block size: cache.json says it, launch exports it
READY = ".ava-ready"
_PACKAGE_SUFFIXES = (".whl", ".tar.gz", ".zip", ".tar.bz2")
_FIND_LINKS = re.compile(r"^(--find-links|-f)(?:\s+|=)(\S+)$")

# Called as on_step(node name, step, "start" | "done" | FAILED).
StepCallback = Callable[[str, "Step", str], None]


# -- the run's Python environment ---------------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    local: Path
    remote: str  # under WORKDIR/wheels/


@dataclass(frozen=True)
class Environment:
    """Requirements made ready to install on one node: their hash names the venv."""

    hash: str  # 16 hex of the normalised requirements (pushed files by content)
    text: str  # the requirements file the node installs from
    uploads: tuple[Upload, ...] = ()


class Source(NamedTuple):
    """Requirements and the folder their relative paths start from. A recipe's are `confined`:
    recipes are shared, so the local files they name (wheels, requirements files, --find-links
    folders) must resolve inside the recipe's own folder; the inventory is the user's own and
    may name any path."""

    requirements: Requirements
    root: Path
    confined: str | None = None  # the recipe file, for messages, when confined to `root`


def _requirement_lines(source: Source) -> list[str]:
    requirements, root = source.requirements, source.root
    lines = list(requirements.packages)
    if requirements.file:
        path = Path(requirements.file).expanduser()
        path = path if path.is_absolute() else root / path
        _check_inside(path, source, requirements.file)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise ConfigError(str(path), "", f"cannot read the requirements file: {error.strerror or error}") from None
        lines += text.splitlines()
        root = path.parent  # paths inside a requirements file are relative to it
    out = []
    for line in lines:
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line:
            out.append(re.sub(r"\s+", " ", line))
    return [_anchor(line, root, source) for line in out]


def _anchor(line: str, root: Path, source: Source) -> str:
    """A local path in a requirement, made absolute so the line means the same from anywhere."""
    found = _FIND_LINKS.match(line)
    if found:
        target = _local(found.group(2), root, source)
        return f"--find-links {target}" if target else line
    target = _local(line, root, source)
    return str(target) if target else line


def _local(text: str, root: Path, source: Source) -> Path | None:
    looks_local = text.startswith(("/", "./", "../", "~")) or text.endswith(_PACKAGE_SUFFIXES)
    if not looks_local or "://" in text:
        return None
    path = Path(text).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.exists():
        return None
    _check_inside(path, source, text)
    if path.is_dir():
        for member in path.iterdir():
            _check_inside(member, source, f"{text}/{member.name}")
    return path.resolve()


def _check_inside(path: Path, source: Source, written: str) -> None:
    """Refuse a recipe's local path that resolves (symlinks followed) outside the recipe."""
    if source.confined is None:
        return
    root = source.root.resolve()
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise ConfigError(
            source.confined,
            "run.requirements",
            f"{written} resolves to {resolved}, outside the recipe's folder; a recipe "
            "sends only its own files (put it in the recipe's folder, or name it in the "
            "inventory's requirements)",
        )


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def environment(node: Node, sources: list[Source] | list[tuple[Requirements, Path]]) -> Environment | None:
    """The environment for these requirements on NODE, or None when they name nothing.

    Local files (a wheel, an sdist, a --find-links directory) are pushed to the node and named
    there; in the hash they count by content, so a rebuilt wheel makes a new environment.
    """
    lines: list[str] = []
    for source in sources:
        lines += _requirement_lines(Source(*source))
    if not lines:
        return None
    options = [l for l in lines if l.startswith("-")]
    packages = sorted({_canonical(l): l for l in lines if not l.startswith("-")}.values(), key=_canonical)
    canonical, rendered, uploads = [], [], []
    wheels = f"{node.workdir.rstrip('/')}/wheels"
    for line in options + packages:
        found = _FIND_LINKS.match(line)
        path = Path(found.group(2) if found else line)
        if not path.is_absolute() or not path.exists():
            canonical.append(_canonical(line))
            rendered.append(line)
            continue
        if path.is_dir() and not found:
            raise ConfigError(str(path), "", "a directory as a requirement: build a wheel (pip wheel DIR) and list it")
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        content = [f"{p.name}:{_digest(p.read_bytes())}" for p in files]
        folder = f"{wheels}/{_digest(json.dumps(content).encode())[:16]}"
        uploads += [Upload(p, f"{folder}/{p.name}") for p in files]
        canonical.append(("--find-links " if found else "") + json.dumps(content))
        target = folder if found else f"{folder}/{path.name}"
        rendered.append(("--find-links " if found else "") + _pip_path(target))
    digest = _digest("\n".join(canonical).encode())[:16]
    return Environment(digest, "\n".join(rendered) + "\n", tuple(uploads))


def _canonical(line: str) -> str:
    """A requirement as the hash sees it: "numpy >= 1.26" and "numpy>=1.26" are one."""
    spec, semi, marker = line.partition(";")
    if "@" not in spec and not spec.startswith("-"):
        spec = re.sub(r"\s+", "", spec)
    return spec + semi + marker.strip() if semi else spec


def _pip_path(path: str) -> str:
    # pip expands ${VAR} in requirements files, not `~`.
    return "${HOME}/" + path[2:] if path.startswith("~/") else path


def requirement_sources(node: Node, recipe: Recipe | None = None, *, base: Path | None = None) -> list[Source]:
    """The node's requirements (paths relative to `base`, the inventory's folder) then the
    recipe's (confined to the recipe's folder)."""
    sources = []
    if node.requirements:
        sources.append(Source(node.requirements, base or Path.cwd()))
    if recipe is not None and recipe.run.requirements:
        sources.append(Source(recipe.run.requirements, Path(recipe.root), recipe.source))
    return sources


def venv_dir(node: Node, env: Environment) -> str:
    return f"{node.workdir.rstrip('/')}/venvs/{env.hash}"


def venv_python(
    node: Node, requirements: Requirements | None = None, *, recipe: Recipe | None = None, root: Path | None = None
) -> str:
    """The interpreter a run uses on NODE: the venv for these requirements, else node.python.

    Pass `requirements` (a file relative to `root`), or `recipe` for the node's and the recipe's
    together, exactly as provision made them.
    """
    sources = requirement_sources(node, recipe, base=root)
    if requirements is not None:
        sources.append(Source(requirements, root or Path.cwd()))
    env = environment(node, sources)
    return node.python if env is None else f"{venv_dir(node, env)}/bin/python"


# -- what each step wants, and the facts that say whether it is there ---------------------------


@dataclass(frozen=True)
class Wanted:
    """Everything provision would make on one node, each named so that it can be tested."""

    node: Node
    layout: tuple[str, ...]
    agent: str
    interpreter: str  # where the agent's interpreter is noted (sync.interpreter_path)
    runtime: str  # the runtime tree's completion marker
    cache: dict[str, object]
    env: Environment | None

    @property
    def ready(self) -> str | None:
        return f"{venv_dir(self.node, self.env)}/{READY}" if self.env else None

    def paths(self) -> list[str]:
        """Every path the facts test, in a fixed order."""
        cgroups = [f"{CGROUP_ROOT}/{c}" for c in V1_CONTROLLERS] + [
            f"{CGROUP_ROOT}/{c}/{CGROUP_PARENT}" for c in V1_CONTROLLERS
        ]
        return [
            *self.layout,
            self.agent,
            self.interpreter,
            self.runtime,
            *([self.ready] if self.ready else []),
            f"{CGROUP_ROOT}/{CGROUP_PARENT}",
            *cgroups,
        ]


def wanted(node: Node, env: Environment | None) -> Wanted:
    work = node.workdir.rstrip("/")
    return Wanted(
        node=node,
        layout=(work, f"{work}/runs", node.cache_dir),
        agent=sync.agent_path(node),
        interpreter=sync.interpreter_path(node),
        runtime=sync.runtime_path(node) + ".complete",
        cache={"dir": node.cache_dir, "size": node.cache_size, "block_size": BLOCK_SIZE},
        env=env,
    )


@dataclass(frozen=True)
class Facts:
    present: dict[str, bool]
    python: str  # its path on the node; "" when not found
    uv: str  # "" when uv is not on the node
    cgroup: str  # v2 | v1 | none
    cgroup_writable: bool
    systemd: bool
    cache: dict[str, object] | None


def facts_command(want: Wanted) -> str:
    """One shell command printing key=value lines, then the current cache.json."""
    paths = " ".join(shell_path(p) for p in want.paths())
    cache_json = shell_path(f"{want.node.workdir.rstrip('/')}/cache.json")
    return "; ".join(
        [
            f"printf 'present='; for p in {paths}; do if [ -e \"$p\" ]; then printf 1; else printf 0; fi; done; echo",
            f"printf 'python=%s\\n' \"$(command -v {shell_path(want.node.python)})\"",
            "printf 'uv=%s\\n' \"$(command -v uv)\"",
            f"if [ -e {CGROUP_ROOT}/cgroup.controllers ]; then echo cgroup=v2; w={CGROUP_ROOT}; "
            f"elif [ -d {CGROUP_ROOT}/memory ]; then echo cgroup=v1; w={CGROUP_ROOT}/memory; else echo cgroup=none; w=/nonexistent; fi",
            'if [ -w "$w" ]; then echo cgroup_writable=1; else echo cgroup_writable=0; fi',
            'if [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ] && command -v systemd-run >/dev/null; then echo systemd=1; else echo systemd=0; fi',
            "echo cache=",
            f"cat {cache_json} 2>/dev/null; true",
        ]
    )


def parse_facts(want: Wanted, stdout: str) -> Facts:
    head, _, cache_text = stdout.partition("cache=\n")
    values = dict(line.split("=", 1) for line in head.splitlines() if "=" in line)
    bits = values.get("present", "")
    paths = want.paths()
    if len(bits) != len(paths):
        raise CommandError(f"{want.node.name}: provision facts were garbled", tail=stdout[-500:])
    try:
        cache = json.loads(cache_text) if cache_text.strip() else None
    except ValueError:
        cache = None  # a damaged file: rewrite it
    return Facts(
        present={p: b == "1" for p, b in zip(paths, bits)},
        python=values.get("python", ""),
        uv=values.get("uv", ""),
        cgroup=values.get("cgroup", "none"),
        cgroup_writable=values.get("cgroup_writable") == "1",
        systemd=values.get("systemd") == "1",
        cache=cache if isinstance(cache, dict) else None,
    )


# -- the plan (pure) ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    kind: str  # layout | agent | runtime | cache | cgroup | venv
    description: str
    paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    node: str
    steps: tuple[Step, ...]
    notes: tuple[str, ...] = ()  # what was left alone and why
    want: Wanted | None = field(default=None, compare=False, repr=False)
    facts: Facts | None = field(default=None, compare=False, repr=False)

    @property
    def empty(self) -> bool:
        return not self.steps


def cgroup_parents(facts: Facts) -> tuple[list[str], str | None]:
    """(parents to create, a note when the node has or allows none)."""
    if facts.cgroup == "none":
        return [], "no cgroups on this node: runs are fenced by process group only"
    if facts.cgroup == "v2" and facts.systemd:
        return [], None  # systemd makes ava.slice when the first run starts
    if not facts.cgroup_writable:
        return [], f"cgroup {facts.cgroup} is not writable here: runs are fenced by process group only"
    if facts.cgroup == "v2":
        parents = [f"{CGROUP_ROOT}/{CGROUP_PARENT}"]
    else:
        parents = [
            f"{CGROUP_ROOT}/{c}/{CGROUP_PARENT}" for c in V1_CONTROLLERS if facts.present.get(f"{CGROUP_ROOT}/{c}")
        ]
    return [p for p in parents if not facts.present.get(p)], None


def plan(want: Wanted, facts: Facts) -> Plan:
    """The steps still needed on one node; none when everything is in place."""
    node = want.node
    if not facts.python:
        raise CommandError(
            f"{node.name}: no {node.python} on the node; install Python 3.10+ or set python "
            "for this node in the inventory"
        )
    steps: list[Step] = []
    missing = [p for p in want.layout if not facts.present[p]]
    if missing:
        steps.append(Step("layout", "create " + ", ".join(missing), tuple(missing)))
    if not facts.present[want.agent]:
        steps.append(Step("agent", f"put the agent at {want.agent}", (want.agent, want.interpreter)))
    elif not facts.present[want.interpreter]:
        steps.append(Step("agent", f"note the agent's interpreter at {want.interpreter}", (want.interpreter,)))
    if not facts.present[want.runtime]:
        steps.append(Step("runtime", "sync the runtime modules", (want.runtime.removesuffix(".complete"),)))
    if facts.cache != want.cache:
        path = f"{node.workdir.rstrip('/')}/cache.json"
        steps.append(Step("cache", f"write {path} (dir {node.cache_dir}, size {node.cache_size})", (path,)))
    parents, note = cgroup_parents(facts)
    if parents:
        steps.append(Step("cgroup", "create the cgroup parent " + ", ".join(parents), tuple(parents)))
    if want.env is not None and want.ready and not facts.present[want.ready]:
        tool = "uv" if facts.uv else "pip"
        count = len([l for l in want.env.text.splitlines() if l and not l.startswith("-")])
        steps.append(
            Step(
                "venv",
                f"make the environment {venv_dir(node, want.env)} with {tool} "
                f"({count} requirement{'s' if count != 1 else ''})",
                (venv_dir(node, want.env),),
            )
        )
    return Plan(node.name, tuple(steps), (note,) if note else (), want, facts)


# -- gathering and applying (network) -----------------------------------------------------------


def plan_node(node: Node, *, recipe: Recipe | None = None, base: Path | None = None) -> Plan:
    want = wanted(node, environment(node, requirement_sources(node, recipe, base=base)))
    command = facts_command(want)
    result = connect(node).run(command, timeout=60)
    if not result.ok:
        raise CommandError(f"{node.name}: could not read provision facts (exit {result.exited})", tail=result.tail())
    found = plan(want, parse_facts(want, result.stdout))
    if not found.steps:  # the next launch's start checks that the facts still read so (guarded)
        launchcache.remember_ready_facts(node, command, _facts_output(result.stdout))
    return found


def _facts_output(stdout: str) -> str:
    """The facts command's own output, without what the login shell printed before it (an rc
    file's greeting): what `guarded` hashes on the node."""
    at = stdout.find("present=")
    return stdout[at:] if at >= 0 else stdout


# What a guarded command prints instead of running where the facts changed.
FACTS_CHANGED = "AVA-FACTS-CHANGED"


@dataclass(frozen=True)
class ReadyCheck:
    """The facts command for a node and recipe, and the sha256 of its output when it last
    found nothing to do there."""

    command: str
    digest: str


def ready_check(node: Node, *, recipe: Recipe | None = None, base: Path | None = None) -> ReadyCheck | None:
    """NODE's ReadyCheck for RECIPE when a check found it ready before (ava.launchcache), else
    None: then only `ensure` can say what it needs."""
    command = facts_command(wanted(node, environment(node, requirement_sources(node, recipe, base=base))))
    digest = launchcache.ready_facts(node, command)
    return ReadyCheck(command, digest) if digest is not None else None


def guarded(command: str, check: ReadyCheck) -> str:
    """Shell text running COMMAND only where the facts still read as when the node was last
    found ready, else printing FACTS_CHANGED and running nothing: a warm launch's provision
    check rides in its start (one trip), and a node that changed since is provisioned first."""
    expected = shlex.quote(f"{check.digest}  -")  # sha256sum's line for its stdin
    # The facts read no input: COMMAND's (a start's spec) is left for COMMAND.
    return f'if [ "$( ( {check.command} ) </dev/null | sha256sum)" = {expected} ]; then {command}; else echo {FACTS_CHANGED}; fi'


def plan_all(
    nodes: list[Node], *, recipe: Recipe | None = None, base: Path | None = None
) -> dict[str, Plan | AvaError]:
    return run_all(nodes, lambda node: plan_node(node, recipe=recipe, base=base))


def _run(node: Node, command: str, what: str, timeout: float = 600) -> None:
    result = connect(node).run(command, timeout=timeout)
    if not result.ok:
        raise CommandError(f"{node.name}: {what} failed (exit {result.exited})", tail=result.tail())


def _make_venv(node: Node, want: Wanted, facts: Facts) -> None:
    """Make the venv under its lock (`<venv>.lock`, flock on the node): a concurrent provisioner
    of the same requirements either finished it (`.ava-ready` is there: nothing to do) or is
    still installing into it, and is waited for rather than removed from under it. The agent
    (an earlier step) holds the lock and sees the node venv's packages from the new one."""
    env = want.env
    assert env is not None
    transport = connect(node)
    for upload in env.uploads:
        transport.put(upload.local, upload.remote)
    folder = venv_dir(node, env)
    q = shell_path(folder)
    python = shell_path(node.python)
    # Beside the venv, not in it: the venv may be removed and remade once the lock is held.
    staged = f"{folder}.requirements-{secrets.token_hex(4)}.txt"
    transport.put(env.text.encode(), staged)
    if facts.uv:
        create = f"uv venv --quiet --system-site-packages --python {python} {q}"
        install = f"uv pip install --quiet --python {q}/bin/python -r {shell_path(staged)}"
    else:
        # System site-packages: the venv sees the node's torch, and the node's pip runs inside it.
        create = f"{python} -m venv --without-pip --system-site-packages {q}"
        install = (
            f"{q}/bin/python -m pip install --no-input --disable-pip-version-check --quiet -r {shell_path(staged)}"
        )
    build = " && ".join(
        [
            # Under the lock, a venv without .ava-ready is one whose provisioner died: start it over.
            f"rm -rf {q}",
            create,
            sync.agent_command(node, "node-site", folder),
            install,
            f"cp {shell_path(staged)} {shell_path(folder + '/requirements.txt')}",
            f"printf '%s\\n' {env.hash} > {shell_path(folder + '/' + READY)}",
        ]
    )
    locked = sync.agent_command(node, "tree", "locked", folder + ".lock", f"{folder}/{READY}", build)
    try:
        _run(node, locked, "making the environment")
    finally:
        connect(node).run(f"rm -f {shell_path(staged)}", timeout=60)


def apply_step(node: Node, step: Step, want: Wanted, facts: Facts) -> None:
    if step.kind == "layout":
        _run(node, "mkdir -p " + " ".join(shell_path(p) for p in step.paths), "creating the workdir layout")
    elif step.kind == "agent":
        sync.ship_agent(node)
    elif step.kind == "runtime":
        sync.ship_runtime(node)
    elif step.kind == "cache":
        data = json.dumps(want.cache, sort_keys=True).encode()
        connect(node).put(data, step.paths[0])
    elif step.kind == "cgroup":
        command = "mkdir -p " + " ".join(shlex.quote(p) for p in step.paths)
        if facts.cgroup == "v2":
            # A controller reaches a child only if every ancestor enables it; best effort.
            for folder in (CGROUP_ROOT, f"{CGROUP_ROOT}/{CGROUP_PARENT}"):
                for ctrl in V2_CONTROLLERS:
                    command += f"; echo +{ctrl} > {folder}/cgroup.subtree_control 2>/dev/null"
            command += "; true"
        _run(node, command, "creating the cgroup parent")
    elif step.kind == "venv":
        _make_venv(node, want, facts)
    else:  # pragma: no cover - plan() makes only the kinds above
        raise ValueError(step.kind)


@dataclass(frozen=True)
class PlanResult:
    node: str
    plan: Plan
    applied: tuple[str, ...]  # step kinds done, in order

    @property
    def changed(self) -> bool:
        return bool(self.applied)


def apply(plan_: Plan, node: Node, on_step: StepCallback | None = None) -> PlanResult:
    assert plan_.want is not None and plan_.facts is not None
    done: list[str] = []
    for step in plan_.steps:
        if on_step:
            on_step(node.name, step, "start")
        try:
            apply_step(node, step, plan_.want, plan_.facts)
        except AvaError:
            if on_step:
                on_step(node.name, step, FAILED)
            raise
        done.append(step.kind)
        if on_step:
            on_step(node.name, step, "done")
    return PlanResult(node.name, plan_, tuple(done))


def apply_all(
    nodes: list[Node], plans: dict[str, Plan], on_step: StepCallback | None = None
) -> dict[str, PlanResult | AvaError]:
    chosen = [n for n in nodes if n.name in plans]
    return run_all(chosen, lambda node: apply(plans[node.name], node, on_step))


def ensure(
    nodes: list[Node], *, recipe: Recipe | None = None, base: Path | None = None, on_step: StepCallback | None = None
) -> dict[str, PlanResult | AvaError]:
    """Make every node ready for a run of RECIPE: one facts round trip each, and the missing
    steps only. `ava train` calls this before launching."""

    def one(node: Node) -> PlanResult:
        return apply(plan_node(node, recipe=recipe, base=base), node, on_step)

    return run_all(nodes, one)
