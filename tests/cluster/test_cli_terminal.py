"""Output that fits where it goes (issue 16): the real `ava` off a TTY (pipes) and on a pty.

Off a terminal: whole rows, no box characters, no colour, nothing cut to 80 columns, and a
closed pipe ends ava quietly. On a terminal: tables, and each node's `node/rank |` prefix in its
own colour (the same in `ava train` and `ava logs`), the text after it untouched; NO_COLOR wins.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_ava
from tests.support.cluster import Cluster
from tests.support.terminal import on_pty, plain_env, write_recipe

TWO = ["n1", "n2"]
ESCAPE = "\x1b["
BOX = set("│┃─━┼╇╈┡┩╭╮╰╯")
PREFIX = re.compile(r"^\x1b\[(\d+)m(n\d)/(\d+) +\|\x1b\[0m (.*)$")


@pytest.fixture()
def home(tmp_path: Path) -> dict[str, str]:
    return {"AVA_HOME": str(tmp_path / "home"), "NO_COLOR": "", "FORCE_COLOR": ""}


def colours_of(shown: str) -> dict[str, set[str]]:
    """node -> the colour codes its prefixes were drawn in; asserts the text after is plain."""
    found: dict[str, set[str]] = {}
    for line in shown.splitlines():
        match = PREFIX.match(line)
        if match:
            found.setdefault(match.group(2), set()).add(match.group(1))
            assert ESCAPE not in match.group(4), f"colour beyond the prefix: {line!r}"
    return found


def last_run(home: dict[str, str]) -> dict:
    done = run_ava("ps", "--json", env=home)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)[-1]


def test_node_prefixes_keep_their_colour_on_a_terminal_and_never_with_no_color(
    cluster: Cluster, home: dict[str, str], tmp_path: Path
) -> None:
    inventory = cluster.inventory(TWO)
    recipe = write_recipe(tmp_path / "spam", nodes=2, lines=4)
    code, shown, stderr = on_pty("--inventory", str(inventory), "train", str(recipe), env=home)
    assert code == 0, shown[-2000:] + stderr[-2000:]
    trained = colours_of(shown)
    # Every line of a node in one colour, the two nodes in different colours.
    assert set(trained) == set(TWO) and all(len(c) == 1 for c in trained.values()), trained
    assert trained["n1"] != trained["n2"]
    run_id = last_run(home)["id"]

    code, shown, stderr = on_pty("--inventory", str(inventory), "logs", run_id, env=home)
    assert code == 0, stderr
    assert colours_of(shown) == trained  # `ava logs` colours each node as `ava train` did
    assert sum(1 for line in shown.splitlines() if PREFIX.match(line) and " of rank " in line) == 8

    code, shown, stderr = on_pty("--inventory", str(inventory), "logs", run_id, env={**home, "NO_COLOR": "1"})
    assert code == 0 and ESCAPE not in shown
    assert sum(1 for line in shown.splitlines() if re.match(r"^n\d/\d +\| line \d of rank \d$", line)) == 8

    # A table on the terminal; the same command piped: plain rows, no colour, no box.
    code, shown, _ = on_pty("ps", env=home)
    assert code == 0 and BOX & set(shown)
    piped = run_ava("ps", env=home)
    assert piped.returncode == 0 and not BOX & set(piped.stdout) and ESCAPE not in piped.stdout
    piped = run_ava("--inventory", str(inventory), "logs", run_id, env=home)
    assert ESCAPE not in piped.stdout
    assert sum(1 for line in piped.stdout.splitlines() if re.match(r"^n\d/\d +\| line \d of rank \d$", line)) == 8
    # FORCE_COLOR colours the prefixes even through a pipe (a CI log viewer that shows colour).
    forced = run_ava("--inventory", str(inventory), "logs", run_id, env={**home, "FORCE_COLOR": "1"})
    assert colours_of(forced.stdout) == trained, repr(forced.stdout[-1500:]) + forced.stderr[-1500:]


def test_off_a_terminal_rows_are_whole_whatever_the_width(
    cluster: Cluster, home: dict[str, str], tmp_path: Path
) -> None:
    inventory = cluster.inventory(TWO)
    # A node that refuses connections: its error must stay whole, on its own row.
    with inventory.open("a") as toml:
        toml.write('\n[nodes.gone-node-with-a-long-name]\nhost = "127.0.0.1"\nport = 1\n')
    narrow = {**home, "COLUMNS": "40"}
    done = run_ava("nodes", inventory=inventory, env=narrow)
    assert done.returncode == 3, done.stderr
    lines = done.stdout.splitlines()
    assert not BOX & set(done.stdout) and ESCAPE not in done.stdout and "…" not in done.stdout
    assert lines[0].split()[:3] == ["node", "host", "up"]
    rows = {line.split()[0]: line for line in lines[1:4]}
    assert set(rows) == {"n1", "n2", "gone-node-with-a-long-name"}
    refused = rows["gone-node-with-a-long-name"]
    assert refused.split()[2] == "no" and "connection refused" in refused
    facts = json.loads(run_ava("nodes", "--json", inventory=cluster.inventory(TWO), env=home).stdout)
    for report in facts:
        assert report["version"] == 1
        # The torch version and memory figures whole, in the node's row.
        assert report["torch"] in rows[report["name"]]

    recipe = write_recipe(tmp_path / "spam", nodes=1, lines=1)
    failed = run_ava("train", str(recipe), "--set", "env.SPAM_FAIL=3", inventory=inventory, env=home, timeout=300)
    assert failed.returncode == 1, failed.stderr[-2000:]
    listed = run_ava("ps", env=narrow)
    assert listed.returncode == 0
    header, row = listed.stdout.splitlines()
    assert header.split() == ["run", "state", "nodes", "attempts", "started", "took", "last", "cause"]
    run = last_run(home)
    assert row.startswith(run["id"] + " ") and " failed " in row
    assert row.endswith(run["attempts"][-1]["cause"])  # the whole cause, on the run's line
    assert not re.search(r"\d+\.\d+s", row)  # durations read as 4s or 1m05s, never 4.0s


def test_a_closed_pipe_ends_ava_quietly(cluster: Cluster, home: dict[str, str], tmp_path: Path) -> None:
    inventory = cluster.inventory(TWO)
    recipe = write_recipe(tmp_path / "spam", nodes=1, lines=30000)
    env = plain_env({**home, "PYTHONPATH": str(REPO)})
    ava = f"{sys.executable} -m ava --inventory {inventory}"

    def piped(command: str) -> tuple[int, str, str]:
        script = f'{command} | head -1; echo "status=${{PIPESTATUS[0]}}" >&2'
        done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
        return int(done.stderr.rsplit("status=", 1)[1]), done.stdout, done.stderr

    # `ava train … | head -1`: the run still runs to its end, the reader's exit stops nothing.
    code, out, err = piped(f"{ava} train {recipe}")
    assert code == 0, err[-2000:]
    assert out.startswith("n1/") and len(out.splitlines()) == 1
    assert "Traceback" not in err and "BrokenPipe" not in err
    run = last_run(home)
    assert run["state"] == "succeeded"

    code, out, err = piped(f"{ava} logs {run['id']}")
    assert code == 0 and "Traceback" not in err and "BrokenPipe" not in err, err[-2000:]
    assert out.startswith("n1/") and len(out.splitlines()) == 1

    code, out, err = piped(f"{ava} exec n1 -- seq 1 200000")
    assert code == 0 and "Traceback" not in err and "BrokenPipe" not in err, err[-2000:]
    assert out.startswith("n1 | ") and len(out.splitlines()) == 1

    code, out, err = piped(f"{ava} ps")
    assert code == 0 and "Traceback" not in err
