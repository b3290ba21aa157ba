"""A run's metrics: what its script reported with `ava.env.progress(step, **metrics)`.

The agent keeps each rank's lines in the attempt's `metrics.jsonl` on the node; its status
answer carries the new ones, and the supervisor hands each batch, in order, to `record`, which
appends them to the run record:

    RUN_DIR/metrics/attempt-N.jsonl     append-only, 0600, one JSON object a line:
    {"step": 1200, "time": 1763892000.125, "attempt": 2, "rank": 0, "node": "gpu1",
     "metrics": {"loss": 2.31, "lr": 0.0003}, "repeated": false}

After a failover the script resumes from its last checkpoint and does again the steps since
then: those points are kept (they are what the model really did) but marked `repeated`, so a
step is never counted twice. A line without metrics is a step-rate point (progress(step)
alone): steps/s comes from the points' steps and times.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ava.runs import RunRecord

METRICS_DIR = "metrics"
_ATTEMPT_FILE = re.compile(r"^attempt-(\d+)\.jsonl$")
# Names of metrics where larger is better; every other metric's best is its smallest value.
_HIGHER_IS_BETTER = re.compile(r"acc|accuracy|score|reward|f1|bleu|rouge|auc|precision|recall|per_s|throughput|mfu")
RATE_WINDOW_S = 60.0  # steps/s is measured over the latest attempt's last minute


@dataclass(frozen=True)
class Point:
    """One recorded line: `metrics` may be empty (a step-rate point)."""

    step: int
    time: float
    attempt: int
    rank: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    repeated: bool = False
    node: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "step": self.step,
            "time": self.time,
            "attempt": self.attempt,
            "rank": self.rank,
            "metrics": self.metrics,
            "repeated": self.repeated,
        }
        if self.node is not None:
            data["node"] = self.node
        return data


def attempt_file(run: RunRecord, attempt: int) -> Path:
    return run.dir / METRICS_DIR / f"attempt-{attempt}.jsonl"


class Steps:
    """A set of steps kept as sorted, disjoint [first, last] ranges: a run's steps mostly come
    one after another, so a million steps are a handful of ranges, not a million entries."""

    def __init__(self) -> None:
        self.firsts: list[int] = []
        self.lasts: list[int] = []

    def __contains__(self, step: int) -> bool:
        index = bisect.bisect_right(self.firsts, step) - 1
        return index >= 0 and step <= self.lasts[index]

    def add(self, step: int) -> None:
        if self.lasts and self.lasts[-1] + 1 == step:  # the usual case: the next step
            self.lasts[-1] = step
            return
        if step in self:
            return
        index = bisect.bisect_right(self.firsts, step)
        self.firsts.insert(index, step)
        self.lasts.insert(index, step)
        # Join the neighbours the new step touches.
        if index + 1 < len(self.firsts) and self.firsts[index + 1] == step + 1:
            self.lasts[index] = self.lasts.pop(index + 1)
            self.firsts.pop(index + 1)
        if index > 0 and self.lasts[index - 1] + 1 == step:
            self.lasts[index - 1] = self.lasts.pop(index)
            self.firsts.pop(index)


# Per run directory, attempt and rank: the steps recorded, read from the files once per process
# (a supervisor that takes over a run reads what the one before it wrote).
_seen: dict[Path, dict[int, dict[int, Steps]]] = {}
_seen_lock = threading.Lock()


def record(run: RunRecord, attempt: int, node: str, lines: list[dict[str, Any]]) -> None:
    """Append one status answer's metric lines (as ava.env.progress wrote them) to the run record.

    A (step, rank) that an earlier attempt recorded is marked `repeated`; one this attempt
    already has is dropped when it carries no metrics (progress(step, force=True) after a
    checkpoint), kept otherwise. Lines that are not metric lines are skipped."""
    points = [p for p in (_from_script(line, attempt, node) for line in lines) if p is not None]
    if not points:
        return
    with _seen_lock:
        seen = _seen.get(run.dir)
        if seen is None:
            seen = _seen[run.dir] = _steps_by_attempt(read(run))
        earlier = [ranks for number, ranks in seen.items() if number < attempt]
        mine = seen.setdefault(attempt, {})
        kept = []
        for point in points:
            steps = mine.setdefault(point.rank, Steps())
            if point.step in steps and not point.metrics:
                continue
            steps.add(point.step)
            repeated = any(point.step in ranks.get(point.rank, ()) for ranks in earlier)
            kept.append(Point(**{**point.__dict__, "repeated": repeated}))
        if kept:
            _append(attempt_file(run, attempt), "".join(json.dumps(p.to_json()) + "\n" for p in kept))


def _steps_by_attempt(points: Iterable[Point]) -> dict[int, dict[int, Steps]]:
    steps: dict[int, dict[int, Steps]] = {}
    for point in points:
        steps.setdefault(point.attempt, {}).setdefault(point.rank, Steps()).add(point.step)
    return steps


def _append(path: Path, text: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)  # one write of whole lines: a reader never sees half of a batch's line


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _from_script(line: dict[str, Any], attempt: int, node: str) -> Point | None:
    """A line as ava.env.progress wrote it, checked; None when it is not one."""
    step, stamp, rank, values = line.get("step"), line.get("time"), line.get("rank", 0), line.get("metrics", {})
    if not (isinstance(step, int) and isinstance(stamp, (int, float)) and isinstance(rank, int)):
        return None
    if isinstance(step, bool) or isinstance(stamp, bool) or not isinstance(values, dict):
        return None
    metrics = {str(k): float(v) for k, v in values.items() if _number(v)}
    return Point(step=step, time=float(stamp), attempt=attempt, rank=rank, metrics=metrics, node=node)


def _from_record(line: Any) -> Point | None:
    if not isinstance(line, dict) or not isinstance(line.get("attempt"), int):
        return None
    point = _from_script(line, line["attempt"], str(line.get("node") or ""))
    if point is None:
        return None
    node = line.get("node") if isinstance(line.get("node"), str) else None
    return Point(**{**point.__dict__, "repeated": bool(line.get("repeated")), "node": node})


def attempts_recorded(run: RunRecord) -> list[int]:
    """The attempts that have a metrics file, in order."""
    folder = run.dir / METRICS_DIR
    if not folder.is_dir():
        return []
    found = (_ATTEMPT_FILE.match(p.name) for p in folder.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def read(run: RunRecord, *, attempts: Iterable[int] | None = None) -> list[Point]:
    """Every recorded point of the run, attempt by attempt, in the order recorded. A line that
    cannot be read (a torn last line after a crash of the supervisor) is skipped."""
    points: list[Point] = []
    for number in attempts if attempts is not None else attempts_recorded(run):
        try:
            text = attempt_file(run, number).read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        for raw in text.splitlines():
            try:
                point = _from_record(json.loads(raw))
            except ValueError:
                continue
            if point is not None:
                points.append(point)
    return points


def tail(run: RunRecord, size: int = 64 << 10) -> list[Point]:
    """The last points of the run's latest attempt (its file's last `size` bytes): cheap for `ava ps`."""
    numbers = attempts_recorded(run)
    if not numbers:
        return []
    try:
        with open(attempt_file(run, numbers[-1]), "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - size))
            data = handle.read()
    except OSError:
        return []
    lines = data.splitlines()[1:] if len(data) >= size else data.splitlines()  # the first may be cut
    points = []
    for raw in lines:
        try:
            point = _from_record(json.loads(raw))
        except ValueError:
            continue
        if point is not None:
            points.append(point)
    return points


def names(points: Iterable[Point]) -> list[str]:
    """The metric names, in the order they first appear."""
    seen: dict[str, None] = {}
    for point in points:
        for name in point.metrics:
            seen.setdefault(name, None)
    return list(seen)


def timeline(points: Iterable[Point], name: str | None = None) -> list[Point]:
    """One point per step (the lowest rank's), as the run finally did it: where an attempt did a
    step again after a resume, its point replaces the earlier attempt's. With `name`, only
    points that carry that metric. Ordered by step."""
    chosen: dict[int, Point] = {}
    for point in points:
        if name is not None and name not in point.metrics:
            continue
        old = chosen.get(point.step)
        if old is None or point.attempt > old.attempt or (point.attempt == old.attempt and point.rank < old.rank):
            chosen[point.step] = point
    return [chosen[step] for step in sorted(chosen)]


def attempt_starts(points: Iterable[Point]) -> dict[int, int]:
    """Each attempt's first recorded step, by attempt number."""
    starts: dict[int, int] = {}
    for point in points:
        starts[point.attempt] = min(point.step, starts.get(point.attempt, point.step))
    return dict(sorted(starts.items()))


def rate(points: list[Point], window: float = RATE_WINDOW_S) -> float | None:
    """Steps per second of the latest attempt, over its last `window` seconds; None when unknown."""
    if not points:
        return None
    latest = points[-1].attempt
    mine = sorted((p.time, p.step) for p in points if p.attempt == latest and p.rank == points[-1].rank)
    if len(mine) < 2:
        return None
    end_time, end_step = mine[-1]
    recent = [(t, s) for t, s in mine if t >= end_time - window]
    start_time, start_step = recent[0] if len(recent) >= 2 else mine[-2]
    if end_time <= start_time:
        return None
    return (end_step - start_step) / (end_time - start_time)


def higher_is_better(name: str) -> bool:
    return bool(_HIGHER_IS_BETTER.search(name.lower()))


@dataclass(frozen=True)
class Summary:
    """A metric's last and best values over the run's timeline."""

    name: str
    final: float
    final_step: int
    best: float
    best_step: int

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "final": self.final,
            "final_step": self.final_step,
            "best": self.best,
            "best_step": self.best_step,
        }


def summarize(points: list[Point]) -> list[Summary]:
    """Final and best value of every metric (best: the smallest, the largest for accuracy-like
    names such as acc, score, reward, tokens_per_s); NaN values are never best."""
    summaries = []
    for name in names(points):
        line = timeline(points, name)
        if not line:
            continue
        finite = [p for p in line if not math.isnan(p.metrics[name])] or line
        pick = max if higher_is_better(name) else min
        best = pick(finite, key=lambda p: p.metrics[name])
        summaries.append(Summary(name, line[-1].metrics[name], line[-1].step, best.metrics[name], best.step))
    return summaries


def value_at(points: list[Point], name: str, step: int) -> float | None:
    """The metric's value at `step`, else at the nearest recorded step before it; None if none."""
    before = [p for p in timeline(points, name) if p.step <= step]
    return before[-1].metrics[name] if before else None


def format_value(value: float) -> str:
    """A metric value in at most about 8 characters: 2.314, 0.0003, 1.23e+05, nan."""
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3g}"
    return f"{value:.4g}"


CSV_FIXED = ["step", "time", "attempt", "rank", "repeated"]


def csv_rows(points: list[Point]) -> tuple[list[str], list[list[str]]]:
    """A header and one row per point: the fixed columns, then one column per metric (empty
    where a point does not carry it)."""
    metric_names = names(points)
    rows = [
        [str(p.step), f"{p.time:.6f}", str(p.attempt), str(p.rank), "1" if p.repeated else "0"]
        + [repr(p.metrics[n]) if n in p.metrics else "" for n in metric_names]
        for p in points
    ]
    return CSV_FIXED + metric_names, rows
