"""`ava plot` (runs' metrics as a picture, matplotlib from the `plot` extra) and `ava compare`
(runs side by side: the recipe keys that differ, final and best metric values)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from ava.cli import app, epilog
from ava.cli.complete import complete_runs
from ava.errors import EXIT_OK, UsageError

if TYPE_CHECKING:
    from ava.metrics import Point
    from ava.runs import RunRecord

RUNS_HELP = "Run ids, or prefixes of exactly one each (see `ava ps`)."
FORMATS = (".png", ".svg", ".html")


@app.command(
    epilog=epilog(
        'ava plot "$RUN" -o loss.png',
        "ava plot charlm-20261201-1 charlm-20261201-2 --metric val_loss -o runs.svg",
        'ava plot "$RUN" --x time -o report.html',
    )
)
def plot(
    run: list[str] = typer.Argument(..., metavar="RUN...", autocompletion=complete_runs, help=RUNS_HELP),
    metric: str | None = typer.Option(
        None, "--metric", "-m", metavar="NAME", help="The metric (default: the first run's first)."
    ),
    x: str = typer.Option("step", "--x", metavar="step|time", help="Against steps, or minutes since each run began."),
    output: str | None = typer.Option(
        None, "--output", "-o", metavar="FILE", help="FILE.png, .svg or .html (default: RUN-METRIC.png here)."
    ),
) -> int:
    """Draw runs' metric on one chart, each attempt its own stretch, failovers marked."""
    from ava import console, metrics, runs

    if x not in ("step", "time"):
        raise UsageError(f"--x {x}: expected step or time")
    if output is not None and Path(output).suffix.lower() not in FORMATS:
        raise UsageError(f"-o {output}: expected a file ending in {', '.join(FORMATS)}")
    records = [runs.resolve(r) for r in run]
    series = {r.id: metrics.read(r) for r in records}
    if metric is None:
        metric = next((metrics.names(p)[0] for p in series.values() if metrics.names(p)), None)
        if metric is None:
            raise UsageError(
                f"{', '.join(series)}: no metrics recorded (the script reports none with ava.env.progress)"
            )
    missing = [run_id for run_id, points in series.items() if metric not in metrics.names(points)]
    if missing:
        raise UsageError(f"run {missing[0]} recorded no metric {metric}")
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed, none opened
        import matplotlib.pyplot as pyplot
    except ImportError:
        raise UsageError("ava plot needs matplotlib: pip install 'ava[plot]' (or: pip install matplotlib)") from None
    target = Path(output or f"{records[0].id}-{metric}.png")
    figure = draw(pyplot, records, series, metric, x)
    if target.suffix.lower() == ".html":
        svg = io.StringIO()
        figure.savefig(svg, format="svg")
        title = f"{metric}: {', '.join(series)}"
        target.write_text(
            f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{_html(title)}</title></head>'
            f"<body>\n{svg.getvalue()}\n</body></html>\n",
            encoding="utf-8",
        )
    else:
        figure.savefig(target, dpi=120)
    pyplot.close(figure)
    console.info(f"ava: {metric} of {', '.join(series)} drawn in {target}")
    return EXIT_OK


def draw(pyplot: Any, records: list[RunRecord], series: dict[str, list[Point]], metric: str, x: str) -> Any:
    """The figure: a line per run and attempt (a failover leaves a gap, or a redone stretch
    drawn over the first), a dotted vertical line where each later attempt began."""
    figure, axes = pyplot.subplots(figsize=(9, 4.8))
    colours = pyplot.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, record in enumerate(records):
        points = [p for p in series[record.id] if metric in p.metrics and p.rank == _lowest_rank(series[record.id])]
        colour = colours[index % len(colours)]
        for number in sorted({p.attempt for p in points}):
            mine = [p for p in points if p.attempt == number]
            xs = [_x(p, record, x) for p in mine]
            label = record.id if number == points[0].attempt else None
            axes.plot(xs, [p.metrics[metric] for p in mine], color=colour, linewidth=1.4, label=label)
            if number != points[0].attempt:
                axes.axvline(xs[0], color=colour, linestyle=":", linewidth=1)
                axes.annotate(
                    f"attempt {number}",
                    (xs[0], 1),
                    xycoords=("data", "axes fraction"),
                    rotation=90,
                    va="top",
                    ha="right",
                    fontsize=8,
                    color=colour,
                )
    axes.set_xlabel("step" if x == "step" else "minutes since the run began")
    axes.set_ylabel(metric)
    values = [p.metrics[metric] for pts in series.values() for p in pts if metric in p.metrics]
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 50:
        axes.set_yscale("log")  # a loss falling by orders of magnitude
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    axes.set_title(metric)
    figure.tight_layout()
    return figure


def _lowest_rank(points: list[Point]) -> int:
    return min((p.rank for p in points), default=0)


def _x(point: Point, record: RunRecord, x: str) -> float:
    return float(point.step) if x == "step" else (point.time - record.started) / 60


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# -- compare ------------------------------------------------------------------------------------


def flat(raw: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A recipe's TOML data as dotted keys and TOML text values (`run.args`: `["--steps", "5"]`)."""
    from ava.runs import toml_value

    out: dict[str, str] = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat(value, name + "."))
        else:
            out[name] = toml_value(value)
    return out


def differing(records: list[RunRecord]) -> dict[str, list[str]]:
    """The recipe keys whose values are not the same in every run (absent: `-`), sorted."""
    flats = [flat(r.raw) for r in records]
    keys = sorted(set().union(*flats))
    return {k: [f.get(k, "-") for f in flats] for k in keys if len({f.get(k, "-") for f in flats}) > 1}


@app.command(
    epilog=epilog(
        "ava compare charlm-20261201-1 charlm-20261201-2",
        "ava compare RUN_A RUN_B --json | jq .differing",
    )
)
def compare(
    run: list[str] = typer.Argument(..., metavar="RUN RUN...", autocompletion=complete_runs, help=RUNS_HELP),
    json_out: bool = typer.Option(False, "--json", help="One JSON object: runs, differing keys, metric summaries."),
) -> int:
    """Runs side by side: the recipe keys that differ, and each metric's final and best values."""
    from ava import console, metrics, runs

    records = [runs.resolve(r) for r in run]
    if len({r.id for r in records}) < 2:
        raise UsageError("ava compare needs two runs or more")
    keys = differing(records)
    summaries = [{s.name: s for s in metrics.summarize(metrics.read(r))} for r in records]
    names = list(dict.fromkeys(name for s in summaries for name in s))
    if json_out:
        console.print_json(
            {
                "runs": [r.id for r in records],
                "differing": keys,
                "metrics": {n: [s[n].to_json() if n in s else None for s in summaries] for n in names},
            }
        )
        return EXIT_OK
    rows = [[key, *values] for key, values in keys.items()]
    for name in names:
        for which in ("final", "best"):
            cells = []
            for summary in summaries:
                s = summary.get(name)
                value, step = (
                    (s.final, s.final_step) if s and which == "final" else (s.best, s.best_step) if s else (0, 0)
                )
                cells.append(f"{metrics.format_value(value)} @{step}" if s else "-")
            rows.append([f"{name} ({which})", *cells])
    if not keys:
        console.info("ava: the runs' recipes are the same (every key, every --set)")
    console.table(["key", *[r.id for r in records]], rows)
    return EXIT_OK
