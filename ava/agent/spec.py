"""The start spec: what the core asks one node's agent to run (JSON, see the package doc).

`tree` (optional) names the run's code tree (WORKDIR/trees/HASH); with it, `cwd` must be the
run's directory WORKDIR/runs/RUN/work, which the agent makes from that tree (see rundir.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import rundir
from .cgroups import PARENT
from .isolation import KINDS, Limits
from .layout import check_name
from .protocol import PROTOCOL, ProtocolMismatch, SpecError


@dataclass(frozen=True)
class Spec:
    run: str
    attempt: int
    node: str
    workdir: Path
    cwd: str
    argv: list[str]
    # The run's code tree: when given, cwd must be the run's directory, made from this tree.
    tree: str = ""
    env: dict[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    gpus_want: int = 0
    gpus_allowed: tuple[int, ...] = ()
    cpu_want: int = 0
    cpu_total: int | None = None
    cgroup_parent: str = PARENT
    user: str = ""
    isolation: str = "auto"  # auto probes; the others force a back-end (tests, odd nodes)
    ledger: str = ""  # a node-wide ledger directory (the inventory's `ledger`); "": WORKDIR's
    keep_warm: float = 0.0  # seconds the node keeps a spare torchrun for its next run (warm.py)

    @classmethod
    def load(cls, path: str) -> Spec:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise SpecError(f"{path}: cannot read: {exc.strerror}") from exc
        return cls.loads(data, path)

    @classmethod
    def loads(cls, data: bytes, where: str) -> Spec:
        try:
            raw = json.loads(data)
        except ValueError as exc:
            raise SpecError(f"{where}: not JSON: {exc}") from exc
        return cls.from_json(raw)

    @classmethod
    def from_json(cls, raw: Any) -> Spec:
        if not isinstance(raw, dict):
            raise SpecError("spec: expected a JSON object")
        version = raw.get("protocol", PROTOCOL)
        if version != PROTOCOL:
            raise ProtocolMismatch(f"protocol: the spec speaks version {version!r}, this agent {PROTOCOL}")
        try:
            argv = raw["argv"]
            if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
                raise SpecError("argv: expected a non-empty list of strings")
            env = raw.get("env") or {}
            if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
                raise SpecError("env: expected an object of strings")
            if any("=" in k or "\0" in k or not k for k in env) or any("\0" in v for v in env.values()):
                raise SpecError("env: names may not hold '=' or NUL, values may not hold NUL")
            gpus = raw.get("gpus") or {}
            slots = raw.get("cpu_slots")
            isolation = raw.get("isolation") or "auto"
            if isolation not in ("auto", *KINDS):
                raise SpecError(f"isolation: expected auto or one of {', '.join(KINDS)}")
            run = check_name("run", raw["run"])
            workdir = Path(os.path.expanduser(raw.get("workdir") or "~/.ava"))
            cwd = os.path.expanduser(raw.get("cwd") or "~")
            tree = os.path.expanduser(raw.get("tree") or "")
            if tree and os.path.normpath(cwd) != os.path.normpath(rundir.path(workdir, run)):
                raise SpecError(
                    f"cwd: a run with a code tree runs in its run directory {rundir.path(workdir, run)}, not {cwd}"
                )
            return cls(
                run=run,
                attempt=int(raw["attempt"]),
                node=check_name("node", raw["node"]),
                workdir=workdir,
                cwd=cwd,
                argv=list(argv),
                tree=tree,
                env=dict(env),
                limits=Limits.from_spec(raw.get("limits")),
                gpus_want=int(gpus.get("want") or 0),
                gpus_allowed=tuple(int(g) for g in gpus.get("allowed") or ()),
                cpu_want=int(slots["want"]) if slots else 0,
                cpu_total=int(slots["total"]) if slots else None,
                cgroup_parent=check_name("cgroup_parent", raw.get("cgroup_parent") or PARENT),
                user=str(raw.get("user") or ""),
                isolation=isolation,
                ledger=os.path.expanduser(str(raw.get("ledger") or "")),
                keep_warm=_keep_warm(raw.get("keep_warm")),
            )
        except KeyError as exc:
            raise SpecError(f"{exc.args[0]}: missing") from exc
        except (TypeError, ValueError) as exc:
            if isinstance(exc, SpecError):
                raise
            raise SpecError(f"spec: {exc}") from exc


def _keep_warm(value: Any) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e9:
        raise SpecError(f"keep_warm: expected seconds (0 or more), got {value!r}")
    return float(value)
