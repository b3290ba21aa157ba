"""Run records on the machine running ava: `$AVA_HOME/runs/<run>/` (default `~/.ava`).

A record holds the recipe as launched (with its content hash), the nodes, every attempt and why
it ended. It is rewritten atomically, so a reader never sees half of one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ava.agent.protocol import FAILED, FINAL, RUNNING, STARTING, STOPPED, STOPPED_KIND, FailureKind, State
from ava.errors import UsageError

if TYPE_CHECKING:
    from ava.config import Recipe

FINAL_STATES = FINAL  # the states a run or an attempt ends in (ava.agent.protocol)


def home() -> Path:
    return Path(os.environ.get("AVA_HOME") or os.path.expanduser("~/.ava"))


def runs_dir() -> Path:
    return home() / "runs"


def new_run_id(recipe_name: str, now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return f"{recipe_name}-{stamp}-{secrets.token_hex(2)}"


@dataclass
class Attempt:
    number: int
    nodes: list[str]
    started: float
    ended: float | None = None
    state: State = STARTING
    # Why it ended, in words a person reads: "rank 3 on n2 exited 1", "node n2 lost", ...
    cause: str | None = None
    kind: FailureKind | None = None
    exit_code: int | None = None
    failed_node: str | None = None
    failed_rank: int | None = None
    master_port: int | None = None
    code_sent_bytes: int | None = None  # code moved to the nodes for this attempt (0: all there)
    progressed: bool = False  # reported progress (or outlived the start-up grace)
    signature: str | None = None  # a crash before any progress: exit code and last line


@dataclass
class RunRecord:
    id: str
    recipe: str
    source: str
    recipe_hash: str
    raw: dict[str, Any]
    inventory: str
    nodes: list[str]
    state: State = STARTING
    started: float = field(default_factory=time.time)
    ended: float | None = None
    exit_code: int | None = None
    attempts: list[Attempt] = field(default_factory=list)
    lost_nodes: list[str] = field(default_factory=list)
    supervisor_pid: int | None = None
    code_tree: str | None = None
    overrides: list[str] = field(default_factory=list)  # the --set assignments, in order
    pool: list[str] = field(default_factory=list)  # the nodes `--nodes` allowed (spares too); []: all
    # `ava train --from`: the run and committed checkpoint it started from (run, step, checkpoint, url).
    parent: dict[str, Any] | None = None

    @property
    def dir(self) -> Path:
        return runs_dir() / self.id

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def current(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    def widest_world(self) -> int:
        """The most ranks any attempt of the run had (nodes x processes per node)."""
        resources = self.raw.get("resources", {}) if isinstance(self.raw.get("resources"), dict) else {}
        gpus = resources.get("gpus_per_node", 0)
        per_node = resources.get("procs_per_node") or (gpus if isinstance(gpus, int) and gpus > 0 else 1)
        widest = max([len(a.nodes) for a in self.attempts] + [len(self.nodes)])
        return widest * (per_node if isinstance(per_node, int) and per_node > 0 else 1)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["attempts"] = [asdict(a) for a in self.attempts]
        return data

    def summary(self) -> dict[str, Any]:
        """What `ava ps --json` shows."""
        return {
            "id": self.id,
            "recipe": self.recipe,
            "state": self.state,
            "nodes": self.nodes,
            "attempts": [asdict(a) for a in self.attempts],
            "started": self.started,
            "ended": self.ended,
            "exit_code": self.exit_code,
        }

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        temp = self.dir / f".record.{os.getpid()}.{threading.get_ident()}.json"
        data = json.dumps(self.to_json(), indent=2, default=str).encode()
        descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            # A crash after the rename must not leave an empty record: the bytes reach the disk first.
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, self.dir / "record.json")
        _fsync_dir(self.dir)


def create(
    run_id: str,
    recipe: Recipe,
    inventory: Path,
    nodes: list[str],
    overrides: list[str],
    pool: list[str] | None = None,
) -> RunRecord:
    """A new run's record and directory, with the recipe as launched kept apart (private_recipe).

    Not saved yet: the caller puts the code snapshot in the directory, then saves. Environment
    values (secrets) never reach record.json: it keeps their names and the --set keys only."""
    record = RunRecord(
        id=run_id,
        recipe=recipe.name,
        source=recipe.source,
        recipe_hash=recipe_hash(recipe.raw),
        raw=env_names_only(recipe.raw),
        inventory=str(inventory.resolve()),
        nodes=nodes,
        overrides=overrides_without_env_values(overrides),
        pool=list(pool or []),
    )
    record.dir.mkdir(parents=True, exist_ok=True)
    private_recipe(record, recipe.raw, dict(recipe.env))
    return record


def recipe_hash(raw: dict[str, Any]) -> str:
    """The recipe's content as launched (every --set applied), as 16 hex digits."""
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:16]


def record_stopped(run_id: str, *, by: str, asked: float) -> RunRecord:
    """Record the run stopped once its processes are gone on every node (`by`: who asked).

    A stop that lands while an attempt is still launching can be recorded by the supervisor as
    a launch failure: a run that ended after the stop was asked for (`asked`) was stopped,
    whatever its supervisor made of the processes vanishing. A run that ended before is left
    as it ended."""
    latest = load(run_id)
    current = latest.current()
    ended_by_stop = latest.state == FAILED and latest.ended is not None and latest.ended >= asked
    if latest.final and not ended_by_stop:
        return latest
    if current is not None and (current.state in (STARTING, RUNNING) or ended_by_stop):
        why = f"stopped by {by}" + (f" ({current.cause})" if ended_by_stop and current.cause else "")
        current.state, current.ended, current.kind, current.cause = STOPPED, time.time(), STOPPED_KIND, why
    latest.state, latest.ended, latest.exit_code = STOPPED, time.time(), 1
    latest.save()
    return latest


ENV_FILE = "env.json"


def private_recipe(record: RunRecord, raw: dict[str, Any], env: dict[str, str]) -> None:
    """Keep the recipe as launched in the run's records, its environment values apart.

    Recipes carry secrets in `[env]` (and `--set env.K=V`), so the values live in one file,
    `env.json` (0600): the only local file that holds them. `recipe.toml` beside it is the
    recipe as launched (every --set applied) without `[env]`, written out again rather than
    copied, since the original text holds the values; record.json keeps env names only.
    `supervisor.recipe_of` joins the two for later attempts (background supervisor, attach).
    """
    os.chmod(runs_dir(), 0o700)  # made earlier with a wider umask: runs hold logs and recipes
    _write_private(record.dir / ENV_FILE, json.dumps(env, sort_keys=True).encode())
    rest = {k: v for k, v in raw.items() if k != "env"}
    _write_private(record.dir / "recipe.toml", toml_text(rest).encode())


def read_env(record: RunRecord) -> dict[str, str] | None:
    """The run's environment values from env.json; None for a record older than env.json."""
    try:
        data = json.loads((record.dir / ENV_FILE).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise DamagedRecord(record.dir / ENV_FILE, getattr(error, "strerror", None) or str(error)) from error
    if not (isinstance(data, dict) and all(isinstance(v, str) for v in data.values())):
        raise DamagedRecord(record.dir / ENV_FILE, "expected an object of strings")
    return data


def env_names_only(raw: dict[str, Any]) -> dict[str, Any]:
    """The recipe's TOML data for record.json: `env` as its sorted names, never the values."""
    return {**raw, "env": sorted(raw["env"])} if isinstance(raw.get("env"), dict) else dict(raw)


def overrides_without_env_values(overrides: list[str]) -> list[str]:
    """--set assignments for record.json: `env.K=V` (and `env={...}`) keep only their key."""
    kept = []
    for assignment in overrides:
        key = assignment.partition("=")[0].strip()
        kept.append(key if key.split(".", 1)[0].strip() == "env" else assignment)
    return kept


def toml_text(raw: dict[str, Any]) -> str:
    """TOML for a recipe's data (scalars, arrays, tables one level deep, inline tables below)."""
    lines = [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in raw.items() if not isinstance(v, dict)]
    for name, table in raw.items():
        if isinstance(table, dict):
            lines += ["", f"[{json.dumps(name)}]"]
            lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def toml_value(value: Any) -> str:
    """One value as TOML text, e.g. for a `--set run.args=[…]` assignment."""
    return _toml_value(value)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a TOML basic string once DEL, which TOML wants escaped, is.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _write_private(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def _fsync_dir(path: Path) -> None:
    # The rename itself is only durable once the directory holding it is synced.
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


class DamagedRecord(UsageError):
    """A run record that exists but cannot be read as one; names the file."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: damaged run record ({problem})")
        self.path, self.problem = path, problem


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _problem(data: Any, run_id: str) -> str | None:
    """What makes this JSON not a run record, or None; `ava ps` and friends rely on these types."""
    if not isinstance(data, dict):
        return f"expected an object, got {type(data).__name__}"
    if data.get("id") != run_id:
        return f"id {data.get('id')!r} does not match its directory"
    for key in ("recipe", "source", "inventory", "state"):
        if not isinstance(data.get(key), str):
            return f"{key}: expected a string"
    if not _number(data.get("started")):
        return "started: expected a number"
    for key in ("ended", "exit_code", "supervisor_pid"):
        if data.get(key) is not None and not _number(data.get(key)):
            return f"{key}: expected a number"
    if not _names(data.get("nodes")) or not _names(data.get("lost_nodes", [])):
        return "nodes: expected a list of node names"
    if data.get("parent") is not None and not isinstance(data.get("parent"), dict):
        return "parent: expected an object"
    attempts = data.get("attempts", [])
    if not isinstance(attempts, list):
        return "attempts: expected a list"
    for index, attempt in enumerate(attempts):
        if not (
            isinstance(attempt, dict)
            and isinstance(attempt.get("number"), int)
            and _names(attempt.get("nodes"))
            and _number(attempt.get("started"))
            and isinstance(attempt.get("state", ""), str)
            and (attempt.get("ended") is None or _number(attempt.get("ended")))
        ):
            return f"attempts[{index}]: not an attempt"
    return None


def load(run_id: str) -> RunRecord:
    """The run's record; DamagedRecord (naming the file) when it is not one ava can use."""
    path = runs_dir() / run_id / "record.json"
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise UsageError(f"no run {run_id} (see `ava ps`)") from None
    except (OSError, ValueError) as error:
        # A directory, unreadable bytes, truncated JSON: name the file, never a traceback.
        raise DamagedRecord(path, getattr(error, "strerror", None) or str(error)) from error
    problem = _problem(data, run_id)
    if problem is not None:
        raise DamagedRecord(path, problem)
    try:
        attempts = [Attempt(**a) for a in data.pop("attempts", [])]
        return RunRecord(**data, attempts=attempts)
    except TypeError as error:  # a key this version does not know, or one missing
        raise DamagedRecord(path, str(error)) from error


# Characters that make a pattern of a run id: a run id is matched as text, never as a glob.
_PATTERN_CHARACTERS = frozenset("*?[]!{}/\\")


def run_ids() -> list[str]:
    """Every run id that has a record here, damaged or not, sorted."""
    if not runs_dir().is_dir():
        return []
    return sorted(p.name for p in runs_dir().iterdir() if not p.name.startswith(".") and (p / "record.json").exists())


def resolve_id(prefix: str) -> str:
    """The run id that `prefix` names: the exact id, or a prefix that matches exactly one run.

    An empty id, a wildcard or an ambiguous prefix is a usage error listing the candidates, so
    that `ava stop "$RUN"` with RUN unset never picks somebody's run.
    """
    known = run_ids()
    shown = ", ".join(known[-5:]) if known else "none"
    if not prefix.strip():
        raise UsageError(f"an empty run id names no run; give an id or a unique prefix of one (recent: {shown})")
    if set(prefix) & _PATTERN_CHARACTERS or prefix.startswith("."):
        raise UsageError(
            f"run id {prefix!r} holds a wildcard or path character; run ids are matched as plain text (recent: {shown})"
        )
    if prefix in known:
        return prefix
    matches = [name for name in known if name.startswith(prefix)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        more = f" and {len(matches) - 10} more" if len(matches) > 10 else ""
        raise UsageError(f"run id {prefix} is ambiguous: {', '.join(matches[:10])}{more}")
    raise UsageError(f"no run {prefix} (see `ava ps`)")


def resolve(prefix: str) -> RunRecord:
    """A run by its id or an unambiguous prefix of it (see resolve_id)."""
    return load(resolve_id(prefix))


def scan() -> tuple[list[RunRecord], list[DamagedRecord]]:
    """Every readable record, oldest first, and every damaged one (one bad file never hides the rest)."""
    records: list[RunRecord] = []
    damaged: list[DamagedRecord] = []
    for run_id in run_ids():
        try:
            records.append(load(run_id))
        except DamagedRecord as error:
            damaged.append(error)
        except UsageError:
            continue  # removed meanwhile
    return sorted(records, key=lambda r: r.started), damaged


def all_runs() -> list[RunRecord]:
    return scan()[0]
