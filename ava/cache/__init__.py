"""ava's node-local block cache for remote data, as the fsspec protocol `avacache`.

    fsspec.open("avacache::s3://bucket/shards/train-0001.tar")

Importing this package registers the protocol with fsspec, so it works on nodes where ava is
not installed (no entry point there); where ava is installed the `fsspec.specs` entry point
does the same. Standard library and fsspec only.
"""

import fsspec  # type: ignore[import-untyped]  # fsspec has no type hints

from ava.cache.fs import AvaCacheFile, AvaCacheFileSystem, ObjectChanged
from ava.cache.settings import CacheSettings, job_env, parse_size
from ava.cache.store import BlockStore, ObjectId

fsspec.register_implementation("avacache", AvaCacheFileSystem, clobber=True)

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
