"""The inventory (`ava.toml`) and recipe TOML files -> frozen, typed objects.

Strict on purpose: an unknown key, a wrong type or a bad value is a ConfigError whose text is one
line, `FILE: dotted.key: problem`, before anything touches a node.

Each key is declared once, on the dataclass field it sets (`_field` and the helpers beside it):
that declaration gives the table's key set, the unknown-key check with its "did you mean", the
`--set` rules and the typed read. Sizes and durations are read by ava.units, which states their
grammar and case rules ("100gib" and "10M" are refused with the spelling meant).

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ava.errors import ConfigError
from ava.units import parse_duration as parse_duration  # re-exported: callers read durations from here too
from ava.units import parse_size as parse_size
from ava.units import show as _show

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

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

_IFACE_RULE = 'expected "auto" or a network interface name like "eth0"'
_LEDGER_RE = re.compile(r"^(/|~/)[^\0]+$")
_LEDGER_RULE = 'expected a directory on the node like "/var/lib/ava/leases"'

D = TypeVar("D")
V = TypeVar("V")
T = TypeVar("T", bound="DataclassInstance")


# ---------------------------------------------------------------------------------------------
# Keys: a dataclass field that a TOML key sets says so once, with how its value is read; the
# key set, the unknown-key check, `--set` and the object's construction all come from that.

Read = Callable[["_Fields", str, Any], Any]  # (the table's reads, the key, its default) -> the value

_KEY = "ava.config.key"  # field metadata: the field's _TomlKey
_TABLE = "ava.config.table"  # field metadata on Recipe: the table's dataclass (None: [env], any name)


@dataclass(frozen=True)
class _TomlKey:
    read: Read
    name: str | None = None  # the TOML key, where it is not the field's name
    text: bool = False  # a `--set` value for it is text as written, so "3e-4" stays "3e-4"


def _field(default: Any, read: Read, *, name: str | None = None, text: bool = False) -> Any:
    return field(default=default, metadata={_KEY: _TomlKey(read, name, text)})


def _text(default: str | None, *, pattern: re.Pattern[str] | None = None, rule: str = "") -> Any:
    return _field(default, lambda f, k, d: f.text(k, d, pattern=pattern, rule=rule), text=True)


def _choice(default: str, choices: Sequence[str]) -> Any:
    return _field(default, lambda f, k, d: f.choice(k, d, choices), text=True)


def _integer(default: int | None, *, low: int = 0, high: int | None = None) -> Any:
    return _field(default, lambda f, k, d: f.integer(k, d, low=low, high=high))


def _size(default: int | None, *, positive: bool = False) -> Any:
    return _field(default, lambda f, k, d: f.size(k, d, positive=positive))


def _duration(default: float, *, positive: bool = False) -> Any:
    return _field(default, lambda f, k, d: f.duration(k, d, positive=positive))


def _labels() -> Any:
    return _field((), lambda f, k, d: f.words(k, d, what="label"))


def _default(item: Field[Any]) -> Any:
    if item.default is not MISSING:
        return item.default
    if item.default_factory is not MISSING:
        return item.default_factory()
    return None


def _keys(cls: type) -> tuple[str, ...]:
    """The TOML keys of a dataclass's table, in field order (a key may set several fields)."""
    names = (key.name or item.name for item in fields(cls) if (key := item.metadata.get(_KEY)) is not None)
    return tuple(dict.fromkeys(names))


def _build(cls: type[T], f: _Fields, **given: Any) -> T:
    """The object, every key read in field order (a reader may look at `f.got`, those before it)."""
    for item in fields(cls):
        key = item.metadata.get(_KEY)
        if key is not None:
            f.got[item.name] = key.read(f, key.name or item.name, _default(item))
    return cls(**given, **f.got)


# ---------------------------------------------------------------------------------------------
# The objects


@dataclass(frozen=True)
class Requirements:
    """What a Python environment needs: pip requirement strings, or a requirements file."""

    packages: tuple[str, ...] = ()
    file: str | None = None  # as written; a recipe's is relative to its root


def _read_host(f: _Fields, key: str, default: str | None) -> str | None:
    host = f.text(key, default, pattern=_WORD_RE, rule="expected a host name or address (no spaces, no user@)")
    if f.got["transport"] == "ssh" and host is None:
        raise f.fail(
            key,
            'missing; an ssh node needs host = "NAME-OR-ADDRESS" (or transport = "local" for this computer)',
        )
    if f.got["transport"] == "local" and host is not None:
        raise f.fail(
            key,
            'a local node runs on this computer and takes no host; remove it or use transport = "ssh"',
        )
    return host


def _read_gpus(f: _Fields, key: str, default: tuple[int, ...]) -> tuple[int, ...]:
    """`gpus = 8` means indices 0..7; a list names the indices (distinct, >= 0)."""
    if not f.has(key):
        return default
    value = f.values[key]
    if isinstance(value, int) and not isinstance(value, bool):
        return tuple(range(f.integer(key, 0, low=0, high=1024)))
    indices = f.items(key, default, int, "a GPU count or a list of GPU indices", "an integer")
    for index, gpu in enumerate(indices):
        if gpu < 0:
            raise f.fail(key, f"a GPU index must be 0 or more, got {gpu}", index)
        if gpu in indices[:index]:
            raise f.fail(key, f"GPU {gpu} is listed twice", index)
    return indices


@dataclass(frozen=True)
class Node:
    name: str
    transport: str = _choice("ssh", TRANSPORTS)  # "ssh" | "local"
    host: str | None = _field(None, _read_host, text=True)
    user: str | None = _text(
        None, pattern=_WORD_RE, rule="expected a user name"
    )  # None: ~/.ssh/config's, else the current user
    port: int = _integer(22, low=1, high=65535)
    identity: str | None = _text(None)  # a private key on this machine, as written
    workdir: str = _text("~/.ava")  # on the node; `~` is the node user's home
    python: str = _text("python3")
    cache_dir: str = _text("~/.ava/cache")
    cache_size: int = _size(100 * 2**30)
    interface: str = _text("auto", pattern=_IFACE_RE, rule=_IFACE_RULE)
    host_keys: str = _choice("strict", HOST_KEY_POLICIES)
    known_hosts: str = _text("~/.ssh/known_hosts")
    connect_timeout: float = _duration(10.0, positive=True)
    gpus: tuple[int, ...] = _field((), _read_gpus)
    labels: tuple[str, ...] = _labels()
    requirements: Requirements | None = field(
        default=None, metadata={_KEY: _TomlKey(lambda f, k, d: f.requirements(k))}
    )
    # A node-wide GPU ledger directory on the node, shared by every workdir that names it
    # (several users: make it group-writable for their group). None: WORKDIR's own ledger.
    ledger: str | None = _text(None, pattern=_LEDGER_RE, rule=_LEDGER_RULE)
    keep_warm: float = _duration(300.0)  # a spare torchrun kept for the next run (agent/warm.py); "0s": none

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


def _read_module(f: _Fields, key: str, default: str | None) -> str | None:
    """The module, then what holds between it and the script read before it."""
    module = f.text(key, default, pattern=_MODULE_RE, rule="expected a module like pkg.train")
    script: str | None = f.got["script"]
    if (script is None) == (module is None):
        problem = "has both script and module" if script else "missing script or module"
        hint = 'give exactly one: script = "train.py" or module = "pkg.train"'
        raise ConfigError(f.source, f.table, f"{problem}; {hint}")
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
    return module


@dataclass(frozen=True)
class RunSpec:
    script: str | None = _text(None)  # relative to the recipe's root
    module: str | None = _field(None, _read_module, text=True)
    args: tuple[str, ...] = _field(
        (), lambda f, k, d: f.items(k, d, str, "a list of strings", 'a string (quote numbers: "200")')
    )
    requirements: Requirements | None = field(
        default=None, metadata={_KEY: _TomlKey(lambda f, k, d: f.requirements(k))}
    )


def _read_node_range(f: _Fields, key: str) -> tuple[int, int]:
    """`nodes = 2` or `nodes = "2:4"` (an elastic range); at least one node."""
    if not f.has(key):
        return 1, 1
    value = f.values[key]
    rule = 'expected a node count like 2 or a range like "2:4"'
    if isinstance(value, int) and not isinstance(value, bool):
        count = f.integer(key, 1, low=1)
        return count, count
    if not isinstance(value, str):
        raise f.fail(key, f"{rule}, got {_show(value)}")
    match = re.fullmatch(r"\s*(\d+)\s*(?::\s*(\d+)\s*)?", value)
    if not match:
        raise f.fail(key, f"{rule}, got {_show(value)}")
    low = int(match.group(1))
    high = int(match.group(2)) if match.group(2) else low
    if low < 1 or high < low:
        raise f.fail(key, f"need 1 <= MIN <= MAX, got {_show(value)}")
    return low, high


@dataclass(frozen=True)
class Resources:
    # `nodes` sets both: a count, or an elastic range "MIN:MAX".
    nodes_min: int = _field(1, lambda f, k, d: _read_node_range(f, k)[0], name="nodes")
    nodes_max: int = _field(1, lambda f, k, d: _read_node_range(f, k)[1], name="nodes")
    procs_per_node: int | None = _integer(None, low=1)
    gpus_per_node: int = _integer(0, low=0)
    memory: int | None = _size(None, positive=True)  # bytes, per node
    cpus: float | None = _field(None, lambda f, k, d: f.number(k, d))  # per node
    pids: int | None = _integer(None, low=1)  # per node
    labels: tuple[str, ...] = _labels()


def _read_prefetch(f: _Fields, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    urls = f.items(key, default, str, "a list of URLs", "a URL string")
    for index, url in enumerate(urls):
        if not _URL_RE.match(url):
            example = '"s3://bucket/shards/*.tar"'
            raise f.fail(key, f"expected a URL like {example}, got {_show(url)}", index)
    return urls


@dataclass(frozen=True)
class Data:
    prefetch: tuple[str, ...] = _field((), _read_prefetch)


def _read_checkpoint_dir(f: _Fields, key: str, default: str | None) -> str | None:
    where = f.text(key, default)
    if where is not None:
        try:
            parts = [(n, spec, conv) for _, n, spec, conv in string.Formatter().parse(where)]
        except ValueError as exc:
            raise f.fail(key, f"bad braces in {_show(where)} ({exc})") from None
        for name, spec, conversion in parts:
            if name is not None and (name not in ("name", "run") or spec or conversion):
                only = "only {name} and {run} expand"
                raise f.fail(key, f"unknown placeholder in {_show(where)}; {only}")
    return where


def _read_checkpoint_every(f: _Fields, key: str, default: str | None) -> str | None:
    """An integer = every that many steps, a duration, or "auto" (Young/Daly, in ava.ckpt);
    kept as AVA_CHECKPOINT_EVERY says it to ava.ckpt.due(): "500", "600s" or "auto"."""
    if not f.has(key):
        return default
    value = f.values[key]
    if isinstance(value, int) and not isinstance(value, bool):
        return str(f.integer(key, 0, low=1))
    if value == "auto":
        return "auto"
    try:
        seconds = f.duration(key, 0.0, positive=True)
    except ConfigError:
        raise f.fail(key, f'expected a step count (500), a duration ("10m") or "auto", got {_show(value)}') from None
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"


@dataclass(frozen=True)
class Checkpoint:
    dir: str | None = _field(None, _read_checkpoint_dir, text=True)  # may hold {name} and {run}
    keep: int = _integer(3, low=1)
    every: str | None = _field(None, _read_checkpoint_every)  # None: the training script decides


def _read_exit_codes(f: _Fields, key: str, default: tuple[int, ...]) -> tuple[int, ...]:
    codes = f.items(key, default, int, "a list of exit codes", "an integer")
    for index, code in enumerate(codes):
        if not 0 < code < 256:
            raise f.fail(key, f"an exit code is 1-255, got {code}", index)
    return codes


@dataclass(frozen=True)
class Failover:
    max_restarts: int = _integer(3, low=0)
    on_node_loss: str = _choice("replace", NODE_LOSS_POLICIES)  # replace | shrink | fail
    hang_timeout: float = _duration(600.0, positive=True)
    fatal_exit_codes: tuple[int, ...] = _field((2,), _read_exit_codes)
    backoff: float = _duration(2.0)
    # Two attempts in a row failing before any progress with the same signature: no retry.
    stop_repeated_startup_failure: bool = _field(True, lambda f, k, d: f.flag(k, d))
    # Each node keeps a spare interpreter with torch imported for the next attempt (a restart
    # then skips torchrun's start and the import); only where max_restarts allows a restart.
    warm_spares: bool = _field(True, lambda f, k, d: f.flag(k, d))


def _read_name(f: _Fields, key: str, default: str | None) -> str:
    if not f.has(key):
        raise ConfigError(f.source, key, 'missing; add name = "my-recipe" at the top of the file')
    return f.text(key, "", pattern=NAME_RE, rule=f"expected {NAME_RULE}")


@dataclass(frozen=True)
class Recipe:
    name: str = field(metadata={_KEY: _TomlKey(_read_name, text=True)})
    source: str  # the path or URL it came from
    root: str  # the directory or URL prefix holding its code
    # Its tables, each read as its dataclass's keys say ([env] takes any variable name).
    run: RunSpec = field(metadata={_TABLE: RunSpec})
    resources: Resources = field(default_factory=Resources, metadata={_TABLE: Resources})
    env: dict[str, str] = field(default_factory=dict, metadata={_TABLE: None})
    data: Data = field(default_factory=Data, metadata={_TABLE: Data})
    checkpoint: Checkpoint = field(default_factory=Checkpoint, metadata={_TABLE: Checkpoint})
    failover: Failover = field(default_factory=Failover, metadata={_TABLE: Failover})
    raw: dict[str, Any] = field(default_factory=dict)  # merged TOML after --set overrides
    description: str = _text("")

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
    """Typed, strict reads of a TOML table; `where[k]` is the dotted key that messages show,
    `table` the table's own, `got` the values read so far (by field name)."""

    def __init__(self, source: str, values: Mapping[str, Any], where: Mapping[str, str], table: str = "") -> None:
        self.source, self.values, self.where, self.table = source, values, where, table
        self.got: dict[str, Any] = {}

    def has(self, name: str) -> bool:
        return name in self.values

    def key(self, name: str) -> str:
        return self.where[name]

    def fail(self, name: str, problem: str, index: int | None = None) -> ConfigError:
        """The error for a value, or with `index` for one item of a list (`key[index]`)."""
        where = self.key(name) if index is None else f"{self.key(name)}[{index}]"
        return ConfigError(self.source, where, problem)

    def _of(self, name: str, kind: type[V], what: str) -> V:
        value = self.values[name]
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
            raise self.fail(name, f"expected {what}, got {_show(value)}")
        return value

    def text(self, name: str, default: D, *, pattern: re.Pattern[str] | None = None, rule: str = "") -> str | D:
        if name not in self.values:
            return default
        value = self._of(name, str, "a string")
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

    def integer(self, name: str, default: D, *, low: int = 0, high: int | None = None) -> int | D:
        if name not in self.values:
            return default
        value = self._of(name, int, "an integer")
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise self.fail(name, f"must be {bound}, got {value}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        if name not in self.values:
            return default
        return self._of(name, bool, "true or false")

    def number(self, name: str, default: D) -> float | D:
        if name not in self.values:
            return default
        value = self.values[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(name, f"expected a number, got {_show(value)}")
        if not math.isfinite(value) or value <= 0:
            raise self.fail(name, f"must be a positive number, got {_show(value)}")
        return float(value)

    def size(self, name: str, default: D, *, positive: bool = False) -> int | D:
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

    def items(self, name: str, default: tuple[V, ...], kind: type[V], what: str, each: str) -> tuple[V, ...]:
        """A list (`what`) whose items (`each`) all have `kind`; an item's error says key[i]."""
        if name not in self.values:
            return default
        values = self._of(name, list, what)
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


def _check_table(source: str, value: Any, key: str) -> dict[str, Any]:
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
    return _Fields(source, table, {name: _key(*prefix, name) for name in table}, _key(*prefix))


def _load_toml(text: str, source: str) -> dict[str, Any]:
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

_NODE_KEYS = _keys(Node)
# `host` names one node, so it has no default.
_DEFAULT_KEYS = tuple(k for k in _NODE_KEYS if k != "host")
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
    _check_keys(source, data, ("defaults", "nodes", "slurm"))  # [slurm]: ava/slurm/inventory.py
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
    return _build(Node, _Fields(source, values, where, _key("nodes", name)), name=name)


# ---------------------------------------------------------------------------------------------
# Recipes

# The recipe's tables and their keys ([env] takes any variable name: None), then its top-level keys:
# the plain values first, as TOML writes them before any table.
_RECIPE_TABLES: dict[str, tuple[str, ...] | None] = {
    item.name: None if item.metadata[_TABLE] is None else _keys(item.metadata[_TABLE])
    for item in fields(Recipe)
    if _TABLE in item.metadata
}
_RECIPE_KEYS = (*_keys(Recipe), *_RECIPE_TABLES)
# A `--set` value for these keys (and env.*) is text as written, so "3e-4" stays "3e-4"; for the
# others it is a TOML value when it parses (4, true, ["a"]) and text otherwise ("2:4", "8GiB").
_TEXT_KEYS = frozenset(
    [item.name for item in fields(Recipe) if _KEY in item.metadata and item.metadata[_KEY].text]
    + [
        f"{table.name}.{key.name or item.name}"
        for table in fields(Recipe)
        if table.metadata.get(_TABLE) is not None
        for item in fields(table.metadata[_TABLE])
        if (key := item.metadata.get(_KEY)) is not None and key.text
    ]
)


def _toml_value(text: str) -> tuple[bool, Any]:
    """(True, value) when `text` is one TOML value, else (False, None)."""
    try:
        parsed = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return False, None
    return (True, parsed["v"]) if list(parsed) == ["v"] else (False, None)


def apply_override(raw: dict[str, Any], assignment: str, source: str) -> None:
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


def _parse_recipe(raw: dict[str, Any], source: str, root: str) -> Recipe:
    top = _fields(source, raw, _RECIPE_KEYS)
    sections = {name: _check_table(source, raw.get(name, {}), name) for name in _RECIPE_TABLES}
    for item in fields(Recipe):  # the plain values (name, description): read before the tables
        if _KEY in item.metadata:
            top.got[item.name] = item.metadata[_KEY].read(top, item.name, _default(item))
    tables: dict[str, Any] = {}
    for name, keys in _RECIPE_TABLES.items():
        if keys is None:
            tables[name] = _parse_env(source, sections[name])
        else:
            cls = Recipe.__dataclass_fields__[name].metadata[_TABLE]
            tables[name] = _build(cls, _fields(source, sections[name], keys, name))
    return Recipe(**top.got, **tables, source=source, root=root, raw=copy.deepcopy(raw))


def _parse_env(source: str, table: dict[str, Any]) -> dict[str, str]:
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
