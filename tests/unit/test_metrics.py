"""Run metrics: ava.metrics.record/read (repeated steps after a resume marked, never duplicated),
the terminal chart, and the commands that read them (show, export, compare, plot, models) on a
hand-made run record."""

from __future__ import annotations

import json
import math
import os
import stat
import time
from pathlib import Path

import pytest

from ava import chart, env, metrics, runs
from ava.cli.plot import differing
from tests.conftest import run_ava

RUN = "charlm-20261201-120000-a1b2"


def make_record(home: Path, run_id: str = RUN, **raw_changes: object) -> runs.RunRecord:
    raw: dict[str, object] = {
        "name": "charlm",
        "run": {"script": "train.py", "args": ["--steps", "300"]},
        "resources": {"nodes": 2, "procs_per_node": 2},
        "checkpoint": {"dir": str(home / "ckpt" / "{name}" / "{run}"), "keep": 3},
        "env": ["OMP_NUM_THREADS"],
    }
    for dotted, value in raw_changes.items():
        table, key = dotted.split("__")
        assert isinstance(raw[table], dict)
        raw[table][key] = value  # type: ignore[index]
    record = runs.RunRecord(
        id=run_id,
        recipe="charlm",
        source="recipes/charlm/recipe.toml",
        recipe_hash=runs.recipe_hash(raw),
        raw=raw,
        inventory="/dev/null",
        nodes=["n1", "n2"],
        state="failed",
        started=time.time() - 100,
        attempts=[
            runs.Attempt(1, ["n1", "n2"], time.time() - 100, time.time() - 60, "failed", "rank 3 on n2 exited 1"),
            runs.Attempt(2, ["n1", "n2"], time.time() - 55, time.time() - 5, "succeeded"),
        ],
        overrides=[f"{k.replace('__', '.')}={v}" for k, v in raw_changes.items()],
    )
    record.save()
    return record


def script_line(step: int, **values: float) -> dict[str, object]:
    return {"step": step, "time": 1_000_000.0 + step, "rank": 0, "metrics": values}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AVA_HOME", str(tmp_path))
    metrics._seen.clear()
    return tmp_path


def crashed_and_resumed(record: runs.RunRecord) -> None:
    """Attempt 1 reaches step 130, crashes; attempt 2 resumes from the checkpoint at 100."""
    metrics.record(record, 1, "n1", [script_line(s, loss=4.0 - s / 100) for s in range(1, 131)])
    metrics.record(record, 2, "n1", [script_line(s, loss=4.0 - s / 100) for s in range(101, 201)])


def test_steps_redone_after_a_resume_are_marked_repeated_not_duplicated(home: Path) -> None:
    record = make_record(home)
    crashed_and_resumed(record)
    points = metrics.read(record)
    assert len(points) == 230
    repeated = [p.step for p in points if p.repeated]
    assert repeated == list(range(101, 131)) and all(p.attempt == 2 for p in points if p.repeated)
    # Every step once among the points that are not repeated: the run's steps, none twice.
    assert [p.step for p in points if not p.repeated] == list(range(1, 201))
    assert [p.step for p in metrics.timeline(points, "loss")] == list(range(1, 201))
    assert metrics.attempt_starts(points) == {1: 1, 2: 101}


def test_record_files_are_append_only_private_and_survive_a_new_supervisor(home: Path) -> None:
    record = make_record(home)
    metrics.record(record, 1, "n1", [script_line(s, loss=1.0) for s in range(1, 11)])
    path = metrics.attempt_file(record, 1)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = path.read_bytes()
    metrics._seen.clear()  # a supervisor that takes over reads what the one before it wrote
    metrics.record(record, 2, "n1", [script_line(s, loss=1.0) for s in range(5, 15)])
    assert path.read_bytes() == first
    assert [p.step for p in metrics.read(record) if p.repeated] == list(range(5, 11))
    line = json.loads(metrics.attempt_file(record, 2).read_text().splitlines()[0])
    assert set(line) == {"step", "time", "attempt", "rank", "metrics", "repeated", "node"}


def test_a_step_rate_line_for_a_step_already_recorded_is_dropped(home: Path) -> None:
    record = make_record(home)
    # charlm: progress(done, loss=...) then progress(done, force=True) after a checkpoint.
    metrics.record(record, 1, "n1", [script_line(10, loss=2.0), script_line(10), {"garbage": 1}, script_line(11)])
    assert [(p.step, p.metrics) for p in metrics.read(record)] == [(10, {"loss": 2.0}), (11, {})]


def test_steps_per_second_come_from_points_without_metrics_too(home: Path) -> None:
    record = make_record(home)
    metrics.record(record, 1, "n1", [{"step": 10 * i, "time": 100.0 + i, "rank": 0, "metrics": {}} for i in range(30)])
    assert metrics.rate(metrics.read(record)) == pytest.approx(10.0)


def test_final_and_best_values(home: Path) -> None:
    record = make_record(home)
    metrics.record(
        record,
        1,
        "n1",
        [script_line(1, loss=3.0, acc=0.1), script_line(2, loss=1.0, acc=0.9), script_line(3, loss=2.0, acc=0.5)],
    )
    summary = {s.name: s for s in metrics.summarize(metrics.read(record))}
    assert (summary["loss"].final, summary["loss"].best, summary["loss"].best_step) == (2.0, 1.0, 2)
    assert (summary["acc"].best, summary["acc"].best_step) == (0.9, 2)


def test_progress_writes_metric_lines_rank_0_only_unless_all_ranks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "metrics.jsonl"
    monkeypatch.delenv("AVA_PROGRESS_FILE", raising=False)
    monkeypatch.setenv("AVA_METRICS_FILE", str(target))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(env, "_last_line", None)
    env._close_metrics()
    monkeypatch.setattr(env, "_metrics_path", None)
    env.progress(1, loss=2.5)
    env.progress(2, loss=2.4, all_ranks=True, nan=float("nan"))
    env._close_metrics()
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert [(line["step"], line["rank"]) for line in lines] == [(2, 1)]
    assert lines[0]["metrics"]["loss"] == 2.4 and math.isnan(lines[0]["metrics"]["nan"])


def test_the_chart_fits_the_width_and_marks_each_attempt() -> None:
    xs = list(range(1, 201))
    ys = [4.0 * math.exp(-x / 50) + 1.0 for x in xs]
    marks = [chart.Mark(1, "1"), chart.Mark(101, "2")]
    for width, unicode in ((60, True), (100, False)):
        lines = chart.render(xs, ys, width=width, height=8, marks=marks, unicode=unicode)
        assert len(lines) == 10 and all(len(line) <= width for line in lines)
        axis = lines[-2]
        assert axis.count("1") == 1 and axis.count("2") == 1 and axis.index("1") < axis.index("2")
        assert lines[-1].split()[0] == "1" and lines[-1].split()[-1] == "200"
    plain = chart.render(xs, ys, width=100, height=8, marks=marks, unicode=False)
    assert all(ord(c) < 128 for line in plain for c in line)
    # The curve falls: its first point is on the top row, its last on the bottom row.
    assert plain[0].split("+", 1)[1].startswith("*") and plain[7].rstrip().endswith("*")


def test_a_flat_or_empty_series_still_draws() -> None:
    assert chart.render([1, 2, 3], [5.0, 5.0, 5.0], width=40, height=4, unicode=False)[1:3]
    assert chart.render([1], [float("nan")], width=40) == ["(no finite values)"]


def test_compare_lists_exactly_the_keys_that_differ(home: Path) -> None:
    a = make_record(home, "charlm-20261201-120000-aaaa", run__args=["--steps", "300", "--lr", "0.003"])
    b = make_record(home, "charlm-20261201-120000-bbbb", run__args=["--steps", "300", "--lr", "0.001"])
    b.raw["resources"]["nodes"] = 1  # type: ignore[index]
    assert differing([a, b]) == {
        "resources.nodes": ["2", "1"],
        "run.args": ['["--steps", "300", "--lr", "0.003"]', '["--steps", "300", "--lr", "0.001"]'],
    }


def test_show_export_compare_and_plot_read_a_run_record(home: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    record = make_record(home)
    crashed_and_resumed(record)
    other = make_record(home, "charlm-20261201-130000-c3d4", resources__nodes=1)
    metrics.record(other, 1, "n1", [script_line(s, loss=3.0 - s / 200) for s in range(1, 201)])
    ckpt_dir = home / "ckpt" / "charlm" / RUN / "step-00000100"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "state.pt").write_bytes(b"x" * 1000)
    (ckpt_dir.parent / "step-00000100.COMMITTED").write_text(
        json.dumps({"step": 100, "format": "torch", "files": {"state.pt": {"size": 1000, "crc32": 0}}, "time": 1.0})
    )
    ava_env = {"AVA_HOME": str(home), "COLUMNS": "90"}

    shown = run_ava("show", RUN, env=ava_env)
    assert shown.returncode == 0, shown.stderr
    assert f"hash {record.recipe_hash}" in shown.stdout and "rank 3 on n2 exited 1" in shown.stdout
    assert "loss: final 2 at step 200" in shown.stdout and "1: step 1, 2: step 101" in shown.stdout
    chart_lines = shown.stdout.split("loss: final", 1)[1].splitlines()[1:]
    assert all(len(line) <= 90 for line in chart_lines) and any("*" in line for line in chart_lines)
    axis = next(line for line in chart_lines if line.lstrip().startswith("+1"))
    assert "2" in axis, "the second attempt is not marked on the x axis"
    assert "100" in shown.stdout.split("checkpoints", 1)[-1] or "step-00000100" not in shown.stdout

    data = json.loads(run_ava("show", RUN, "--json", env=ava_env).stdout)
    assert [c["step"] for c in data["checkpoints"]] == [100]
    assert len(data["metrics"]["points"]) == 230 and data["metrics"]["names"] == ["loss"]

    exported = run_ava("export", RUN, "--csv", env=ava_env)
    rows = exported.stdout.splitlines()
    assert rows[0] == "step,time,attempt,rank,repeated,loss" and len(rows) == 231
    tb = run_ava("export", RUN, "--tensorboard", str(tmp_path / "tb"), env=ava_env)
    try:
        import tensorboard
    except ImportError:
        assert tb.returncode == 2 and len(tb.stderr.strip().splitlines()) == 1 and "tensorboard" in tb.stderr

    compared = run_ava("compare", RUN, other.id, "--json", env=ava_env)
    assert json.loads(compared.stdout)["differing"] == {"resources.nodes": ["2", "1"]}
    table = run_ava("compare", RUN, other.id, env=ava_env).stdout.splitlines()
    assert table[0].split() == ["key", RUN, other.id]
    assert table[1].split() == ["resources.nodes", "2", "1"] and table[2].split()[:2] == ["loss", "(final)"]

    picture = tmp_path / "loss.png"
    drawn = run_ava("plot", RUN, other.id, "-o", str(picture), env=ava_env)
    assert drawn.returncode == 0, drawn.stderr
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 10_000
    vector = tmp_path / "loss.svg"
    assert run_ava("plot", RUN, "--x", "time", "-o", str(vector), env=ava_env).returncode == 0
    assert vector.read_text().lstrip().startswith("<?xml") and "<svg" in vector.read_text()
    page = tmp_path / "loss.html"
    assert run_ava("plot", RUN, "-o", str(page), env=ava_env).returncode == 0
    assert page.read_text().startswith("<!doctype html>") and "<svg" in page.read_text()
    wrong = run_ava("plot", RUN, "-o", str(tmp_path / "loss.jpg"), env=ava_env)
    assert wrong.returncode == 2 and ".png, .svg, .html" in wrong.stderr

    listed = json.loads(run_ava("models", "--json", env=ava_env).stdout)
    assert [(m["run"], m["step"], m["size"]) for m in listed] == [(RUN, 100, 1000)]
    assert listed[0]["metric"] == "loss=3"
    out = tmp_path / "exported"
    done = run_ava("models", "export", f"{RUN}@100", str(out), env=ava_env)
    assert done.returncode == 0, done.stderr
    assert (out / "step-00000100" / "state.pt").read_bytes() == b"x" * 1000
    assert (out / "step-00000100.COMMITTED").exists()
    assert json.loads((out / "ava-model.json").read_text())["run"] == RUN
    missing = run_ava("models", "export", f"{RUN}@50", str(tmp_path / "x"), env=ava_env)
    assert missing.returncode == 2 and "committed: 100" in missing.stderr
    assert os.listdir(ckpt_dir) == ["state.pt"]


def test_steps_ranges_hold_exactly_the_steps_added() -> None:
    import random

    chooser = random.Random(7)
    added: set[int] = set()
    steps = metrics.Steps()
    for step in list(range(1, 200)) + [chooser.randrange(0, 400) for _ in range(300)] + list(range(150, 260)):
        steps.add(step)
        added.add(step)
    assert all((step in steps) == (step in added) for step in range(-5, 420))
    assert all(a <= b for a, b in zip(steps.firsts, steps.lasts))
    assert all(b + 1 < a for b, a in zip(steps.lasts, steps.firsts[1:])), "ranges not disjoint and apart"
    ranges = metrics.Steps()
    for step in range(1_000_000):
        ranges.add(step)
    assert len(ranges.firsts) == 1


def test_ps_shows_step_rate_and_first_metric_of_a_running_run(home: Path) -> None:
    record = make_record(home)
    record.state = "running"
    record.save()
    metrics.record(
        record,
        1,
        "n1",
        [{"step": s, "time": 1000.0 + s / 4, "rank": 0, "metrics": {"loss": 5.0 - s / 100}} for s in range(1, 41)],
    )
    finished = make_record(home, "charlm-20261201-110000-ffff")
    listed = run_ava("ps", env={"AVA_HOME": str(home)})
    header, *rows = listed.stdout.splitlines()
    assert header.split()[6:9] == ["step", "steps/s", "metric"]
    running = next(row for row in rows if row.startswith(RUN)).split()
    assert running[7:10] == ["40", "4.00", "loss=4.6"]  # "started" is two words: 12-01 16:25
    assert next(row for row in rows if row.startswith(finished.id)).split()[7] == "-"
    data = json.loads(run_ava("ps", "--json", env={"AVA_HOME": str(home)}).stdout)
    assert next(r for r in data if r["id"] == RUN)["progress"]["step"] == 40
