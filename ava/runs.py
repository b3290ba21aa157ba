"""Run records on the machine running ava: `$AVA_HOME/runs/<run>/` (default `~/.ava`).

A record holds the recipe as launched (with its content hash), the nodes, every attempt and why
it ended. It is rewritten atomically, so a reader never sees half of one.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ava.errors import UsageError

FINAL_STATES = ("succeeded", "failed", "stopped")


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
    state: str = "starting"  # starting | running | succeeded | failed | stopped
    # Why it ended, in words a person reads: "rank 3 on n2 exited 1", "node n2 lost", ...
    cause: str | None = None
    kind: str | None = None  # exit | crash | node-lost | hang | oom | stopped | launch
    exit_code: int | None = None
    failed_node: str | None = None
    failed_rank: int | None = None
    master_port: int | None = None
    code_sent_bytes: int | None = None  # code moved to the nodes for this attempt (0: all there)


@dataclass
class RunRecord:
    id: str
    recipe: str
    source: str
    recipe_hash: str
    raw: dict[str, Any]
    inventory: str
    nodes: list[str]
    state: str = "starting"
    started: float = field(default_factory=time.time)
    ended: float | None = None
    exit_code: int | None = None
    attempts: list[Attempt] = field(default_factory=list)
    lost_nodes: list[str] = field(default_factory=list)
    supervisor_pid: int | None = None
    code_tree: str | None = None
    overrides: list[str] = field(default_factory=list)  # the --set assignments, in order

    @property
    def dir(self) -> Path:
        return runs_dir() / self.id

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def current(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

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
        temp = self.dir / f".record.{os.getpid()}.json"
        temp.write_text(json.dumps(self.to_json(), indent=2, default=str))
        os.replace(temp, self.dir / "record.json")


def load(run_id: str) -> RunRecord:
    path = runs_dir() / run_id / "record.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"no run {run_id} (see `ava ps`)") from None
    attempts = [Attempt(**a) for a in data.pop("attempts", [])]
    return RunRecord(**data, attempts=attempts)


def resolve(prefix: str) -> RunRecord:
    """A run by its id or an unambiguous prefix of it."""
    if (runs_dir() / prefix / "record.json").exists():
        return load(prefix)
    matches = sorted(p.name for p in runs_dir().glob(f"{prefix}*") if (p / "record.json").exists()) if runs_dir().exists() else []
    if len(matches) == 1:
        return load(matches[0])
    if matches:
        raise UsageError(f"run {prefix} is ambiguous: {', '.join(matches[:5])}")
    raise UsageError(f"no run {prefix} (see `ava ps`)")


def all_runs() -> list[RunRecord]:
    if not runs_dir().exists():
        return []
    records = []
    for path in runs_dir().iterdir():
        if (path / "record.json").exists():
            try:
                records.append(load(path.name))
            except (ValueError, TypeError):
                continue
    return sorted(records, key=lambda r: r.started)
