"""The test cluster's nodes are like users' nodes, and ava works on them as it is.

Their python is the node venv of tests/support/nodepy.py (torch, nothing of ava's), so a training script
finds ava's user-side modules and the `avacache` protocol only where ava shipped them; n3 uses
the inventory defaults (`python3` from its login PATH, `~/.ava`); n2's ~/.bashrc prints on both
streams and changes PATH on every SSH command, as conda's and pyenv's init do.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest
import tomllib

from ava import attempt, sync
from ava.config import Node, load_inventory
from ava.transport import close_all, connect
from tests.conftest import REPO, run_ava
from tests.support import nodepy
from tests.support.cluster import DEFAULTS_NODE, NOISE_ERR, NOISE_OUT, NOISY_NODE, Cluster

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="node rc files and homes need mount namespaces (root)")

THREE = ["n1", "n2", "n3"]
IMPORTS = """
import importlib.util, json, sys
print(json.dumps({"prefix": sys.prefix, "found": [m for m in %s if importlib.util.find_spec(m)],
                  "torch": importlib.util.find_spec("torch") is not None}))
""" % json.dumps(nodepy.FOREIGN)

# What a training script on a node sees: where ava and `avacache::` come from, and its python.
PROBE = """
import importlib.metadata, json, os, sys
import fsspec, torch
# Before any import of ava, as a script that only opens "avacache::s3://…" URLs: the entry point.
avacache = type(fsspec.filesystem("avacache"))
import ava, ava.ckpt, ava.data, ava.env
specs = [e for e in importlib.metadata.entry_points(group="fsspec.specs") if e.name == "avacache"]
print("PROBE " + json.dumps({
    "node": os.environ["AVA_NODE"], "executable": sys.executable, "prefix": sys.prefix,
    "cwd": os.getcwd(), "ava": ava.__file__, "avacache": sys.modules[avacache.__module__].__file__,
    "entry_point": [str(e.dist._path) for e in specs], "torch": torch.__version__,
}), flush=True)
"""


def probe_recipe(folder: Path) -> Path:
    folder.mkdir()
    (folder / "probe.py").write_text(PROBE)
    (folder / "recipe.toml").write_text(
        'name = "probe"\n[run]\nscript = "probe.py"\n[resources]\nprocs_per_node = 1\n[failover]\nmax_restarts = 0\n'
    )
    return folder


@needs_root
def test_every_node_runs_a_python_with_torch_and_nothing_of_avas(cluster: Cluster) -> None:
    done = run_ava(
        "exec", "--json", "--", f"python3 -c {shlex.quote(IMPORTS)}", inventory=cluster.inventory(), timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {row["node"]: row for row in json.loads(done.stdout)}
    assert sorted(rows) == ["n1", "n2", "n3", "n4"]
    for name, row in rows.items():
        stdout = [out["line"] for out in row["output"] if out["stream"] == "stdout"]
        facts = json.loads(stdout[-1])
        assert facts["torch"] and facts["found"] == [], (name, facts)
        assert facts["prefix"] == str(Path(cluster.python).parent.parent), (name, facts)


@needs_root
def test_the_defaults_node_names_no_python_or_workdir_and_the_noisy_node_prints_on_every_command(
    cluster: Cluster,
) -> None:
    nodes = tomllib.loads(cluster.inventory().read_text())["nodes"]
    assert {"python", "workdir", "cache_dir"}.isdisjoint(nodes[DEFAULTS_NODE]), nodes[DEFAULTS_NODE]
    assert nodes["n1"]["python"] == cluster.python != os.path.realpath(os.sys.executable)
    done = run_ava("exec", "--json", NOISY_NODE, "--", "true", inventory=cluster.inventory(), timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    (row,) = json.loads(done.stdout)
    assert NOISE_OUT in json.dumps(row) and NOISE_ERR in json.dumps(row), row  # the rc file ran


@needs_root
def test_a_script_finds_ava_and_avacache_only_in_what_ava_shipped(cluster: Cluster, tmp_path: Path) -> None:
    """On the plain node, the noisy one and the defaults one alike, in one three-node run."""
    recipe = probe_recipe(tmp_path / "probe")
    done = run_ava(
        "train",
        str(recipe),
        "--set",
        "resources.nodes=3",
        inventory=cluster.inventory(THREE),
        env={"AVA_HOME": str(tmp_path / "home")},
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    probes = {}
    for line in done.stdout.splitlines():
        if "PROBE " in line:
            facts = json.loads(line.split("PROBE ", 1)[1])
            probes[facts["node"]] = facts
    assert sorted(probes) == THREE, done.stdout[-3000:]
    venv = str(Path(cluster.python).parent.parent)
    for name, facts in probes.items():
        node = cluster.node(name)
        workdir = "/root/.ava" if node.defaults else str(node.workdir)  # n3: ~/.ava, as the node sees it
        trees = f"{workdir}/trees/"
        assert facts["prefix"] == venv, facts
        assert facts["ava"].startswith(trees) and facts["avacache"].startswith(trees), facts
        # The protocol comes from the runtime's own metadata, not from an install of ava.
        assert len(facts["entry_point"]) == 1 and facts["entry_point"][0].startswith(trees), facts
        assert facts["entry_point"][0].endswith("ava_runtime-0.dist-info"), facts
        assert not facts["ava"].startswith(str(REPO)), facts
        assert facts["cwd"].startswith(f"{workdir}/runs/"), facts
    # The defaults node ran python3 from its PATH, in its own ~/.ava (this machine's stays apart).
    assert (cluster.node(DEFAULTS_NODE).workdir / "runs").is_dir()
    # The noisy rc file reaches neither the training log nor ava's own parsing.
    assert NOISE_OUT not in done.stdout and NOISE_ERR not in done.stderr, done.stdout[-2000:] + done.stderr[-2000:]


@needs_root
def test_provision_and_nodes_work_through_the_noisy_rc_file(cluster: Cluster, tmp_path: Path) -> None:
    inventory = cluster.inventory([NOISY_NODE, DEFAULTS_NODE], path=tmp_path / "ava.toml")
    first = run_ava("provision", inventory=inventory, timeout=180)
    assert first.returncode == 0, first.stdout + first.stderr
    again = run_ava("provision", inventory=inventory, timeout=180)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("nothing to do") == 2, again.stdout  # the noise is not taken for a change
    done = run_ava("nodes", "--json", inventory=inventory, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    for name in (NOISY_NODE, DEFAULTS_NODE):
        assert rows[name]["reachable"] and rows[name]["torch"] == "2.13.0+cpu" and rows[name]["python"], rows[name]


@needs_root
def test_the_agent_runs_on_what_a_shim_python_resolves_to_and_without_its_link_still_runs(
    cluster: Cluster, tmp_path: Path
) -> None:
    """`python` naming a wrapper script (pyenv's and conda's shims are such, and cost a shell or
    more on every call): the agent runs on the interpreter behind it, and on `python` itself again
    when that note is gone (a workdir an older ava provisioned)."""
    shim = cluster.node(NOISY_NODE).dir / "conda" / "bin" / "python3"
    assert shim.read_text().startswith("#!/bin/sh"), shim
    inventory = tmp_path / "ava.toml"
    text = cluster.inventory([NOISY_NODE], path=inventory).read_text()
    inventory.write_text(text.replace(f'python = "{cluster.python}"', f'python = "{shim}"'))
    assert f'python = "{shim}"' in inventory.read_text()
    done = run_ava("provision", inventory=inventory, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    node = load_inventory(str(inventory)).nodes[NOISY_NODE]
    noted = Path(sync.interpreter_path(node))
    assert noted.read_text() == f"{cluster.python}\n"  # the venv's python, which the shim execs

    noted.unlink()
    rows = run_ava("nodes", "--json", inventory=inventory, timeout=120)
    assert rows.returncode == 0, rows.stdout + rows.stderr
    assert json.loads(rows.stdout)[0]["torch"] == "2.13.0+cpu", rows.stdout
    again = run_ava("provision", inventory=inventory, timeout=180)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{NOISY_NODE}  agent    note the agent's interpreter at " in again.stdout, again.stdout
    assert noted.read_text() == f"{cluster.python}\n"


@needs_root
def test_a_file_read_without_sftp_through_the_noisy_rc_file_is_byte_exact(cluster: Cluster, tmp_path: Path) -> None:
    node = cluster.node(NOISY_NODE)
    source = node.dir / "payload.bin"
    source.write_bytes(os.urandom(4096) + b"\nlast line\n")
    inventory = load_inventory(str(cluster.inventory([NOISY_NODE], path=tmp_path / "ava.toml")))
    cluster.set_sftp(NOISY_NODE, False)
    try:
        transport = connect(inventory.nodes[NOISY_NODE])
        assert not transport.sftp_offered()
        transport.get(str(source), tmp_path / "got")
        transport.put(b"written\n", str(node.dir / "put.txt"))
    finally:
        close_all()
        cluster.set_sftp(NOISY_NODE, True)
    assert (tmp_path / "got").read_bytes() == source.read_bytes()
    assert (node.dir / "put.txt").read_bytes() == b"written\n"


def test_log_lines_before_the_agents_output_are_dropped_and_not_counted_in_the_offset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class NoisyShell:
        def run(self, command: str, *, on_line: Callable[[str, str], None], **_: object) -> None:
            assert command.startswith(f"echo {attempt.LOG_START}; ")
            for stream, text in [
                ("out", NOISE_OUT),
                ("err", NOISE_ERR),
                ("out", attempt.LOG_START),
                ("out", "[rank0]: step 1"),
                ("out", ""),
            ]:
                on_line(stream, text)

    monkeypatch.setattr(attempt, "connect", lambda node: NoisyShell())
    lines: list[str] = []
    read = attempt.follow_logs(Node(name="a", host="h", workdir="/w"), "run-1", 1, lines.append, follow=False)
    assert lines == ["[rank0]: step 1", ""]
    assert read == len("[rank0]: step 1\n") + 1  # the next read resumes right after these bytes
