"""Fixtures the cache tests share: moto in its own process, the counting proxy in front of it,
and a plain s3fs client with the test module's BUCKET made."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.s3server import Proxy, S3Endpoint, moto_server, s3_proxy


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Endpoint]:
    with moto_server(process=True) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(s3: S3Endpoint) -> Iterator[Proxy]:
    with s3_proxy(s3.url) as p:
        yield p


@pytest.fixture(scope="module")
def direct(s3: S3Endpoint, request: pytest.FixtureRequest) -> Any:
    import s3fs

    bucket = request.module.BUCKET
    fs = s3fs.S3FileSystem(**s3.s3fs_kwargs(skip_instance_cache=True))
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    return fs
