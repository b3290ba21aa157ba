"""Read S3 objects through the node cache for a few epochs; print what the cache fetched.

Plain fsspec, no ava import: `avacache::` URLs take their settings from the FSSPEC_AVACACHE_*
variables that launch exports. Prints per epoch and object, on every rank:
`epoch E node N url U read R fetched F sha256 H`, where F is the bytes the node's cache fetched
from the remote store while the object was read (its counters, summed over the node's processes).
"""

import argparse
import hashlib
import os

import fsspec
import torch.distributed as dist

parser = argparse.ArgumentParser()
parser.add_argument("--url", action="append", required=True, help="an avacache:: URL; repeat for more")
parser.add_argument("--epochs", type=int, default=2)
args = parser.parse_args()

dist.init_process_group("gloo")
# Configured like every `avacache::` URL; its store's counters cover the whole node.
cache = fsspec.filesystem("avacache")


def fetched() -> int:
    return int(cache.store.status()["fetched_bytes"])


for epoch in range(1, args.epochs + 1):
    dist.barrier()
    for url in args.url:
        before = fetched()
        digest, read = hashlib.sha256(), 0
        with fsspec.open(url, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                read += len(chunk)
        print(f"epoch {epoch} node {os.environ.get('AVA_NODE')} url {url} read {read} "
              f"fetched {fetched() - before} sha256 {digest.hexdigest()[:16]}", flush=True)
dist.destroy_process_group()
