"""The pure parts of the Slurm node program (ava/agent/slurmnode.py, the agent's slurm-node command) and of the Slurm doctor."""

from __future__ import annotations

import json
from pathlib import Path

from ava.agent import slurmnode as node
from ava.slurm.batch import MASTER_ADDR, NODE
from ava.slurm.doctor import PASS, WARN, config_values, isolation


def test_fill_replaces_tokens_in_every_string_of_the_spec() -> None:
    spec = {"node": NODE, "argv": ["--rdzv-endpoint", f"{MASTER_ADDR}:1"], "env": {"AVA_NODE": NODE}, "attempt": 2}
    filled = node.fill(spec, {NODE: "n7", MASTER_ADDR: "10.0.0.1"})
    assert filled == {"node": "n7", "argv": ["--rdzv-endpoint", "10.0.0.1:1"], "env": {"AVA_NODE": "n7"}, "attempt": 2}


def test_only_a_next_template_naming_this_job_continues_the_run_in_it(tmp_path: Path) -> None:
    first = tmp_path / "attempt-1.json"
    first.write_text("{}")
    assert node.next_template(str(first), 1, "42") is None
    (tmp_path / "attempt-2.json").write_text(json.dumps({"attempt": 2}))  # a new job's: not ours
    assert node.next_template(str(first), 1, "42") is None
    (tmp_path / "attempt-2.json").write_text(json.dumps({"attempt": 2, "job": "42"}))
    assert node.next_template(str(first), 1, "42") == str(tmp_path / "attempt-2.json")
    (tmp_path / "attempt-2.json").write_text('{"attempt": 2, "jo')  # half written: not yet
    assert node.next_template(str(first), 1, "42") is None


def test_doctor_reads_slurms_isolation_plugins() -> None:
    text = "ProctrackType           = proctrack/cgroup\nTaskPlugin              = task/cgroup,task/affinity\n"
    config = config_values(text, "TaskPlugin", "ProctrackType")
    assert config == {"ProctrackType": "proctrack/cgroup", "TaskPlugin": "task/cgroup,task/affinity"}
    assert isolation(config).status == PASS
    weak = isolation({"TaskPlugin": "task/none", "ProctrackType": "proctrack/linuxproc"})
    assert weak.status == WARN and "TaskPlugin=task/cgroup" in weak.fix
