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

With STREAM_JSON too ({"life": S, "nnodes": N, "gap": G, "starting": G0}), a stream: one answer
per line, each from where the one before it left off (offsets and states), until LIFE seconds
have passed, the job has left the queue, or the next attempt's template is there. Answers come
on news, at most one per G seconds once a rank of N nodes has printed (G0 before: the start is
what users wait on), and after WAIT seconds without news; squeue and sinfo at most once a
second. One SSH command and one interpreter per stream instead of per answer: while ranks
start (importing torch on the same nodes), each look at them costs next to nothing.
"""

from __future__ import annotations

import glob
import json
import os
import re
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


def slurm_facts(job: str) -> dict[str, Any]:
    """The job's state and every node's sinfo state, squeue and sinfo side by side."""
    states: dict[str, str] = {}
    sinfo = threading.Thread(target=lambda: states.update(node_states()))
    sinfo.start()
    facts: dict[str, Any] = {"job": job_state(job) if job else {}}
    sinfo.join()
    facts["states"] = states
    return facts


def answer(facts: dict[str, Any], statuses: dict[str, Any], logs: dict[str, Any]) -> str:
    return json.dumps({**facts, "status": statuses, "logs": logs, "now": time.time()}) + "\n"


def main(argv: list[str]) -> int:
    shared, run_id, attempt, job, offsets = argv[0], argv[1], int(argv[2]), argv[3], json.loads(argv[4])
    wait = float(argv[5]) if len(argv) > 5 else 0.0
    known = json.loads(argv[6]) if len(argv) > 6 else {}
    if len(argv) > 7:
        return stream(shared, run_id, attempt, job, offsets, known, wait, json.loads(argv[7]))
    end = time.monotonic() + wait
    statuses, logs = scan(shared, run_id, attempt, offsets)
    while time.monotonic() < end and not news(statuses, logs, known):
        time.sleep(TICK)
        statuses, logs = scan(shared, run_id, attempt, offsets)
    # The job's and the nodes' states last, as of the answer.
    sys.stdout.write(answer(slurm_facts(job), statuses, logs))
    return 0


FACTS_EVERY = 1.0  # a stream's squeue and sinfo, at most this often
_RANK_LINE = re.compile(r"^\[\d+\]:", re.M)  # a rank's line, as torchrun prefixes it
GONE = ("", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL")


def stream(
    shared: str,
    run_id: str,
    attempt: int,
    job: str,
    offsets: dict[str, Any],
    known: dict[str, Any],
    wait: float,
    options: dict[str, Any],
) -> int:
    """Answer line after line (see the module's doc); 0 when done, or when no one reads."""
    started = time.monotonic()
    nnodes = int(options.get("nnodes", 1))
    gap, starting = float(options.get("gap", 1.0)), float(options.get("starting", TICK))
    following = os.path.join(shared, "slurm", run_id, f"attempt-{attempt + 1}.json")
    offsets = dict(offsets)
    ranked: set[str] = set()
    facts: dict[str, Any] = {}
    facts_at = answered = float("-inf")
    while True:
        statuses, logs = scan(shared, run_id, attempt, offsets)
        now = time.monotonic()
        last = now - started >= float(options.get("life", 30.0))
        soon = gap if len(ranked) >= nnodes else starting
        due = now - answered >= wait or last or os.path.exists(following)
        if due or (news(statuses, logs, known) and now - answered >= soon):
            if due or now - facts_at >= FACTS_EVERY:
                facts, facts_at = slurm_facts(job), now
            try:
                sys.stdout.write(answer(facts, statuses, logs))
                sys.stdout.flush()
            except OSError:  # the supervisor went away (its SSH session closed)
                return 0
            answered = now
            known = {node: status.get("state") for node, status in statuses.items()}
            for node, log in logs.items():
                offsets[node] = log["offset"]
                if _RANK_LINE.search(log["text"]):
                    ranked.add(node)
            job_now = facts.get("job") or {}
            if last or os.path.exists(following) or (job and job_now.get("state", "").split(" ")[0] in GONE):
                return 0
        time.sleep(TICK)
