"""One look at a Slurm attempt from the login node: the job's state, every node's agent status
and the new bytes of every node's log. An agent command (the agent is on the shared filesystem):

    python3 AGENT.pyz slurm-watch SHARED RUN ATTEMPT JOB OFFSETS_JSON [WAIT KNOWN_JSON]

prints one JSON object: `job` (state, reason, nodes, from squeue, else scontrol, else sacct),
`states` (every node of the cluster: its sinfo state), `status` (node -> the agent's status.json
for the attempt), `logs` (node -> {offset, text}: whole lines from the given offset), `now`.

With WAIT (seconds), a long poll: it answers as soon as there is news (a whole new log line, or
a node whose agent state is not the one in KNOWN_JSON, node -> state), else after WAIT. Reading
the shared filesystem is cheap; what costs (an SSH command, this interpreter, squeue, sinfo) is
then paid once per answer, not once per short poll, on a login node that may be busy.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

from .protocol import FINAL
from .slurmnode import read_json

CHUNK = 1 << 18


def run(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def job_state(job: str) -> dict[str, str]:
    out = run(["squeue", "-h", "-j", job, "-o", "%T|%r|%N"]).strip()
    if out:
        state, reason, nodes = (out.splitlines()[0].split("|") + ["", ""])[:3]
        return {"state": state, "reason": reason, "nodes": nodes, "source": "squeue"}
    fields = {}
    for word in run(["scontrol", "show", "job", "-o", job]).split():
        key, _, value = word.partition("=")
        fields[key] = value
    if fields.get("JobState"):
        return {
            "state": fields["JobState"],
            "reason": fields.get("Reason", ""),
            "nodes": fields.get("NodeList", ""),
            "source": "scontrol",
        }
    out = run(["sacct", "-n", "-P", "-X", "-j", job, "-o", "State,NodeList"]).strip()
    if out:
        state, _, nodes = out.splitlines()[0].partition("|")
        return {"state": state.split()[0] if state else "", "reason": "", "nodes": nodes, "source": "sacct"}
    return {"state": "", "reason": "", "nodes": "", "source": ""}


def node_states() -> dict[str, str]:
    found = {}
    for line in run(["sinfo", "-h", "-N", "-o", "%N %T"]).splitlines():
        parts = line.split()
        if len(parts) == 2:
            found[parts[0]] = parts[1]
    return found


def read_log(path: str, offset: int, final: bool) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(CHUNK)
    except OSError:
        return {"offset": offset, "text": ""}
    if not final or len(data) == CHUNK:
        data = data[: data.rfind(b"\n") + 1]
    return {"offset": offset + len(data), "text": data.decode("utf-8", "replace")}


TICK = 0.05  # how often a long poll reads the attempt's files again


def scan(shared: str, run_id: str, attempt: int, offsets: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every node's agent status for the attempt, and its log's whole new lines."""
    statuses, logs = {}, {}
    pattern = os.path.join(shared, "nodes", "*", "runs", run_id, f"attempt-{attempt}")
    for adir in sorted(glob.glob(pattern)):
        node = adir.split(os.sep)[-4]
        status = read_json(os.path.join(adir, "status.json"))
        if status is not None:
            statuses[node] = status
        final = bool(status and status.get("state") in FINAL)
        logs[node] = read_log(os.path.join(adir, "output.log"), int(offsets.get(node, 0)), final)
    return statuses, logs


def news(statuses: dict[str, Any], logs: dict[str, Any], known: dict[str, Any]) -> bool:
    states = {node: status.get("state") for node, status in statuses.items()}
    return states != known or any(log["text"] for log in logs.values())


def main(argv: list[str]) -> int:
    shared, run_id, attempt, job, offsets = argv[0], argv[1], int(argv[2]), argv[3], json.loads(argv[4])
    wait = float(argv[5]) if len(argv) > 5 else 0.0
    known = json.loads(argv[6]) if len(argv) > 6 else {}
    end = time.monotonic() + wait
    statuses, logs = scan(shared, run_id, attempt, offsets)
    while time.monotonic() < end and not news(statuses, logs, known):
        time.sleep(TICK)
        statuses, logs = scan(shared, run_id, attempt, offsets)
    # The job's and the nodes' states last, as of the answer; squeue and sinfo side by side.
    states: dict[str, str] = {}
    sinfo = threading.Thread(target=lambda: states.update(node_states()))
    sinfo.start()
    result: dict[str, Any] = {"job": job_state(job) if job else {}}
    sinfo.join()
    result["states"] = states
    result.update(status=statuses, logs=logs, now=time.time())
    sys.stdout.write(json.dumps(result) + "\n")
    return 0
