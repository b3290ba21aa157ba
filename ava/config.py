"""The inventory (`ava.toml`) and recipe TOML files -> frozen, typed objects.

Strict on purpose: an unknown key, a wrong type or a bad value is a ConfigError whose text is one
line, `FILE: dotted.key: problem`, before anything touches a node.

Units, as both formats write them:
- sizes: a whole number of bytes, or a number and a unit spelled exactly as here: B, KB MB GB TB
  (powers of 1000), KiB MiB GiB TiB (powers of 1024): "100GiB", "1.5 GB", 512.
- durations: seconds as a number (90, 1.5), or a string of number+unit parts from ms s m h d:
  "90s", "10m", "1h30m", "500ms". Units are lower case ("10M" is refused rather than guessed).

Recipe `env` values are strings; an integer (`OMP_NUM_THREADS = 1`) is taken as its decimal text,
while floats and booleans are refused since their text would not survive as written (quote them).
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
import string
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ava.errors import ConfigError
from ava.units import parse_duration, parse_size
from ava.units import show as _show

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
NAME_RULE = "1-63 letters, digits, '_', '.' or '-', starting with a letter or digit"
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BARE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://\S+$")
# Words that would be read as options or split by a shell: never a host, user or label.
_WORD_RE = re.compile(r"^[^\s\-@'\"`$;&|<>\\][^\s@'\"`$;&|<>\\]*$")
_IFACE_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")

# Set by torchrun or by ava's placement for every rank; a recipe may not override them.
RESERVED_ENV = frozenset(
    [
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "GROUP_WORLD_SIZE",
        "ROLE_RANK",
        "ROLE_WORLD_SIZE",
        "ROLE_NAME",
        "MASTER_ADDR",
        "MASTER_PORT",
        "CUDA_VISIBLE_DEVICES",
    ]
)

TRANSPORTS = ("ssh", "local")
HOST_KEY_POLICIES = ("strict", "accept-new")
NODE_LOSS_POLICIES = ("replace", "shrink", "fail")


# ---------------------------------------------------------------------------------------------
# The objects


@dataclass(frozen=True)
class Requirements:
    """What a Python environment needs: pip requirement strings, or a requirements file."""

    packages: tuple[str, ...] = ()
    file: str | None = None  # as written; a recipe's is relative to its root


@dataclass(frozen=True)
class Node:
    name: str
    transport: str = "ssh"  # "ssh" | "local"
    host: str | None = None
    user: str | None = None  # None: ~/.ssh/config's, else the current user
    port: int = 22
    identity: str | None = None  # a private key on this machine, as written
    workdir: str = "~/.ava"  # on the node; `~` is the node user's home
    python: str = "python3"
    cache_dir: str = "~/.ava/cache"
    cache_size: int = 100 * 2**30
    interface: str = "auto"
    host_keys: str = "strict"  # "strict" | "accept-new"
    known_hosts: str = "~/.ssh/known_hosts"
    connect_timeout: float = 10.0
    gpus: tuple[int, ...] = ()
    labels: tuple[str, ...] = ()
    requirements: Requirements | None = None
    # A node-wide GPU ledger directory on the node, shared by every workdir that names it
    # (several users: make it group-writable for their group). None: WORKDIR's own ledger.
    ledger: str | None = None

    @property
    def address(self) -> str:
        """Where the node is, for messages: "host:port", or "local"."""
        if self.transport == "local" or self.host is None:
            return "local"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Inventory:
    path: Path
    nodes: dict[str, Node]  # in file order

    def select(self, names: Sequence[str]) -> list[Node]:
        """The named nodes, in the order given; an unknown or repeated name is a ConfigError."""
        chosen: list[Node] = []
        for name in names:
            if name not in self.nodes:
                known = ", ".join(self.nodes)
                raise ConfigError(str(self.path), _key("nodes", name), f"no such node (known: {known})")
            if any(node.name == name for node in chosen):
                raise ConfigError(str(self.path), _key("nodes", name), "node named twice")
            chosen.append(self.nodes[name])
        return chosen


@dataclass(frozen=True)
class RunSpec:
    script: str | None = None  # relative to the recipe's root
    module: str | None = None
    args: tuple[str, ...] = ()
    requirements: Requirements | None = None


@dataclass(frozen=True)
class Resources:
    nodes_min: int = 1
    nodes_max: int = 1
    procs_per_node: int | None = None
    gpus_per_node: int = 0
    memory: int | None = None  # bytes, per node
    cpus: float | None = None  # per node
    pids: int | None = None  # per node
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class Data:
    prefetch: tuple[str, ...] = ()


@dataclass(frozen=True)
class Checkpoint:
    dir: str | None = None  # may hold {name} and {run}
    keep: int = 3


@dataclass(frozen=True)
class Failover:
    max_restarts: int = 3
    on_node_loss: str = "replace"  # replace | shrink | fail
    hang_timeout: float = 600.0
    fatal_exit_codes: tuple[int, ...] = (2,)
    backoff: float = 2.0
    # Two attempts in a row failing before any progress with the same signature: no retry.
    stop_repeated_startup_failure: bool = True


@dataclass(frozen=True)
class Recipe:
    name: str
    source: str  # the path or URL it came from
    root: str  # the directory or URL prefix holding its code
    run: RunSpec
    resources: Resources = field(default_factory=Resources)
    env: dict[str, str] = field(default_factory=dict)
    data: Data = field(default_factory=Data)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    failover: Failover = field(default_factory=Failover)
    raw: dict = field(default_factory=dict)  # merged TOML after --set overrides
    description: str = ""

    def procs(self) -> int:
        """Processes per node: procs_per_node, else one per GPU, else 1 on CPU."""
        return self.resources.procs_per_node or self.resources.gpus_per_node or 1


# ---------------------------------------------------------------------------------------------
# Keys and values in messages


def _key(*parts: str | int) -> str:
    """A dotted key as TOML would write it: nodes."gpu 1".port, failover.fatal_exit_codes[0]."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        text = part if _BARE_KEY_RE.match(part) else '"' + part.replace('"', '\\"') + '"'
        out = f"{out}.{text}" if out else text
    return out


def _unknown(source: str, key: str, known: Sequence[str]) -> ConfigError:
    name = key.rsplit(".", 1)[-1]
    # A key the typo starts ("gpus" for gpus_per_node) beats the closest spelling ("cpus").
    close = [k for k in known if k.startswith(name)][:1] or difflib.get_close_matches(name, known, 1)
    hint = f'did you mean "{close[0]}"?' if close else "known keys: " + ", ".join(sorted(known))
    return ConfigError(source, key, f"unknown key; {hint}")


# ---------------------------------------------------------------------------------------------
# Typed reads of one table


class _Fields:
    """Typed, strict reads of a TOML table; `where[k]` is the dotted key that messages show."""

    def __init__(self, source: str, values: Mapping[str, Any], where: Mapping[str, str]) -> None:
        self.source, self.values, self.where = source, values, where

    def has(self, name: str) -> bool:
        return name in self.values

    def key(self, name: str) -> str:
        return self.where[name]

    def fail(self, name: str, problem: str, index: int | None = None) -> ConfigError:
        """The error for a value, or with `index` for one item of a list (`key[index]`)."""
        where = self.key(name) if index is None else f"{self.key(name)}[{index}]"
        return ConfigError(self.source, where, problem)

    def _typed(self, name: str, types: tuple[type, ...], what: str) -> Any:
        value = self.values[name]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise self.fail(name, f"expected {what}, got {_show(value)}")
        return value

    def text(self, name: str, default: Any, *, pattern: re.Pattern[str] | None = None, rule: str = "") -> Any:
        if name not in self.values:
            return default
        value = self._typed(name, (str,), "a string")
        if not value.strip():
            raise self.fail(name, "must not be empty")
        if "\n" in value or "\0" in value:
            raise self.fail(name, "must be one line")
        if pattern is not None and not pattern.match(value):
            raise self.fail(name, f"{rule}, got {_show(value)}")
        return value

    def choice(self, name: str, default: str, choices: Sequence[str]) -> str:
        value = self.text(name, default)
        if value not in choices:
            raise self.fail(name, f"expected one of {', '.join(choices)}; got {_show(value)}")
        return value

    def integer(self, name: str, default: Any, *, low: int = 0, high: int | None = None) -> Any:
        if name not in self.values:
            return default
        value = self._typed(name, (int,), "an integer")
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise self.fail(name, f"must be {bound}, got {value}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        if name not in self.values:
            return default
        return bool(self._typed(name, (bool,), "true or false"))

    def number(self, name: str, default: Any) -> Any:
        if name not in self.values:
            return default
        value = self._typed(name, (int, float), "a number")
        if not math.isfinite(value) or value <= 0:
            raise self.fail(name, f"must be a positive number, got {_show(value)}")
        return float(value)

    def size(self, name: str, default: Any, *, positive: bool = False) -> Any:
        if name not in self.values:
            return default
        value = parse_size(self.values[name], source=self.source, key=self.key(name))
        if positive and value == 0:
            raise self.fail(name, "must be more than 0 bytes")
        return value

    def duration(self, name: str, default: float, *, positive: bool = False) -> float:
        if name not in self.values:
            return default
        value = parse_duration(self.values[name], source=self.source, key=self.key(name))
        if positive and value == 0:
            raise self.fail(name, "must be longer than 0s")
        return value

    def items(self, name: str, default: tuple, kind: type, what: str, each: str) -> tuple:
        """A list (`what`) whose items (`each`) all have `kind`; an item's error says key[i]."""
        if name not in self.values:
            return default
        values = self._typed(name, (list,), what)
        for index, item in enumerate(values):
            if (isinstance(item, bool) and kind is not bool) or not isinstance(item, kind):
                raise self.fail(name, f"expected {each}, got {_show(item)}", index)
        return tuple(values)

    def words(self, name: str, default: tuple[str, ...], *, what: str) -> tuple[str, ...]:
        """A list of distinct, non-empty strings without spaces (labels)."""
        values = self.items(name, default, str, "a list of strings", "a string")
        for index, value in enumerate(values):
            if not _WORD_RE.match(value):
                raise self.fail(name, f"not a valid {what}: {_show(value)} (no spaces or quotes)", index)
            if value in values[:index]:
                raise self.fail(name, f"{_show(value)} is listed twice", index)
        return values

    def requirements(self, name: str) -> Requirements | None:
        if name not in self.values:
            return None
        value = self.values[name]
        if isinstance(value, str):
            return Requirements(file=self.text(name, None))
        packages = self.items(name, (), str, "a requirements file path or a list of pip requirements", "a string")
        for index, package in enumerate(packages):
            # Options belong in a requirements file, where pip reads them as such.
            if not package.strip() or package.lstrip().startswith("-") or "\n" in package:
                raise self.fail(
                    name,
                    f'expected a pip requirement like "numpy>=1.26", got {_show(package)} '
                    "(put pip options in a requirements file)",
                    index,
                )
        return Requirements(packages=packages)


def _check_table(source: str, value: Any, key: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(source, key, f"expected a table, got {_show(value)}")
    return value


def _check_keys(source: str, table: Mapping[str, Any], known: Iterable[str], *prefix: str) -> None:
    known = list(known)
    for name in table:
        if name not in known:
            raise _unknown(source, _key(*prefix, name), known)


def _fields(source: str, table: Mapping[str, Any], known: Iterable[str], *prefix: str) -> _Fields:
    _check_keys(source, table, known, *prefix)
    return _Fields(source, table, {name: _key(*prefix, name) for name in table})


def _load_toml(text: str, source: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        at = re.search(r"\s*\(at (line \d+, column \d+|end of document)\)\s*$", message)
        where = at.group(1) if at else ""
        problem = message[: at.start()] if at else message
        problem = problem[:1].lower() + problem[1:]
        raise ConfigError(source, where, f"invalid TOML: {problem}") from None


def _read(path: Path, source: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(source, "", "not a UTF-8 text file") from None
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------------
# The inventory

_NODE_KEYS = tuple(
    [
        "transport",
        "host",
        "user",
        "port",
        "identity",
        "workdir",
        "python",
        "cache_dir",
        "cache_size",
        "interface",
        "host_keys",
        "known_hosts",
        "connect_timeout",
        "gpus",
        "labels",
        "requirements",
        "ledger",
    ]
)
# `host` names one node, so it has no default.
_DEFAULT_KEYS = tuple(k for k in _NODE_KEYS if k != "host")

_NODE_DEFAULTS = Node(name="")  # the documented defaults live on the dataclass
_IFACE_RULE = 'expected "auto" or a network interface name like "eth0"'
_LEDGER_RE = re.compile(r"^(/|~/)[^\0]+$")
_LEDGER_RULE = 'expected a directory on the node like "/var/lib/ava/leases"'
_ADD_NODES = 'add a [nodes.NAME] table per node (the smallest: [nodes.local] transport = "local")'


def find_inventory(explicit: str | None) -> Path:
    """--inventory PATH, else $AVA_INVENTORY, else ./ava.toml; it must exist."""
    if explicit:
        path, how = Path(explicit), "given with --inventory"
    elif os.environ.get("AVA_INVENTORY"):
        path, how = Path(os.environ["AVA_INVENTORY"]), "named by $AVA_INVENTORY"
    else:
        path, how = Path("ava.toml"), "looked for in the current directory"
    if path.is_dir():
        raise ConfigError(str(path), "", f"is a directory ({how}); expected an inventory file")
    if not path.exists():
        raise ConfigError(
            str(path),
            "",
            f"no inventory ({how}); create it and {_ADD_NODES}, or pass --inventory PATH or set $AVA_INVENTORY",
        )
    return path


def load_inventory(explicit: str | None = None) -> Inventory:
    path = find_inventory(explicit)
    inventory = parse_inventory(_read(path, str(path)), str(path))
    return Inventory(path=path, nodes=inventory.nodes)


def parse_inventory(text: str, source: str) -> Inventory:
    data = _load_toml(text, source)
    _check_keys(source, data, ("defaults", "nodes"))
    defaults = _check_table(source, data.get("defaults", {}), "defaults")
    if "host" in defaults:  # _DEFAULT_KEYS lacks it; say why rather than "unknown key"
        raise ConfigError(source, "defaults.host", "each node has its own host; set it per node")
    _check_keys(source, defaults, _DEFAULT_KEYS, "defaults")
    nodes = _check_table(source, data.get("nodes", {}), "nodes")
    if not nodes:
        raise ConfigError(source, "nodes", f"no nodes; {_ADD_NODES}")
    parsed: dict[str, Node] = {}
    for name, table in nodes.items():
        parsed[name] = _parse_node(source, name, table, defaults)
    return Inventory(path=Path(source), nodes=parsed)


def _parse_node(source: str, name: str, table: Any, defaults: Mapping[str, Any]) -> Node:
    if not NAME_RE.match(name):
        raise ConfigError(source, _key("nodes", name), f"a node name is {NAME_RULE}")
    table = _check_table(source, table, _key("nodes", name))
    _check_keys(source, table, _NODE_KEYS, "nodes", name)
    # A node's own value wins over [defaults]; a message names wherever the value was written.
    values = {**defaults, **table}
    where = {k: _key("defaults", k) for k in defaults} | {k: _key("nodes", name, k) for k in table}
    where.setdefault("host", _key("nodes", name, "host"))
    f = _Fields(source, values, where)
    d = _NODE_DEFAULTS

    transport = f.choice("transport", d.transport, TRANSPORTS)
    host = f.text("host", None, pattern=_WORD_RE, rule="expected a host name or address (no spaces, no user@)")
    if transport == "ssh" and host is None:
        raise f.fail(
            "host",
            'missing; an ssh node needs host = "NAME-OR-ADDRESS" (or transport = "local" for this computer)',
        )
    if transport == "local" and host is not None:
        raise f.fail(
            "host",
            'a local node runs on this computer and takes no host; remove it or use transport = "ssh"',
        )
    return Node(
        name=name,
        transport=transport,
        host=host,
        user=f.text("user", d.user, pattern=_WORD_RE, rule="expected a user name"),
        port=f.integer("port", d.port, low=1, high=65535),
        identity=f.text("identity", d.identity),
        workdir=f.text("workdir", d.workdir),
        python=f.text("python", d.python),
        cache_dir=f.text("cache_dir", d.cache_dir),
        cache_size=f.size("cache_size", d.cache_size),
        interface=f.text("interface", d.interface, pattern=_IFACE_RE, rule=_IFACE_RULE),
        host_keys=f.choice("host_keys", d.host_keys, HOST_KEY_POLICIES),
        known_hosts=f.text("known_hosts", d.known_hosts),
        connect_timeout=f.duration("connect_timeout", d.connect_timeout, positive=True),
        gpus=_parse_gpus(f),
        labels=f.words("labels", (), what="label"),
        requirements=f.requirements("requirements"),
        ledger=f.text("ledger", d.ledger, pattern=_LEDGER_RE, rule=_LEDGER_RULE),
    )


def _parse_gpus(f: _Fields) -> tuple[int, ...]:
    """`gpus = 8` means indices 0..7; a list names the indices (distinct, >= 0)."""
    if not f.has("gpus"):
        return ()
    value = f.values["gpus"]
    if isinstance(value, int) and not isinstance(value, bool):
        return tuple(range(f.integer("gpus", 0, low=0, high=1024)))
    indices = f.items("gpus", (), int, "a GPU count or a list of GPU indices", "an integer")
    for index, gpu in enumerate(indices):
        if gpu < 0:
            raise f.fail("gpus", f"a GPU index must be 0 or more, got {gpu}", index)
        if gpu in indices[:index]:
            raise f.fail("gpus", f"GPU {gpu} is listed twice", index)
    return indices


# ---------------------------------------------------------------------------------------------
# Recipes

# The recipe's tables and their keys; [env] takes any variable name.
_RECIPE_TABLES: dict[str, tuple[str, ...] | None] = {
    "run": ("script", "module", "args", "requirements"),
    "resources": ("nodes", "procs_per_node", "gpus_per_node", "memory", "cpus", "pids", "labels"),
    "env": None,
    "data": ("prefetch",),
    "checkpoint": ("dir", "keep"),
    "failover": (
        "max_restarts",
        "on_node_loss",
        "hang_timeout",
        "fatal_exit_codes",
        "backoff",
        "stop_repeated_startup_failure",
    ),
}
_RECIPE_KEYS = ("name", "description", *_RECIPE_TABLES)
# A `--set` value for these keys (and env.*) is text as written, so "3e-4" stays "3e-4"; for the
# others it is a TOML value when it parses (4, true, ["a"]) and text otherwise ("2:4", "8GiB").
_TEXT_KEYS = frozenset({"name", "description", "run.script", "run.module", "checkpoint.dir", "failover.on_node_loss"})


def _toml_value(text: str) -> tuple[bool, Any]:
    """(True, value) when `text` is one TOML value, else (False, None)."""
    try:
        parsed = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return False, None
    return (True, parsed["v"]) if list(parsed) == ["v"] else (False, None)


def apply_override(raw: dict, assignment: str, source: str) -> None:
    """Apply one `--set dotted.key=value` to the recipe's TOML data, in place."""
    dotted, eq, text = assignment.partition("=")
    dotted = dotted.strip()
    if not eq or not dotted:
        raise ConfigError(source, f"--set {assignment}", "expected KEY=VALUE like resources.nodes=4")
    section, *rest = dotted.split(".")
    if section not in _RECIPE_KEYS:
        raise _unknown(source, f"--set {section}", _RECIPE_KEYS)
    if not rest:
        if section in _RECIPE_TABLES:  # a whole table, written inline: env={A = "1"}
            ok, value = _toml_value(text)
            if not ok or not isinstance(value, dict):
                raise ConfigError(source, f"--set {section}", 'expected a table like {K = "v"}')
            raw[section] = value
        else:
            raw[section] = _override_value(text, as_text=True)
        return
    if section not in _RECIPE_TABLES or len(rest) > 1:
        parent = ".".join([section, *rest][:-1])
        raise ConfigError(source, f"--set {dotted}", f"{parent} is not a table")
    keys = _RECIPE_TABLES[section]
    if keys is not None and rest[0] not in keys:
        raise _unknown(source, f"--set {section}.{rest[0]}", keys)
    table = _check_table(source, raw.setdefault(section, {}), section)
    table[rest[0]] = _override_value(text, as_text=keys is None or dotted in _TEXT_KEYS)


def _override_value(text: str, *, as_text: bool) -> Any:
    ok, value = _toml_value(text)
    if as_text:
        # Quoted text is a TOML string; anything else is taken exactly as written.
        return value if ok and isinstance(value, str) else text
    return value if ok else text


def load_recipe(path: str, overrides: Sequence[str] = ()) -> Recipe:
    """A local recipe: a recipe.toml file, or a directory that holds one."""
    given = Path(path)
    file = given / "recipe.toml" if given.is_dir() else given
    source = str(file)
    if not file.exists():
        what = "no recipe.toml in this directory" if given.is_dir() else "no such file"
        raise ConfigError(source, "", f"{what}; expected a recipe TOML file or its directory")
    root = file.resolve().parent
    recipe = parse_recipe(_read(file, source), source, str(root), overrides)
    if recipe.run.script is not None and not (root / recipe.run.script).is_file():
        missing = _show(recipe.run.script)
        raise ConfigError(source, "run.script", f"no file {missing} beside the recipe")
    return recipe


def parse_recipe(text: str, source: str, root: str, overrides: Sequence[str] = ()) -> Recipe:
    raw = _load_toml(text, source)
    for assignment in overrides:
        apply_override(raw, assignment, source)
    overridden = {a.partition("=")[0].strip() for a in overrides}
    try:
        return _parse_recipe(raw, source, root)
    except ConfigError as exc:
        # A bad value that came from the command line is named as such.
        if any(exc.key == k or exc.key.startswith((k + ".", k + "[")) for k in overridden):
            raise ConfigError(source, f"--set {exc.key}", exc.problem) from None
        raise


def _parse_recipe(raw: dict, source: str, root: str) -> Recipe:
    top = _fields(source, raw, _RECIPE_KEYS)
    sections = {name: _check_table(source, raw.get(name, {}), name) for name in _RECIPE_TABLES}
    if not top.has("name"):
        raise ConfigError(source, "name", 'missing; add name = "my-recipe" at the top of the file')
    name = top.text("name", None, pattern=NAME_RE, rule=f"expected {NAME_RULE}")
    return Recipe(
        name=name,
        source=source,
        root=root,
        run=_parse_run(source, sections["run"]),
        resources=_parse_resources(source, sections["resources"]),
        env=_parse_env(source, sections["env"]),
        data=_parse_data(source, sections["data"]),
        checkpoint=_parse_checkpoint(source, sections["checkpoint"]),
        failover=_parse_failover(source, sections["failover"]),
        raw=copy.deepcopy(raw),
        description=top.text("description", ""),
    )


def _parse_run(source: str, table: dict) -> RunSpec:
    f = _fields(source, table, _RECIPE_TABLES["run"] or (), "run")
    script = f.text("script", None)
    module = f.text("module", None, pattern=_MODULE_RE, rule="expected a module like pkg.train")
    if (script is None) == (module is None):
        problem = "has both script and module" if script else "missing script or module"
        hint = 'give exactly one: script = "train.py" or module = "pkg.train"'
        raise ConfigError(source, "run", f"{problem}; {hint}")
    # The code is shipped from the recipe's directory, so the script must lie inside it.
    if script is not None and (Path(script).is_absolute() or ".." in Path(script).parts or script.startswith("~")):
        raise f.fail("script", f"must be a path inside the recipe's directory, got {_show(script)}")
    # torchrun would parse a leading "-" as its own option (e.g. --rdzv-endpoint=...).
    if script is not None and script.startswith("-"):
        raise f.fail(
            "script",
            f'must not begin with "-" (torchrun would read it as an option), '
            f'got {_show(script)}; write "./{script}" for such a file name',
        )
    return RunSpec(
        script=script,
        module=module,
        args=f.items("args", (), str, "a list of strings", 'a string (quote numbers: "200")'),
        requirements=f.requirements("requirements"),
    )


def _parse_resources(source: str, table: dict) -> Resources:
    f = _fields(source, table, _RECIPE_TABLES["resources"] or (), "resources")
    low, high = _parse_node_range(f)
    return Resources(
        nodes_min=low,
        nodes_max=high,
        procs_per_node=f.integer("procs_per_node", None, low=1),
        gpus_per_node=f.integer("gpus_per_node", 0, low=0),
        memory=f.size("memory", None, positive=True),
        cpus=f.number("cpus", None),
        pids=f.integer("pids", None, low=1),
        labels=f.words("labels", (), what="label"),
    )


def _parse_node_range(f: _Fields) -> tuple[int, int]:
    """`nodes = 2` or `nodes = "2:4"` (an elastic range); at least one node."""
    if not f.has("nodes"):
        return 1, 1
    value = f.values["nodes"]
    rule = 'expected a node count like 2 or a range like "2:4"'
    if isinstance(value, int) and not isinstance(value, bool):
        count = f.integer("nodes", 1, low=1)
        return count, count
    if not isinstance(value, str):
        raise f.fail("nodes", f"{rule}, got {_show(value)}")
    match = re.fullmatch(r"\s*(\d+)\s*(?::\s*(\d+)\s*)?", value)
    if not match:
        raise f.fail("nodes", f"{rule}, got {_show(value)}")
    low = int(match.group(1))
    high = int(match.group(2)) if match.group(2) else low
    if low < 1 or high < low:
        raise f.fail("nodes", f"need 1 <= MIN <= MAX, got {_show(value)}")
    return low, high


def _parse_env(source: str, table: dict) -> dict[str, str]:
    env: dict[str, str] = {}
    for name, value in table.items():
        key = _key("env", name)
        if not _ENV_NAME_RE.match(name):
            raise ConfigError(source, key, "not a valid variable name (letters, digits, _)")
        if name in RESERVED_ENV or name.startswith("TORCHELASTIC_"):
            raise ConfigError(source, key, "set by torchrun or ava for each rank; not settable")
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            hint = f' (quote it: {name} = "...")' if isinstance(value, (bool, float)) else ""
            raise ConfigError(source, key, f"expected a string, got {_show(value)}{hint}")
        if "\0" in value:
            raise ConfigError(source, key, "must not contain a NUL character")
        env[name] = value
    return env


def _parse_data(source: str, table: dict) -> Data:
    f = _fields(source, table, _RECIPE_TABLES["data"] or (), "data")
    urls = f.items("prefetch", (), str, "a list of URLs", "a URL string")
    for index, url in enumerate(urls):
        if not _URL_RE.match(url):
            example = '"s3://bucket/shards/*.tar"'
            raise f.fail("prefetch", f"expected a URL like {example}, got {_show(url)}", index)
    return Data(prefetch=urls)


def _parse_checkpoint(source: str, table: dict) -> Checkpoint:
    f = _fields(source, table, _RECIPE_TABLES["checkpoint"] or (), "checkpoint")
    where = f.text("dir", None)
    if where is not None:
        try:
            fields = [(n, spec, conv) for _, n, spec, conv in string.Formatter().parse(where)]
        except ValueError as exc:
            raise f.fail("dir", f"bad braces in {_show(where)} ({exc})") from None
        for name, spec, conversion in fields:
            if name is not None and (name not in ("name", "run") or spec or conversion):
                only = "only {name} and {run} expand"
                raise f.fail("dir", f"unknown placeholder in {_show(where)}; {only}")
    return Checkpoint(dir=where, keep=f.integer("keep", Checkpoint().keep, low=1))


def _parse_failover(source: str, table: dict) -> Failover:
    f = _fields(source, table, _RECIPE_TABLES["failover"] or (), "failover")
    d = Failover()
    codes = f.items("fatal_exit_codes", d.fatal_exit_codes, int, "a list of exit codes", "an integer")
    for index, code in enumerate(codes):
        if not 0 < code < 256:
            raise f.fail("fatal_exit_codes", f"an exit code is 1-255, got {code}", index)
    return Failover(
        max_restarts=f.integer("max_restarts", d.max_restarts, low=0),
        on_node_loss=f.choice("on_node_loss", d.on_node_loss, NODE_LOSS_POLICIES),
        hang_timeout=f.duration("hang_timeout", d.hang_timeout, positive=True),
        fatal_exit_codes=codes,
        backoff=f.duration("backoff", d.backoff),
        stop_repeated_startup_failure=f.flag("stop_repeated_startup_failure", d.stop_repeated_startup_failure),
    )
