"""ava's node-local block cache for remote data, as the fsspec protocol `avacache`.

    fsspec.open("avacache::s3://bucket/shards/train-0001.tar")

fsspec finds the protocol through the `fsspec.specs` entry point: ava's where ava is installed,
the runtime tree's own (``ava_runtime-0.dist-info``) on nodes, where it is on PYTHONPATH; and
importing `ava.cache.fs` (or any of its names from here) registers it as well. Standard library
and fsspec only.

The names below are imported on first use: the CLI reads `ava.cache.settings` at every launch,
and fsspec's own import (~50 ms) is not for it to pay.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ava.cache.fs import AvaCacheFile, AvaCacheFileSystem, ObjectChanged
    from ava.cache.settings import CacheSettings, job_env, parse_size
    from ava.cache.store import BlockStore, ObjectId

__all__ = [
    "AvaCacheFile",
    "AvaCacheFileSystem",
    "BlockStore",
    "CacheSettings",
    "ObjectChanged",
    "ObjectId",
    "job_env",
    "parse_size",
]

_MODULE = {
    "AvaCacheFile": "fs",
    "AvaCacheFileSystem": "fs",
    "ObjectChanged": "fs",
    "CacheSettings": "settings",
    "job_env": "settings",
    "parse_size": "settings",
    "BlockStore": "store",
    "ObjectId": "store",
}


def __getattr__(name: str) -> Any:
    if name not in _MODULE:
        raise AttributeError(f"module 'ava.cache' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ava.cache.{_MODULE[name]}"), name)
    globals()[name] = value
    return value
