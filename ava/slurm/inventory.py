"""The `[slurm]` table of ava.toml: which cluster, through which login node, with which defaults.

```toml
[nodes.login]                  # an SSH node like any other (same host-key rules)
host = "login.hpc.example.org"

[slurm]
login = "login"                # the [nodes.NAME] that runs sbatch, squeue, sacct, scancel, sinfo
shared_dir = "/shared/ava"     # ava's files on the filesystem every node mounts (absolute)
partition = "gpu"              # optional: sbatch --partition
account = "lab"                # optional: --account
qos = "normal"                 # optional: --qos
time = "1-00:00:00"            # optional: --time (Slurm's format)
constraint = "h100"            # optional: --constraint
gres = ""                      # optional: --gres (GPUs come from resources.gpus_per_node)
python = "python3"             # on the allocated nodes; default: the login node's
cache_dir = "/tmp/ava-cache"   # node-local block cache on the allocated nodes
```
config.py parses the nodes and leaves this table to this module (read from the same file).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ava.config import Inventory, Node
from ava.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

TABLE = "slurm"
_WORD = re.compile(r"^[A-Za-z0-9_.:,=+/@\[\]-]{1,200}$")  # what sbatch options take here: no spaces
_TIME = re.compile(r"^[0-9:-]{1,20}$")
_OPTIONAL = ("partition", "account", "qos", "time", "constraint", "gres", "python", "cache_dir")
KEYS = ("login", "shared_dir", *_OPTIONAL)


@dataclass(frozen=True)
class SlurmSettings:
    login: str
    shared_dir: str
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    constraint: str | None = None
    gres: str | None = None
    python: str | None = None
    cache_dir: str | None = None
    source: str = ""

    def sbatch_options(self) -> list[tuple[str, str]]:
        """The inventory's own sbatch options, in a fixed order."""
        pairs = [
            ("partition", self.partition),
            ("account", self.account),
            ("qos", self.qos),
            ("time", self.time),
            ("constraint", self.constraint),
            ("gres", self.gres),
        ]
        return [(k, v) for k, v in pairs if v]


def parse(raw: dict[str, Any], source: str, nodes: dict[str, Node]) -> SlurmSettings | None:
    """The [slurm] table of an inventory's TOML, checked; None when it has none."""
    table = raw.get(TABLE)
    if table is None:
        return None
    if not isinstance(table, dict):
        raise ConfigError(source, TABLE, "expected a table")
    for key in table:
        if key not in KEYS:
            raise ConfigError(source, f"{TABLE}.{key}", f"unknown key (known: {', '.join(KEYS)})")
    values: dict[str, str] = {}
    for key, value in table.items():
        if not isinstance(value, str) or not value:
            raise ConfigError(source, f"{TABLE}.{key}", f"expected a non-empty string, got {value!r}")
        values[key] = value
    for key in ("login", "shared_dir"):
        if key not in values:
            raise ConfigError(source, f"{TABLE}.{key}", "missing")
    if values["login"] not in nodes:
        raise ConfigError(source, f"{TABLE}.login", f"no [nodes.{values['login']}] table (known: {', '.join(nodes)})")
    if nodes[values["login"]].transport != "ssh":
        raise ConfigError(source, f"{TABLE}.login", 'the login node is reached over SSH (transport = "ssh")')
    for key in ("shared_dir", "cache_dir"):
        if key in values and not values[key].startswith("/"):
            raise ConfigError(source, f"{TABLE}.{key}", f"expected an absolute path, got {values[key]!r}")
    for key in ("partition", "account", "qos", "constraint", "gres"):
        if key in values and not _WORD.match(values[key]):
            raise ConfigError(source, f"{TABLE}.{key}", f"expected one word without spaces, got {values[key]!r}")
    if "time" in values and not _TIME.match(values["time"]):
        raise ConfigError(
            source, f"{TABLE}.time", f'expected Slurm\'s time format like "1-00:00:00", got {values["time"]!r}'
        )
    return SlurmSettings(source=source, **values)


def load(inventory: Inventory) -> SlurmSettings | None:
    """The inventory file's [slurm] table, or None for a plain SSH inventory."""
    path = Path(inventory.path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return None  # config.py has already said what is wrong with the file
    return parse(raw, str(path), inventory.nodes)


def login_node(settings: SlurmSettings, inventory: Inventory, *, workdir: bool = True) -> Node:
    """The login node, with ava's files on the shared filesystem as its workdir."""
    node = inventory.nodes[settings.login]
    return dataclasses.replace(node, workdir=settings.shared_dir) if workdir else node


def compute_python(settings: SlurmSettings, inventory: Inventory) -> str:
    return settings.python or inventory.nodes[settings.login].python
