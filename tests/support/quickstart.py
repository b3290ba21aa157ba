"""The README's quickstart command, as CI runs it: `python3 -m tests.support.quickstart` prints it."""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def quickstart_command(text: str) -> str:
    """The one command in the first ```sh block of the README's Quickstart section."""
    section = text.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```sh\n(.*?)\n```", section, re.S)
    if match is None:
        raise ValueError("README.md: ## Quickstart has no ```sh block")
    lines = [line for line in match.group(1).splitlines() if line.strip()]
    if len(lines) != 1:
        raise ValueError(f"README.md: the quickstart is one command, found {len(lines)} lines")
    return lines[0]


if __name__ == "__main__":
    sys.stdout.write(quickstart_command(README.read_text(encoding="utf-8")) + "\n")
