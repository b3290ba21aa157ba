"""Module CLI run on a node by `ava cache`: `python3 -m ava.cache status|warm|clear --dir D`.

Prints JSON on stdout, one object per line; exit 0 on success, 1 when an object could not be
fetched, 2 on bad usage. Remote credentials and endpoint come from the environment only
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL or FSSPEC_S3_ENDPOINT_URL; see
ava/data.py), never from the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import fsspec  # type: ignore[import-untyped]  # fsspec has no type hints
from fsspec.core import split_protocol  # type: ignore[import-untyped]

from ava.cache.fs import AvaCacheFileSystem
from ava.cache.settings import parse_size
from ava.cache.store import BlockStore


def _emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _expand(pattern: str) -> list[str]:
    """Object URLs matching a URL or glob, e.g. s3://bucket/shards/train-*.tar."""
    proto = split_protocol(pattern)[0] or "file"
    fs = fsspec.filesystem(proto)
    names = fs.glob(pattern) if any(c in pattern for c in "*?[") else [pattern]
    out = []
    for name in names:
        url = name if "://" in name else f"{proto}://{fs._strip_protocol(name)}"
        if fs.isfile(url):
            out.append(url)
    return out


def cmd_status(args: argparse.Namespace) -> int:
    _emit(BlockStore(args.dir, None).status())
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    store = BlockStore(args.dir, None)
    _emit({"dir": args.dir, **store.clear()})
    return 0


def cmd_warm(args: argparse.Namespace) -> int:
    kw: dict[str, Any] = {"cache_dir": args.dir}
    if args.size_limit is not None:
        kw["cache_size"] = parse_size(args.size_limit)
    if args.block_size is not None:
        kw["block_size"] = parse_size(args.block_size)
    cfs = AvaCacheFileSystem(**kw)
    urls: list[str] = []
    for pattern in args.urls:
        urls.extend(_expand(pattern))
    sizes = {}
    for url in urls:
        sizes[url] = cfs.object_id(url)[0].size
    total = sum(sizes.values())
    done = 0
    failed: list[dict[str, str]] = []
    for url in urls:
        base = done

        def progress(obj_done: int, _obj_total: int, url: str = url, base: int = base) -> None:
            _emit({"url": url, "done_bytes": base + obj_done, "total_bytes": total})

        try:
            cfs.warm(url, on_progress=progress)
        except OSError as e:
            failed.append({"url": url, "error": str(e)})
        done = base + sizes[url]
    cfs.store.stats.flush()
    _emit(
        {
            "summary": True,
            "objects": len(urls),
            "done_bytes": done,
            "total_bytes": total,
            "errors": failed,
            **{k: v for k, v in cfs.store.status().items() if k in ("dir", "bytes", "blocks", "size_limit")},
        }
    )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m ava.cache")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("status", help="bytes, blocks, hits and misses of a cache directory")
    p.add_argument("--dir", required=True)
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("warm", help="fetch every block of the matching objects")
    p.add_argument("--dir", required=True)
    p.add_argument("--size-limit", help='bytes or a size such as "100GiB"')
    p.add_argument("--block-size", help="block size (default 8MiB or $AVA_CACHE_BLOCK_SIZE)")
    p.add_argument("urls", nargs="+", metavar="URL_OR_GLOB")
    p.set_defaults(func=cmd_warm)
    p = sub.add_parser("clear", help="remove every block")
    p.add_argument("--dir", required=True)
    p.set_defaults(func=cmd_clear)
    args = parser.parse_args(argv)
    args.dir = os.path.abspath(os.path.expanduser(args.dir))
    try:
        return int(args.func(args))
    except (OSError, ValueError) as e:
        _emit({"error": f"{type(e).__name__}: {e}"})
        return 1


if __name__ == "__main__":
    sys.exit(main())
