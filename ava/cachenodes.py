"""The node caches seen from here: run the cache's command line (ava/cache/__main__.py) on nodes.

`status`, `warm` and `clear` fan out over nodes and return a result or an AvaError for each;
`prefetch` warms a recipe's `[data] prefetch` before a launch and raises if any node failed.
Nothing here prints. The agent's `cache` command runs the module from ava's runtime tree on the
node (so `provision.ensure` first: it puts both there), against the node's `cache_dir`, with
the block size that launch exports to jobs, so a warmed block is the very block a job reads.

Secrets never reach a command line: an environment for the module (a recipe's AWS_* values,
or variables forwarded by `ava cache warm --env`) travels as a 0600 JSON file that the agent
reads and deletes before it imports the cache (see ava/agent/cachecli.py).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ava import sync
from ava.agent.cachecli import NO_ENV_FILE
from ava.config import Node, Recipe
from ava.errors import EXIT_INFRA, EXIT_JOB_FAILED, EXIT_OK, AvaError, CommandError, ConnectError
from ava.transport import connect, run_all, shell_path

ADMIN_TIMEOUT = 120.0  # status and clear scan the cache directory; warm has no deadline

# Called as on_progress(node name, bytes done, bytes in all) while a node warms.
ProgressCallback = Callable[[str, int, int], None]


class WarmFailed(AvaError):
    """Objects could not be fetched into a node's cache (missing, denied, no such bucket...)."""

    exit_code = EXIT_JOB_FAILED


@dataclass(frozen=True)
class CacheStatus:
    node: str
    dir: str
    bytes: int
    blocks: int
    hits: int
    misses: int
    fetched_bytes: int
    size_limit: int  # the node's cache_size

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Cleared:
    node: str
    dir: str
    freed_bytes: int
    blocks: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Warmed:
    node: str
    objects: int
    total_bytes: int  # of the matching objects
    bytes: int  # in the node's cache afterwards
    blocks: int
    failed: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def module_command(node: Node, python: str, env_file: str | None, *args: str) -> str:
    """Shell text that runs the cache's command line with ARGS on NODE: the agent's `cache`
    command, by PYTHON (the node environment's, which has fsspec), from the runtime tree."""
    words = [
        shell_path(python),
        shell_path(sync.agent_path(node)),
        "cache",
        shell_path(sync.runtime_path(node)),
        shell_path(env_file) if env_file else NO_ENV_FILE,
        *map(shell_path, args),
    ]
    command = " ".join(words)
    if env_file:
        # The agent deletes the file at once; this covers a python that never started.
        command = f"{command}; code=$?; rm -f {shell_path(env_file)}; exit $code"
    return command


def _records(stdout: str) -> list[dict[str, Any]]:
    found = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return found


def _run_module(
    node: Node,
    python: str | None,
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float | None = ADMIN_TIMEOUT,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[int, list[dict[str, Any]], str]:
    """(exit status, JSON records, tail of the output) of the module CLI on NODE."""
    transport = connect(node)
    env_file = None
    if env:
        env_file = f"{node.workdir.rstrip('/')}/tmp/cache-env-{secrets.token_hex(8)}.json"
        transport.put(json.dumps(dict(env)).encode(), env_file, mode=0o600)

    def line(stream: str, text: str) -> None:
        if stream == "out" and on_record is not None and text.startswith("{"):
            try:
                on_record(json.loads(text))
            except ValueError:
                pass

    command = module_command(node, python or node.python, env_file, *args)
    result = transport.run(command, timeout=timeout, on_line=line if on_record else None)
    return result.exited, _records(result.stdout), result.tail()


def _exception_line(tail: str) -> str | None:
    """`NoCredentialsError: Unable to locate credentials` from the end of a traceback."""
    lines = [l.strip() for l in tail.splitlines() if l.strip()]
    if len(lines) > 1 and any(l.startswith("Traceback") or l.startswith("File ") for l in lines):
        name, colon, text = lines[-1].partition(":")
        return f"{name.rsplit('.', 1)[-1]}{colon}{text}"
    return None


def _cache_args(node: Node) -> list[str]:
    return ["--dir", node.cache_dir]


def status_one(node: Node, python: str | None = None) -> CacheStatus:
    code, records, tail = _run_module(node, python, "status", *_cache_args(node))
    if code != 0 or not records or "bytes" not in records[-1]:
        raise CommandError(f"{node.name}: cache status failed (exit {code})", tail=tail)
    r = records[-1]
    return CacheStatus(
        node.name,
        str(r.get("dir", node.cache_dir)),
        int(r["bytes"]),
        int(r["blocks"]),
        int(r.get("hits", 0)),
        int(r.get("misses", 0)),
        int(r.get("fetched_bytes", 0)),
        node.cache_size,
    )


def clear_one(node: Node, python: str | None = None) -> Cleared:
    code, records, tail = _run_module(node, python, "clear", *_cache_args(node))
    if code != 0 or not records or "freed_bytes" not in records[-1]:
        raise CommandError(f"{node.name}: cache clear failed (exit {code})", tail=tail)
    r = records[-1]
    return Cleared(node.name, str(r.get("dir", node.cache_dir)), int(r["freed_bytes"]), int(r["blocks"]))


def warm_one(
    node: Node,
    urls: list[str],
    *,
    python: str | None = None,
    env: Mapping[str, str] | None = None,
    on_progress: ProgressCallback | None = None,
) -> Warmed:
    """Fetch every block of the objects matching URLS (URLs or globs) into NODE's cache."""

    # Imported here: the cache package pulls in fsspec, which status and clear never need.
    from ava.cache.settings import DEFAULT_BLOCK_SIZE  # as WORKDIR/cache.json says and jobs read

    def record(r: dict[str, Any]) -> None:
        if on_progress is not None and "done_bytes" in r and not r.get("summary"):
            on_progress(node.name, int(r["done_bytes"]), int(r.get("total_bytes") or 0))

    args = [
        "warm",
        *_cache_args(node),
        "--size-limit",
        str(node.cache_size),
        "--block-size",
        str(DEFAULT_BLOCK_SIZE),
        "--",
        *urls,
    ]
    code, records, tail = _run_module(node, python, *args, env=env, timeout=None, on_record=record)
    summary = next((r for r in reversed(records) if r.get("summary")), None)
    if summary is None:
        error = next((r["error"] for r in reversed(records) if r.get("error")), None) or _exception_line(tail)
        raise WarmFailed(f"{node.name}: cache warm failed: {error or f'exit {code}'}", tail="" if error else tail)
    warmed = Warmed(
        node.name,
        int(summary["objects"]),
        int(summary["total_bytes"]),
        int(summary["bytes"]),
        int(summary["blocks"]),
        list(summary.get("errors") or []),
    )
    if warmed.failed:
        first = warmed.failed[0]
        more = f" (and {len(warmed.failed) - 1} more)" if len(warmed.failed) > 1 else ""
        raise WarmFailed(f"{node.name}: could not fetch {first.get('url')}: {first.get('error')}{more}")
    if warmed.objects == 0:
        raise WarmFailed(f"{node.name}: no object matches {' '.join(urls)}")
    if on_progress is not None:
        on_progress(node.name, warmed.total_bytes, warmed.total_bytes)
    return warmed


def status(nodes: list[Node], *, pythons: Mapping[str, str] | None = None) -> dict[str, CacheStatus | AvaError]:
    return run_all(nodes, lambda node: status_one(node, (pythons or {}).get(node.name)))


def clear(nodes: list[Node], *, pythons: Mapping[str, str] | None = None) -> dict[str, Cleared | AvaError]:
    return run_all(nodes, lambda node: clear_one(node, (pythons or {}).get(node.name)))


def warm(
    nodes: list[Node],
    urls: list[str],
    *,
    env: Mapping[str, str] | None = None,
    pythons: Mapping[str, str] | None = None,
    on_progress: ProgressCallback | None = None,
) -> dict[str, Warmed | AvaError]:
    """Every node warms at once, each from the remote store itself."""
    return run_all(
        nodes,
        lambda node: warm_one(node, urls, python=(pythons or {}).get(node.name), env=env, on_progress=on_progress),
    )


def exit_code(outcomes: Mapping[str, Any]) -> int:
    """3 when a node was unreachable or a command broke, else 1 when a warm failed, else 0."""
    errors = [o for o in outcomes.values() if isinstance(o, AvaError)]
    if any(not isinstance(e, WarmFailed) for e in errors):
        return EXIT_INFRA
    return EXIT_JOB_FAILED if errors else EXIT_OK


def prefetch(
    nodes: list[Node],
    recipe: Recipe,
    *,
    pythons: Mapping[str, str] | None = None,
    report: Callable[[str], None] | None = None,
) -> None:
    """Warm the recipe's `[data] prefetch` on NODES with the recipe's environment (its AWS_*
    values reach the nodes in a 0600 file). Raises the first node's error if any node failed."""
    urls = list(recipe.data.prefetch)
    if not urls:
        return
    if report is not None:
        report(f"prefetching {' '.join(urls)} into the cache of {', '.join(n.name for n in nodes)}")
    outcomes = warm(nodes, urls, env=recipe.env, pythons=pythons)
    errors = [(name, o) for name, o in outcomes.items() if isinstance(o, AvaError)]
    if errors:
        _name, first = errors[0]
        more = f" (and {len(errors) - 1} more nodes)" if len(errors) > 1 else ""
        if isinstance(first, ConnectError):
            raise first
        raise type(first)(f"prefetching recipe data: {first.message}{more}", tail=first.tail)
    if report is not None:
        for name, outcome in outcomes.items():
            assert isinstance(outcome, Warmed)
            report(f"{name}: {outcome.objects} objects ({outcome.total_bytes / 2**20:.1f} MiB) in the cache")
