"""Run the real `ava` on a pseudo-terminal, as a person at a terminal does (helpers for tests)."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

from tests.conftest import REPO


def plain_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without anything that changes ava's output form (colour, inventory)."""
    env = {k: v for k, v in os.environ.items() if k not in ("AVA_INVENTORY", "NO_COLOR", "FORCE_COLOR", "COLUMNS")}
    env.update(extra or {})
    return env


def on_pty(
    *args: str, env: dict[str, str] | None = None, timeout: float = 180, columns: int = 200
) -> tuple[int, str, str]:
    """(exit code, what the terminal showed with \\r\\n made \\n, stderr) of `python -m ava ARGS`
    with stdin and stdout on a pty of `columns` columns; stderr stays a pipe, to be read apart."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "ava", *args],
        stdin=slave,
        stdout=slave,
        stderr=subprocess.PIPE,
        env=plain_env(env),
        cwd=REPO,
    )
    # The slave stays open here until the end: once its last holder closes it, Linux may drop
    # what the master had not read yet (EIO), losing a short command's whole output.
    shown = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                process.kill()
                raise AssertionError(
                    f"ava {' '.join(args)} on a pty: no end after {timeout} s:\n{shown.decode()[-2000:]}"
                )
            ended = process.poll() is not None
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                shown += os.read(master, 65536)
            elif ended:
                break
    finally:
        os.close(master)
        os.close(slave)
    code = process.wait(timeout=30)
    assert process.stderr is not None
    return code, shown.decode(errors="replace").replace("\r\n", "\n"), process.stderr.read().decode()


def write_recipe(root: Path, *, nodes: int = 1, lines: int = 3) -> Path:
    """A recipe whose every rank prints `line K of rank R` `lines` times."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "spam.py").write_text(
        "import os, sys\n"
        "rank = os.environ['RANK']\n"
        "out = sys.stdout\n"
        f"for k in range(int(os.environ.get('SPAM_LINES', '{lines}'))):\n"
        "    out.write(f'line {k} of rank {rank}\\n')\n"
        "out.flush()\n"
        "if os.environ.get('SPAM_FAIL'):\n"
        "    sys.exit(int(os.environ['SPAM_FAIL']))\n"
    )
    (root / "recipe.toml").write_text(
        'name = "spam"\n[run]\nscript = "spam.py"\n'
        f"[resources]\nnodes = {nodes}\nprocs_per_node = 1\n[failover]\nmax_restarts = 0\n"
    )
    return root
