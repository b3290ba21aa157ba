"""One ava agent on one node of a Slurm allocation: started by the batch script's `srun`.

An agent command (the agent is on the shared filesystem), run by the nodes' python:

    python3 AGENT.pyz slurm-node AGENT.pyz TEMPLATE.json

The first node of the allocation (SLURM_NODEID 0) publishes its address (Slurm's NodeAddr) and
a free port for the rendezvous in the job's folder; every node reads it, finds its own address
and interface on the path there, fills the template (batch.py's tokens), and starts the attempt
as the node agent's `start` does (in this process: it is the agent). It then stays in the foreground, as Slurm expects of
a task, until the attempt ends, and exits 0 only if it succeeded. After a failed attempt it waits
(NEXT_WAIT) for ava to restart the run in this same allocation (the next attempt's template,
naming this job, beside this one), and runs that. SIGTERM (scancel, the end of the time limit)
stops the attempt through the agent, verified, before it exits.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from .protocol import FINAL, SUCCEEDED

NODE = "@AVA_NODE@"
MASTER_ADDR = "@AVA_MASTER_ADDR@"
MASTER_PORT = "@AVA_MASTER_PORT@"
ADDR = "@AVA_ADDR@"
IFACE = "@AVA_IFACE@"
NEXT_WAIT = 120.0  # after a failed attempt: how long ava has to restart the run in this allocation
MASTER_WAIT = 120.0
STOP_GRACE = "2"


def node_address(name: str) -> str:
    """The node's address as Slurm knows it (NodeAddr), as an IP address."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "node", "-o", name], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for word in out.split():
        if word.startswith("NodeAddr="):
            return socket.gethostbyname(word.split("=", 1)[1])
    return socket.gethostbyname(socket.gethostname())


def free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def local_address(master: str) -> str:
    """This node's own address on its path to the master (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((master, 9))
        return str(sock.getsockname()[0])


def interface_of(address: str) -> str:
    try:
        out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    for line in out.splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[3].split("/")[0] == address:
            return parts[1]
    return ""


def write_json(path: str, data: dict[str, Any]) -> None:
    temp = f"{path}.{os.getpid()}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(temp, path)


def read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def master_of(job_dir: str, index: int, name: str, attempt: int) -> dict[str, Any]:
    path = os.path.join(job_dir, f"master-{attempt}.json")
    if index == 0:
        address = node_address(name)
        master = {"node": name, "address": address, "port": free_port(address)}
        write_json(path, master)
        return master
    end = time.monotonic() + MASTER_WAIT
    while time.monotonic() < end:
        found = read_json(path)
        if found:
            return found
        time.sleep(0.05)
    raise SystemExit(f"ava: {name}: the first node never published the rendezvous ({path})")


def fill(value: Any, tokens: dict[str, str]) -> Any:
    if isinstance(value, str):
        for token, text in tokens.items():
            value = value.replace(token, text)
        return value
    if isinstance(value, list):
        return [fill(v, tokens) for v in value]
    if isinstance(value, dict):
        return {fill(k, tokens): fill(v, tokens) for k, v in value.items()}
    return value


def slurm_gpus() -> list[int]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return [int(g) for g in visible.split(",") if g.strip().isdigit()]


def prefetch(agent: str, wanted: dict[str, Any], spec: dict[str, Any], run_dir: str, job: str) -> bool:
    """Warm the recipe's `[data] prefetch` into this node's cache. A node that cannot ends the
    job: its peers would otherwise wait for it at the rendezvous until its timeout."""
    env_file = os.path.join(run_dir, f"cache-env-{os.getpid()}.json")
    write_json(env_file, spec["env"])  # 0600, read and deleted by the agent's `cache` command
    argv = [sys.executable, agent, "cache", wanted["runtime"], env_file, "warm", *wanted["args"], "--", *wanted["urls"]]
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if os.path.exists(env_file):
        os.unlink(env_file)
    if done.returncode == 0:
        return True
    name = os.environ.get("SLURMD_NODENAME", "?")
    print(f"ava: {name}: prefetching {' '.join(wanted['urls'])} failed:\n{done.stdout[-2000:]}", file=sys.stderr)
    subprocess.run(["scancel", job])
    return False


def next_template(template_path: str, attempt: int, job: str) -> str | None:
    """The next attempt's template when ava restarts the run in this allocation (it names this
    job; a template for a new job after a lost node does not)."""
    path = os.path.join(os.path.dirname(template_path), f"attempt-{attempt + 1}.json")
    found = read_json(path)
    return path if found is not None and str(found.get("job") or "") == job else None


class Signals:
    """SIGTERM (scancel, the time limit), SIGINT, SIGHUP: noted, acted on in the loop."""

    def __init__(self) -> None:
        self.asked = False
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self.note)

    def note(self, _signum: int, _frame: Any) -> None:
        self.asked = True


def main(argv: list[str]) -> int:
    agent, template_path = argv[0], argv[1]
    signals = Signals()
    job = os.environ.get("SLURM_JOB_ID", "0")
    while True:
        template = read_json(template_path)
        if template is None:
            print(f"ava: cannot read the attempt's template {template_path}", file=sys.stderr)
            return 1
        attempt = int(template["attempt"])
        code = one_attempt(agent, template_path, template, job, signals)
        if code != 1:
            return code
        # Failed: ava may restart the run in this same allocation; wait for its word.
        end = time.monotonic() + NEXT_WAIT
        following = None
        while following is None and time.monotonic() < end and not signals.asked:
            following = next_template(template_path, attempt, job)
            time.sleep(0.2)
        if following is None:
            return 143 if signals.asked else 1
        template_path = following


def one_attempt(agent: str, template_path: str, template: dict[str, Any], job: str, signals: Signals) -> int:
    name = os.environ["SLURMD_NODENAME"]
    index = int(os.environ.get("SLURM_NODEID", "0"))
    attempt = int(template["attempt"])
    job_dir = os.path.join(os.path.dirname(template_path), f"job-{job}")
    os.makedirs(job_dir, mode=0o700, exist_ok=True)
    master = master_of(job_dir, index, name, attempt)
    mine = master["address"] if index == 0 else local_address(master["address"])
    tokens = {
        NODE: name,
        MASTER_ADDR: str(master["address"]),
        MASTER_PORT: str(master["port"]),
        ADDR: mine,
        IFACE: interface_of(mine) or "lo",
    }
    spec = fill(template["master" if index == 0 else "worker"], tokens)
    spec["gpus"]["allowed"] = slurm_gpus()
    workdir, run = spec["workdir"], spec["run"]
    run_dir = os.path.join(workdir, "runs", run)
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    spec_path = os.path.join(run_dir, f"spec-{attempt}.json")
    write_json(spec_path, spec)  # 0600: it holds the run's environment
    if template.get("prefetch") and not prefetch(agent, fill(template["prefetch"], tokens), spec, run_dir, job):
        return 1
    return supervise(agent, spec_path, workdir, run, attempt, template_path, job, signals)


def start(spec_path: str) -> int:
    """The agent's `start` of the attempt, in this process: one interpreter start less before
    torchrun (this program is the agent already). Its answer goes to this task's output."""
    from . import layout
    from . import main as agent

    # The agent's main takes the umask it finds as the job's (layout.JOB_UMASK) and narrows its
    # own: give it the one this program was started with, as a separate `start` would have.
    os.umask(layout.JOB_UMASK)
    return agent.main(["start", spec_path])


def supervise(
    agent: str, spec_path: str, workdir: str, run: str, attempt: int, template_path: str, job: str, signals: Signals
) -> int:
    python = sys.executable
    stop = [python, agent, "stop", workdir, run, "--grace", STOP_GRACE]
    # What an earlier attempt left here (a rank still hung when ava restarted the run) goes first.
    if any(n.startswith("attempt-") for n in os.listdir(os.path.join(workdir, "runs", run))):
        subprocess.run(stop, stdout=subprocess.DEVNULL)
    started = start(spec_path)
    status_path = os.path.join(workdir, "runs", run, f"attempt-{attempt}", "status.json")
    checked = time.monotonic()
    while True:
        if signals.asked:
            subprocess.run(stop, stdout=subprocess.DEVNULL)
            return 143
        status = read_json(status_path)
        if status is None and started != 0:
            return 1
        if status and status.get("state") in FINAL:
            return 0 if status["state"] == SUCCEEDED else 1
        if next_template(template_path, attempt, job) is not None:
            return 1  # ava restarts the run while this node's attempt still runs: it is stopped first
        if time.monotonic() - checked > 5:
            # The agent's own status settles an attempt whose monitor died (here, on its node).
            checked = time.monotonic()
            subprocess.run(
                [python, agent, "status", workdir, run, "--attempt", str(attempt)], stdout=subprocess.DEVNULL
            )
        time.sleep(0.5)
