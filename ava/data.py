"""Open training data through the node's cache: `ava.data.open("s3://bucket/shard-0001.tar")`.

ava exports the cache settings to every job (AVA_CACHE_DIR, AVA_CACHE_SIZE in bytes,
AVA_CACHE_BLOCK_SIZE, and the same as FSSPEC_AVACACHE_CACHE_DIR/_CACHE_SIZE/_BLOCK_SIZE for
code that opens `avacache::` URLs through fsspec), so a training script needs nothing else:

    with ava.data.open("s3://bucket/shards/train-0001.tar") as f:
        ...

Remote storage is configured the way s3fs and botocore read it, from the environment, so no
secret reaches a command line or a log:
- credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, instance roles, ...);
- endpoint (MinIO, moto, other S3 APIs): any of AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL
  (botocore >= 1.31 reads both) or FSSPEC_S3_ENDPOINT_URL (fsspec's config, passed to s3fs as
  `endpoint_url`); all three verified against moto with botocore 1.43 / s3fs 2026.9.
fsspec json-decodes FSSPEC_<PROTOCOL>_<KWARG> values, so a number-looking value becomes a number.

Without AVA_CACHE_DIR (outside an ava job) reads go straight to the remote unless `cache=True`.
Standard library and fsspec only; importing this registers the `avacache` protocol.
"""

from __future__ import annotations

import builtins
import os
from typing import IO, Any

import fsspec  # type: ignore[import-untyped,unused-ignore]  # fsspec has no stubs or py.typed
from fsspec.core import split_protocol  # type: ignore[import-untyped,unused-ignore]  # fsspec has no stubs or py.typed

from ava.cache import AvaCacheFileSystem

_LOCAL = {"file", "local", "memory"}


def cache_enabled(env: dict[str, str] | None = None) -> bool:
    """True inside an ava job with a node cache (AVA_CACHE_DIR set and AVA_CACHE not "off")."""
    env = dict(os.environ) if env is None else env
    return bool(env.get("AVA_CACHE_DIR")) and env.get("AVA_CACHE", "").lower() not in ("0", "off")


def open(
    url: str,
    mode: str = "rb",
    *,
    cache: bool | None = None,
    **storage_options: Any,
) -> IO[Any]:
    """Open `url` (any fsspec URL or local path); reads of remote objects go through the cache.

    cache: None = use the node cache when the job has one; True/False to force.
    storage_options: passed to the remote filesystem (e.g. anon=True); prefer the environment
    for credentials. Writes, and local paths, are never cached.
    """
    protocol = split_protocol(url)[0]
    if protocol is None:
        return builtins.open(url, mode)
    use = cache_enabled() if cache is None else cache
    if not use or protocol in _LOCAL or "r" not in mode or "+" in mode:
        handle: IO[Any] = fsspec.open(url, mode, **storage_options).open()
        return handle
    cfs = AvaCacheFileSystem(target_protocol=protocol, target_options=storage_options)
    cached: IO[Any] = cfs.open(url, mode)
    return cached
