"""`ava show` (a run's whole story, its metrics as terminal charts) and `ava export` (its metrics
for other tools); the step, steps/s and latest metric `ava ps` shows for running runs."""

from __future__ import annotations

import csv
import io
import shutil
import time
from typing import TYPE_CHECKING, Any

import typer

from ava.cli import app, epilog
from ava.cli.complete import complete_runs
from ava.errors import EXIT_OK, AvaError, UsageError
from ava.units import format_duration, format_size

if TYPE_CHECKING:
    from ava.metrics import Point
    from ava.models import Checkpoint
    from ava.runs import RunRecord

RUN_HELP = "A run id, or a prefix of exactly one (see `ava ps`)."
CHART_HEIGHT = 10


def progress_cells(record: RunRecord) -> list[str]:
    """`ava ps` for a running run: its step, steps/s and the latest value of its first metric."""
    from ava import metrics
    from ava.agent.protocol import RUNNING

    if record.state != RUNNING:
        return ["", "", ""]
    points = metrics.tail(record)
    if not points:
        return ["", "", ""]
    rate = metrics.rate(points)
    first = next((p for p in reversed(points) if p.metrics), None)
    shown = ""
    if first is not None:
        name, value = next(iter(first.metrics.items()))
        shown = f"{name}={metrics.format_value(value)}"
    return [str(points[-1].step), f"{rate:.2f}" if rate is not None else "", shown]


def progress_json(record: RunRecord) -> dict[str, Any]:
    """`ava ps --json`'s `progress` of a run: step, steps_per_s, metrics (latest values)."""
    from ava import metrics

    points = metrics.tail(record)
    if not points:
        return {}
    latest: dict[str, float] = {}
    for point in points:
        latest.update(point.metrics)
    return {"step": points[-1].step, "steps_per_s": metrics.rate(points), "metrics": latest}


@app.command(
    epilog=epilog(
        'ava show "$RUN"',
        'ava show "$RUN" --metric loss --json | jq .metrics.summary',
        "COLUMNS=120 ava show charlm-2026 | less",
    )
)
def show(
    run: str = typer.Argument(..., metavar="RUN", autocompletion=complete_runs, help=RUN_HELP),
    metric: list[str] = typer.Option([], "--metric", "-m", metavar="NAME", help="Only this metric (repeatable)."),
    json_out: bool = typer.Option(
        False, "--json", help="One JSON object: the record, lineage, checkpoints, metric points."
    ),
) -> int:
    """A run's story: recipe and overrides, lineage, attempts, checkpoints, and each metric as a chart."""
    from ava import console, metrics, models, runs

    record = runs.resolve(run)
    points = metrics.read(record)
    names = metrics.names(points)
    unknown = [m for m in metric if m not in names]
    if unknown:
        raise UsageError(f"run {record.id} recorded no metric {unknown[0]} (recorded: {', '.join(names) or 'none'})")
    chosen = metric or names
    checkpoints: list[Checkpoint] = []
    unreadable = None
    try:
        checkpoints = models.committed(record)
    except AvaError as error:
        unreadable = error.message
    if json_out:
        console.print_json(
            {
                **record.summary(),
                "recipe_hash": record.recipe_hash,
                "overrides": record.overrides,
                "parent": record.parent,
                "lineage": models.lineage(record),
                "checkpoint_dir": models.checkpoint_dir(record),
                "checkpoints": [c.to_json() for c in checkpoints],
                "checkpoints_error": unreadable,
                "metrics": {
                    "names": names,
                    "steps_per_s": metrics.rate(points),
                    "summary": [s.to_json() for s in metrics.summarize(points) if s.name in chosen],
                    "points": [p.to_json() for p in points],
                },
            }
        )
        return EXIT_OK
    _story(record, points)
    _checkpoints(record, checkpoints, points, unreadable)
    _charts(record, points, chosen)
    return EXIT_OK


def _lineage_text(record: RunRecord) -> str:
    from ava import models

    chain = models.lineage(record)
    return " <- ".join(f"{p['run']}@{p['step']} (checkpoint {p.get('checkpoint', '?')})" for p in chain)


def _story(record: RunRecord, points: list[Point]) -> None:
    from ava import console, metrics

    took = (record.ended or time.time()) - record.started
    rate = metrics.rate(points)
    recorded = (
        f"{len({p.step for p in points})} steps, metrics: {', '.join(metrics.names(points)) or 'none'}"
        + (f", {rate:.2f} steps/s (latest attempt)" if rate is not None else "")
        if points
        else "none (the script reports none with ava.env.progress)"
    )
    rows = [
        ["run", record.id],
        ["recipe", f"{record.recipe} (hash {record.recipe_hash}, {record.source})"],
        ["overrides", " ".join(record.overrides) or "-"],
        ["from", _lineage_text(record) or "-"],
        ["state", record.state + ("" if record.exit_code is None else f" (exit {record.exit_code})")],
        ["started", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.started))],
        ["took", format_duration(took)],
        ["recorded", recorded],
    ]
    console.plain(["key", "value"], rows)
    starts = metrics.attempt_starts(points)
    attempts = [
        [
            str(a.number),
            ",".join(a.nodes),
            time.strftime("%H:%M:%S", time.localtime(a.started)),
            format_duration((a.ended or time.time()) - a.started),
            str(starts[a.number]) if a.number in starts else "",
            a.state + (f": {a.cause}" if a.cause else ""),
        ]
        for a in record.attempts
    ]
    if attempts:
        console.write("\n")
        console.table(["attempt", "nodes", "started", "took", "first step", "end"], attempts)


def _checkpoints(record: RunRecord, checkpoints: list[Checkpoint], points: list[Point], unreadable: str | None) -> None:
    from ava import console, metrics, models

    where = models.checkpoint_dir(record)
    if where is None:
        return
    console.write("\n")
    if unreadable is not None:
        console.write(f"checkpoints: {unreadable}\n")
        return
    if not checkpoints:
        console.write(f"checkpoints: none committed in {where}\n")
        return
    first = metrics.names(points)[:1]
    rows = []
    for c in checkpoints:
        value = metrics.value_at(points, first[0], c.step) if first else None
        rows.append(
            [
                str(c.step),
                time.strftime("%H:%M:%S", time.localtime(c.time)) if c.time else "",
                format_size(c.size),
                metrics.format_value(value) if value is not None else "",
                c.digest,
            ]
        )
    console.table(["step", "committed", "size", first[0] if first else "metric", "checkpoint"], rows, title=where)


def chart_width() -> int:
    """The terminal's width (COLUMNS off a terminal, else 80)."""
    return shutil.get_terminal_size((80, 24)).columns


def _charts(record: RunRecord, points: list[Point], chosen: list[str]) -> None:
    from ava import chart, console, metrics

    unicode = console.tabular()
    marks = [chart.Mark(step, str(number)) for number, step in metrics.attempt_starts(points).items()]
    summaries = {s.name: s for s in metrics.summarize(points)}
    for name in chosen:
        line = metrics.timeline(points, name)
        s = summaries[name]
        console.write(
            f"\n{name}: final {metrics.format_value(s.final)} at step {s.final_step}, "
            f"best {metrics.format_value(s.best)} at step {s.best_step}; attempts start at "
            + ", ".join(f"{m.label}: step {int(m.x)}" for m in marks)
            + "\n"
        )
        lines = chart.render(
            [p.step for p in line],
            [p.metrics[name] for p in line],
            width=chart_width(),
            height=CHART_HEIGHT,
            marks=marks,
            unicode=unicode,
        )
        console.write("\n".join(lines) + "\n")


@app.command(
    epilog=epilog(
        'ava export "$RUN" --csv > metrics.csv',
        'ava export "$RUN" --json | jq ".[] | select(.repeated | not)"',
        'ava export "$RUN" --tensorboard runs/    (then: tensorboard --logdir runs/)',
    )
)
def export(
    run: str = typer.Argument(..., metavar="RUN", autocompletion=complete_runs, help=RUN_HELP),
    csv_out: bool = typer.Option(False, "--csv", help="CSV (the default): step,time,attempt,rank,repeated,<metrics>."),
    json_out: bool = typer.Option(False, "--json", help="A JSON list of the recorded points."),
    tensorboard: str | None = typer.Option(
        None, "--tensorboard", metavar="DIR", help="TensorBoard event files in DIR/RUN (needs tensorboard)."
    ),
    output: str | None = typer.Option(None, "--output", "-o", metavar="FILE", help="Write here, not to stdout."),
) -> int:
    """A run's recorded metrics for other tools: CSV, JSON, or TensorBoard event files."""
    from ava import console, metrics, runs

    if sum([csv_out, json_out, tensorboard is not None]) > 1:
        raise UsageError("ava export: choose one of --csv, --json, --tensorboard")
    record = runs.resolve(run)
    points = metrics.read(record)
    if tensorboard is not None:
        written = _tensorboard(record, points, tensorboard)
        console.info(f"ava: {len(points)} points of {record.id} written to {written}")
        return EXIT_OK
    if json_out:
        text = _json_text([p.to_json() for p in points])
    else:
        header, rows = metrics.csv_rows(points)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        text = buffer.getvalue()
    if output is None:
        console.write(text)
    else:
        with open(output, "w", encoding="utf-8") as handle:
            handle.write(text)
        console.info(f"ava: {len(points)} points of {record.id} written to {output}")
    return EXIT_OK


def _json_text(items: list[dict[str, Any]]) -> str:
    import json

    from ava.console import JSON_VERSION

    return json.dumps([{"version": JSON_VERSION, **item} for item in items], indent=2) + "\n"


def _tensorboard(record: RunRecord, points: list[Point], folder: str) -> str:
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2  # type: ignore[import-not-found,unused-ignore]
        from tensorboard.summary.writer.event_file_writer import (  # type: ignore[import-not-found,unused-ignore]
            EventFileWriter,
        )
    except ImportError:
        raise UsageError(
            "ava export --tensorboard needs tensorboard's event writer: pip install tensorboard (or use --csv / --json)"
        ) from None
    target = f"{folder.rstrip('/')}/{record.id}"
    writer = EventFileWriter(target)
    for point in points:
        if point.repeated:
            continue  # TensorBoard keeps one value per step: the first time each step was done
        values = [summary_pb2.Summary.Value(tag=name, simple_value=value) for name, value in point.metrics.items()]
        if values:
            writer.add_event(
                event_pb2.Event(wall_time=point.time, step=point.step, summary=summary_pb2.Summary(value=values))
            )
    writer.close()
    return target
