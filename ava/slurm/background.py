"""The detached supervisor of a Slurm run (`ava train --detach` on a Slurm inventory).

    python -m ava.slurm.background RUN INVENTORY

It supervises the run exactly as `ava train` does in the foreground, from where the run is,
writing `node/rank |` lines and events to the run's output.log. An interrupted foreground
`ava train` or `ava attach` hands the run over to it; `ava attach` takes it back (SIGTERM: it
leaves the job alone and exits). `ava ps`, `ava wait` and `ava stop` act on the run's record as
for any run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ava import runs
from ava.agent.protocol import FAILED
from ava.config import load_inventory
from ava.errors import AvaError
from ava.slurm.inventory import load
from ava.slurm.supervise import SlurmSupervisor


class FileSink:
    """The run's output.log, prefixed as on the terminal."""

    def __init__(self, path: Path) -> None:
        self.handle = open(path, "a", encoding="utf-8", buffering=1)

    def line(self, node: str, rank: str | None, text: str) -> None:
        self.handle.write(f"{node}/{rank if rank is not None else '-'} | {text}\n")

    def event(self, text: str) -> None:
        self.handle.write(f"{time.strftime('%H:%M:%S')} ava: {text}\n")


def spawn(record: runs.RunRecord, inventory_path: Path) -> int:
    """Start the detached supervisor; its own output goes to the run's supervisor.log."""
    from ava.onefile import child_env, python_module  # the one-file ava starts itself again

    module = "ava.slurm.background"
    with open(record.dir / "supervisor.log", "ab") as log:
        process = subprocess.Popen(
            [*python_module(module), record.id, str(inventory_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            env={**os.environ, "AVA_HOME": str(record.dir.parent.parent), **child_env(module)},
        )
    return process.pid


def main(argv: list[str]) -> int:
    from ava.supervisor import Supervised, recipe_of  # the recipe as launched: its copied text, code and env

    os.umask(0o077)  # as the CLI: what the run's records gain stays the user's own
    record = runs.load(argv[0])
    inventory = load_inventory(argv[1])
    settings = load(inventory)
    if settings is None:
        print(f"ava: {argv[1]}: no [slurm] table", file=sys.stderr)
        return 2
    supervisor = SlurmSupervisor(
        record,
        recipe_of(record),
        inventory,
        settings,
        FileSink(record.dir / "output.log"),
        role="a background supervisor",
        lock_wait=60.0,
    )
    # SIGHUP too: a background supervisor outlives the terminal that started it. SIGTERM
    # (`ava attach` taking over): leave the job alone and exit.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: supervisor.leave())
    try:
        return supervisor.run()
    except Supervised as taken:
        print(f"{time.strftime('%H:%M:%S')} ava: {taken.message}", file=sys.stderr)
        return 0
    except AvaError as exc:
        record.state, record.ended, record.exit_code = FAILED, time.time(), 3
        record.save()
        print(f"ava: {exc.message}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
