"""Cache settings: explicit arguments, then fsspec config, then AVA_CACHE_* variables, then defaults.

fsspec applies its own configuration (``FSSPEC_AVACACHE_<KWARG>`` variables, files in
``FSSPEC_CONFIG_DIR``) to the filesystem's keyword arguments before we see them, so this module
only has to fall back to the ``AVA_CACHE_*`` variables that ava exports to every job.
Standard library only: this file ships to nodes where ava is not installed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

DEFAULT_DIR = "~/.ava/cache"
DEFAULT_SIZE = 100 * GiB
DEFAULT_BLOCK_SIZE = 8 * MiB
DEFAULT_READAHEAD = 8  # blocks fetched ahead of a sequential reader
DEFAULT_CHECK_TTL = 60.0  # seconds an object's ETag is trusted before a recheck
DEFAULT_RETRIES = 3  # attempts per block fetch, on top of the remote client's own retries

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": KiB,
    "kib": KiB,
    "mi": MiB,
    "mib": MiB,
    "gi": GiB,
    "gib": GiB,
    "ti": TiB,
    "tib": TiB,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str) -> int:
    """Bytes from an int or a string like "100GiB", "8MiB", "1.5GB" (1000-based without the i)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"expected a non-negative size, got {value!r}")
        return int(value)
    m = _SIZE_RE.match(str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f'expected a size such as "8MiB" or "100GiB", got {value!r}')
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _prefixes(value: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return tuple(str(v) for v in json.loads(text))
        return tuple(p.strip() for p in text.split(",") if p.strip())
    return tuple(str(v) for v in value)


@dataclass(frozen=True)
class CacheSettings:
    """Everything the cache needs to know; immutable once built."""

    cache_dir: str
    cache_size: int = DEFAULT_SIZE
    block_size: int = DEFAULT_BLOCK_SIZE
    readahead: int = DEFAULT_READAHEAD
    check_ttl: float = DEFAULT_CHECK_TTL
    immutable: tuple[str, ...] = field(default_factory=tuple)
    retries: int = DEFAULT_RETRIES
    high_watermark: float = 0.9
    low_watermark: float = 0.8
    fsync: bool = False  # rename after write is enough for kill -9; fsync also survives power loss

    @classmethod
    def resolve(cls, env: Mapping[str, str] | None = None, **given: Any) -> CacheSettings:
        """Settings from explicit keyword values (None = not given), else env, else defaults."""
        env = os.environ if env is None else env

        def pick(name: str, var: str, default: Any) -> Any:
            value = given.get(name)
            if value is not None:
                return value
            return env.get(var, default) if env.get(var, "") != "" else default

        block_size = parse_size(pick("block_size", "AVA_CACHE_BLOCK_SIZE", DEFAULT_BLOCK_SIZE))
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        low = float(pick("low_watermark", "AVA_CACHE_LOW_WATERMARK", 0.8))
        high = float(pick("high_watermark", "AVA_CACHE_HIGH_WATERMARK", 0.9))
        if not 0 < low <= high <= 1:
            raise ValueError("cache watermarks must satisfy 0 < low <= high <= 1")
        fsync = pick("fsync", "AVA_CACHE_FSYNC", False)
        return cls(
            cache_dir=os.path.abspath(os.path.expanduser(str(pick("cache_dir", "AVA_CACHE_DIR", DEFAULT_DIR)))),
            cache_size=parse_size(pick("cache_size", "AVA_CACHE_SIZE", DEFAULT_SIZE)),
            block_size=block_size,
            readahead=max(0, int(pick("readahead", "AVA_CACHE_READAHEAD", DEFAULT_READAHEAD))),
            check_ttl=float(pick("check_ttl", "AVA_CACHE_CHECK_TTL", DEFAULT_CHECK_TTL)),
            immutable=_prefixes(pick("immutable", "AVA_CACHE_IMMUTABLE", None)),
            retries=max(1, int(pick("retries", "AVA_CACHE_RETRIES", DEFAULT_RETRIES))),
            high_watermark=high,
            low_watermark=low,
            fsync=fsync if isinstance(fsync, bool) else str(fsync).lower() in ("1", "true", "yes"),
        )


def job_env(
    cache_dir: str,
    cache_size: int | str,
    block_size: int | str = DEFAULT_BLOCK_SIZE,
    immutable: list[str] | tuple[str, ...] = (),
    check_ttl: float | None = None,
) -> dict[str, str]:
    """Environment to export to a job so `avacache::` and `ava.data.open` use the node's cache.

    Both spellings are set: AVA_CACHE_* for ava's own code, FSSPEC_AVACACHE_* for anything that
    builds the filesystem through fsspec's config (fsspec json-decodes those values, so numbers
    arrive as ints). Nothing secret is in here.
    """
    size = parse_size(cache_size)
    block = parse_size(block_size)
    env = {
        "AVA_CACHE_DIR": cache_dir,
        "AVA_CACHE_SIZE": str(size),
        "AVA_CACHE_BLOCK_SIZE": str(block),
        "FSSPEC_AVACACHE_CACHE_DIR": cache_dir,
        "FSSPEC_AVACACHE_CACHE_SIZE": str(size),
        "FSSPEC_AVACACHE_BLOCK_SIZE": str(block),
    }
    if immutable:
        env["AVA_CACHE_IMMUTABLE"] = json.dumps(list(immutable))
    if check_ttl is not None:
        env["AVA_CACHE_CHECK_TTL"] = str(check_ttl)
    return env
