"""Sizes and durations: the one grammar that reads them and the one way they are shown.

Every inventory or recipe key, command-line option (`--since`, `--timeout`) and message that takes
or shows a size or a duration goes through here; nothing else parses or formats them.

Reading (case rules):
- sizes: a whole number of bytes (512, "512"), or a number and a unit spelled exactly as here:
  B, KB, MB, GB, TB (powers of 1000) and KiB, MiB, GiB, TiB (powers of 1024): "100GiB", "1.5 GB".
  Units are case-sensitive: "100gib" or "8mb" is refused, with the spelling meant ("GiB"), rather
  than guessed, since "mb" could be megabits.
- durations: seconds as a number (90, 1.5, "90"), or number+unit parts, largest first or not, from
  ms, s, m, h, d: "90s", "10m", "1h30m", "500ms". Units are lower case: "10M" (minutes? months?) is
  refused rather than guessed.
Negative values are refused with their own message.

Showing: `format_size` writes bytes in powers of 1024 ("512B", "16.0MiB", "1.2GiB");
`format_duration` writes "850ms", "4s", "42s", "9m50s", "1h02m", "3d04h", never "590.0s".
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Any

from ava.errors import ConfigError


def show(value: Any) -> str:
    """A value as the user wrote it in TOML, cut short."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    elif isinstance(value, dict):
        return "a table"
    elif isinstance(value, list):
        text = "[" + ", ".join(show(v) for v in value) + "]"
    else:
        text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_SIZE_UNITS = {"": 1, "B": 1} | {
    f"{p}{i}B": (1024 if i else 1000) ** (n + 1) for n, p in enumerate("KMGT") for i in ("", "i")
}
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_RE = re.compile(r"^(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_size(text: str | int, *, source: str, key: str) -> int:
    """Bytes from 512, "512", "8MiB", "200MB", "1.5 GiB"; units are case-sensitive."""
    expected = 'expected a size like "8GiB" or a whole number of bytes'
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ConfigError(source, key, f"{expected}, got {show(text)}")
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(source, key, f"must not be negative, got {text}")
        return text
    match = _SIZE_RE.match(text)
    if not match:
        if text.strip().startswith("-"):
            raise ConfigError(source, key, f"must not be negative, got {show(text)}")
        raise ConfigError(source, key, f"{expected}, got {show(text)}")
    number, unit = match.groups()
    if unit not in _SIZE_UNITS:
        spelled = {u.lower(): u for u in _SIZE_UNITS if u}
        hint = (
            f'did you mean "{spelled[unit.lower()]}"?'
            if unit.lower() in spelled
            else "use B, KB, MB, GB, TB (x1000) or KiB, MiB, GiB, TiB (x1024)"
        )
        raise ConfigError(source, key, f'unknown size unit "{unit}" in {show(text)}; {hint}')
    return int(Decimal(number) * _SIZE_UNITS[unit])


def parse_duration(text: str | int | float, *, source: str, key: str) -> float:
    """Seconds from 90, 1.5, "90", "90s", "10m", "2h", "1h30m", "500ms", "1d"."""
    expected = 'expected a duration like "90s", "10m", "2h" or a number of seconds'
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ConfigError(source, key, f"{expected}, got {show(text)}")
    if isinstance(text, (int, float)):
        if not math.isfinite(text):
            raise ConfigError(source, key, f"{expected}, got {show(text)}")
        if text < 0:
            raise ConfigError(source, key, f"must not be negative, got {show(text)}")
        return float(text)
    spec = text.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", spec):
        return float(spec)
    if not _DURATION_RE.match(spec):
        if spec.startswith("-"):
            raise ConfigError(source, key, f"must not be negative, got {show(text)}")
        raise ConfigError(source, key, f"{expected}, got {show(text)}")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART_RE.findall(spec))


_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_size(value: float | None, *, unknown: str = "-", exact: bool = False) -> str:
    """Bytes as "512B", "4.0KiB", "16.0MiB", "1.2GiB" (powers of 1024); `unknown` for None.
    With `exact`, a whole number of units reads as a recipe writes it: "200MiB", "8GiB"."""
    if value is None:
        return unknown
    amount = float(value)
    for unit in _BINARY_UNITS:
        if abs(amount) < 1024 or unit == _BINARY_UNITS[-1]:
            whole = unit == "B" or (exact and amount == int(amount))
            return f"{amount:.0f}{unit}" if whole else f"{amount:.1f}{unit}"
        amount /= 1024
    raise AssertionError("unreachable: the last unit takes any amount")


def format_duration(seconds: float | None, *, unknown: str = "-") -> str:
    """Seconds as "850ms", "4s", "42s", "9m50s", "1h02m", "3d04h"; `unknown` for None."""
    if seconds is None:
        return unknown
    if round(seconds * 1000) < 1000:
        return f"{seconds * 1000:.0f}ms"
    # Whole seconds from 1 s on: `ava ps` reads "4s", never "4.0s" (tests/cluster/test_cli_terminal.py).
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"
