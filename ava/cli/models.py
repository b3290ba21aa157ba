"""`ava models`: committed checkpoints across runs, and `ava models export` to copy one out."""

from __future__ import annotations

import time
from typing import Any

import typer

from ava.cli import app, epilog
from ava.errors import EXIT_OK, AvaError, UsageError
from ava.units import format_size


@app.command(
    epilog=epilog(
        "ava models",
        'ava models "$RUN" --json',
        'ava models export "$RUN"@1000 s3://models/charlm-v1',
        "ava train recipes/charlm --from charlm-20261201-1@1000   (a new run from that checkpoint)",
    )
)
def models(
    words: list[str] = typer.Argument(
        None,
        metavar="[RUN] | export RUN[@STEP] DEST",
        help="A run (default: every run); or `export RUN[@STEP] DEST`: copy that checkpoint (default: "
        "the latest) to DEST, a directory or fsspec URL, with its metadata.",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print JSON: a list of checkpoints, or the export's metadata."),
) -> int:
    """Committed checkpoints as models: run, step, size, metric at that step, where."""
    from ava import console

    words = list(words or [])
    if words[:1] == ["export"]:
        if len(words) != 3:
            raise UsageError("usage: ava models export RUN[@STEP] DEST")
        return _export(words[1], words[2], json_out=json_out)
    if len(words) > 1:
        raise UsageError(f"unexpected argument {words[1]!r}: ava models [RUN] | ava models export RUN[@STEP] DEST")
    listed = _list(words[0] if words else None)
    if json_out:
        console.print_json(listed)
        return EXIT_OK
    rows = [
        [
            str(item["run"]),
            str(item["step"]),
            format_size(item["size"]),
            item["metric"] or "",
            time.strftime("%m-%d %H:%M", time.localtime(item["time"])) if item["time"] else "",
            str(item["url"]),
        ]
        for item in listed
    ]
    console.table(["run", "step", "size", "metric", "committed", "where"], rows)
    return EXIT_OK


def _list(run: str | None) -> list[dict[str, Any]]:
    from ava import console, metrics, runs
    from ava import models as checkpoints

    records = [runs.resolve(run)] if run is not None else runs.all_runs()
    listed: list[dict[str, Any]] = []
    for record in records:
        try:
            found = checkpoints.committed(record)
        except AvaError as error:
            if run is not None:
                raise
            console.warn(error.message)  # one unreachable store never hides the other runs
            continue
        if not found:
            continue
        points = metrics.read(record)
        first = metrics.names(points)[:1]
        for checkpoint in found:
            value = metrics.value_at(points, first[0], checkpoint.step) if first else None
            listed.append(
                {
                    **checkpoint.to_json(),
                    "metric": f"{first[0]}={metrics.format_value(value)}" if first and value is not None else None,
                }
            )
    return listed


def _export(ref: str, dest: str, *, json_out: bool) -> int:
    from ava import console
    from ava import models as checkpoints

    record, checkpoint = checkpoints.resolve(ref)
    meta = checkpoints.export(record, checkpoint, dest)
    if json_out:
        console.print_json(meta)
    else:
        console.info(
            f"ava: {record.id}@{checkpoint.step} (checkpoint {checkpoint.digest}) copied to {dest}; "
            f"train from it: ava train RECIPE --set env.AVA_INIT_CHECKPOINT={dest.rstrip('/')}/step-{checkpoint.step:08d}"
        )
    return EXIT_OK
