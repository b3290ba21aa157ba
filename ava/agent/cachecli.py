"""The agent's `cache` command: the cache's own command line (ava/cache/__main__.py: status,
warm, clear) run from ava's runtime tree on this node, for `ava cache` and a recipe's prefetch.

    python3 agent.pyz cache RUNTIME ENV_FILE ARGS...

The agent itself stays standard library only: the cache needs fsspec, so its module comes from
the runtime tree RUNTIME, run by the interpreter of the node's environment. ENV_FILE ("-" for
none) is a 0600 JSON file of environment variables (a recipe's AWS_* values): it is read and
deleted before the cache is imported, since fsspec reads its FSSPEC_* configuration at import,
and it keeps those values off every command line.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

NO_ENV_FILE = "-"


def run(runtime: str, env_file: str, args: list[str], *, umask: int) -> int:
    """Exit status of the cache's command line run with ARGS (see the module doc)."""
    # The cache's files get the login's umask, as under `python3 -c`, not the agent's 0o077.
    os.umask(umask)
    if env_file != NO_ENV_FILE:
        path = os.path.expanduser(env_file)
        try:
            with open(path, encoding="utf-8") as f:
                os.environ.update(json.load(f))
        finally:
            os.unlink(path)
    sys.path.insert(0, os.path.expanduser(runtime))
    cache_main = importlib.import_module("ava.cache.__main__")
    return int(cache_main.main(args))
