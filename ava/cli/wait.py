"""`ava wait`: block until a run ends; its exit code is the run's (for CI scripts)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import typer

from ava.cli import app, epilog
from ava.cli.complete import complete_runs
from ava.errors import EXIT_JOB_FAILED, EXIT_OK, AvaError, UsageError
from ava.units import format_duration

if TYPE_CHECKING:
    from ava.runs import RunRecord

# A detached run's background supervisor records its pid a moment after `ava train --detach`
# returns; only a run unsupervised for this long is taken as orphaned.
ORPHAN_GRACE = 15.0


class RunOrphaned(AvaError):
    """Nothing supervises the run any more: it will not end by itself (exit 3)."""


class WaitTimedOut(AvaError):
    """--timeout passed; the run goes on (exit 3: nothing is known of the job's outcome yet)."""


@app.command(
    epilog=epilog(
        'RUN=$(ava train recipe.toml --detach) && ava wait "$RUN"',
        'ava wait "$RUN" --timeout 2h || ava logs "$RUN" --tail 50',
        'ava wait "$RUN" --json | jq .exit_code',
    )
)
def wait(
    run: str = typer.Argument(
        ..., metavar="RUN", autocompletion=complete_runs, help="A run id, or a prefix of exactly one (see `ava ps`)."
    ),
    timeout: str | None = typer.Option(
        None, "--timeout", metavar="DURATION", help="Give up after this long (e.g. 90s, 30m, 2h); the run goes on."
    ),
    json_out: bool = typer.Option(False, "--json", help="When it ends, print the run as `ava ps RUN --json` does."),
) -> int:
    """Wait until the run ends: exit 0 if it succeeded, 1 if it failed or was stopped.

    Exit 3 when --timeout passes first, or when nothing supervises the run any more (its
    `ava train` was killed: `ava attach RUN` takes it over); the run is left as it is.
    """
    from ava import runs
    from ava.units import parse_duration

    record = runs.resolve(run)
    limit = parse_duration(timeout, source="--timeout", key="") if timeout is not None else None
    if limit is not None and limit <= 0:
        raise UsageError(f"--timeout {timeout}: expected a duration above zero")
    began = time.monotonic()
    unsupervised_since: float | None = None
    last_seen: tuple[str, int] | None = None
    while True:
        record = runs.load(record.id)
        if record.final:
            break
        now = time.monotonic()
        attempt = record.current()
        seen = (record.state, attempt.number if attempt else 0)
        if seen != last_seen:
            _say(f"ava: {record.id}: {record.state}" + (f" (attempt {seen[1]})" if seen[1] else ""))
            last_seen = seen
        if _supervised(record):
            unsupervised_since = None
        elif unsupervised_since is None:
            unsupervised_since = now
        elif now - unsupervised_since > ORPHAN_GRACE:
            raise RunOrphaned(
                f"run {record.id} is {record.state} but nothing supervises it; "
                f"`ava attach {record.id}` takes it over, `ava stop {record.id}` ends it"
            )
        if limit is not None and now - began >= limit:
            raise WaitTimedOut(
                f"run {record.id} still {record.state} after {format_duration(limit)} "
                f"(--timeout); it goes on: `ava stop {record.id}` ends it"
            )
        time.sleep(0.5)
    return _ended(record, json_out)


def _supervised(record: RunRecord) -> bool:
    from ava.cli.train import _alive

    pid = record.supervisor_pid
    return pid is not None and pid != 0 and _alive(pid)


def _say(text: str) -> None:
    from ava import console

    console.info(text)


def _ended(record: RunRecord, json_out: bool) -> int:
    from ava import console
    from ava.agent.protocol import SUCCEEDED

    if json_out:
        console.print_json(record.summary())
    took = format_duration((record.ended or time.time()) - record.started)
    last = record.current()
    cause = f": {last.cause}" if record.state != SUCCEEDED and last is not None and last.cause else ""
    _say(f"ava: run {record.id} {record.state} after {took}{cause}")
    return EXIT_OK if record.state == SUCCEEDED else EXIT_JOB_FAILED
